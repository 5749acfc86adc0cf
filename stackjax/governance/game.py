"""The resource-governance game: session state, follower and leader utilities, one turn.

The leader (controller) commits to `l = (q, alpha)`: a quality target and a cost
subsidy. The follower (executor) answers with `a = (c, p, u)` maximising

    U_F = w_Q Q - w_C (1 - alpha) T / T0 - w_G [q - Q]_+ - (mu / 2) ||a - a_ref||^2

and the leader earns

    U_L = w_S clip(1 - T / T0, -kappa, 1) - w_D [tau_Q - Q]_+ - w_B [tau_B - B]_+ [T - tau_T]_+
          - w_Delta ||l - l_prev||^2

with T, Q from a `ResponseModel`, T0 the tokens of the conservative fixed action in
the same state, and B the share of the session budget left. Hinges and the clip are
smoothed (softplus with temperature `smoothing`) so the theory's conditions can be
checked, and the `mu` term makes the follower's problem strongly concave near its
optimum. All weights live in `GameConfig`.
"""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from . import features
from .response import ResponseModel

# Fixed actions (c, p, u) of the paper's baselines.
CONSERVATIVE_ACTION = (0.3, 0.45, 0.3)
MIDDLE_ACTION = (0.5, 0.6, 0.5)
ACTION_LOWER, ACTION_UPPER = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


@dataclasses.dataclass(frozen=True)
class GameConfig:
    """Every weight and threshold of the game, with documented defaults.

    Attributes:
        quality_weight, cost_weight, target_weight: follower's w_Q, w_C, w_G.
        concavity: follower's mu (strong-concavity term around `reference_action`).
        reference_action: the action the concavity term pulls towards.
        savings_weight, shortfall_weight, budget_weight, change_weight: leader's
            w_S, w_D, w_B, w_Delta.
        quality_floor: tau_Q, the quality below which the leader is penalised; with
            `relative_floor` it is instead the conservative action's quality in the same
            state minus `quality_tolerance` ("cut tokens at unchanged quality").
        relative_floor, quality_tolerance: see `quality_floor`.
        budget_threshold: tau_B, share of the budget below which expensive turns cost.
        token_threshold: tau_T, tokens per turn that count as expensive.
        max_savings_loss: kappa, the floor of the savings clip.
        smoothing: temperature of the smoothed hinges and clip.
        target_range: [q_min, q_max], the leader's box for q (alpha lies in [0, 1]).
        subsidy_inertia, subsidy_max_change: the paper's subsidy smoothing rho, d.
        hold_turns: K, turns a leader signal is held before it may change.
        max_tool_calls: tool calls u = 1 allows.
    """

    quality_weight: float = 4.0
    cost_weight: float = 3.0
    target_weight: float = 4.0
    concavity: float = 0.5
    reference_action: tuple[float, float, float] = CONSERVATIVE_ACTION
    savings_weight: float = 1.0
    shortfall_weight: float = 8.0
    budget_weight: float = 0.5
    change_weight: float = 0.05
    quality_floor: float = 0.8
    relative_floor: bool = True
    quality_tolerance: float = 0.0
    budget_threshold: float = 0.2
    token_threshold: float = 2000.0
    max_savings_loss: float = 1.0
    smoothing: float = 0.02
    target_range: tuple[float, float] = (0.5, 0.99)
    subsidy_inertia: float = 0.5
    subsidy_max_change: float = 0.2
    hold_turns: int = 1
    max_tool_calls: int = 4

    def __post_init__(self):
        lo, hi = self.target_range
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"target_range: expected 0 <= q_min < q_max <= 1, got {self.target_range}")
        for name in (
            "quality_weight",
            "cost_weight",
            "target_weight",
            "concavity",
            "smoothing",
            "shortfall_weight",
        ):
            if getattr(self, name) < 0 or not np.isfinite(getattr(self, name)):
                raise ValueError(f"{name}: must be finite and >= 0, got {getattr(self, name)}")
        if self.smoothing <= 0:
            raise ValueError(f"smoothing: must be > 0, got {self.smoothing}")
        if not 0.0 <= self.subsidy_inertia <= 1.0 or self.subsidy_max_change < 0:
            raise ValueError("subsidy_inertia must lie in [0, 1] and subsidy_max_change be >= 0")
        if self.hold_turns < 1:
            raise ValueError(f"hold_turns: must be >= 1, got {self.hold_turns}")

    @property
    def leader_lower(self) -> jax.Array:
        return jnp.array([self.target_range[0], 0.0])

    @property
    def leader_upper(self) -> jax.Array:
        return jnp.array([self.target_range[1], 1.0])


DEFAULT_CONFIG = GameConfig()


