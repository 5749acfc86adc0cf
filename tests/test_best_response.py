"""best_response against closed forms, finite differences and second methods."""

import functools
import warnings

import equinox as eqx
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import stackjax as sj

pytestmark = pytest.mark.usefixtures("x64")

N_ACTION, N_LEADER = 4, 3


def _random_game(seed):
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(N_ACTION, N_ACTION))
    return {
        "curvature": jnp.asarray(m @ m.T / N_ACTION + np.eye(N_ACTION)),
        "mixing": jnp.asarray(rng.normal(size=(N_ACTION, N_LEADER))),
    }


def smooth_concave_utility(action, leader, context):
    """Strongly concave in the action, non-quadratic, smooth in leader and context."""
    target = context["mixing"] @ jnp.tanh(leader) + context["shift"]
    gap = action - target
    return (
        -0.5 * gap @ context["curvature"] @ gap
        - 0.1 * jnp.sum(jnp.logaddexp(action - context["shift"], context["shift"] - action))
        + 0.05 * jnp.sum(jnp.sin(action * leader[0]))
    )


def _central_difference(fun, x, h=1e-6):
    x = np.asarray(x, dtype=np.float64)
    out = []
    for i in range(x.size):
        e = np.zeros_like(x)
        e.flat[i] = h
        out.append((np.asarray(fun(jnp.asarray(x + e))) - np.asarray(fun(jnp.asarray(x - e)))) / (2 * h))
    return np.stack(out, axis=-1)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("bounds", ["interior", "active"])
def test_hypergradient_matches_finite_differences(seed, bounds):
    context = _random_game(seed) | {
        "shift": jnp.asarray(np.random.default_rng(seed + 10).normal(size=N_ACTION))
    }
    leader = jnp.asarray(np.random.default_rng(seed + 20).normal(size=N_LEADER))
    lower, upper = -10 * jnp.ones(N_ACTION), 10 * jnp.ones(N_ACTION)
    if bounds == "active":
        # Clamp coordinate 0 from above and 1 from below; leave the rest free.
        free = sj.best_response(smooth_concave_utility, leader, context, lower=lower, upper=upper)
        lower, upper = free - 1.0, free + 1.0
        upper, lower = upper.at[0].set(free[0] - 0.3), lower.at[1].set(free[1] + 0.3)

    def solve(leader, context=context):
        return sj.best_response(smooth_concave_utility, leader, context, lower=lower, upper=upper, tol=1e-12)

    action, info = sj.best_response(
        smooth_concave_utility, leader, context, lower=lower, upper=upper, tol=1e-12, return_info=True
    )
    assert bool(info.converged) and float(info.residual) <= 1e-12
    clamped = np.asarray((action <= lower + 1e-9) | (action >= upper - 1e-9))
    if bounds == "interior":
        assert not clamped.any()
    else:
        np.testing.assert_array_equal(clamped, [True, True, False, False])

    jac = np.asarray(jax.jacrev(solve)(leader))
    np.testing.assert_allclose(jac, _central_difference(solve, leader), rtol=1e-6, atol=1e-8)
    assert np.all(jac[clamped] == 0.0)

    # ... and with respect to the context, through grad of a scalar.
    shift_fun = lambda s: jnp.sum(solve(leader, context | {"shift": s}) ** 2)  # noqa: E731
    grad_shift = np.asarray(jax.grad(shift_fun)(context["shift"]))
    np.testing.assert_allclose(
        grad_shift, _central_difference(shift_fun, context["shift"]), rtol=1e-6, atol=1e-8
    )


def test_ridge_hyperparameter_gradient_matches_closed_form():
    rng = np.random.default_rng(0)
    x_train, x_valid = rng.normal(size=(60, 20)), rng.normal(size=(40, 20))
    w_true = rng.normal(size=20)
    y_train = x_train @ w_true + 0.5 * rng.normal(size=60)
    y_valid = x_valid @ w_true + 0.5 * rng.normal(size=40)
    data = {"x": jnp.asarray(x_train), "y": jnp.asarray(y_train)}

    def neg_ridge_loss(w, log_lam, d):
        return -(jnp.sum((d["x"] @ w - d["y"]) ** 2) + jnp.exp(log_lam) * jnp.sum(w**2))

    def validation_loss(log_lam):
        w = sj.best_response(neg_ridge_loss, log_lam, data, init=jnp.zeros(20), tol=1e-10)
        return jnp.sum((x_valid @ w - y_valid) ** 2)

    log_lam = jnp.log(3.0)
    lam = 3.0
    a = x_train.T @ x_train + lam * np.eye(20)
    w = np.linalg.solve(a, x_train.T @ y_train)
    dw_dlam = -np.linalg.solve(a, w)
    expected = 2 * (x_valid @ w - y_valid) @ (x_valid @ dw_dlam) * lam  # chain rule through exp
    np.testing.assert_allclose(
        float(validation_loss(log_lam)), np.sum((x_valid @ w - y_valid) ** 2), rtol=1e-10
    )
    np.testing.assert_allclose(float(jax.grad(validation_loss)(log_lam)), expected, rtol=1e-7)


