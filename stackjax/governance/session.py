"""Multi-turn sessions: controllers, a `lax.scan` rollout, baselines, and policy training.

A controller decides each turn's action. Three kinds:
- `LeaderPolicy`: an MLP from the session state to a leader signal (q, alpha); the
  follower answers with its implicit best response (so the rollout is differentiable
  in the policy's parameters end to end);
- `FixedAction`: the paper's fixed baselines ("conservative", "middle");
- `ThresholdRule`: a static-threshold rule (verbosity by task complexity, context and
  tools cut when the budget runs low), what an operator writes by hand.

State transitions after a turn with tokens T and quality Q: the budget share drops
by T / budget_tokens; the conversation grows by the completion plus a 100-token user
message; turn, running mean cost, recent quality (EMA 0.5), cost trend and the
previous leader signal update. With `sample=True`, T and Q are drawn (log-normal
tokens, quality as the share of 10 graded answers) instead of their expectations.
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, PRNGKeyArray

from .. import best_response
from .._io import atomic_write
from . import actions, features, game
from .game import DEFAULT_CONFIG, GameConfig, SessionState
from .response import ResponseModel

USER_MESSAGE_TOKENS = 100.0


class FixedAction(eqx.Module):
    """A controller that always plays the same action (the leader signal is unused)."""

    action: Float[Array, " 3"]


class ThresholdRule(eqx.Module):
    """A static-threshold rule, the hand-written alternative to a learned controller.

    Verbosity `p_hard` when complexity >= `complexity_threshold` else `p_easy`;
    context `c` and tools `u` at their normal levels while the budget share is
    above `budget_threshold`, at `c_low`, `u_low` once it falls below.
    """

    p_easy: float = 0.2
    p_hard: float = 0.6
    complexity_threshold: float = 0.6
    c: float = 0.4
    u: float = 0.3
    c_low: float = 0.1
    u_low: float = 0.0
    budget_threshold: float = 0.3

    def action(self, state: SessionState) -> Float[Array, " 3"]:
        p = jnp.where(state.complexity >= self.complexity_threshold, self.p_hard, self.p_easy)
        low = state.budget < self.budget_threshold
        return jnp.stack([jnp.where(low, self.c_low, self.c), p, jnp.where(low, self.u_low, self.u)])


class LeaderPolicy(eqx.Module):
    """A contextual leader: state features -> (q, alpha) inside the leader box.

    Attributes:
        mlp: the network (`eqx.nn.MLP`), features -> 2 logits.
        lower, upper: the leader box; outputs are `lower + (upper - lower) sigmoid(logits)`.
        task_aware: use the 14-dim task-aware state (else the 9-dim scalar state).
    """

    mlp: eqx.nn.MLP
    lower: tuple[float, float] = eqx.field(static=True)
    upper: tuple[float, float] = eqx.field(static=True)
    task_aware: bool = eqx.field(static=True, default=True)

    def __init__(
        self,
        key: PRNGKeyArray,
        config: GameConfig = DEFAULT_CONFIG,
        *,
        task_aware: bool = True,
        width: int = 32,
        depth: int = 2,
    ):
        size = 14 if task_aware else 9
        self.mlp = eqx.nn.MLP(size, 2, width, depth, activation=jax.nn.tanh, key=key)
        self.lower = (float(config.target_range[0]), 0.0)
        self.upper = (float(config.target_range[1]), 1.0)
        self.task_aware = task_aware

    def __call__(self, state: SessionState) -> Float[Array, " 2"]:
        inputs = state.task_features() if self.task_aware else state.scalar_features()
        lower, upper = jnp.asarray(self.lower), jnp.asarray(self.upper)
        return lower + (upper - lower) * jax.nn.sigmoid(self.mlp(inputs))


class ConstantLeader(eqx.Module):
    """A leader that always commits to the same signal (q, alpha); the follower still best-responds."""

    signal: Float[Array, " 2"]

    def __call__(self, state: SessionState) -> Float[Array, " 2"]:
        return jnp.asarray(self.signal, jnp.float32)


class Turn(eqx.Module):
    """One turn's outcome (a leading (sessions, turns) axis after `rollout`)."""

    leader: Float[Array, "... 2"]
    action: Float[Array, "... 3"]
    tokens: Float[Array, "..."]
    quality: Float[Array, "..."]
    expected_tokens: Float[Array, "..."]
    expected_quality: Float[Array, "..."]
    leader_utility: Float[Array, "..."]
    converged: Any


def smooth_signal(raw: Float[Array, " 2"], state: SessionState, config: GameConfig) -> Float[Array, " 2"]:
    """The signal applied this turn: the paper's subsidy smoothing, and held for `hold_turns` turns."""
    previous = state.previous_leader
    subsidy = actions.smooth_subsidy(
        raw[1], previous[1], inertia=config.subsidy_inertia, max_change=config.subsidy_max_change
    )
    signal = jnp.stack([raw[0], subsidy])
    hold = (state.turn.astype(jnp.int32) % config.hold_turns) != 0
    return jnp.where(hold, previous, signal)