def soft_hinge(z: Float[Array, "..."], temperature: float) -> Float[Array, "..."]:
    """Smooth `max(z, 0)`: `t softplus(z / t)`, within `t log 2` of the hinge."""
    return temperature * jax.nn.softplus(z / temperature)


def soft_clip(z, low: float, high: float, temperature: float):
    """Smooth `clip(z, low, high)` built from two soft hinges."""
    return low + soft_hinge(z - low, temperature) - soft_hinge(z - high, temperature)


class SessionState(eqx.Module):
    """The state of one session (or a batch, with a leading axis on every field).

    Attributes:
        task: task-type index into `TASK_TYPES`.
        model_tier: tier of the executing model in [0, 1].
        complexity: task complexity in [0, 1].
        context_tokens: tokens of conversation so far.
        turn: turn index (0-based).
        avg_cost: mean tokens per turn so far.
        recent_quality: exponentially weighted quality of recent turns.
        cost_trend: last turn's tokens minus the running mean, in thousands.
        budget: share of the session's token budget left, in [0, 1] (may go below 0).
        budget_tokens: the session's total token budget.
        previous_leader: the leader signal of the previous turn, (q, alpha).
    """

    task: Int[Array, "..."]
    model_tier: Float[Array, "..."]
    complexity: Float[Array, "..."]
    context_tokens: Float[Array, "..."]
    turn: Float[Array, "..."]
    avg_cost: Float[Array, "..."]
    recent_quality: Float[Array, "..."]
    cost_trend: Float[Array, "..."]
    budget: Float[Array, "..."]
    budget_tokens: Float[Array, "..."]
    previous_leader: Float[Array, "... 2"]

    @classmethod
    def create(
        cls,
        task,
        model_tier,
        complexity,
        context_tokens,
        budget_tokens,
        *,
        initial_leader=(0.8, 0.0),
    ) -> "SessionState":
        """A fresh session (or batch of sessions), validating every range.

        Arguments:
            task: task-type index or name(s) from `TASK_TYPES`.
            model_tier: in [0, 1].
            complexity: in [0, 1].
            context_tokens: >= 0, the task's own context at turn 0.
            budget_tokens: > 0, the session's token budget.
            initial_leader: the signal assumed before turn 0.
        """
        task = np.asarray(task)
        if task.dtype.kind in "US":
            unknown = sorted(set(task.ravel()) - set(features.TASK_TYPES))
            if unknown:
                raise ValueError(f"task: unknown task types {unknown}; expected {features.TASK_TYPES}")
            task = np.vectorize(features.TASK_TYPES.index)(task)
        task = np.asarray(task, dtype=np.int32)
        if np.any((task < 0) | (task >= len(features.TASK_TYPES))):
            raise ValueError(f"task: indices must lie in [0, {len(features.TASK_TYPES) - 1}]")
        shape = task.shape

        def field(value, name, low, high):
            arr = np.broadcast_to(np.asarray(value, dtype=np.float32), shape)
            if not np.isfinite(arr).all() or np.any(arr < low) or np.any(arr > high):
                raise ValueError(f"{name}: expected finite values in [{low}, {high}]")
            return jnp.asarray(arr)

        tier = field(model_tier, "model_tier", 0.0, 1.0)
        complexity = field(complexity, "complexity", 0.0, 1.0)
        context = field(context_tokens, "context_tokens", 0.0, np.inf)
        budget_tokens = field(budget_tokens, "budget_tokens", 1e-9, np.inf)
        leader = np.asarray(initial_leader, np.float32)
        if leader.shape[-1:] != (2,) or not np.isfinite(leader).all():
            raise ValueError(f"initial_leader: expected finite (q, alpha) pairs, got shape {leader.shape}")
        return cls.fresh(jnp.asarray(task), tier, complexity, context, budget_tokens, jnp.asarray(leader))

    @classmethod
    def fresh(
        cls, task, model_tier, complexity, context_tokens, budget_tokens, initial_leader
    ) -> "SessionState":
        """Like `create` but without validation, for use inside `jit` (values must already be valid)."""
        shape = jnp.shape(task)
        zeros = jnp.zeros(shape, jnp.float32)
        return cls(
            task=jnp.asarray(task, jnp.int32),
            model_tier=jnp.asarray(model_tier, jnp.float32),
            complexity=jnp.asarray(complexity, jnp.float32),
            context_tokens=jnp.asarray(context_tokens, jnp.float32),
            turn=zeros,
            avg_cost=zeros,
            recent_quality=jnp.full(shape, 0.8, jnp.float32),
            cost_trend=zeros,
            budget=jnp.ones(shape, jnp.float32),
            budget_tokens=jnp.asarray(budget_tokens, jnp.float32),
            previous_leader=jnp.broadcast_to(jnp.asarray(initial_leader, jnp.float32), (*shape, 2)),
        )

    def covariates(self) -> Float[Array, "... f"]:
        """The response model's covariates: task one-hot, tier, context size, complexity."""
        onehot = jax.nn.one_hot(self.task, len(features.TASK_TYPES), dtype=jnp.float32)
        context = jnp.log1p(self.context_tokens / 500.0)
        return jnp.concatenate(
            [onehot, self.model_tier[..., None], context[..., None], self.complexity[..., None]], axis=-1
        )

    def _scalar_part(self) -> Float[Array, "... 8"]:
        return jnp.stack(
            [
                self.complexity,
                jnp.log1p(self.context_tokens / 1000.0),
                self.turn / 10.0,
                self.avg_cost / 1000.0,
                self.recent_quality,
                self.cost_trend,
                self.model_tier,
                self.budget,
            ],
            axis=-1,
        )

    def scalar_features(self) -> Float[Array, "... 9"]:
        """The paper's 9-dim scalar state: 8 scalars plus the task type as one number."""
        task = self.task.astype(jnp.float32) / (len(features.TASK_TYPES) - 1)
        return jnp.concatenate([self._scalar_part(), task[..., None]], axis=-1)

    def task_features(self) -> Float[Array, "... 14"]:
        """The paper's 14-dim task-aware state: 8 scalars plus the task one-hot."""
        onehot = jax.nn.one_hot(self.task, len(features.TASK_TYPES), dtype=jnp.float32)
        return jnp.concatenate([self._scalar_part(), onehot], axis=-1)


