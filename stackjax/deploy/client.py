"""The governed OpenAI client: every turn's request shaped by the controller's action.

    client = GovernedClient(openai.OpenAI(base_url=..., api_key=...), model="gpt-4o-mini",
                            governor=Governor(), log="calls.jsonl")
    session = client.session(task_type="code_generation", budget_tokens=20_000, system="...")
    result = session.ask("Write a function that ...")

Per turn the session builds the state from the conversation so far, asks the
`Governor` for the action a = (c, p, u), and applies it: the newest share c of the
history is sent (the system prompt always is), p picks the verbosity instruction and
the completion cap, and at most round(u k) tool calls are executed across the tool
loop (tools are not offered when that is 0; once it is spent, `tool_choice="none"`
and further calls are answered with a refusal). The session token budget is
enforced before each call, never after: the completion cap is lowered to what is
left, then the history is dropped, and if even that does not fit the turn is refused
with the reason (or `BudgetExhausted` is raised, with `on_budget="raise"`). Every
call is appended to the JSONL log (schema `stackjax.call/1`, see
`stackjax.governance.data`).

Works with `openai.OpenAI` (`GovernedClient`) and `openai.AsyncOpenAI`
(`AsyncGovernedClient`) against any Chat Completions endpoint; usage details
(cached, reasoning tokens) and tools are used when the server has them.
"""

import dataclasses
import inspect
import json
import time
import uuid
from collections.abc import Callable, Generator
from pathlib import Path

from ..governance import actions
from ..governance.data import CALL_SCHEMA
from ..governance.features import TASK_TYPES
from . import request as req
from .calllog import CallLog
from .governor import Decision, Governor

MIN_COMPLETION_TOKENS = 16
MALFORMED_RETRIES = 3


class BudgetExhausted(RuntimeError):
    """The session's token budget cannot pay for the next call."""


@dataclasses.dataclass
class TurnResult:
    """What one governed turn did.

    Attributes:
        text: the final reply (None when the turn was refused before any reply).
        refused: why the turn was refused or cut short by the budget, else None.
        degraded: how the request was shrunk to fit the budget, else None.
        decision: the controller's leader signal and action.
        prompt_tokens, completion_tokens: billed over every call of the turn.
        calls: API calls made (tool rounds included).
        tool_calls_executed, tool_calls_refused: tool calls run, and refused over the cap.
        history_sent: history messages sent with the first call (after trimming).
        max_tokens: the completion cap of the first call.
        budget_left: session tokens left after the turn.
        quality: the grade of the reply, when a grader and a reference were given.
        request_ids: the API's request id of every call.
    """

    text: str | None
    refused: str | None
    degraded: str | None
    decision: Decision
    prompt_tokens: int = 0
    completion_tokens: int = 0
    calls: int = 0
    tool_calls_executed: int = 0
    tool_calls_refused: int = 0
    history_sent: int = 0
    max_tokens: int = 0
    budget_left: float = 0.0
    quality: object = None
    request_ids: list = dataclasses.field(default_factory=list)

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclasses.dataclass
class _Entry:
    """A conversation message and its token count (measured by the API, or estimated)."""

    message: dict
    tokens: float
    measured: bool

    @property
    def text_tokens(self) -> int:
        return req.estimate_tokens(self.message)


def _usage(response) -> dict:
    """The usage fields of a response, with details when the server reports them."""
    usage = getattr(response, "usage", None)
    if usage is None:
        return {}
    prompt_details = getattr(usage, "prompt_tokens_details", None)
    completion_details = getattr(usage, "completion_tokens_details", None)
    return {
        "prompt_tokens": int(usage.prompt_tokens or 0),
        "completion_tokens": int(usage.completion_tokens or 0),
        "cached_tokens": int(getattr(prompt_details, "cached_tokens", 0) or 0),
        "reasoning_tokens": int(getattr(completion_details, "reasoning_tokens", 0) or 0),
    }