def _qp_utility(action, linear, quad):
    return -0.5 * action @ quad @ action + linear @ action


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
    width=st.floats(0.05, 3.0),
)
def test_box_qp_solution_and_jacobian_match_kkt_closed_form(n, seed, width):
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(n, n))
    quad = m @ m.T + 0.5 * np.eye(n)
    linear = rng.normal(size=n) * 2
    lower = -width * rng.uniform(0.2, 1.0, size=n)
    upper = width * rng.uniform(0.2, 1.0, size=n)

    solve = lambda lin: sj.best_response(  # noqa: E731
        _qp_utility, lin, jnp.asarray(quad), lower=jnp.asarray(lower), upper=jnp.asarray(upper), tol=1e-11
    )
    action, info = sj.best_response(
        _qp_utility,
        jnp.asarray(linear),
        jnp.asarray(quad),
        lower=lower,
        upper=upper,
        tol=1e-11,
        return_info=True,
    )
    assert bool(info.converged)
    action = np.asarray(action)

    # Second method: scipy's L-BFGS-B on the same strictly convex problem.
    ref = scipy.optimize.minimize(
        lambda a: 0.5 * a @ quad @ a - linear @ a,
        np.zeros(n),
        jac=lambda a: quad @ a - linear,
        bounds=list(zip(lower, upper, strict=True)),
        method="L-BFGS-B",
        options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 10_000},
    )
    np.testing.assert_allclose(action, ref.x, atol=1e-6)

    # KKT closed form for the Jacobian: zero on the active set, Q_FF^{-1} on the free set.
    grad = linear - quad @ action
    at_lower, at_upper = action <= lower + 1e-9, action >= upper - 1e-9
    assume(np.all(np.abs(grad[at_lower | at_upper]) > 1e-6))  # strict complementarity
    free = ~(at_lower | at_upper)
    expected = np.zeros((n, n))
    if free.any():
        expected[np.ix_(free, free)] = np.linalg.inv(quad[np.ix_(free, free)])
    np.testing.assert_allclose(np.asarray(jax.jacrev(solve)(jnp.asarray(linear))), expected, atol=1e-8)


def test_large_action_uses_first_order_solver_and_iterative_implicit_solve():
    n = 600
    quad = 3 * np.eye(n) + 0.5 * (np.eye(n, k=1) + np.eye(n, k=-1))
    rng = np.random.default_rng(1)
    linear = jnp.asarray(rng.normal(size=n) * 3)
    lower, upper = -jnp.ones(n), jnp.ones(n)

    def solve(lin):
        return sj.best_response(_qp_utility, lin, jnp.asarray(quad), lower=lower, upper=upper, tol=1e-10)

    action, info = sj.best_response(
        _qp_utility, linear, jnp.asarray(quad), lower=lower, upper=upper, tol=1e-10, return_info=True
    )
    assert bool(info.converged) and int(info.steps) > 1
    probe = jnp.asarray(rng.normal(size=n))
    grad = np.asarray(jax.grad(lambda lin: probe @ solve(lin))(linear))
    free = np.asarray((action > lower + 1e-8) & (action < upper - 1e-8))
    expected = np.zeros(n)
    expected[free] = np.linalg.solve(quad[np.ix_(free, free)], np.asarray(probe)[free])
    np.testing.assert_allclose(grad, expected, atol=1e-6)


def test_solvers_agree_with_each_other_and_with_jaxopt():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import jaxopt
    context = _random_game(3) | {"shift": jnp.linspace(-1, 1, N_ACTION)}
    leader = jnp.array([0.3, -0.2, 0.5])
    box = {"lower": -0.5 * jnp.ones(N_ACTION), "upper": 0.5 * jnp.ones(N_ACTION), "tol": 1e-10}
    newton = sj.best_response(smooth_concave_utility, leader, context, solver="newton", **box)
    spg = sj.best_response(smooth_concave_utility, leader, context, solver="spg", **box)
    lbfgsb = sj.best_response(
        smooth_concave_utility,
        leader,
        context,
        solver=functools.partial(jaxopt.LBFGSB, tol=1e-12, maxiter=500),
        **box,
    )
    np.testing.assert_allclose(spg, newton, atol=1e-8)
    np.testing.assert_allclose(lbfgsb, newton, atol=1e-7)
    unconstrained = sj.best_response(
        smooth_concave_utility, leader, context, init=jnp.zeros(N_ACTION), tol=1e-10
    )
    lbfgs = sj.best_response(
        smooth_concave_utility,
        leader,
        context,
        init=jnp.zeros(N_ACTION),
        solver=jaxopt.LBFGS(fun=lambda x: 0.0, tol=1e-12, maxiter=500),
    )
    np.testing.assert_allclose(lbfgs, unconstrained, atol=1e-7)
    # Gradients go through stackjax's own implicit differentiation whatever the solver.
    g_newton = jax.grad(lambda lead: jnp.sum(sj.best_response(smooth_concave_utility, lead, context, **box)))(
        leader
    )
    g_lbfgsb = jax.grad(
        lambda lead: jnp.sum(
            sj.best_response(
                smooth_concave_utility,
                lead,
                context,
                solver=jaxopt.LBFGSB(fun=lambda x: 0.0, tol=1e-12),
                **box,
            )
        )
    )(leader)
    np.testing.assert_allclose(g_lbfgsb, g_newton, atol=1e-6)