class TurnContext(eqx.Module):
    """What the utilities need about one turn: covariates, the conservative action's
    tokens and quality in this state, the budget share left and the previous signal."""

    covariates: Float[Array, " f"]
    reference_tokens: Float[Array, ""]
    reference_quality: Float[Array, ""]
    budget: Float[Array, ""]
    previous_leader: Float[Array, " 2"]


def turn_context(model: ResponseModel, state: SessionState) -> TurnContext:
    """The `TurnContext` of a single (unbatched) session state."""
    x = state.covariates()
    tokens, quality = model(jnp.asarray(CONSERVATIVE_ACTION, x.dtype), x)
    return TurnContext(x, tokens, quality, state.budget, state.previous_leader)


class FollowerWeights(eqx.Module):
    """The follower's utility weights as arrays (w_Q, w_C, w_G), so they can be learned."""

    quality: Float[Array, ""]
    cost: Float[Array, ""]
    target: Float[Array, ""]

    @classmethod
    def from_config(cls, config: GameConfig) -> "FollowerWeights":
        return cls(
            jnp.asarray(config.quality_weight, jnp.float32),
            jnp.asarray(config.cost_weight, jnp.float32),
            jnp.asarray(config.target_weight, jnp.float32),
        )


def follower_utility(
    action: Float[Array, " 3"],
    leader: Float[Array, " 2"],
    context: TurnContext,
    model: ResponseModel,
    config: GameConfig,
    weights: FollowerWeights | None = None,
) -> Float[Array, ""]:
    """U_F: quality, subsidised relative cost, the target hinge and the concavity term.

    `weights` overrides the config's w_Q, w_C, w_G (used when learning them).
    """
    weights = FollowerWeights.from_config(config) if weights is None else weights
    target, subsidy = leader[0], leader[1]
    quality = model.quality(action, context.covariates)
    relative_cost = model.tokens(action, context.covariates) / context.reference_tokens
    shortfall = soft_hinge(target - quality, config.smoothing)
    anchor = action - jnp.asarray(config.reference_action, action.dtype)
    return (
        weights.quality * quality
        - weights.cost * (1.0 - subsidy) * relative_cost
        - weights.target * shortfall
        - 0.5 * config.concavity * jnp.dot(anchor, anchor)
    )


def leader_utility(
    action: Float[Array, " 3"],
    leader: Float[Array, " 2"],
    context: TurnContext,
    model: ResponseModel,
    config: GameConfig,
) -> Float[Array, ""]:
    """U_L: smoothed savings, quality shortfall, budget pressure and signal change."""
    tokens = model.tokens(action, context.covariates)
    quality = model.quality(action, context.covariates)
    savings = soft_clip(
        1.0 - tokens / context.reference_tokens, -config.max_savings_loss, 1.0, config.smoothing
    )
    floor = (
        context.reference_quality - config.quality_tolerance
        if config.relative_floor
        else config.quality_floor
    )
    shortfall = soft_hinge(floor - quality, config.smoothing)
    pressure = soft_hinge(config.budget_threshold - context.budget, config.smoothing) * soft_hinge(
        (tokens - config.token_threshold) / 1000.0, config.smoothing
    )
    change = leader - context.previous_leader
    return (
        config.savings_weight * savings
        - config.shortfall_weight * shortfall
        - config.budget_weight * pressure
        - config.change_weight * jnp.dot(change, change)
    )
