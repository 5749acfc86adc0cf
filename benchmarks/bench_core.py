"""Core benchmark: leader value + exact hypergradient over N sessions, four ways, one run.

Problem: a 3-dimensional box-constrained follower (a in [0, 1]^3, strongly concave,
non-quadratic) and a 2-dimensional shared leader l = (quality target, subsidy);
J(l) = mean over sessions of the leader's utility at the followers' best responses.
Every method stops its inner solves at the same tolerance (projected-gradient
fixed-point residual <= 1e-6, float64) and the table reports the residual it reached.

  (i)   stackjax: jit(value_and_grad(mean(vmap(best_response)))) - projected Newton,
        implicit differentiation.
  (ii)  what a user would otherwise write: a per-session scipy L-BFGS-B loop with a
        central finite-difference hypergradient (5 solves per session).
  (iii) jax.vmap of a jaxopt solver with implicit_diff=True (ProjectedGradient, LBFGSB).
  (iv)  (i)'s Newton iterations differentiated by unrolling them (lax.scan).

Then peak memory of (i) vs (iv) as max_steps grows (XLA's compiled buffer plan).

    python benchmarks/bench_core.py            # N in 1e3, 1e4, 1e5
    python benchmarks/bench_core.py --quick    # N = 1e3 only
"""

import argparse
import sys
import time
import warnings

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import scipy.optimize  # noqa: E402

import stackjax as sj  # noqa: E402
from stackjax import _solvers  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import jaxopt

TOL = 1e-6
LOWER, UPPER = jnp.zeros(3), jnp.ones(3)
LEADER = jnp.array([0.7, 0.3])
SHARPNESS = 10.0


# ---------------------------------------------------------------- the game (JAX)
def quality(a, x):
    return 1.0 - jnp.exp(-(x["gain"] @ a) - 0.2)


def tokens(a, x):
    return x["base"] + x["price"] @ a + 0.5 * a @ (x["curv"] * a)


def follower(a, leader, x):
    target, subsidy = leader[0], leader[1]
    q = quality(a, x)
    shortfall = jax.nn.softplus(SHARPNESS * (target - q)) / SHARPNESS
    return q - 2.0 * shortfall - (1.0 - subsidy) * 0.3 * tokens(a, x) - 0.05 * a @ a


def leader_utility(a, leader, x):
    return 3.0 * quality(a, x) - 0.5 * tokens(a, x) - 0.1 * leader[1] ** 2