def _assistant_message(message) -> dict:
    """A response message as a request message (tool calls kept)."""
    out = {"role": "assistant", "content": message.content}
    if getattr(message, "tool_calls", None):
        out["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.function.name, "arguments": call.function.arguments},
            }
            for call in message.tool_calls
        ]
    return out


class _ClientBase:
    def __init__(
        self,
        openai_client,
        model: str,
        *,
        governor: Governor | None = None,
        log: str | Path | CallLog | None = None,
        max_tokens_field: str = "max_tokens",
        send_context_header: bool = True,
    ):
        if not hasattr(openai_client, "chat"):
            raise TypeError(
                f"openai_client: expected an openai.OpenAI or AsyncOpenAI, got {type(openai_client).__name__}"
            )
        if not isinstance(model, str) or not model:
            raise ValueError("model: expected a model name")
        if max_tokens_field not in ("max_tokens", "max_completion_tokens"):
            raise ValueError(
                "max_tokens_field: expected 'max_tokens' or 'max_completion_tokens', "
                f"got {max_tokens_field!r}"
            )
        self.openai = openai_client
        self.model = model
        self.governor = governor or Governor()
        key = getattr(openai_client, "api_key", None)
        secrets = (key,) if isinstance(key, str) else ()
        self.log = log if isinstance(log, CallLog) or log is None else CallLog(log, secrets=secrets)
        self.max_tokens_field = max_tokens_field
        self.send_context_header = send_context_header

    def close(self) -> None:
        """Close the call log (the openai client stays open: it is the caller's)."""
        if self.log is not None:
            self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        # Never the key: the base URL and model identify the client well enough.
        base_url = str(getattr(self.openai, "base_url", ""))
        return f"{type(self).__name__}(base_url={base_url!r}, model={self.model!r})"


