"""A fixed-length L-BFGS run for smooth, deterministic objectives (inside jit)."""

from collections.abc import Callable

import jax
import optax
from jaxtyping import Array, PyTree


def lbfgs_minimise(loss: Callable[[PyTree], Array], init: PyTree, steps: int) -> tuple[PyTree, Array]:
    """Minimise `loss` from `init` with `steps` iterations of optax's L-BFGS (zoom line search).

    Returns:
        The final parameters and the loss at every iteration.
    """
    optimizer = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    def step(carry, _):
        params, state = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = optimizer.update(grad, state, params, value=value, grad=grad, value_fn=loss)
        return (optax.apply_updates(params, updates), state), value

    (params, _), values = jax.lax.scan(step, (init, optimizer.init(init)), None, length=steps)
    return params, values