def make_contexts(n, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    return {
        "gain": jax.random.uniform(ks[0], (n, 3), minval=0.3, maxval=2.0),
        "price": jax.random.uniform(ks[1], (n, 3), minval=0.1, maxval=1.5),
        "curv": jax.random.uniform(ks[2], (n, 3), minval=0.5, maxval=2.0),
        "base": jax.random.uniform(ks[3], (n,), minval=0.1, maxval=1.0),
    }


# ---------------------------------------------------------------- (i) stackjax
def make_stackjax(max_steps=50):
    def objective(leader, contexts):
        actions, info = jax.vmap(
            lambda x: sj.best_response(
                follower, leader, x, lower=LOWER, upper=UPPER, tol=TOL, max_steps=max_steps, return_info=True
            )
        )(contexts)
        values = jax.vmap(leader_utility, in_axes=(0, None, 0))(actions, leader, contexts)
        return jnp.mean(values), (actions, info.steps)

    return jax.jit(jax.value_and_grad(objective, has_aux=True))


# ---------------------------------------------------------------- (iii) jaxopt under vmap
# jaxopt stops on its own error measure; these are the loosest settings that bring
# the projected-gradient residual to <= TOL on this problem (checked in the table).
JAXOPT_TOL = {"ProjectedGradient": 1e-8, "LBFGSB": TOL}


def make_jaxopt(kind):
    neg = lambda a, leader, x: -follower(a, leader, x)  # noqa: E731
    tol = JAXOPT_TOL[kind]
    if kind == "ProjectedGradient":
        solver = jaxopt.ProjectedGradient(
            fun=neg, projection=jaxopt.projection.projection_box, tol=tol, maxiter=2000, implicit_diff=True
        )
    else:
        solver = jaxopt.LBFGSB(fun=neg, tol=tol, maxiter=2000, implicit_diff=True)

    def objective(leader, contexts):
        def one(x):
            return solver.run(0.5 * jnp.ones(3), (LOWER, UPPER), leader, x)

        sol = jax.vmap(one)(contexts)
        actions = sol.params
        values = jax.vmap(leader_utility, in_axes=(0, None, 0))(actions, leader, contexts)
        return jnp.mean(values), (actions, sol.state.iter_num)

    return jax.jit(jax.value_and_grad(objective, has_aux=True))


# ---------------------------------------------------------------- (iv) unrolled
BACKTRACKS = 0.5 ** jnp.arange(8)


def unrolled_best_response(leader, x, steps):
    """(i)'s projected Newton, with its line search as a fixed set of trial steps, unrolled."""
    fun = lambda a: -follower(a, leader, x)  # noqa: E731

    def step(a, _):
        f, g = jax.value_and_grad(fun)(a)
        r = _solvers.projected_residual(a, g, LOWER, UPPER)
        d = _solvers.newton_direction(a, g, jax.hessian(fun)(a), LOWER, UPPER, jnp.minimum(r, 1e-2))
        trials = jnp.clip(a + BACKTRACKS[:, None] * d, LOWER, UPPER)
        f_trials = jax.vmap(fun)(trials)
        ok = f_trials <= f + 1e-4 * (trials - a) @ g + 8 * jnp.finfo(f.dtype).eps * (1 + jnp.abs(f))
        best = trials[jnp.argmax(ok)]
        return jnp.where(jnp.any(ok) & (r > TOL), best, a), None

    a, _ = jax.lax.scan(step, 0.5 * jnp.ones(3), None, length=steps)
    return a


def make_unrolled(steps):
    def objective(leader, contexts):
        actions = jax.vmap(lambda x: unrolled_best_response(leader, x, steps))(contexts)
        values = jax.vmap(leader_utility, in_axes=(0, None, 0))(actions, leader, contexts)
        return jnp.mean(values), (actions, jnp.full(actions.shape[0], steps))

    return jax.jit(jax.value_and_grad(objective, has_aux=True))


# ---------------------------------------------------------------- (ii) scipy loop
def _np_parts(a, leader, x):
    gain, price, curv, base = x
    e = np.exp(-(gain @ a) - 0.2)
    q, dq = 1.0 - e, e * gain
    t, dt = base + price @ a + 0.5 * a @ (curv * a), price + curv * a
    z = SHARPNESS * (leader[0] - q)
    shortfall = np.logaddexp(0.0, z) / SHARPNESS
    sig = 0.5 * (1.0 + np.tanh(0.5 * z))
    return q, dq, t, dt, shortfall, sig


def np_neg_follower(a, leader, x):
    q, dq, t, dt, shortfall, sig = _np_parts(a, leader, x)
    c = (1.0 - leader[1]) * 0.3
    value = q - 2.0 * shortfall - c * t - 0.05 * a @ a
    grad = dq + 2.0 * sig * dq - c * dt - 0.1 * a
    return -value, -grad


def np_leader(a, leader, x):
    q, _, t, *_ = _np_parts(a, leader, x)
    return 3.0 * q - 0.5 * t - 0.1 * leader[1] ** 2


def scipy_solve(leader, x):
    res = scipy.optimize.minimize(
        np_neg_follower,
        0.5 * np.ones(3),
        args=(leader, x),
        jac=True,
        method="L-BFGS-B",
        bounds=[(0.0, 1.0)] * 3,
        options={"gtol": TOL, "ftol": 0.0, "maxiter": 1000},
    )
    return res.x


def scipy_value_and_fd_grad(leader, contexts, h=1e-4):
    leader = np.asarray(leader)
    n = contexts[0].shape[0]
    value, grad, actions = 0.0, np.zeros(2), np.zeros((n, 3))
    for s in range(n):
        x = tuple(c[s] for c in contexts)
        actions[s] = scipy_solve(leader, x)
        value += np_leader(actions[s], leader, x)
        for k in range(2):
            e = np.zeros(2)
            e[k] = h
            up = np_leader(scipy_solve(leader + e, x), leader + e, x)
            down = np_leader(scipy_solve(leader - e, x), leader - e, x)
            grad[k] += (up - down) / (2 * h)
    return value / n, grad / n, actions


# ---------------------------------------------------------------- measurement
def residuals(actions, contexts):
    g = jax.vmap(lambda a, x: jax.grad(follower)(a, LEADER, x))(actions, contexts)
    return jax.vmap(lambda a, gg: _solvers.projected_residual(a, -gg, LOWER, UPPER))(actions, g)


def progress(message):
    print(f"[bench_core] {message}", file=sys.stderr, flush=True)


def max_residual(actions, contexts):
    return float(jnp.max(residuals(jnp.asarray(actions), contexts)))


def relative_error(grad, reference):
    reference = np.asarray(reference)
    return float(np.max(np.abs(np.asarray(grad) - reference)) / np.max(np.abs(reference)))


def time_jax(fn, contexts, repeats=3):
    start = time.perf_counter()
    compiled = fn.lower(LEADER, contexts).compile()
    compile_s = time.perf_counter() - start
    out = jax.block_until_ready(compiled(LEADER, contexts))
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(compiled(LEADER, contexts))
        best = min(best, time.perf_counter() - start)
    return out, compile_s, best


def temp_bytes(fn, contexts):
    stats = fn.lower(LEADER, contexts).compile().memory_analysis()
    return stats.temp_size_in_bytes + stats.output_size_in_bytes + stats.argument_size_in_bytes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 1e3 only, small memory sweep")
    parser.add_argument("--sizes", type=int, nargs="*", default=None)
    parser.add_argument("--scipy-sessions", type=int, default=300, help="sessions the scipy loop is timed on")
    args = parser.parse_args(argv)
    sizes = args.sizes or ([1000] if args.quick else [1000, 10_000, 100_000])
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} device(s), float64")
    print(f"tolerance: projected-gradient residual <= {TOL:g}\n")

    ours = make_stackjax()
    jaxopt_fns = {name: make_jaxopt(name) for name in ("ProjectedGradient", "LBFGSB")}
    rows = []
    for n in sizes:
        contexts = make_contexts(n)
        progress(f"N = {n:,}: (i) stackjax")
        ((_, (actions, steps)), grad), c_ours, t_ours = time_jax(ours, contexts)
        unroll_steps = int(steps.max())
        rows.append(
            (n, "(i) stackjax", c_ours, t_ours, t_ours, max_residual(actions, contexts), 0.0,
             f"Newton steps <= {unroll_steps}")
        )  # fmt: skip

        progress(f"N = {n:,}: (ii) scipy loop")
        k = min(n, args.scipy_sessions)
        sub_contexts = {key: contexts[key][:k] for key in contexts}
        sub = tuple(np.asarray(sub_contexts[key]) for key in ("gain", "price", "curv", "base"))
        start = time.perf_counter()
        _, g_scipy, a_scipy = scipy_value_and_fd_grad(LEADER, sub)
        # The loop's cost is linear in sessions: time k of them and scale to n.
        t_scipy = (time.perf_counter() - start) * n / k
        (_, _), g_ours_sub = ours(LEADER, sub_contexts)
        rows.append(
            (n, "(ii) scipy L-BFGS-B loop + FD", 0.0, t_scipy, t_ours, max_residual(a_scipy, sub_contexts),
             relative_error(g_scipy, g_ours_sub), f"timed on {k} sessions")
        )  # fmt: skip

        for name, fn in jaxopt_fns.items():
            progress(f"N = {n:,}: (iii) jaxopt.{name}")
            ((_, (acts, iters)), g), c, t = time_jax(fn, contexts)
            note = f"tol={JAXOPT_TOL[name]:g}, iterations <= {int(iters.max())}"
            rows.append(
                (n, f"(iii) vmap jaxopt.{name}", c, t, t_ours, max_residual(acts, contexts),
                 relative_error(g, grad), note)
            )  # fmt: skip

        progress(f"N = {n:,}: (iv) unrolled")
        ((_, (acts, _)), g), c, t = time_jax(make_unrolled(unroll_steps), contexts)
        rows.append(
            (n, "(iv) unrolled Newton", c, t, t_ours, max_residual(acts, contexts), relative_error(g, grad),
             f"{unroll_steps} steps unrolled")
        )  # fmt: skip

    header = ("N", "method", "compile s", "run s", "sessions/s", "time vs (i)", "max residual",
              "hypergrad rel. err vs (i)", "note")  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for n, name, c, t, t_ours, res, err, note in rows:
        cells = (f"{n:,}", name, f"{c:.2f}", f"{t:.3f}", f"{n / t:,.0f}", f"{t / t_ours:.1f}x", f"{res:.1e}",
                 f"{err:.1e}", note)  # fmt: skip
        print("| " + " | ".join(cells) + " |")

    n_mem = 10_000 if not args.quick else 1000
    contexts = make_contexts(n_mem)
    print(f"\nPeak memory (XLA buffer plan: arguments + outputs + temporaries), N = {n_mem:,}")
    print("| max_steps | (i) stackjax MiB | (iv) unrolled MiB | (iv) / (i) |")
    print("|---|---|---|---|")
    for steps in (5, 10, 20, 40) if not args.quick else (5, 10):
        progress(f"memory at max_steps = {steps}")
        m_ours = temp_bytes(make_stackjax(max_steps=steps), contexts) / 2**20
        m_unrolled = temp_bytes(make_unrolled(steps), contexts) / 2**20
        print(f"| {steps} | {m_ours:.1f} | {m_unrolled:.1f} | {m_unrolled / m_ours:.1f}x |")


if __name__ == "__main__":
    main()
