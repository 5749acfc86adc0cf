"""The leader's problem: gradient ascent through the follower's implicit best response."""

import dataclasses
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Bool, Float, Int, PyTree

from . import _solvers, _validate
from ._best_response import BestResponseInfo, best_response


class LeaderSolution(eqx.Module):
    """What `solve_leader` returns.

    Attributes:
        leader: the optimised commitment (same structure as `leader_init`: one
            commitment, one per session, or the trained policy module).
        actions: the followers' best responses to it, shape `(sessions, *action)`.
        value: mean leader utility over sessions at `leader`.
        session_values: leader utility per session.
        converged: the leader is stationary (`leader_residual <= tol`) and every
            follower converged.
        leader_converged: the leader alone is stationary.
        leader_residual: projected-gradient residual of the leader's objective
            (plain gradient norm for a policy).
        follower_info: `BestResponseInfo` per session at `leader`.
        history: mean leader utility at each iterate, starting with `leader_init`.
        steps: leader iterations taken.
    """

    leader: PyTree
    actions: Float[Array, "sessions ..."]
    value: Float[Array, ""]
    session_values: Float[Array, " sessions"]
    converged: Bool[Array, ""]
    leader_converged: Bool[Array, ""]
    leader_residual: Float[Array, ""]
    follower_info: BestResponseInfo
    history: Float[np.ndarray, " steps_plus_one"]
    steps: Int[Array, ""]


@dataclasses.dataclass(frozen=True)
class _Problem:
    """Everything static about one leader problem (hashable: it keys the jit cache)."""

    leader_utility: Callable
    follower_utility: Callable
    mode: str  # "shared", "per_session" or "policy"
    follower_solver: Any
    follower_tol: float | None
    follower_max_steps: int | None
    optimizer: Any
    steps: int
    tol: float


def _session_leaders(problem, leader, contexts, leader_lower, leader_upper):
    """The commitment each session sees, and its vmap axis."""
    if problem.mode == "policy":
        raw = jax.vmap(leader)(contexts)
        return optax.projections.projection_box(raw, leader_lower, leader_upper), 0
    return leader, (0 if problem.mode == "per_session" else None)


def _evaluate(problem, params, static, contexts, bounds):
    """Leader loss (to minimise) and, as aux, actions, follower info and per-session utilities."""
    follower_lower, follower_upper, follower_init, leader_lower, leader_upper = bounds
    leader = eqx.combine(params, static)
    leaders, axis = _session_leaders(problem, leader, contexts, leader_lower, leader_upper)

    def follower(lead, ctx):
        return best_response(
            problem.follower_utility,
            lead,
            ctx,
            lower=follower_lower,
            upper=follower_upper,
            init=follower_init,
            solver=problem.follower_solver,
            tol=problem.follower_tol,
            max_steps=problem.follower_max_steps,
            return_info=True,
        )

    actions, info = jax.vmap(follower, in_axes=(axis, 0))(leaders, contexts)
    utilities = jax.vmap(problem.leader_utility, in_axes=(0, axis, 0))(actions, leaders, contexts)
    # Per-session commitments are independent problems: summing keeps each one's
    # gradient at its own scale instead of shrinking it by 1/sessions.
    loss = -jnp.sum(utilities) if problem.mode == "per_session" else -jnp.mean(utilities)
    return loss, (actions, info, utilities)


def _leader_residual(problem, params, grads, lower, upper):
    if problem.mode == "policy":
        flat, _ = ravel_pytree(grads)
        return jnp.max(jnp.abs(flat), initial=0.0)
    stepped = jax.tree_util.tree_map(lambda p, g: p - g, params, grads)
    projected = optax.projections.projection_box(stepped, lower, upper)
    diff, _ = ravel_pytree(jax.tree_util.tree_map(jnp.subtract, params, projected))
    return jnp.max(jnp.abs(diff), initial=0.0)


def _optimise_spg(problem, params, static, contexts, bounds):
    flat0, unravel = ravel_pytree(params)
    if problem.mode == "policy":
        lo = jnp.full_like(flat0, -jnp.inf)
        hi = jnp.full_like(flat0, jnp.inf)
    else:
        lo, _ = ravel_pytree(bounds[3])
        hi, _ = ravel_pytree(bounds[4])
    fun = lambda flat: _evaluate(problem, unravel(flat), static, contexts, bounds)[0]  # noqa: E731
    flat, stats, history = _solvers.spectral_projected_gradient(
        fun, flat0, lo, hi, tol=problem.tol, max_steps=problem.steps, record_history=True
    )
    return unravel(flat), stats.steps, -history


