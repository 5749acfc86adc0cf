"""The controller in front of an agent: session state in, action a = (c, p, u) out.

A `Governor` holds a leader controller, the response model and the game. Each turn
it asks the controller for the leader signal l, solves the follower's best response
a*(l, x) (`stackjax.governance.session.decide`, compiled once), then repairs the
action onto the safe set when one is configured (a box inside [0, 1]^3, by
projection).
"""

import dataclasses

import jax.numpy as jnp
import numpy as np

from ..governance import features
from ..governance.game import DEFAULT_CONFIG, GameConfig, SessionState
from ..governance.response import ResponseModel, calibrated
from ..governance.session import ConstantLeader, FixedAction, LeaderPolicy, ThresholdRule, decide

DEFAULT_SIGNAL = (0.8, 0.3)


@dataclasses.dataclass(frozen=True)
class Decision:
    """One turn's decision: the leader signal (q, alpha), the action (c, p, u), whether the
    follower's solve converged, and whether the safe-set repair moved the action."""

    leader: tuple[float, float]
    action: tuple[float, float, float]
    converged: bool
    repaired: bool


@dataclasses.dataclass
class SessionTracker:
    """The running session quantities the state is built from (plain Python numbers)."""

    task: int
    model_tier: float
    complexity: float
    budget_tokens: float
    turn: int = 0
    spent: float = 0.0
    avg_cost: float = 0.0
    recent_quality: float = 0.8
    cost_trend: float = 0.0
    previous_leader: tuple[float, float] = (0.8, 0.0)

    @property
    def budget_left(self) -> float:
        return self.budget_tokens - self.spent

    def state(self, context_tokens: float) -> SessionState:
        """The `SessionState` of this session with `context_tokens` of conversation."""
        f = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
        return SessionState(
            task=jnp.asarray(self.task, jnp.int32),
            model_tier=f(self.model_tier),
            complexity=f(self.complexity),
            context_tokens=f(context_tokens),
            turn=f(self.turn),
            avg_cost=f(self.avg_cost),
            recent_quality=f(self.recent_quality),
            cost_trend=f(self.cost_trend),
            budget=f(self.budget_left / self.budget_tokens),
            budget_tokens=f(self.budget_tokens),
            previous_leader=f(self.previous_leader),
        )

    def end_turn(self, tokens: float, quality: float | None, leader: tuple[float, float]) -> None:
        """The paper's state transition after a turn that spent `tokens` (see `session`)."""
        self.turn += 1
        self.cost_trend = (tokens - self.avg_cost) / 1000.0
        self.avg_cost += (tokens - self.avg_cost) / self.turn
        if quality is not None:
            self.recent_quality = 0.5 * self.recent_quality + 0.5 * quality
        self.previous_leader = leader


class Governor:
    """Decides each turn's action for governed sessions.

    Arguments:
        controller: a trained `LeaderPolicy` (see `train_policy`, `load_policy`), a
            `ConstantLeader`, or a fixed baseline (`FixedAction`, `ThresholdRule`). Default:
            `ConstantLeader((0.8, 0.3))`.
        model: the response model the follower optimises against (default: the shipped
            calibrated model).
        config: the game.
        safe_lower, safe_upper: an optional safe box for the action inside [0, 1]^3; the
            follower's action is projected onto it.
    """

    def __init__(
        self,
        controller=None,
        model: ResponseModel | None = None,
        config: GameConfig = DEFAULT_CONFIG,
        *,
        safe_lower=None,
        safe_upper=None,
    ):
        controller = ConstantLeader(jnp.asarray(DEFAULT_SIGNAL)) if controller is None else controller
        if not isinstance(controller, (LeaderPolicy, ConstantLeader, FixedAction, ThresholdRule)):
            raise TypeError(
                "controller: expected a LeaderPolicy, ConstantLeader, FixedAction or ThresholdRule, "
                f"got {type(controller).__name__}"
            )
        self.controller = controller
        self.model = calibrated() if model is None else model
        self.config = config
        lower = np.zeros(3) if safe_lower is None else np.asarray(safe_lower, float)
        upper = np.ones(3) if safe_upper is None else np.asarray(safe_upper, float)
        if lower.shape != (3,) or upper.shape != (3,):
            raise ValueError("safe_lower, safe_upper: expected 3 values (c, p, u) each")
        if not (np.all(lower >= 0) and np.all(upper <= 1) and np.all(lower <= upper)):
            raise ValueError(
                f"safe_lower, safe_upper: expected 0 <= lower <= upper <= 1, got {lower} and {upper}"
            )
        self.safe_lower, self.safe_upper = lower, upper

    def tracker(self, task_type: str, model_name: str, complexity: float, budget_tokens: float):
        """A fresh `SessionTracker` (validated) for one session."""
        if task_type not in features.TASK_TYPES:
            raise ValueError(f"task_type: expected one of {features.TASK_TYPES}, got {task_type!r}")
        if not 0.0 <= complexity <= 1.0:
            raise ValueError(f"complexity: expected a value in [0, 1], got {complexity}")
        if not (np.isfinite(budget_tokens) and budget_tokens > 0):
            raise ValueError(f"budget_tokens: expected a positive number, got {budget_tokens}")
        return SessionTracker(
            task=features.TASK_TYPES.index(task_type),
            model_tier=features.model_tier(model_name),
            complexity=float(complexity),
            budget_tokens=float(budget_tokens),
        )

    def decide(self, state: SessionState) -> Decision:
        """The leader signal and the (repaired) follower action for one session state."""
        leader, action, converged = decide(self.controller, self.model, state, self.config)
        action = np.asarray(action, dtype=float)
        if not np.isfinite(action).all():
            raise FloatingPointError(f"Governor.decide: the follower's action is not finite ({action})")
        repaired = np.clip(action, self.safe_lower, self.safe_upper)
        return Decision(
            leader=tuple(float(v) for v in np.asarray(leader)),
            action=tuple(float(v) for v in repaired),
            converged=bool(converged),
            repaired=bool(np.any(np.abs(repaired - action) > 1e-9)),
        )
