"""What an action a = (c, p, u) and a leader signal l = (q, alpha) mean for a real request.

- c, context retention: the share of the conversation history (newest first) or of
  the few-shot examples kept; the system prompt is always kept.
- p, prompt verbosity: four ordered levels, as in the real data. Continuous p maps
  to the nearest level `round(3 p)`, i.e. thresholds at 1/6, 1/2 and 5/6, and each
  level carries a completion-token cap.
- u, tool budget: `round(u * max_tool_calls)` tool calls this turn (0 removes the tools).
"""

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

VERBOSITY_LEVELS = ("answer_only", "concise", "chain_of_thought", "detailed")
# p at each level's centre: the value logged data at that level is mapped to.
VERBOSITY_P = (0.0, 1 / 3, 2 / 3, 1.0)
# Completion-token cap per level (a generous ceiling, not a target).
COMPLETION_CAPS = (256, 1024, 2048, 4096)
# The real-data prompt styles, in the same order.
PROMPT_STYLE_LEVEL = {"baseline": 0, "concise": 1, "chain_of_thought": 2, "composite": 3}
# Few-shot examples at full context (c = 1) in the real few-shot data.
MAX_SHOTS = 16
ACTION_NAMES = ("context", "verbosity", "tools")


def verbosity_level(p: float | np.ndarray) -> np.ndarray:
    """The verbosity level index (0-3) of a continuous p in [0, 1]."""
    return np.clip(np.rint(3.0 * np.asarray(p, dtype=float)), 0, 3).astype(int)


def completion_cap(p: float) -> int:
    """The completion-token cap for a continuous p."""
    return COMPLETION_CAPS[int(verbosity_level(p))]


def kept_messages(c: float, n_history: int) -> int:
    """How many of the newest `n_history` history messages a retention share c keeps."""
    if not 0.0 <= c <= 1.0:
        raise ValueError(f"c: context retention must be in [0, 1], got {c}")
    return int(np.ceil(c * n_history - 1e-9))


def tool_calls_allowed(u: float, max_tool_calls: int) -> int:
    """The number of tool calls a tool budget u allows (0 means tools are removed)."""
    if not 0.0 <= u <= 1.0:
        raise ValueError(f"u: tool budget must be in [0, 1], got {u}")
    return int(np.rint(u * max_tool_calls))


def shots_to_context(shots: np.ndarray) -> np.ndarray:
    """Context retention of a few-shot prompt: the share of `MAX_SHOTS` examples kept."""
    return np.clip(np.asarray(shots, dtype=float) / MAX_SHOTS, 0.0, 1.0)


def smooth_subsidy(
    raw: Float[Array, "..."],
    previous: Float[Array, "..."],
    *,
    inertia: float = 0.5,
    max_change: float = 0.2,
) -> Float[Array, "..."]:
    """The paper's subsidy smoothing between turns.

    `alpha_t = clip(rho * alpha_{t-1} + (1 - rho) * raw, [alpha_{t-1} - d, alpha_{t-1} + d] and [0, 1])`.

    Arguments:
        raw: the subsidy the policy asks for.
        previous: last turn's subsidy.
        inertia: rho in [0, 1].
        max_change: d >= 0, the largest change per turn.

    Returns:
        The subsidy applied this turn.
    """
    blended = inertia * previous + (1.0 - inertia) * raw
    return jnp.clip(jnp.clip(blended, previous - max_change, previous + max_change), 0.0, 1.0)
