"""Argument checks that run in Python, before anything is traced or compiled.

Every error names the argument at fault and says what was expected. Values are
checked only when they are concrete; under an outer `jit`/`vmap` only shapes
and dtypes can be, and non-finite data is reported by the solvers' info.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_callable(fn: Any, name: str) -> None:
    if not callable(fn):
        raise TypeError(f"{name}: expected a callable, got {type(fn).__name__}")


def as_float_array(x: Any, name: str, dtype: Any = None) -> jax.Array:
    """Convert to a floating JAX array, refusing non-numeric input with a clear message."""
    if isinstance(x, jax.Array):
        arr = x
    else:
        try:
            arr = np.asarray(x)
        except Exception as err:  # pragma: no cover - numpy's own message is kept
            raise TypeError(f"{name}: expected an array of numbers, got {type(x).__name__}") from err
        if arr.dtype == object or not (
            np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.bool_)
        ):
            raise TypeError(f"{name}: expected an array of numbers, got dtype {arr.dtype}")
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        arr = jnp.asarray(arr, dtype=dtype or jnp.result_type(float))
    elif dtype is not None:
        arr = jnp.asarray(arr, dtype=dtype)
    return jnp.asarray(arr)


class Box(NamedTuple):
    lower: jax.Array
    upper: jax.Array
    init: jax.Array
    bounded: bool


def resolve_box(lower: Any, upper: Any, init: Any, prefix: str = "") -> Box:
    """Bring `lower`, `upper` and `init` to one shape and dtype, with +-inf for missing bounds.

    The action's shape comes from whichever of the three is a non-scalar array;
    they must agree. `init` defaults to the box midpoint (finite box), else the
    point of the box nearest zero.
    """
    names = {k: f"{prefix}{k}" for k in ("lower", "upper", "init")}
    given = {k: v for k, v in (("init", init), ("lower", lower), ("upper", upper)) if v is not None}
    dtype = None
    if "init" in given:
        init_arr = as_float_array(given["init"], names["init"])
        dtype = init_arr.dtype
        given["init"] = init_arr
    arrays = {k: (v if k == "init" else as_float_array(v, names[k], dtype)) for k, v in given.items()}
    if dtype is None:
        dtype = jnp.result_type(*arrays.values()) if arrays else jnp.result_type(float)
        arrays = {k: v.astype(dtype) for k, v in arrays.items()}

    shapes = {k: v.shape for k, v in arrays.items() if v.ndim > 0 or k == "init"}
    if not shapes:
        raise ValueError(
            f"cannot tell the action's shape: pass {names['init']} or array-valued "
            f"{names['lower']}/{names['upper']}"
        )
    reference_key, shape = next(iter(shapes.items()))
    for key, other in shapes.items():
        if other != shape:
            raise ValueError(
                f"{names[key]}: shape {other} does not match {names[reference_key]} shape {shape}"
            )

    lo = jnp.broadcast_to(arrays.get("lower", jnp.asarray(-jnp.inf, dtype)), shape)
    hi = jnp.broadcast_to(arrays.get("upper", jnp.asarray(jnp.inf, dtype)), shape)
    # Inside an outer jit even constants become tracers once jnp touches them, so
    # values are checked in numpy on the caller's own (concrete) inputs.
    if all(is_concrete(given[k]) for k in ("lower", "upper") if k in given):
        lo_np = np.broadcast_to(np.asarray(given.get("lower", -np.inf), dtype=float), shape)
        hi_np = np.broadcast_to(np.asarray(given.get("upper", np.inf), dtype=float), shape)
        if np.isnan(lo_np).any() or np.isnan(hi_np).any():
            raise ValueError(f"{names['lower']}/{names['upper']}: bounds must not be NaN")
        bad = np.flatnonzero(lo_np > hi_np)
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"{names['lower']} must be <= {names['upper']}: at flat index {i}, "
                f"lower={lo_np.reshape(-1)[i]} > upper={hi_np.reshape(-1)[i]}"
            )
    if "init" in arrays:
        x0 = arrays["init"]
    else:
        finite = jnp.isfinite(lo) & jnp.isfinite(hi)
        x0 = jnp.where(finite, 0.5 * (jnp.where(finite, lo, 0) + jnp.where(finite, hi, 0)), 0)
        x0 = jnp.clip(x0, lo, hi).astype(dtype)
    return Box(lo, hi, x0, bool(lower is not None or upper is not None))


def leading_size(tree: Any, name: str) -> int:
    """The common leading-axis size of every array leaf of `tree` (the session axis)."""
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        raise ValueError(f"{name}: expected a pytree of arrays with a leading session axis, got no arrays")
    sizes = set()
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        shape = np.shape(leaf)
        if len(shape) == 0:
            raise ValueError(
                f"{name}: leaf {jax.tree_util.keystr(path) or '(root)'} is a scalar; every leaf "
                "needs a leading session axis"
            )
        sizes.add(shape[0])
    if len(sizes) != 1:
        raise ValueError(f"{name}: leaves disagree on the leading (session) axis: sizes {sorted(sizes)}")
    (size,) = sizes
    if size == 0:
        raise ValueError(f"{name}: the session axis is empty")
    return size


def check_scalar_output(out: Any, name: str) -> None:
    """`out` is the `jax.eval_shape` result of a utility; it must be one real scalar."""
    if not isinstance(out, jax.ShapeDtypeStruct):
        raise TypeError(f"{name}: must return a scalar array, got a {type(out).__name__} pytree")
    if out.shape != ():
        raise ValueError(f"{name}: must return a scalar, got shape {out.shape}")
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(f"{name}: must return a real floating scalar, got dtype {out.dtype}")


def default_tol(dtype: Any) -> float:
    """A stationarity tolerance reachable in `dtype` on unit-scale problems."""
    return 1e-9 if jnp.finfo(dtype).bits >= 64 else 1e-4
