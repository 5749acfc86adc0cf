"""Implicit differentiation of a solver, and the only module that imports jaxopt.

jaxopt is unmaintained and warns on import; keeping every use of it here means
swapping it for `jax.lax.custom_root` or optimistix touches this file alone.
"""

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from jaxopt import linear_solve as _linear_solve
    from jaxopt import projection as _projection
    from jaxopt.implicit_diff import custom_root as _custom_root

# Up to this many unknowns the linear system of the implicit function theorem
# is formed densely and solved exactly; beyond it, matrix-free GMRES.
DENSE_SOLVE_LIMIT = 256


def _dense_solve(matvec: Callable, b: jax.Array) -> jax.Array:
    basis = jnp.eye(b.size, dtype=b.dtype)
    matrix = jax.vmap(matvec)(basis).T
    return jnp.linalg.solve(matrix, b)


def _iterative_solve(matvec: Callable, b: jax.Array) -> jax.Array:
    return _linear_solve.solve_gmres(matvec, b, tol=1e-10, ridge=None)


def root_with_implicit_gradient(
    solve: Callable[..., tuple[jax.Array, Any]],
    optimality: Callable[..., jax.Array],
    init: jax.Array,
    *args: Any,
) -> tuple[jax.Array, Any]:
    """Run `solve(init, *args) -> (root, aux)` with derivatives from the implicit function theorem.

    Arguments:
        solve: returns a root of `optimality(root, *args) = 0` and any auxiliary output.
        optimality: the root condition, differentiable in all its arguments.
        init: starting point (receives no gradient). A flat vector.
        *args: pytrees the root depends on; gradients flow to them.

    Returns:
        `(root, aux)`; the root's derivatives w.r.t. `args` solve the linearised
        optimality condition (dense LU for small roots, GMRES for large), and
        `aux` is not differentiated.
    """
    linear = _dense_solve if init.size <= DENSE_SOLVE_LIMIT else _iterative_solve
    wrapped = _custom_root(optimality, has_aux=True, solve=linear)(solve)
    return wrapped(init, *args)


def is_jaxopt_solver(obj: Any) -> bool:
    """Whether `obj` looks like a jaxopt solver instance (a dataclass with `run` and `fun`)."""
    return (
        dataclasses.is_dataclass(obj)
        and not isinstance(obj, type)
        and callable(getattr(obj, "run", None))
        and hasattr(obj, "fun")
        and type(obj).__module__.startswith("jaxopt")
    )


def as_jaxopt_solver(solver: Any, fun: Callable) -> Any:
    """A jaxopt solver minimising `fun`, from an instance (its `fun` replaced) or a factory `fun -> solver`.

    The solver's own implicit differentiation is switched off: stackjax
    differentiates the projected-gradient fixed point itself.
    """
    if not is_jaxopt_solver(solver):
        solver = solver(fun=fun)
        if not is_jaxopt_solver(solver):
            raise TypeError(
                f"solver: the factory returned a {type(solver).__name__}, not a jaxopt solver instance"
            )
    changes = {"fun": fun}
    if any(f.name == "implicit_diff" for f in dataclasses.fields(solver)):
        changes["implicit_diff"] = False
    return dataclasses.replace(solver, **changes)


def run_jaxopt_solver(
    solver: Any,
    fun: Callable[..., jax.Array],
    x0: jax.Array,
    lower: jax.Array,
    upper: jax.Array,
    bounded: bool,
    *args: Any,
) -> tuple[jax.Array, jax.Array]:
    """Minimise `fun(x, *args)` with a user's jaxopt solver (instance or factory).

    The solver's own settings (maxiter, tol, line search, ...) are kept.

    Returns:
        The solution and the solver's iteration count.
    """
    solver = as_jaxopt_solver(solver, fun)
    if bounded and hasattr(solver, "projection"):
        solver = dataclasses.replace(solver, projection=_projection.projection_box)
        params, state = solver.run(x0, (lower, upper), *args)
    elif bounded:
        params, state = solver.run(x0, (lower, upper), *args)
    else:
        params, state = solver.run(x0, *args)
    return params, jnp.asarray(getattr(state, "iter_num", -1), jnp.int32)


def solver_supports_bounds(solver: Any) -> bool:
    """Whether a jaxopt solver (instance or factory) can be given a box."""
    solver = as_jaxopt_solver(solver, lambda x, *args: jnp.sum(x))
    return hasattr(solver, "projection") or type(solver).__name__ == "LBFGSB"
