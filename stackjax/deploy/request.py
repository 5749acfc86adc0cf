"""What an action a = (c, p, u) does to one Chat Completions request.

Pure functions, shared by the governed client and the probe runner:
- `trim_history`: keep the newest share c of the history (whole exchanges: an
  assistant message that calls tools always travels with its tool results);
- `verbosity_instruction`: the instruction of p's verbosity level, appended to the
  system prompt, with its completion-token cap from `actions.COMPLETION_CAPS`;
- `estimate_tokens`: the estimate used for text the API has not counted yet.

Token estimate for new text (documented, deliberately simple): 4 characters per
token plus 4 tokens of message overhead. Counts for earlier messages come from the
API's own `usage` of the calls that sent them (see `client.GovernedSession`).
"""

import json
import math

from ..governance import actions

# Appended to the system prompt, one per verbosity level (actions.VERBOSITY_LEVELS).
VERBOSITY_INSTRUCTIONS = (
    "Reply with the final answer only, no explanation. End with a line 'Answer: <answer>'.",
    "Reason briefly, in at most two short sentences, then end with a line 'Answer: <answer>'.",
    "Think step by step, then end with a line 'Answer: <answer>'.",
    "Explain your reasoning in detail, step by step, checking each step, "
    "then end with a line 'Answer: <answer>'.",
)
# The request header carrying the action and state, which simulators (the surrogate
# server) read and real APIs ignore.
CONTEXT_HEADER = "X-Stackjax-Context"
CHARS_PER_TOKEN = 4.0
MESSAGE_OVERHEAD_TOKENS = 4


def estimate_tokens(message: dict | str) -> int:
    """Tokens of a message (or text) the API has not counted yet: 4 characters per token + 4."""
    if isinstance(message, str):
        text = message
    else:
        text = message.get("content") or ""
        if not isinstance(text, str):  # content parts
            text = json.dumps(text)
        if message.get("tool_calls"):
            text += json.dumps(message["tool_calls"])
    return math.ceil(len(text) / CHARS_PER_TOKEN) + MESSAGE_OVERHEAD_TOKENS


def verbosity_instruction(p: float) -> str:
    """The instruction of the verbosity level of a continuous p in [0, 1]."""
    return VERBOSITY_INSTRUCTIONS[int(actions.verbosity_level(p))]


def detect_verbosity_level(messages: list[dict]) -> int | None:
    """The verbosity level whose instruction appears in the system prompt, if any."""
    for message in messages:
        if message.get("role") in ("system", "developer") and isinstance(message.get("content"), str):
            for level, instruction in enumerate(VERBOSITY_INSTRUCTIONS):
                if instruction in message["content"]:
                    return level
    return None


def with_instruction(system: str | None, p: float) -> dict:
    """The system message: the operator's system prompt followed by the verbosity instruction."""
    instruction = verbosity_instruction(p)
    return {"role": "system", "content": f"{system}\n\n{instruction}" if system else instruction}


def _exchange_starts(history: list[dict]) -> list[int]:
    """Indices where a history may start without orphaning a tool result."""
    return [i for i, m in enumerate(history) if m.get("role") != "tool"]


def trim_history(history: list[dict], c: float) -> list[dict]:
    """The newest share `c` of `history` (by message count, `actions.kept_messages`),
    moved forward to the next message that is not a tool result, so every tool result
    sent has the assistant message that called it."""
    keep = actions.kept_messages(c, len(history))
    if keep == 0:
        return []
    start = len(history) - keep
    allowed = [i for i in _exchange_starts(history) if i >= start]
    return history[allowed[0] :] if allowed else []


def completion_cap(p: float, budget_left: float | None = None) -> int:
    """The completion-token cap of p's level, lowered to `budget_left` when that is smaller."""
    cap = actions.completion_cap(p)
    if budget_left is not None:
        cap = min(cap, int(budget_left))
    return cap