def _act(controller, state, context, model, config):
    """(leader signal, action, converged) of one session this turn."""
    if isinstance(controller, FixedAction):
        return state.previous_leader, controller.action, jnp.asarray(True)
    if isinstance(controller, ThresholdRule):
        return state.previous_leader, controller.action(state), jnp.asarray(True)
    leader = smooth_signal(controller(state), state, config)
    action, info = best_response(
        lambda a, lead, ctx: game.follower_utility(a, lead, ctx, model, config),
        leader,
        context,
        lower=jnp.asarray(game.ACTION_LOWER),
        upper=jnp.asarray(game.ACTION_UPPER),
        return_info=True,
    )
    return leader, action, info.converged


def _sampled_outcome(model, action, x, expected_quality, key):
    """Drawn tokens (log-normal prompt and completion) and graded quality (share of 10 answers)."""
    k1, k2, k3 = jax.random.split(key, 3)
    prompt = model.prompt_tokens(action, x) * jnp.exp(jnp.exp(model.log_sigma_prompt) * jax.random.normal(k1))
    completion = model.completion_tokens(action, x) * jnp.exp(
        jnp.exp(model.log_sigma_completion) * jax.random.normal(k2)
    )
    graded = jax.random.binomial(k3, 10.0, expected_quality) / 10.0
    return prompt + completion, graded


@eqx.filter_jit
def decide(
    controller: Any, model: ResponseModel, state: SessionState, config: GameConfig = DEFAULT_CONFIG
) -> tuple[Float[Array, " 2"], Float[Array, " 3"], Any]:
    """One session's decision this turn: `(leader signal, action, converged)`.

    Arguments:
        controller: a `LeaderPolicy`, `ConstantLeader`, `FixedAction` or `ThresholdRule`.
        model: the response model the follower optimises against.
        state: one (unbatched) session state.
        config: the game.

    Returns:
        The signal applied (after smoothing and hold), the follower's action, and whether
        its best response converged.
    """
    return _act(controller, state, game.turn_context(model, state), model, config)


def _step(controller, model, config, sample, state: SessionState, key):
    context = game.turn_context(model, state)
    leader, action, converged = _act(controller, state, context, model, config)
    expected_tokens, expected_quality = model(action, context.covariates)
    tokens, quality = expected_tokens, expected_quality
    if sample:
        tokens, quality = _sampled_outcome(model, action, context.covariates, expected_quality, key)
    utility = game.leader_utility(action, leader, context, model, config)
    completion = model.completion_tokens(action, context.covariates)
    turn = state.turn + 1.0
    new_state = eqx.tree_at(
        lambda s: (
            s.context_tokens, s.turn, s.avg_cost, s.recent_quality, s.cost_trend, s.budget, s.previous_leader,
        ),
        state,
        (
            state.context_tokens + completion + USER_MESSAGE_TOKENS,
            turn,
            state.avg_cost + (tokens - state.avg_cost) / turn,
            0.5 * state.recent_quality + 0.5 * quality,
            (tokens - state.avg_cost) / 1000.0,
            state.budget - tokens / state.budget_tokens,
            leader,
        ),
    )  # fmt: skip
    record = Turn(leader, action, tokens, quality, expected_tokens, expected_quality, utility, converged)
    return new_state, record


def rollout(
    controller: Any,
    model: ResponseModel,
    states: SessionState,
    turns: int,
    *,
    config: GameConfig = DEFAULT_CONFIG,
    key: PRNGKeyArray | None = None,
    sample: bool = False,
) -> tuple[Turn, SessionState]:
    """Play `turns` turns of every session in `states` (leading axis = sessions).

    Arguments:
        controller: a `LeaderPolicy`, `ConstantLeader`, `FixedAction` or `ThresholdRule`.
        model: the response model the simulator draws from.
        states: a batch of `SessionState`s.
        turns: turns per session.
        config: the game's weights.
        key: randomness for `sample=True`.
        sample: draw tokens and graded quality instead of using expectations.

    Returns:
        The per-turn outcomes, shape (sessions, turns, ...), and the final states.
        Differentiable in the policy's parameters when `sample=False`.
    """
    if turns < 1:
        raise ValueError(f"turns: must be >= 1, got {turns}")
    if sample and key is None:
        raise ValueError("key: sample=True needs a PRNG key")
    sessions = states.task.shape[0]
    key = jax.random.PRNGKey(0) if key is None else key
    keys = jax.random.split(key, sessions * turns).reshape(sessions, turns, -1)

    def one_session(state, session_keys):
        step = lambda s, k: _step(controller, model, config, sample, s, k)  # noqa: E731
        final, record = jax.lax.scan(step, state, session_keys)
        return record, final

    return jax.vmap(one_session)(states, keys)