def _optimise_optax(problem, params, static, contexts, bounds):
    optimizer = problem.optimizer
    leader_lower, leader_upper = bounds[3], bounds[4]
    loss = lambda p: _evaluate(problem, p, static, contexts, bounds)[0]  # noqa: E731
    value_and_grad = jax.value_and_grad(loss)
    extra_args = isinstance(optimizer, optax.GradientTransformationExtraArgs)

    value0, grads0 = value_and_grad(params)
    history = jnp.full((problem.steps + 1,), jnp.nan, value0.dtype).at[0].set(-value0)
    residual0 = _leader_residual(problem, params, grads0, leader_lower, leader_upper)
    init = (params, optimizer.init(params), value0, grads0, residual0, jnp.zeros((), jnp.int32), history)

    def cond(carry):
        *_, value, _, residual, k, _ = carry
        return (residual > problem.tol) & (k < problem.steps) & jnp.isfinite(value)

    def body(carry):
        params, state, value, grads, _, k, history = carry
        kwargs = {"value": value, "grad": grads, "value_fn": loss} if extra_args else {}
        updates, state = optimizer.update(grads, state, params, **kwargs)
        params = optax.apply_updates(params, updates)
        if problem.mode != "policy":
            params = optax.projections.projection_box(params, leader_lower, leader_upper)
        value, grads = value_and_grad(params)
        residual = _leader_residual(problem, params, grads, leader_lower, leader_upper)
        return params, state, value, grads, residual, k + 1, history.at[k + 1].set(-value)

    params, *_, k, history = jax.lax.while_loop(cond, body, init)
    return params, k, history


@eqx.filter_jit
def _solve(problem, params, static, contexts, bounds):
    if problem.optimizer is None:
        params, steps, history = _optimise_spg(problem, params, static, contexts, bounds)
    else:
        params, steps, history = _optimise_optax(problem, params, static, contexts, bounds)
    (loss, (actions, info, utilities)), grads = jax.value_and_grad(
        lambda p: _evaluate(problem, p, static, contexts, bounds), has_aux=True
    )(params)
    residual = _leader_residual(problem, params, grads, bounds[3], bounds[4])
    residual = jnp.where(jnp.isfinite(loss), residual, jnp.inf)
    return params, actions, info, utilities, residual, steps, history


def _leader_bounds(bound: Any, params: PyTree, name: str, default: float, per_session: bool):
    """Broadcast `bound` (None, a scalar, or a pytree like one commitment) to `params`."""
    if bound is None:
        return jax.tree_util.tree_map(lambda p: jnp.full_like(p, default), params)
    leaves = jax.tree_util.tree_leaves(bound)
    if len(leaves) == 1 and np.ndim(leaves[0]) == 0 and not isinstance(bound, (dict, list, tuple)):
        value = _validate.as_float_array(bound, name)
        return jax.tree_util.tree_map(lambda p: jnp.broadcast_to(value, p.shape).astype(p.dtype), params)
    try:
        return jax.tree_util.tree_map(
            lambda p, b: jnp.broadcast_to(_validate.as_float_array(b, name), p.shape).astype(p.dtype),
            params,
            bound,
        )
    except ValueError as err:
        what = "one commitment (or per session)" if per_session else "leader_init"
        raise ValueError(
            f"{name}: must be a scalar or match the structure and shape of {what}: {err}"
        ) from None