def test_utility_module_parameters_receive_gradients():
    class Quadratic(eqx.Module):
        centre: jax.Array

        def __call__(self, action, leader, context):
            return -jnp.sum((action - self.centre * leader) ** 2)

    model = Quadratic(jnp.array([0.2, 0.4]))
    grads = jax.grad(
        lambda m: jnp.sum(sj.best_response(m, 2.0, None, lower=jnp.zeros(2), upper=jnp.ones(2)))
    )(model)
    # a* = clip(2 * centre, 0, 1) = (0.4, 0.8): d/dcentre of the sum = (2, 2).
    np.testing.assert_allclose(grads.centre, [2.0, 2.0], rtol=1e-9)


def test_nonconcave_utility_still_reaches_a_stationary_point():
    def double_well(action, leader, context):
        return -jnp.sum((action**2 - 1.0) ** 2) + leader * jnp.sum(action)

    action, info = sj.best_response(double_well, 0.1, None, init=jnp.array([0.01, -0.02]), return_info=True)
    assert bool(info.converged)
    grad = jax.grad(double_well)(action, 0.1, None)
    assert float(jnp.max(jnp.abs(grad))) < 1e-8


def test_non_convergence_is_flagged():
    context = _random_game(0) | {"shift": jnp.ones(N_ACTION)}
    _, info = sj.best_response(
        smooth_concave_utility, jnp.ones(3), context, init=jnp.zeros(N_ACTION), max_steps=1, return_info=True
    )
    assert not bool(info.converged)
    assert int(info.steps) == 1
    assert float(info.residual) > 1e-9
    assert not bool(info.nonfinite)


def test_nan_context_is_flagged_per_session():
    context = _random_game(0)
    shifts = jnp.stack([jnp.zeros(N_ACTION), jnp.full(N_ACTION, jnp.nan), jnp.ones(N_ACTION)])

    def solve(shift):
        return sj.best_response(
            smooth_concave_utility,
            jnp.ones(3),
            context | {"shift": shift},
            lower=-jnp.ones(N_ACTION),
            upper=jnp.ones(N_ACTION),
            return_info=True,
        )

    _, info = jax.jit(jax.vmap(solve))(shifts)
    np.testing.assert_array_equal(info.nonfinite, [False, True, False])
    np.testing.assert_array_equal(info.converged, [True, False, True])
    assert np.isinf(info.residual[1])


class _Counter:
    def __init__(self):
        self.traces = 0

    def utility(self, action, leader, context):
        self.traces += 1
        return -jnp.sum((action - leader * context) ** 2)


def test_jit_vmap_grad_compose_and_compile_once_per_shape():
    counter = _Counter()

    @jax.jit
    def mean_action_grad(leaders, contexts):
        def loss(leaders):
            actions = jax.vmap(
                lambda lead, ctx: sj.best_response(
                    counter.utility, lead, ctx, lower=jnp.zeros(3), upper=jnp.ones(3)
                )
            )(leaders, contexts)
            return jnp.mean(jnp.sum(actions, axis=1))

        return jax.grad(loss)(leaders)

    contexts = jnp.linspace(0.1, 0.3, 15).reshape(5, 3)
    g1 = mean_action_grad(jnp.ones(5), contexts)
    traces = counter.traces
    assert traces > 0
    g2 = mean_action_grad(2 * jnp.ones(5), 0.5 * contexts)
    assert counter.traces == traces, "same shapes must not retrace"
    mean_action_grad(jnp.ones(7), jnp.ones((7, 3)) * 0.1)
    assert counter.traces > traces, "a new shape compiles once more"
    # a* = leader * context (interior): d mean(sum a*) / d leader_i = sum(context_i) / sessions.
    np.testing.assert_allclose(g1, np.sum(np.asarray(contexts), axis=1) / 5, rtol=1e-8)
    np.testing.assert_allclose(g2, 0.5 * np.sum(np.asarray(contexts), axis=1) / 5, rtol=1e-8)


