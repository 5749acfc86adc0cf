"""The follower's best response: argmax of its utility over a box, implicitly differentiated."""

import dataclasses
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PyTree

from . import _implicit, _solvers, _validate

# Above this many coordinates, forming the Hessian every step stops paying off.
NEWTON_MAX_SIZE = 64


class BestResponseInfo(eqx.Module):
    """How the inner solve went, per session when vmapped.

    Attributes:
        converged: residual <= tol and everything finite.
        residual: projected-gradient fixed-point residual
            `||a - clip(a + grad_a U, lower, upper)||_inf` at the returned action.
        steps: solver iterations.
        nonfinite: the utility, its gradient or the action became NaN/inf.
    """

    converged: Bool[Array, ""]
    residual: Float[Array, ""]
    steps: Int[Array, ""]
    nonfinite: Bool[Array, ""]


def _solver_name(solver: Any, size: int) -> str:
    if isinstance(solver, str):
        if solver == "auto":
            return "newton" if size <= NEWTON_MAX_SIZE else "spg"
        if solver in ("newton", "spg"):
            return solver
    elif _implicit.is_jaxopt_solver(solver) or callable(solver):
        return "jaxopt"
    raise ValueError(
        f"solver: expected 'auto', 'newton', 'spg', a jaxopt solver instance or a factory "
        f"fun -> jaxopt solver, got {solver!r}"
    )


@dataclasses.dataclass(frozen=True)
class _Options:
    """The static part of one best-response problem (hashable: it keys the jit cache)."""

    shape: tuple[int, ...]
    closure_converted: bool
    method: str
    solver: Any
    bounded: bool
    tol: float
    max_steps: int


@eqx.filter_jit
def _solve(options, utility_static, leader, context, params, init, lower, upper):
    shape, tol, max_steps = options.shape, options.tol, options.max_steps

    def objective(x, leader, context, params):
        if options.closure_converted:
            return -utility_static(x.reshape(shape), leader, context, *params)
        return -eqx.combine(params, utility_static)(x.reshape(shape), leader, context)

    def optimality(x, leader, context, params, lo, hi):
        g = jax.grad(objective)(x, leader, context, params)
        return x - jnp.clip(x - g, lo, hi)

    def solve(x0, leader, context, params, lo, hi):
        fun = lambda x: objective(x, leader, context, params)  # noqa: E731
        if options.method == "newton":
            x, stats = _solvers.projected_newton(fun, x0, lo, hi, tol=tol, max_steps=max_steps)
            steps, nonfinite = stats.steps, stats.nonfinite
        elif options.method == "spg":
            x, stats, _ = _solvers.spectral_projected_gradient(fun, x0, lo, hi, tol=tol, max_steps=max_steps)
            steps, nonfinite = stats.steps, stats.nonfinite
        else:
            x, steps = _implicit.run_jaxopt_solver(
                options.solver, objective, x0, lo, hi, options.bounded, leader, context, params
            )
            nonfinite = jnp.asarray(False)
        g = jax.grad(fun)(x)
        residual = _solvers.projected_residual(x, g, lo, hi)
        nonfinite = nonfinite | ~jnp.all(jnp.isfinite(x)) | ~jnp.all(jnp.isfinite(g))
        residual = jnp.where(nonfinite, jnp.inf, residual)
        info = BestResponseInfo(~nonfinite & (residual <= tol), residual, steps, nonfinite)
        return x, info

    return _implicit.root_with_implicit_gradient(
        solve,
        optimality,
        init.reshape(-1),
        leader,
        context,
        params,
        lower.reshape(-1),
        upper.reshape(-1),
    )