def sample_sessions(
    key: PRNGKeyArray,
    sessions: int,
    *,
    turns: int = 3,
    tasks: tuple[str, ...] = features.TASK_TYPES,
) -> SessionState:
    """Random fresh sessions: task types uniform over `tasks`, tier 0 or 1, complexity U(0, 1),
    task context log-uniform in [200, 4000] tokens, budget U(2000, 6000) tokens per turn."""
    k = jax.random.split(key, 5)
    index = jnp.asarray([features.TASK_TYPES.index(t) for t in tasks])
    task = index[jax.random.randint(k[0], (sessions,), 0, len(tasks))]
    tier = jax.random.bernoulli(k[1], 0.5, (sessions,)).astype(jnp.float32)
    complexity = jax.random.uniform(k[2], (sessions,))
    context = jnp.exp(jax.random.uniform(k[3], (sessions,), minval=np.log(200.0), maxval=np.log(4000.0)))
    budget = turns * jax.random.uniform(k[4], (sessions,), minval=2000.0, maxval=6000.0)
    return SessionState.fresh(task, tier, complexity, context, budget, jnp.array([0.8, 0.0]))


def fixed_baselines() -> dict[str, FixedAction | ThresholdRule]:
    """The paper's fixed controllers plus a static-threshold rule."""
    return {
        "conservative": FixedAction(jnp.asarray(game.CONSERVATIVE_ACTION)),
        "middle": FixedAction(jnp.asarray(game.MIDDLE_ACTION)),
        "threshold_rule": ThresholdRule(),
    }


def training_loss(
    policy: LeaderPolicy, model: ResponseModel, states: SessionState, turns: int, config: GameConfig
):
    """Minus the mean leader utility over sessions and turns (expected outcomes)."""
    record, _ = rollout(policy, model, states, turns, config=config)
    return -jnp.mean(record.leader_utility), record


@eqx.filter_jit
def _train_step(params, static, opt_state, key, model, config, learning_rate, sessions, turns, spread):
    """One Adam step on a fresh batch; module-level so repeated training runs reuse the compilation."""
    optimizer = optax.adam(learning_rate)
    batch = sample_sessions(key, sessions, turns=turns)
    if spread is not None:
        # Every leaf of the batch leads with the session axis: split it across the devices.
        batch = jax.lax.with_sharding_constraint(batch, spread)

    def loss(p):
        return training_loss(eqx.combine(p, static), model, batch, turns, config)[0]

    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value


def train_policy(
    policy: LeaderPolicy,
    model: ResponseModel,
    *,
    config: GameConfig = DEFAULT_CONFIG,
    steps: int = 300,
    sessions: int = 256,
    turns: int = 3,
    learning_rate: float = 3e-3,
    seed: int = 0,
    checkpoint: str | Path | None = None,
    progress: bool = True,
    devices: Sequence[jax.Device] | None = None,
) -> tuple[LeaderPolicy, np.ndarray]:
    """Train a leader policy by gradient descent through the followers' implicit best responses.

    Every step draws a fresh batch of sessions, rolls them out for `turns` turns and
    follows the exact gradient of the mean leader utility (implicit function theorem
    at every follower solve, backpropagation through the state transitions).

    Arguments:
        policy: the starting policy.
        model: the response model (the simulator).
        config: the game.
        steps, sessions, turns: optimisation steps, sessions per batch, turns per session.
        learning_rate: Adam's step size.
        seed: fixes the session batches, hence the result.
        checkpoint: if set, the policy is saved there (atomically) at the end.
        progress: show a progress bar.
        devices: if given, each batch's sessions are split across these devices
            (`sessions` must divide evenly); the policy is replicated. Same result as
            on one device, up to floating-point summation order.

    Returns:
        The trained policy and the training loss per step.
    """
    if steps < 1 or sessions < 1:
        raise ValueError("steps and sessions must be >= 1")
    spread = None
    if devices is not None:
        devices = list(devices)
        if not devices or sessions % len(devices):
            raise ValueError(
                f"devices: expected a non-empty list whose length divides sessions={sessions}, "
                f"got {len(devices)} devices"
            )
        mesh = jax.sharding.Mesh(np.array(devices), ("sessions",))
        spread = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("sessions"))
    params, static = eqx.partition(policy, eqx.is_inexact_array)
    state = optax.adam(learning_rate).init(params)
    losses = np.zeros(steps)
    keys = jax.random.split(jax.random.PRNGKey(seed), steps)
    iterator = range(steps)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="training leader policy")
    for i in iterator:
        params, state, value = _train_step(
            params, static, state, keys[i], model, config, learning_rate, sessions, turns, spread
        )
        losses[i] = float(value)
        if not np.isfinite(losses[i]):
            raise FloatingPointError(f"train_policy: the loss became non-finite at step {i}")
        if progress and i % 10 == 0:
            iterator.set_postfix(leader_utility=f"{-losses[i]:.4f}")
    trained = eqx.combine(params, static)
    if checkpoint is not None:
        save_policy(trained, checkpoint)
    return trained, losses


def save_policy(policy: LeaderPolicy, path: str | Path) -> None:
    """Write the policy's parameters to `path` atomically (equinox serialisation)."""
    atomic_write(path, lambda handle: eqx.tree_serialise_leaves(handle, policy))


def load_policy(path: str | Path, like: LeaderPolicy) -> LeaderPolicy:
    """Read a policy written by `save_policy`; `like` gives its structure (same config, width, depth)."""
    return eqx.tree_deserialise_leaves(path, like)