def test_bad_input_raises_before_tracing():
    counter = _Counter()
    u = counter.utility
    with pytest.raises(ValueError, match="lower must be <= upper"):
        sj.best_response(u, 1.0, 1.0, lower=jnp.ones(3), upper=jnp.zeros(3))
    with pytest.raises(ValueError, match="upper"):
        sj.best_response(u, 1.0, 1.0, lower=jnp.zeros(3), upper=jnp.ones(2))
    with pytest.raises(ValueError, match="init"):
        sj.best_response(u, 1.0, 1.0, lower=jnp.zeros(3), init=jnp.zeros(4))
    with pytest.raises(ValueError, match="action's shape"):
        sj.best_response(u, 1.0, 1.0, lower=0.0, upper=1.0)
    with pytest.raises(ValueError, match="solver"):
        sj.best_response(u, 1.0, 1.0, init=jnp.zeros(3), solver="bogus")
    with pytest.raises(ValueError, match="tol"):
        sj.best_response(u, 1.0, 1.0, init=jnp.zeros(3), tol=-1.0)
    with pytest.raises(TypeError, match="init"):
        sj.best_response(u, 1.0, 1.0, init=["a", "b"])
    assert counter.traces == 0
    with pytest.raises(TypeError, match="utility"):
        sj.best_response("not a function", 1.0, 1.0, init=jnp.zeros(3))
    with pytest.raises(ValueError, match="utility: must return a scalar"):
        sj.best_response(lambda a, lead, c: a * lead, 1.0, 1.0, init=jnp.zeros(3))
    with pytest.raises(TypeError, match="utility"):
        sj.best_response(lambda a, lead, c: (a.sum(), a.sum()), 1.0, 1.0, init=jnp.zeros(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import jaxopt
    with pytest.raises(ValueError, match="solver"):
        sj.best_response(u, 1.0, 1.0, lower=jnp.zeros(3), solver=jaxopt.LBFGS)


def _separable(action, centre, _):
    return -jnp.sum((action - centre) ** 2)


@settings(max_examples=25, deadline=None)
@given(
    lower=hnp.arrays(np.float64, 3, elements=st.floats(-5, 5)),
    width=hnp.arrays(np.float64, 3, elements=st.floats(0, 5)),
    centre=hnp.arrays(np.float64, 3, elements=st.floats(-10, 10)),
)
def test_separable_projection_property(lower, width, centre):
    """For a separable quadratic the best response is the clipped centre, exactly."""
    upper = lower + width
    action = sj.best_response(_separable, jnp.asarray(centre), None, lower=lower, upper=upper)
    np.testing.assert_allclose(action, np.clip(centre, lower, upper), atol=1e-9)


def _matrix_utility(action, leader, context):
    return -jnp.sum((action - leader * context) ** 2) - 0.1 * jnp.sum(action**4)


def test_matrix_shaped_action_keeps_its_shape_and_gradient():
    context = jnp.arange(6.0).reshape(2, 3) / 6
    action = sj.best_response(_matrix_utility, 1.5, context, lower=jnp.zeros((2, 3)), upper=0.5)
    assert action.shape == (2, 3)
    # Separable: each entry solves 2 (a - l x) + 0.4 a^3 = 0, or sits at the upper bound 0.5.
    target = 1.5 * np.asarray(context)
    residual = 2 * (np.asarray(action) - target) + 0.4 * np.asarray(action) ** 3
    interior = np.asarray(action) < 0.5 - 1e-9
    np.testing.assert_allclose(residual[interior], 0.0, atol=1e-9)
    assert np.all(residual[~interior] < 0)
    grad = jax.grad(
        lambda lead: jnp.sum(
            sj.best_response(_matrix_utility, lead, context, lower=0.0, upper=0.5 + 0 * context)
        )
    )(1.5)
    a = np.asarray(action)
    # Implicit derivative per interior entry: da/dl = 2 x / (2 + 1.2 a^2).
    expected = np.sum(np.where(interior, 2 * np.asarray(context) / (2 + 1.2 * a**2), 0.0))
    np.testing.assert_allclose(grad, expected, rtol=1e-8)


def test_utility_closing_over_traced_values_gets_their_gradients():
    def total(weights):
        utility = lambda a, lead, ctx: -jnp.sum((a - weights * lead) ** 2)  # noqa: E731
        return jnp.sum(sj.best_response(utility, 2.0, None, init=jnp.zeros(2)) ** 2)

    # a* = 2 w, so d sum(a*^2) / dw = 8 w.
    weights = jnp.array([0.3, -0.4])
    np.testing.assert_allclose(jax.jit(jax.grad(total))(weights), 8 * weights, rtol=1e-8)