class _SessionBase:
    def __init__(
        self,
        client: _ClientBase,
        *,
        budget_tokens: float,
        task_type: str = "simple_qa",
        complexity: float = 0.5,
        system: str | None = None,
        tools: list[dict] | None = None,
        tool_handler: Callable | None = None,
        max_tool_calls: int | None = None,
        grader=None,
        on_budget: str = "degrade",
        session_id: str | None = None,
    ):
        if on_budget not in ("degrade", "raise"):
            raise ValueError(f"on_budget: expected 'degrade' or 'raise', got {on_budget!r}")
        if tools and tool_handler is None:
            raise ValueError("tool_handler: required when tools are given")
        if task_type not in TASK_TYPES:
            raise ValueError(f"task_type: expected one of {TASK_TYPES}, got {task_type!r}")
        self.client = client
        self.tracker = client.governor.tracker(task_type, client.model, complexity, budget_tokens)
        self.task_type = task_type
        self.tools = tools or None
        self.tool_handler = tool_handler
        self.max_tool_calls = (
            client.governor.config.max_tool_calls if max_tool_calls is None else int(max_tool_calls)
        )
        self.grader = grader
        self.on_budget = on_budget
        self.session_id = session_id or uuid.uuid4().hex[:16]
        self.system_text = system
        self.system_tokens = req.estimate_tokens(system or "")
        self.history: list[_Entry] = []

    @property
    def budget_left(self) -> float:
        return self.tracker.budget_left

    def _refuse(self, result: TurnResult, reason: str) -> TurnResult:
        if self.on_budget == "raise":
            raise BudgetExhausted(reason)
        result.refused = reason
        result.budget_left = self.budget_left
        return result

    def _fit_budget(self, entries: list[_Entry], system: _Entry, cap: int):
        """(entries, cap, degraded) that fit what is left, or None when nothing does."""
        left = self.budget_left
        prompt = system.tokens + sum(e.tokens for e in entries)
        if prompt + cap <= left:
            return entries, cap, None
        if left - prompt >= MIN_COMPLETION_TOKENS:
            return entries, int(left - prompt), f"completion cap lowered from {cap} to {int(left - prompt)}"
        return None

    def _protocol(self, user_message: str, reference) -> Generator:
        """One turn as a generator: yields ("call", kwargs) and ("tool", name, arguments)
        events, receives the response or tool result, and returns the `TurnResult`."""
        if not isinstance(user_message, str) or not user_message:
            raise ValueError("user_message: expected a non-empty string")
        tracker = self.tracker
        user = _Entry({"role": "user", "content": user_message}, req.estimate_tokens(user_message), False)
        # The state's context size is read from the text (the documented estimate), not from
        # billed counts: a simulator's drawn counts must not feed back into its own covariate.
        conversation = float(
            req.estimate_tokens(self.system_text or "")
            + sum(e.text_tokens for e in self.history)
            + user.tokens
        )
        decision = self.client.governor.decide(tracker.state(conversation))
        c, p, u = decision.action
        result = TurnResult(None, None, None, decision, budget_left=self.budget_left)
        system = _Entry(req.with_instruction(self.system_text, p), self.system_tokens, tracker.turn > 0)
        system.tokens += req.estimate_tokens(req.verbosity_instruction(p)) if tracker.turn == 0 else 0
        kept = req.trim_history([e.message for e in self.history], c)
        history = self.history[len(self.history) - len(kept) :]
        allowed = actions.tool_calls_allowed(u, self.max_tool_calls) if self.tools else 0
        cap = actions.completion_cap(p)

        turn_entries: list[_Entry] = [user]
        used = 0
        text = None
        for _ in range(allowed + 2):
            fitted = self._fit_budget(history + turn_entries, system, cap)
            if fitted is None and history:
                history = []
                result.degraded = "history dropped to fit the budget"
                fitted = self._fit_budget(turn_entries, system, cap)
            if fitted is None:
                prompt = system.tokens + sum(e.tokens for e in turn_entries)
                reason = (
                    f"token budget exhausted: {self.budget_left:.0f} tokens left, the request needs "
                    f"about {prompt:.0f} prompt + {MIN_COMPLETION_TOKENS} completion tokens"
                )
                return self._finish(self._refuse(result, reason), text, turn_entries, decision)
            sent, call_cap, degraded = fitted
            result.degraded = degraded or result.degraded
            if result.calls == 0:
                result.history_sent, result.max_tokens = len(history), call_cap
            messages = [system.message, *(e.message for e in sent)]
            kwargs = {"model": self.client.model, "messages": messages}
            kwargs[self.client.max_tokens_field] = call_cap
            if allowed > 0:
                kwargs["tools"] = self.tools
                if used >= allowed:
                    kwargs["tool_choice"] = "none"
            if self.client.send_context_header:
                header = {
                    "action": [c, p, u],
                    "task_type": self.task_type,
                    "context_tokens": round(conversation, 1),
                    "complexity": tracker.complexity,
                    "session_id": self.session_id,
                    "turn": tracker.turn,
                }
                kwargs["extra_headers"] = {req.CONTEXT_HEADER: json.dumps(header)}
            budget_before = tracker.budget_left / tracker.budget_tokens
            started = time.time()
            response = yield ("call", kwargs)
            finished = time.time()
            usage = _usage(response)
            estimated = not usage
            choice = response.choices[0] if response.choices else None
            message = choice.message if choice is not None else None
            if estimated:  # the server reports no usage: estimate it, and say so in the log
                usage = {
                    "prompt_tokens": int(system.tokens + sum(e.tokens for e in sent)),
                    "completion_tokens": req.estimate_tokens(_assistant_message(message) if message else ""),
                    "cached_tokens": 0,
                    "reasoning_tokens": 0,
                }
            self._measure(system, sent, usage["prompt_tokens"])
            tracker.spent += usage["prompt_tokens"] + usage["completion_tokens"]
            result.calls += 1
            result.prompt_tokens += usage["prompt_tokens"]
            result.completion_tokens += usage["completion_tokens"]
            request_id = getattr(response, "_request_id", None) or getattr(response, "id", None)
            result.request_ids.append(request_id)
            record = {
                "schema": CALL_SCHEMA,
                "request_id": request_id,
                "model": getattr(response, "model", None) or self.client.model,
                "session_id": self.session_id,
                "turn": tracker.turn,
                "call_index": result.calls - 1,
                "started_at": started,
                "finished_at": finished,
                "latency_s": finished - started,
                "finish_reason": getattr(choice, "finish_reason", None),
                "action": {"context": c, "verbosity": p, "tools": u},
                "state": {
                    "task_type": self.task_type,
                    "context_tokens": conversation,
                    "complexity": tracker.complexity,
                    "budget": budget_before,
                    "budget_tokens": tracker.budget_tokens,
                },
                "leader": {"quality_target": decision.leader[0], "subsidy": decision.leader[1]},
                "usage": usage,
                "usage_estimated": estimated,
                "request": {
                    "verbosity_level": actions.VERBOSITY_LEVELS[int(actions.verbosity_level(p))],
                    "max_tokens": call_cap,
                    "history_sent": len(history),
                    "messages_sent": len(messages),
                    "tools_offered": len(self.tools or []) if allowed > 0 else 0,
                    "tool_calls_allowed": allowed,
                    "degraded": degraded,
                },
            }
            tool_calls = list(getattr(message, "tool_calls", None) or [])
            if message is not None:
                turn_entries.append(_Entry(_assistant_message(message), usage["completion_tokens"], True))
            text = message.content if message is not None else None
            if not tool_calls or allowed == 0:
                if self.grader is not None and reference is not None and text is not None:
                    grade = yield ("grade", user_message, text, reference)
                    record["quality"] = {"score": grade.score, "grader": grade.grader, "trials": 1}
                    result.quality = grade
                self._log(record)
                return self._finish(result, text, turn_entries, decision)
            self._log(record)
            for call in tool_calls:
                if used < allowed:
                    output = yield ("tool", call.function.name, call.function.arguments)
                    used += 1
                    result.tool_calls_executed += 1
                else:
                    output = "Tool call refused: this turn's tool budget is spent. Answer without tools."
                    result.tool_calls_refused += 1
                content = str(output)
                turn_entries.append(
                    _Entry(
                        {"role": "tool", "tool_call_id": call.id, "content": content},
                        req.estimate_tokens(content),
                        False,
                    )
                )
            cap = call_cap
        reason = "the model kept calling tools after the tool budget was spent"
        result.refused = reason
        return self._finish(result, text, turn_entries, decision)

    def _measure(self, system: _Entry, sent: list[_Entry], prompt_tokens: int) -> None:
        """Spread the API's prompt count over the messages it had not counted before."""
        unmeasured = [e for e in (system, *sent) if not e.measured]
        known = sum(e.tokens for e in (system, *sent) if e.measured)
        estimate = sum(e.tokens for e in unmeasured)
        remainder = prompt_tokens - known
        if unmeasured and remainder > 0 and estimate > 0:
            for entry in unmeasured:
                entry.tokens *= remainder / estimate
                entry.measured = True
            if system.measured:
                self.system_tokens = system.tokens

    def _finish(self, result: TurnResult, text, turn_entries, decision) -> TurnResult:
        result.text = text
        if result.calls:
            self.history.extend(turn_entries)
        result.budget_left = self.budget_left
        quality = result.quality.score if result.quality is not None else None
        self.tracker.end_turn(result.tokens, quality, decision.leader)
        return result

    def _log(self, record: dict) -> None:
        if self.client.log is not None and record is not None:
            self.client.log.append(record)


