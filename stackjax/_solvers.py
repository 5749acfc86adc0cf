"""Inner solvers: minimise a smooth function over a box, in pure JAX.

Both solvers work on one flat vector and are written as `lax.while_loop`s, so
they compile once, run under `jax.vmap` (a batch runs until its slowest member
stops) and never need Python control flow on traced values. They are *not*
meant to be differentiated: derivatives of the solution come from the implicit
function theorem (see `_implicit.py`).

Stationarity is measured by the fixed-point residual of projected gradient with
unit step, `||x - clip(x - grad f(x), lower, upper)||_inf`, the same map whose
root `_implicit.py` differentiates.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

_ARMIJO = 1e-4
_MAX_BACKTRACKS = 40
_SPG_MEMORY = 10
_BB_MIN, _BB_MAX = 1e-10, 1e10


class SolveStats(NamedTuple):
    """What a solver reports besides its solution.

    Attributes:
        residual: projected-gradient fixed-point residual at the solution.
        steps: iterations taken.
        nonfinite: the objective or its gradient became NaN/inf.
        stalled: the line search found no acceptable step.
    """

    residual: Float[Array, ""]
    steps: Int[Array, ""]
    nonfinite: Bool[Array, ""]
    stalled: Bool[Array, ""]


def projected_residual(
    x: Float[Array, " n"],
    grad: Float[Array, " n"],
    lower: Float[Array, " n"],
    upper: Float[Array, " n"],
) -> Float[Array, ""]:
    """Infinity norm of `x - clip(x - grad, lower, upper)` (zero iff x is stationary)."""
    return jnp.max(jnp.abs(x - jnp.clip(x - grad, lower, upper)), initial=0.0)


def _noise_floor(f: Float[Array, ""]) -> Float[Array, ""]:
    # Near the optimum, decreases in f drown in rounding; accepting steps that
    # are within a few ulps of f keeps the residual (not f) in charge of stopping.
    return 8 * jnp.finfo(f.dtype).eps * (1 + jnp.abs(f))


def _backtrack(value_and_grad, x, f, g, direction, project, reference, sigma_scale=1.0):
    """Armijo backtracking along `project(x + t * direction)`, t = 1, 1/2, ...

    Returns (t_accepted, x_new, f_new, g_new, accepted).
    """

    def trial(t):
        x_t = project(x + t * direction)
        f_t, g_t = value_and_grad(x_t)
        ok = f_t <= reference + sigma_scale * _ARMIJO * jnp.dot(g, x_t - x) + _noise_floor(f)
        return x_t, f_t, g_t, ok & jnp.isfinite(f_t)

    def cond(carry):
        _, _, _, _, ok, k = carry
        return ~ok & (k < _MAX_BACKTRACKS)

    def body(carry):
        t, *_, k = carry
        t = 0.5 * t
        return (t, *trial(t), k + 1)

    t0 = jnp.ones((), x.dtype)
    t, x_t, f_t, g_t, ok, _ = jax.lax.while_loop(cond, body, (t0, *trial(t0), 0))
    return t, x_t, f_t, g_t, ok


def _solve_modified_ldl(h: Float[Array, "n n"], b: Float[Array, " n"]) -> Float[Array, " n"]:
    """Solve (h + E) x = b, where E is zero when h is safely positive definite.

    A one-pass modified LDL^T factorisation: pivots below `delta` are replaced by
    `max(|pivot|, delta)`, so an indefinite h still yields a descent direction and
    a positive definite one the exact Newton step. Pure `jnp` on purpose: tiny
    batched LAPACK calls are slow under vmap, and two of them side by side in one
    program have wedged XLA's CPU runtime (jaxlib 0.10) in reverse mode.
    """
    n = h.shape[0]
    index = jnp.arange(n)
    delta = jnp.sqrt(jnp.finfo(h.dtype).eps) * jnp.maximum(1.0, jnp.max(jnp.abs(jnp.diag(h))))

    def factor_column(j, carry):
        low, piv = carry
        before = index < j
        weighted = jnp.where(before, low[j] * piv, 0.0)
        pivot = h[j, j] - jnp.dot(weighted, low[j])
        pivot = jnp.maximum(jnp.abs(pivot), delta)
        column = (h[:, j] - low @ weighted) / pivot
        column = jnp.where(index > j, column, jnp.where(index == j, 1.0, 0.0))
        return low.at[:, j].set(column), piv.at[j].set(pivot)

    zeros = jnp.zeros_like(h)
    low, piv = jax.lax.fori_loop(0, n, factor_column, (zeros, jnp.ones_like(b)))

    def forward(j, y):
        return y.at[j].set(b[j] - jnp.dot(jnp.where(index < j, low[j], 0.0), y))

    def backward(i, x):
        j = n - 1 - i
        return x.at[j].set(z[j] - jnp.dot(jnp.where(index > j, low[:, j], 0.0), x))

    z = jax.lax.fori_loop(0, n, forward, jnp.zeros_like(b)) / piv
    return jax.lax.fori_loop(0, n, backward, jnp.zeros_like(b))


def newton_direction(
    x: Float[Array, " n"],
    g: Float[Array, " n"],
    h: Float[Array, "n n"],
    lower: Float[Array, " n"],
    upper: Float[Array, " n"],
    eps: Float[Array, ""],
) -> Float[Array, " n"]:
    """Bertsekas' projected Newton direction for a box.

    Coordinates within `eps` of a bound with the gradient pushing outwards are
    treated as active and take a gradient step (which the projection clamps);
    the free ones take a Newton step on the reduced Hessian.
    """
    active = ((x - lower <= eps) & (g > 0)) | ((upper - x <= eps) & (g < 0))
    free = ~active
    reduced = jnp.where(free[:, None] & free[None, :], h, 0.0) + jnp.diag(active.astype(h.dtype))
    step = _solve_modified_ldl(reduced, jnp.where(free, g, 0.0))
    return jnp.where(free, -step, -g)


def projected_newton(
    fun: Callable[[Float[Array, " n"]], Float[Array, ""]],
    x0: Float[Array, " n"],
    lower: Float[Array, " n"],
    upper: Float[Array, " n"],
    *,
    tol: float,
    max_steps: int,
) -> tuple[Float[Array, " n"], SolveStats]:
    """Minimise `fun` over the box [lower, upper] by projected Newton with Armijo search.

    Meant for small problems (up to a few dozen coordinates): each step forms the
    dense Hessian. Where it is not positive definite, a modified LDL^T factorisation
    turns the step into a descent direction.

    Arguments:
        fun: smooth scalar function of a flat vector, to be minimised.
        x0: starting point (projected onto the box first).
        lower, upper: bounds, same shape as `x0` (use +-inf for none).
        tol: stop once the projected-gradient residual is at most `tol`.
        max_steps: iteration cap.

    Returns:
        The final iterate and its `SolveStats`.
    """
    value_and_grad = jax.value_and_grad(fun)
    hessian = jax.hessian(fun)
    project = lambda z: jnp.clip(z, lower, upper)  # noqa: E731

    x = project(x0)
    f, g = value_and_grad(x)
    init = (x, f, g, projected_residual(x, g, lower, upper), jnp.zeros((), jnp.int32), jnp.asarray(False))

    def cond(carry):
        _, f, g, r, k, stalled = carry
        finite = jnp.isfinite(f) & jnp.all(jnp.isfinite(g))
        return (r > tol) & (k < max_steps) & finite & ~stalled

    def body(carry):
        x, f, g, r, k, _ = carry
        d = newton_direction(x, g, hessian(x), lower, upper, jnp.minimum(r, 1e-2))
        _, x_new, f_new, g_new, ok = _backtrack(value_and_grad, x, f, g, d, project, f)
        x, f, g = (jnp.where(ok, a, b) for a, b in ((x_new, x), (f_new, f), (g_new, g)))
        return x, f, g, projected_residual(x, g, lower, upper), k + 1, ~ok

    x, f, g, r, k, stalled = jax.lax.while_loop(cond, body, init)
    nonfinite = ~(jnp.isfinite(f) & jnp.all(jnp.isfinite(g)) & jnp.all(jnp.isfinite(x)))
    return x, SolveStats(r, k, nonfinite, stalled)


def spectral_projected_gradient(
    fun: Callable[[Float[Array, " n"]], Float[Array, ""]],
    x0: Float[Array, " n"],
    lower: Float[Array, " n"],
    upper: Float[Array, " n"],
    *,
    tol: float,
    max_steps: int,
    record_history: bool = False,
) -> tuple[Float[Array, " n"], SolveStats, Float[Array, " steps"]]:
    """Minimise `fun` over a box by spectral projected gradient (Birgin, Martinez, Raydan 2000).

    Barzilai-Borwein step lengths with a non-monotone Armijo search over the last
    ten values: first-order, tuning-free, and cheap per step, so it suits large
    actions and leader parameters alike.

    Arguments:
        fun, x0, lower, upper, tol, max_steps: as for `projected_newton`.
        record_history: also return `fun` at every iterate (NaN after the last).

    Returns:
        The final iterate, its `SolveStats` and the value history, `max_steps + 1`
        long (an empty array unless `record_history`).
    """
    value_and_grad = jax.value_and_grad(fun)
    project = lambda z: jnp.clip(z, lower, upper)  # noqa: E731

    x = project(x0)
    f, g = value_and_grad(x)
    r = projected_residual(x, g, lower, upper)
    alpha = jnp.clip(1.0 / jnp.maximum(r, jnp.finfo(x.dtype).tiny), _BB_MIN, _BB_MAX).astype(x.dtype)
    recent = jnp.full((_SPG_MEMORY,), f)
    history = jnp.full((max_steps + 1 if record_history else 0,), jnp.nan, x.dtype)
    if record_history:
        history = history.at[0].set(f)
    init = (x, f, g, r, jnp.zeros((), jnp.int32), jnp.asarray(False), alpha, recent, history)

    def cond(carry):
        _, f, g, r, k, stalled, *_ = carry
        finite = jnp.isfinite(f) & jnp.all(jnp.isfinite(g))
        return (r > tol) & (k < max_steps) & finite & ~stalled

    def body(carry):
        x, f, g, r, k, _, alpha, recent, history = carry
        d = project(x - alpha * g) - x
        # The search runs along the segment x + t d, which stays in the box.
        _, x_new, f_new, g_new, ok = _backtrack(value_and_grad, x, f, g, d, lambda z: z, jnp.max(recent))
        s, y = x_new - x, g_new - g
        sy = jnp.dot(s, y)
        alpha_new = jnp.where(sy > 0, jnp.dot(s, s) / jnp.where(sy > 0, sy, 1.0), _BB_MAX)
        alpha_new = jnp.clip(alpha_new, _BB_MIN, _BB_MAX)
        x, f, g = (jnp.where(ok, a, b) for a, b in ((x_new, x), (f_new, f), (g_new, g)))
        alpha = jnp.where(ok, alpha_new, alpha)
        recent = jnp.where(ok, jnp.roll(recent, 1).at[0].set(f), recent)
        if record_history:
            history = history.at[k + 1].set(f)
        r = projected_residual(x, g, lower, upper)
        return x, f, g, r, k + 1, ~ok, alpha, recent, history

    x, f, g, r, k, stalled, _, _, history = jax.lax.while_loop(cond, body, init)
    nonfinite = ~(jnp.isfinite(f) & jnp.all(jnp.isfinite(g)) & jnp.all(jnp.isfinite(x)))
    return x, SolveStats(r, k, nonfinite, stalled), history
