"""Learn the follower's utility weights from the actions it was seen to take.

Inverse optimisation through the implicit best response: find weights w minimising
`mean ||a_observed - a*(l, x; w)||^2`, where `a*` is `best_response` of the follower
utility with weights w. The gradient with respect to w is exact (implicit function
theorem), so plain L-BFGS on log-weights (positivity) does the fit. This replaces
the paper's imitation learning: the fitted executor is a real best response.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .. import best_response
from .._optim import lbfgs_minimise
from . import game
from .game import DEFAULT_CONFIG, FollowerWeights, GameConfig, TurnContext
from .response import ResponseModel


def predicted_actions(
    weights: FollowerWeights,
    model: ResponseModel,
    leaders: Float[Array, "n 2"],
    contexts: TurnContext,
    config: GameConfig,
) -> Float[Array, "n 3"]:
    """The follower's best responses under `weights`, one per (leader, context) row."""

    def one(leader, context, weights):
        return best_response(
            lambda a, lead, ctx: game.follower_utility(a, lead, ctx[0], model, config, ctx[1]),
            leader,
            (context, weights),
            lower=jnp.asarray(game.ACTION_LOWER),
            upper=jnp.asarray(game.ACTION_UPPER),
        )

    return jax.vmap(one, in_axes=(0, 0, None))(leaders, contexts, weights)


@eqx.filter_jit
def _fit(log_init, model, leaders, contexts, observed, config, steps):
    def loss(log_w):
        w = FollowerWeights(*jnp.exp(log_w))
        return jnp.mean(jnp.sum((predicted_actions(w, model, leaders, contexts, config) - observed) ** 2, -1))

    return lbfgs_minimise(loss, log_init, steps)


def fit_follower_weights(
    model: ResponseModel,
    leaders: Float[Array, "n 2"],
    contexts: TurnContext,
    observed_actions: Float[Array, "n 3"],
    *,
    config: GameConfig = DEFAULT_CONFIG,
    init: FollowerWeights | None = None,
    steps: int = 60,
) -> tuple[FollowerWeights, np.ndarray]:
    """Fit (w_Q, w_C, w_G) so the follower's best responses reproduce observed actions.

    Arguments:
        model: the calibrated response model.
        leaders: the leader signal each action answered, shape (n, 2).
        contexts: the turn contexts (a batched `TurnContext`, leading axis n).
        observed_actions: the actions taken, shape (n, 3), in [0, 1].
        config: the game (its other terms stay fixed).
        init: starting weights (default: the config's).
        steps: L-BFGS iterations.

    Returns:
        The fitted weights and the loss per iteration.
    """
    observed_actions = jnp.asarray(observed_actions, jnp.float32)
    leaders = jnp.asarray(leaders, jnp.float32)
    n = observed_actions.shape[0]
    if observed_actions.shape != (n, 3) or leaders.shape != (n, 2):
        raise ValueError(
            f"observed_actions, leaders: expected shapes (n, 3) and (n, 2), got {observed_actions.shape} "
            f"and {leaders.shape}"
        )
    if jax.tree_util.tree_leaves(contexts)[0].shape[0] != n:
        raise ValueError("contexts: needs one row per observed action")
    if not bool(jnp.all((observed_actions >= 0) & (observed_actions <= 1))):
        raise ValueError("observed_actions: must lie in [0, 1]")
    init = FollowerWeights.from_config(config) if init is None else init
    log_init = jnp.log(jnp.stack([init.quality, init.cost, init.target]))
    log_w, values = _fit(log_init, model, leaders, contexts, observed_actions, config, steps)
    return FollowerWeights(*jnp.exp(log_w)), np.asarray(values)
