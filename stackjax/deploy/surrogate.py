"""`stackjax serve`: an OpenAI-compatible Chat Completions server that SIMULATES an LLM.

It is a simulator, not a model: it answers `POST /v1/chat/completions` with usage
fields and answers drawn from a `ResponseModel` (the shipped calibrated one by
default), so the governed client, the probe runner and the calibration step can be
exercised end to end offline. Served with Starlette on uvicorn, on 127.0.0.1.

For each request it reads the action and state from the `X-Stackjax-Context` header
when present (the governed client and the probe runner send it), else infers them:
the verbosity level from the system prompt's instruction, c = 1, u from the tools
offered, the task type `simple_qa`, the context from the messages' length. Then:
- prompt tokens ~ LogNormal(log P(a, x), sigma_prompt), completion tokens per choice
  ~ LogNormal(log C(a, x), sigma_completion), cut at the request's max_tokens
  (finish_reason "length", and a cut reply has no answer);
- each choice is correct with probability Q(a, x): arithmetic questions ('What is
  12 + 30?') get the true result, or a wrong one; judge prompts ('SCORE: x') are
  scored by checking the candidate's number against the reference;
- with tools offered (and tool_choice not "none"), the first `tool_rounds` rounds
  after the user's message call the first tool.

Draws are seeded by the server seed and a hash of the request (body and context
header), so the same request gets the same reply, retries included. Faults are
injected at the configured rates from a separate seeded stream: 429 (with a short
Retry-After), 500, slow replies and malformed JSON bodies. Every request, faults
included, is recorded in the server's own JSONL log (never a header or a key).
"""

import asyncio
import dataclasses
import hashlib
import json
import re
import threading
import time
import uuid
from pathlib import Path

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from ..governance import actions, features
from ..governance.response import ResponseModel, calibrated
from . import request as req
from .calllog import CallLog
from .graders import parse_number

_ARITHMETIC = re.compile(r"(-?\d+)\s*([+\-*×])\s*(-?\d+)")
SURROGATE_MODEL = "stackjax-surrogate"


@dataclasses.dataclass
class SurrogateConfig:
    """How the surrogate behaves.

    Attributes:
        model: the response model usage and quality follow (default: the calibrated one).
        seed: seeds every draw.
        fault_429, fault_500, fault_slow, fault_malformed: rate of each injected fault.
        slow_seconds: delay of a slow reply.
        tool_rounds: tool calls the simulated model makes per user message when tools are offered.
        max_tool_calls: k, to infer u from the tools offered when no context header is sent.
        api_key: if set, requests must carry it as a bearer token (else 401).
        log: path of the server's own JSONL record of every request.
    """

    model: ResponseModel | None = None
    seed: int = 0
    fault_429: float = 0.0
    fault_500: float = 0.0
    fault_slow: float = 0.0
    fault_malformed: float = 0.0
    slow_seconds: float = 2.0
    tool_rounds: int = 1
    max_tool_calls: int = 4
    api_key: str | None = None
    log: str | Path | None = None

    def __post_init__(self):
        rates = (self.fault_429, self.fault_500, self.fault_slow, self.fault_malformed)
        if any(not 0.0 <= r <= 1.0 for r in rates) or sum(rates) > 1.0:
            raise ValueError(f"fault rates: expected values in [0, 1] summing to <= 1, got {rates}")
        if self.slow_seconds < 0 or self.tool_rounds < 0:
            raise ValueError("slow_seconds and tool_rounds: must be >= 0")

    def __repr__(self) -> str:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "model"}
        fields["api_key"] = "[REDACTED]" if self.api_key else None
        return f"SurrogateConfig({', '.join(f'{k}={v!r}' for k, v in fields.items())})"


@eqx.filter_jit
def _expected(model: ResponseModel, action, x):
    return model.prompt_tokens(action, x), model.completion_tokens(action, x), model.quality(action, x)


def _error(status: int, message: str, kind: str, headers: dict | None = None):
    from starlette.responses import JSONResponse

    body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


def _text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        return " ".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def _solve(question: str) -> float | None:
    match = _ARITHMETIC.search(question)
    if match is None:
        return None
    a, op, b = int(match.group(1)), match.group(2), int(match.group(3))
    return float(a + b if op == "+" else a - b if op == "-" else a * b)