def best_response(
    utility: Callable[[Array, PyTree, PyTree], Float[Array, ""]],
    leader: PyTree,
    context: PyTree,
    *,
    lower: Float[Array, "..."] | float | None = None,
    upper: Float[Array, "..."] | float | None = None,
    init: Float[Array, "..."] | None = None,
    solver: Any = "auto",
    tol: float | None = None,
    max_steps: int | None = None,
    return_info: bool = False,
) -> Float[Array, "..."] | tuple[Float[Array, "..."], BestResponseInfo]:
    """The action maximising `utility(action, leader, context)` over `[lower, upper]`.

    Derivatives with respect to `leader`, `context` and the bounds come from the
    implicit function theorem applied to the projected-gradient fixed point
    `a = clip(a + grad_a U(a), lower, upper)`: exact at the solution, zero along
    coordinates clamped at a bound, and never obtained by unrolling the solver.
    Works under `jax.jit`, `jax.vmap`, `jax.grad` and `jax.jacrev`.

    Arguments:
        utility: the follower's utility; smooth in the action, returning a scalar.
            It may be a callable pytree (e.g. an `eqx.Module`) or close over traced
            values (inside `jit`/`grad`); either way those arrays receive gradients
            too.
        leader: the leader's commitment (any pytree).
        context: the session's context (any pytree).
        lower, upper: per-coordinate bounds (arrays or scalars); `None` means unbounded.
        init: starting action; fixes the action's shape when no bound does.
            Defaults to the box midpoint.
        solver: `"auto"` (projected Newton up to 64 coordinates, spectral projected
            gradient above), `"newton"`, `"spg"`, or a jaxopt solver: an instance
            (its `fun` is replaced by the negated utility, so any stand-in function will
            do) or a factory `fun -> solver` such as
            `functools.partial(jaxopt.LBFGSB, maxiter=500)`. Bounded problems need
            one that takes a box (ProjectedGradient, LBFGSB).
        tol: stop when the fixed-point residual is at most `tol`
            (default 1e-4 in float32, where gradients of utilities built from
            large token counts carry rounding noise near 1e-5, and 1e-9 in float64).
        max_steps: iteration cap (default 50 for Newton, 2000 for SPG).
        return_info: also return a `BestResponseInfo`.

    Returns:
        The best-response action (shape of `init`/the bounds), and with
        `return_info=True` the pair `(action, info)`.
    """
    _validate.check_callable(utility, "utility")
    box = _validate.resolve_box(lower, upper, init)
    shape, dtype, size = box.init.shape, box.init.dtype, box.init.size
    method = _solver_name(solver, size)
    if method == "jaxopt" and box.bounded and not _implicit.solver_supports_bounds(solver):
        raise ValueError(
            f"solver: {getattr(solver, '__name__', type(solver).__name__)} cannot handle bounds; "
            "pass jaxopt.ProjectedGradient or jaxopt.LBFGSB, or drop lower/upper"
        )
    tol = _validate.default_tol(dtype) if tol is None else float(tol)
    if not tol > 0:
        raise ValueError(f"tol: must be positive, got {tol}")
    if max_steps is None:
        max_steps = 50 if method == "newton" else 2000
    if int(max_steps) < 0:
        raise ValueError(f"max_steps: must be >= 0, got {max_steps}")
    max_steps = int(max_steps)

    _validate.check_scalar_output(jax.eval_shape(utility, box.init, leader, context), "utility")
    # Inside an outer transformation the utility may close over traced values (a
    # model being trained, say); hoisting them into explicit arguments lets them
    # receive implicit gradients instead of leaking into the solver's trace.
    converted, consts = jax.closure_convert(
        lambda a, lead, ctx: utility(a, lead, ctx), box.init, leader, context
    )
    if consts:
        params, static = list(consts), converted
    else:
        params, static = eqx.partition(utility, eqx.is_array)
    options = _Options(shape, bool(consts), method, solver, box.bounded, tol, max_steps)
    x, info = _solve(options, static, leader, context, params, box.init, box.lower, box.upper)
    action = x.reshape(shape).astype(dtype)
    if return_info:
        return action, jax.tree_util.tree_map(jax.lax.stop_gradient, info)
    return action