def malformed_reply(error: Exception) -> bool:
    """Whether `error` is a reply the client could not parse (retried here, not by openai)."""
    import openai

    return isinstance(error, (json.JSONDecodeError, openai.APIResponseValidationError))


class GovernedSession(_SessionBase):
    """A governed conversation over a synchronous `openai.OpenAI` client (see the module doc)."""

    def ask(self, user_message: str, *, reference=None) -> TurnResult:
        """Run one turn: decide the action, call the API (tool loop included), log every call.

        Arguments:
            user_message: the user's message this turn.
            reference: the reference answer for the session's grader, if any.

        Returns:
            A `TurnResult`.
        """
        protocol = self._protocol(user_message, reference)
        reply = None
        try:
            while True:
                event = protocol.send(reply)
                if event[0] == "call":
                    reply = _call_with_retries(self.client.openai, event[1])
                elif event[0] == "tool":
                    reply = self.tool_handler(event[1], event[2])
                else:
                    reply = self.grader.grade(*event[1:])
        except StopIteration as stop:
            return stop.value


class AsyncGovernedSession(_SessionBase):
    """A governed conversation over an `openai.AsyncOpenAI` client (see the module doc).
    The tool handler and the grader may be coroutine functions."""

    async def ask(self, user_message: str, *, reference=None) -> TurnResult:
        """Run one turn (see `GovernedSession.ask`)."""
        protocol = self._protocol(user_message, reference)
        reply = None
        try:
            while True:
                event = protocol.send(reply)
                if event[0] == "call":
                    reply = await _acall_with_retries(self.client.openai, event[1])
                elif event[0] == "tool":
                    reply = self.tool_handler(event[1], event[2])
                    reply = await reply if inspect.isawaitable(reply) else reply
                else:
                    grade = getattr(self.grader, "agrade", None)
                    reply = await grade(*event[1:]) if grade else self.grader.grade(*event[1:])
        except StopIteration as stop:
            return stop.value