def solve_leader(
    leader_utility: Callable[[Array, PyTree, PyTree], Float[Array, ""]],
    follower_utility: Callable[[Array, PyTree, PyTree], Float[Array, ""]],
    leader_init: PyTree,
    contexts: PyTree,
    *,
    lower: Float[Array, "..."] | float | None = None,
    upper: Float[Array, "..."] | float | None = None,
    init: Float[Array, "..."] | None = None,
    leader_lower: PyTree | float | None = None,
    leader_upper: PyTree | float | None = None,
    per_session: bool = False,
    optimizer: optax.GradientTransformation | None = None,
    steps: int | None = None,
    tol: float | None = None,
    follower_solver: Any = "auto",
    follower_tol: float | None = None,
    follower_max_steps: int | None = None,
) -> LeaderSolution:
    """Maximise the mean over sessions of `leader_utility(a*, leader, context)`.

    `a* = best_response(follower_utility, leader, context, ...)` for each session,
    differentiated implicitly; the whole optimisation loop runs compiled, and a
    second call with the same functions and shapes reuses the compilation.

    Arguments:
        leader_utility: `(action, leader, context) -> scalar` the leader maximises.
        follower_utility: `(action, leader, context) -> scalar` each follower maximises.
        leader_init: the starting commitment (a pytree of arrays); with
            `per_session=True`, one per session along a leading axis; or a callable
            `eqx.Module` policy `context -> commitment`, whose parameters are trained.
        contexts: pytree whose leaves share a leading session axis.
        lower, upper, init: the follower's action box and starting action, as in
            `best_response` (shared by all sessions).
        leader_lower, leader_upper: the leader's box: scalars or pytrees shaped like
            one commitment. Enforced by projection after every step (on the policy's
            outputs for a policy).
        per_session: give every session its own commitment.
        optimizer: any optax optimizer (`optax.lbfgs()` gets its line-search
            arguments). Default: spectral projected gradient with a non-monotone
            line search, which needs no learning rate.
        steps: iteration cap (default 200 for the default optimizer, 1000 for optax).
        tol: stop when the leader's projected-gradient residual is at most `tol`
            (default 1e-4 in float32, 1e-8 in float64).
        follower_solver, follower_tol, follower_max_steps: passed to `best_response`.

    Returns:
        A `LeaderSolution`.
    """
    _validate.check_callable(leader_utility, "leader_utility")
    _validate.check_callable(follower_utility, "follower_utility")
    sessions = _validate.leading_size(contexts, "contexts")
    is_policy = isinstance(leader_init, eqx.Module) and callable(leader_init)
    if is_policy and per_session:
        raise ValueError("per_session: a policy leader_init already gives each session its own commitment")
    mode = "policy" if is_policy else ("per_session" if per_session else "shared")
    if optimizer is not None and not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise TypeError(
            f"optimizer: expected an optax GradientTransformation, got {type(optimizer).__name__}"
        )
    if steps is None:
        steps = 200 if optimizer is None else 1000
    if int(steps) < 1:
        raise ValueError(f"steps: must be >= 1, got {steps}")

    box = _validate.resolve_box(lower, upper, init)
    follower_lower = None if lower is None else box.lower
    follower_upper = None if upper is None else box.upper
    one_context = jax.tree_util.tree_map(lambda c: c[0], contexts)

    if is_policy:
        params, static = eqx.partition(leader_init, eqx.is_inexact_array)
        if not jax.tree_util.tree_leaves(params):
            raise ValueError("leader_init: the policy module has no floating-point parameters to train")
        one_leader = jax.eval_shape(leader_init, one_context)
        dtype = jax.tree_util.tree_leaves(params)[0].dtype
        shape_like = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), one_leader)
        leader_lower_tree = _leader_bounds(leader_lower, shape_like, "leader_lower", -jnp.inf, False)
        leader_upper_tree = _leader_bounds(leader_upper, shape_like, "leader_upper", jnp.inf, False)
    else:
        params = jax.tree_util.tree_map(lambda x: _validate.as_float_array(x, "leader_init"), leader_init)
        static = None
        if not jax.tree_util.tree_leaves(params):
            raise ValueError("leader_init: expected a pytree of arrays, got no arrays")
        if per_session:
            size = _validate.leading_size(params, "leader_init")
            if size != sessions:
                raise ValueError(
                    f"leader_init: per_session=True needs a leading axis of {sessions} sessions "
                    f"(the size of contexts), got {size}"
                )
            one_leader = jax.tree_util.tree_map(lambda p: p[0], params)
        else:
            one_leader = params
        dtype = jax.tree_util.tree_leaves(params)[0].dtype
        leader_lower_tree = _leader_bounds(leader_lower, params, "leader_lower", -jnp.inf, per_session)
        leader_upper_tree = _leader_bounds(leader_upper, params, "leader_upper", jnp.inf, per_session)
        low, _ = ravel_pytree(leader_lower_tree)
        high, _ = ravel_pytree(leader_upper_tree)
        if bool(jnp.any(low > high)):
            raise ValueError("leader_lower must be <= leader_upper everywhere")
        params = optax.projections.projection_box(params, leader_lower_tree, leader_upper_tree)

    one_action = jax.ShapeDtypeStruct(box.init.shape, box.init.dtype)
    _validate.check_scalar_output(
        jax.eval_shape(follower_utility, one_action, one_leader, one_context), "follower_utility"
    )
    _validate.check_scalar_output(
        jax.eval_shape(leader_utility, one_action, one_leader, one_context), "leader_utility"
    )

    problem = _Problem(
        leader_utility=leader_utility,
        follower_utility=follower_utility,
        mode=mode,
        follower_solver=follower_solver,
        follower_tol=follower_tol,
        follower_max_steps=follower_max_steps,
        optimizer=optimizer,
        steps=int(steps),
        tol=float(tol) if tol is not None else (1e-8 if jnp.finfo(dtype).bits >= 64 else 1e-4),
    )
    bounds = (follower_lower, follower_upper, box.init, leader_lower_tree, leader_upper_tree)
    params, actions, info, utilities, residual, steps_taken, history = _solve(
        problem, params, static, contexts, bounds
    )
    leader = eqx.combine(params, static) if is_policy else params
    history = np.asarray(history)[: int(steps_taken) + 1]
    if per_session:
        history = history / sessions
    leader_converged = residual <= problem.tol
    return LeaderSolution(
        leader=leader,
        actions=actions,
        value=jnp.mean(utilities),
        session_values=utilities,
        converged=leader_converged & jnp.all(info.converged),
        leader_converged=leader_converged,
        leader_residual=residual,
        follower_info=info,
        history=history,
        steps=steps_taken,
    )