class Surrogate:
    """The simulator behind the HTTP app: one request body in, one reply (or fault) out."""

    def __init__(self, config: SurrogateConfig):
        self.config = config
        self.model = config.model if config.model is not None else calibrated()
        self._faults = np.random.default_rng([config.seed, 1])
        self._lock = threading.Lock()
        self.log = CallLog(config.log, secrets=(config.api_key or "",)) if config.log else None

    def _fault(self) -> str | None:
        c = self.config
        with self._lock:
            r = float(self._faults.random())
        for name, rate in (
            ("429", c.fault_429),
            ("500", c.fault_500),
            ("slow", c.fault_slow),
            ("malformed", c.fault_malformed),
        ):
            if r < rate:
                return name
            r -= rate
        return None

    def _state(self, body: dict, header: str | None):
        messages = body["messages"]
        context = {}
        if header:
            try:
                context = json.loads(header)
            except json.JSONDecodeError:
                context = {}
        level = req.detect_verbosity_level(messages)
        tools = body.get("tools") or []
        default_u = min(1.0, len(tools) / max(self.config.max_tool_calls, 1)) if tools else 0.0
        action = context.get("action") or [1.0, actions.VERBOSITY_P[level or 0], default_u]
        task = context.get("task_type", "simple_qa")
        task = task if task in features.TASK_TYPES else "simple_qa"
        context_tokens = context.get(
            "context_tokens", sum(req.estimate_tokens(m) for m in messages if isinstance(m, dict))
        )
        complexity = float(context.get("complexity", 0.5))
        x = features.covariates(
            np.array([features.TASK_TYPES.index(task)]),
            features.model_tier(str(body.get("model", ""))),
            float(context_tokens),
            complexity,
        )[0]
        return np.clip(np.asarray(action, float), 0.0, 1.0), x, task

    def _answer(self, messages: list[dict], correct: bool, rng) -> str:
        question = next((_text(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")
        if "SCORE:" in question and "Candidate answer:" in question:
            candidate = question.split("Candidate answer:", 1)[1].split("How correct", 1)[0]
            reference = question.split("Reference answer:", 1)[-1].split("Candidate answer:", 1)[0]
            ours, truth = parse_number(candidate), parse_number(reference)
            score = 0.5 if truth is None else float(ours is not None and abs(ours - truth) < 1e-9)
            return f"SCORE: {score:g}"
        truth = _solve(question)
        if truth is None:
            return "Answer: (simulated reply)"
        if correct:
            return f"Answer: {truth:g}"
        offset = int(rng.integers(1, 10)) * (1 if rng.random() < 0.5 else -1)
        return f"Answer: {truth + offset:g}"

    def respond(self, body: dict, context_header: str | None) -> dict:
        """The Chat Completions reply to a validated request body (no faults)."""
        c = self.config
        messages = body["messages"]
        action, x, task = self._state(body, context_header)
        digest = hashlib.sha256(
            json.dumps(body, sort_keys=True).encode() + (context_header or "").encode()
        ).digest()
        rng = np.random.default_rng([c.seed, int.from_bytes(digest[:8], "little")])
        prompt_median, completion_median, quality = (
            float(v)
            for v in _expected(self.model, jnp.asarray(action, jnp.float32), jnp.asarray(x, jnp.float32))
        )
        sigma_p = float(np.exp(self.model.log_sigma_prompt))
        sigma_c = float(np.exp(self.model.log_sigma_completion))
        cap = body.get("max_completion_tokens") or body.get("max_tokens")
        n = int(body.get("n") or 1)
        prompt_tokens = max(1, round(prompt_median * np.exp(sigma_p * rng.standard_normal())))
        tools = body.get("tools") or []
        since_user = 0
        for m in reversed(messages):
            if m.get("role") == "user":
                break
            since_user += m.get("role") == "tool"
        call_tool = bool(tools) and body.get("tool_choice") != "none" and since_user < c.tool_rounds
        choices, completion_total = [], 0
        for index in range(n):
            tokens = max(1, round(completion_median * np.exp(sigma_c * rng.standard_normal())))
            correct = bool(rng.random() < quality)
            finish = "stop"
            if cap is not None and tokens > int(cap):
                tokens, finish = int(cap), "length"
            completion_total += tokens
            if call_tool:
                name = tools[0].get("function", {}).get("name", "tool")
                message = {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": f"call_{uuid.uuid4().hex[:12]}",
                            "type": "function",
                            "function": {"name": name, "arguments": json.dumps({"query": "lookup"})},
                        }
                    ],
                }
                finish = "tool_calls"
            else:
                answer = self._answer(messages, correct, rng)
                content = "(cut off at max_tokens)" if finish == "length" else answer
                message = {"role": "assistant", "content": content}
            choices.append({"index": index, "message": message, "finish_reason": finish, "logprobs": None})
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": str(body["model"]),
            "system_fingerprint": "stackjax-surrogate",
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_total,
                "total_tokens": prompt_tokens + completion_total,
                "prompt_tokens_details": {"cached_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 0},
            },
            "_meta": {"action": action.tolist(), "task_type": task, "expected_quality": quality},
        }

    def record(self, entry: dict) -> None:
        if self.log is not None:
            self.log.append(entry)