def _call_with_retries(openai_client, kwargs: dict):
    """One Chat Completions call; the client's own retries cover 429, 5xx and timeouts,
    these cover a malformed (unparseable) response body."""
    for attempt in range(MALFORMED_RETRIES + 1):
        try:
            return openai_client.chat.completions.create(**kwargs)
        except Exception as error:
            if not malformed_reply(error) or attempt == MALFORMED_RETRIES:
                raise
            time.sleep(0.1 * 2**attempt)
    raise AssertionError("unreachable")


async def _acall_with_retries(openai_client, kwargs: dict):
    import asyncio

    for attempt in range(MALFORMED_RETRIES + 1):
        try:
            return await openai_client.chat.completions.create(**kwargs)
        except Exception as error:
            if not malformed_reply(error) or attempt == MALFORMED_RETRIES:
                raise
            await asyncio.sleep(0.1 * 2**attempt)
    raise AssertionError("unreachable")


class GovernedClient(_ClientBase):
    """Governs a synchronous `openai.OpenAI` client.

    Arguments:
        openai_client: an `openai.OpenAI` (any base_url: OpenAI, vLLM, Ollama, llama.cpp, ...).
        model: the model every call uses.
        governor: decides the actions (default `Governor()`).
        log: a JSONL path or `CallLog` every call is appended to (None: no log).
        max_tokens_field: 'max_tokens' (most servers) or 'max_completion_tokens' (newer OpenAI models).
        send_context_header: send the action and state in the `X-Stackjax-Context` header
            (simulators read it; real APIs ignore it).
    """

    def session(self, **options) -> GovernedSession:
        """A new governed conversation; options as `GovernedSession` (budget_tokens, task_type, ...)."""
        return GovernedSession(self, **options)


class AsyncGovernedClient(_ClientBase):
    """Governs an `openai.AsyncOpenAI` client (arguments as `GovernedClient`)."""

    def session(self, **options) -> AsyncGovernedSession:
        """A new governed conversation; options as `AsyncGovernedSession`."""
        return AsyncGovernedSession(self, **options)