def create_app(config: SurrogateConfig | None = None):
    """The Starlette app of the surrogate server (routes `/v1/chat/completions`, `/v1/models`, `/health`)."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    surrogate = Surrogate(config or SurrogateConfig())
    cfg = surrogate.config

    async def completions(request):
        received = time.time()
        if cfg.api_key is not None:
            auth = request.headers.get("authorization", "")
            if auth != f"Bearer {cfg.api_key}":
                return _error(401, "Incorrect API key provided.", "invalid_request_error")
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "The request body is not valid JSON.", "invalid_request_error")
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body.get("model"):
            return _error(400, "'model' and a list of 'messages' are required.", "invalid_request_error")
        request_id = f"req_{uuid.uuid4().hex}"
        entry = {"request_id": request_id, "received_at": received, "model": body.get("model")}
        fault = surrogate._fault()
        if fault == "429":
            surrogate.record({**entry, "status": 429, "fault": "429"})
            return _error(
                429,
                "Rate limit reached (simulated).",
                "rate_limit_error",
                {"retry-after-ms": "20", "x-request-id": request_id},
            )
        if fault == "500":
            surrogate.record({**entry, "status": 500, "fault": "500"})
            return _error(
                500, "The server had an error (simulated).", "server_error", {"x-request-id": request_id}
            )
        if fault == "slow":
            await asyncio.sleep(cfg.slow_seconds)
        reply = surrogate.respond(body, request.headers.get(req.CONTEXT_HEADER.lower()))
        meta = reply.pop("_meta")
        reply["id"] = request_id.replace("req_", "chatcmpl-")
        messages = body["messages"]
        surrogate.record(
            {
                **entry,
                "status": 200,
                "fault": fault,
                "response_id": reply["id"],
                "usage": reply["usage"],
                "max_tokens": body.get("max_completion_tokens") or body.get("max_tokens"),
                "roles": [m.get("role") for m in messages],
                "system": _text(messages[0].get("content"))
                if messages and messages[0].get("role") == "system"
                else None,
                "tools_offered": len(body.get("tools") or []),
                "tool_choice": body.get("tool_choice"),
                "n": int(body.get("n") or 1),
                "finish_reasons": [ch["finish_reason"] for ch in reply["choices"]],
                "tool_calls": sum(len(ch["message"].get("tool_calls") or []) for ch in reply["choices"]),
                **meta,
            }
        )
        headers = {"x-request-id": request_id}
        if fault == "malformed":
            text = json.dumps(reply)
            return Response(text[: len(text) // 2], media_type="application/json", headers=headers)
        return JSONResponse(reply, headers=headers)

    async def models(request):
        return JSONResponse(
            {"object": "list", "data": [{"id": SURROGATE_MODEL, "object": "model", "owned_by": "stackjax"}]}
        )

    async def health(request):
        return JSONResponse({"status": "ok", "simulator": True})

    routes = [
        Route("/v1/chat/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ]
    app = Starlette(routes=routes)
    app.state.surrogate = surrogate
    return app


class SurrogateServer:
    """The surrogate served on 127.0.0.1 from a background thread (for tests, examples, the demo).

        with SurrogateServer(SurrogateConfig(seed=0)) as server:
            client = openai.OpenAI(base_url=server.base_url, api_key="sk-local")

    Arguments:
        config: the surrogate's behaviour.
        port: 0 picks a free port.
    """

    def __init__(self, config: SurrogateConfig | None = None, *, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.app = create_app(config)
        self._server = uvicorn.Server(
            uvicorn.Config(
                self.app,
                host=host,
                port=port,
                log_level="warning",
                access_log=False,
                lifespan="off",
                log_config=None,  # a library must not reconfigure the caller's logging
            )
        )
        self._thread = threading.Thread(target=self._server.run, name="stackjax-surrogate", daemon=True)
        self.host = host

    @property
    def surrogate(self) -> Surrogate:
        return self.app.state.surrogate

    def start(self, timeout: float = 30.0) -> "SurrogateServer":
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the surrogate server did not start")
            time.sleep(0.01)
        return self

    @property
    def port(self) -> int:
        return self._server.servers[0].sockets[0].getsockname()[1]

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        if self.surrogate.log is not None:
            self.surrogate.log.close()

    def __enter__(self) -> "SurrogateServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(config: SurrogateConfig, *, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve the surrogate in the foreground until interrupted."""
    import uvicorn

    uvicorn.run(create_app(config), host=host, port=port, log_level="info", lifespan="off")
