"""Probes: a planned design of actions over prompts, run against an API to collect the
data the calibration step fits.

    probes = plan(arithmetic_prompts(40), action_grid(), models=["gpt-4o-mini"], samples=5)
    report = run_probes(openai.AsyncOpenAI(...), probes, log="probes.jsonl")
    records = stackjax.governance.data.load("probes.jsonl")

Each probe applies its action exactly as the governed client does (history share c
of the prompt's context messages, p's verbosity instruction and completion cap),
draws `samples` answers in one call (`n`), grades them, and appends one
`stackjax.call/1` line with its `probe_id`. Runs are resumable: probes already in
the log are skipped, so a killed run restarted with the same plan ends with every
probe in the log exactly once. Transient failures (429, 5xx, timeouts) are retried
by the openai client itself (`max_retries`), and malformed replies or exhausted
retries by this runner with exponential backoff; a probe that still fails is
reported, never logged as data.
"""

import asyncio
import dataclasses
import hashlib
import itertools
import json
import random
import time
from pathlib import Path

import numpy as np

from ..governance import actions
from ..governance.data import CALL_SCHEMA
from ..governance.features import TASK_TYPES
from . import graders as grading
from . import request as req
from .calllog import CallLog, read_log, redact
from .client import malformed_reply


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One task to probe.

    Attributes:
        id: a stable identifier.
        question: the user message.
        answer: the reference answer for the grader.
        task_type: one of `TASK_TYPES`.
        context: earlier messages (conversation or few-shot examples) that c trims.
        complexity: in [0, 1].
        grader: a name in `graders.GRADERS`, used when the runner is given no grader.
    """

    id: str
    question: str
    answer: object = None
    task_type: str = "simple_qa"
    context: tuple = ()
    complexity: float = 0.5
    grader: str = "numeric"

    def __post_init__(self):
        if self.task_type not in TASK_TYPES:
            raise ValueError(f"task_type: expected one of {TASK_TYPES}, got {self.task_type!r}")
        if self.grader not in grading.GRADERS:
            raise ValueError(f"grader: expected one of {sorted(grading.GRADERS)}, got {self.grader!r}")


@dataclasses.dataclass(frozen=True)
class Probe:
    """One planned call: a prompt, an action, a model and the answers drawn."""

    probe_id: str
    prompt: Prompt
    action: tuple[float, float, float]
    model: str
    samples: int = 1


@dataclasses.dataclass
class ProbeReport:
    """What a run did: probes planned, already in the log, completed now, and failed (with reasons)."""

    planned: int
    already_logged: int
    completed: int
    failed: dict[str, str]
    seconds: float


def action_grid(
    context=(0.0, 0.5, 1.0), verbosity=actions.VERBOSITY_P, tools=(0.0,)
) -> list[tuple[float, float, float]]:
    """Every combination of the given levels of c, p and u."""
    grid = [tuple(float(v) for v in a) for a in itertools.product(context, verbosity, tools)]
    if any(not 0.0 <= v <= 1.0 for a in grid for v in a):
        raise ValueError("action_grid: every level must lie in [0, 1]")
    return grid


def plan(prompts, action_list, *, models=("gpt-4o-mini",), samples: int = 1, repeats: int = 1) -> list[Probe]:
    """The full design: every prompt x action x model x repeat, with stable probe ids."""
    if samples < 1 or repeats < 1:
        raise ValueError("samples and repeats: must be >= 1")
    if not prompts or not action_list or not models:
        raise ValueError("prompts, action_list and models: must not be empty")
    probes = []
    for prompt, action, model, repeat in itertools.product(prompts, action_list, models, range(repeats)):
        key = json.dumps([prompt.id, [round(v, 6) for v in action], model, repeat, samples])
        probe_id = hashlib.sha256(key.encode()).hexdigest()[:20]
        probes.append(Probe(probe_id, prompt, tuple(float(v) for v in action), model, samples))
    return probes


def arithmetic_prompts(
    n: int, *, seed: int = 0, task_types=TASK_TYPES, max_examples: int = 16
) -> list[Prompt]:
    """Synthetic prompts with known answers ('What is 123 + 456?'), each with 0 to
    `max_examples` worked examples as context and a random task type and complexity."""
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        examples = []
        for _ in range(rng.randint(0, max_examples)):
            a, b = rng.randint(10, 999), rng.randint(10, 999)
            examples += [
                {"role": "user", "content": f"What is {a} + {b}?"},
                {"role": "assistant", "content": f"Answer: {a + b}"},
            ]
        a, b = rng.randint(100, 9999), rng.randint(100, 9999)
        prompts.append(
            Prompt(
                id=f"arith-{seed}-{i}",
                question=f"What is {a} + {b}?",
                answer=a + b,
                task_type=rng.choice(list(task_types)),
                context=tuple(examples),
                complexity=round(rng.random(), 3),
            )
        )
    return prompts


def load_prompts(path: str | Path) -> list[Prompt]:
    """Prompts from a JSONL file: one object per line with the fields of `Prompt`."""
    prompts = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            obj["context"] = tuple(obj.get("context", ()))
            prompts.append(Prompt(**obj))
        except (json.JSONDecodeError, TypeError, ValueError) as err:
            raise ValueError(f"{path}:{number}: not a prompt ({err})") from err
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def _request(probe: Probe, max_tokens_field: str) -> tuple[dict, float]:
    c, p, u = probe.action
    prompt = probe.prompt
    context = list(prompt.context)
    messages = [
        req.with_instruction(None, p),
        *req.trim_history(context, c),
        {"role": "user", "content": prompt.question},
    ]
    context_tokens = float(
        sum(req.estimate_tokens(m) for m in context) + req.estimate_tokens(prompt.question)
    )
    header = {
        "action": [c, p, u],
        "task_type": prompt.task_type,
        "context_tokens": context_tokens,
        "complexity": prompt.complexity,
    }
    kwargs = {
        "model": probe.model,
        "messages": messages,
        max_tokens_field: actions.completion_cap(p),
        "n": probe.samples,
        "seed": int(probe.probe_id[:8], 16),
        "extra_headers": {req.CONTEXT_HEADER: json.dumps(header)},
    }
    return kwargs, context_tokens


def _transient(error: Exception) -> bool:
    import openai

    if malformed_reply(error) or isinstance(error, openai.APIConnectionError):
        return True  # APITimeoutError is an APIConnectionError
    if isinstance(error, openai.APIStatusError):
        return error.status_code in (408, 409, 429) or error.status_code >= 500
    return False


async def _grade(grader, prompt: Prompt, texts: list[str | None]) -> grading.Grade:
    scores, name = [], None
    for text in texts:
        agrade = getattr(grader, "agrade", None)
        grade = (
            await agrade(prompt.question, text, prompt.answer)
            if agrade
            else grader.grade(prompt.question, text, prompt.answer)
        )
        scores.append(grade.score)
        name = grade.grader
    return grading.Grade(float(np.mean(scores)), name)


async def arun_probes(
    client,
    probes: list[Probe],
    log: str | Path | CallLog,
    *,
    grader=None,
    concurrency: int = 8,
    retries: int = 5,
    max_tokens_field: str = "max_tokens",
    progress: bool = True,
) -> ProbeReport:
    """Run the probes not yet in `log` (see the module doc) with an `openai.AsyncOpenAI` client.

    Arguments:
        client: the async client (its `max_retries` covers 429, 5xx and timeouts).
        probes: from `plan`.
        log: the JSONL call log (appended to; read first to skip probes already there).
        grader: grades every answer (default: each prompt's own `grader`).
        concurrency: calls in flight at once.
        retries: further attempts after a failure the client did not absorb.
        max_tokens_field: 'max_tokens' or 'max_completion_tokens'.
        progress: show a progress bar.

    Returns:
        A `ProbeReport`.
    """
    if concurrency < 1 or retries < 0:
        raise ValueError("concurrency must be >= 1 and retries >= 0")
    ids = [p.probe_id for p in probes]
    if len(set(ids)) != len(ids):
        raise ValueError("probes: probe ids must be unique (build them with plan())")
    key = getattr(client, "api_key", None)
    secrets = (key,) if isinstance(key, str) else ()
    owns_log = not isinstance(log, CallLog)
    call_log = CallLog(log, secrets=secrets) if owns_log else log
    done = {r.get("probe_id") for r in read_log(call_log.path)[0]}
    todo = [p for p in probes if p.probe_id not in done]
    started = time.time()
    failed: dict[str, str] = {}
    semaphore = asyncio.Semaphore(concurrency)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="probes")

    async def one(probe: Probe) -> None:
        async with semaphore:
            kwargs, context_tokens = _request(probe, max_tokens_field)
            for attempt in range(retries + 1):
                t0 = time.time()
                try:
                    response = await client.chat.completions.create(**kwargs)
                    break
                except Exception as error:
                    if not _transient(error) or attempt == retries:
                        failed[probe.probe_id] = redact(f"{type(error).__name__}: {error}", secrets)
                        return
                    await asyncio.sleep(min(8.0, 0.25 * 2**attempt) * (0.5 + random.random()))
            t1 = time.time()
            texts = [choice.message.content for choice in response.choices]
            grade = await _grade(grader or grading.GRADERS[probe.prompt.grader](), probe.prompt, texts)
            usage = response.usage
            c, p, u = probe.action
            call_log.append(
                {
                    "schema": CALL_SCHEMA,
                    "probe_id": probe.probe_id,
                    "prompt_id": probe.prompt.id,
                    "request_id": getattr(response, "_request_id", None) or response.id,
                    "model": probe.model,
                    "started_at": t0,
                    "finished_at": t1,
                    "latency_s": t1 - t0,
                    "finish_reason": response.choices[0].finish_reason if response.choices else None,
                    "action": {"context": c, "verbosity": p, "tools": u},
                    "state": {
                        "task_type": probe.prompt.task_type,
                        "context_tokens": context_tokens,
                        "complexity": probe.prompt.complexity,
                    },
                    "usage": {
                        "prompt_tokens": int(usage.prompt_tokens),
                        "completion_tokens": int(usage.completion_tokens),
                    },
                    "samples": probe.samples,
                    "quality": {
                        "score": grade.score,
                        "grader": grade.grader,
                        "trials": probe.samples,
                        "successes": grade.score * probe.samples,
                    },
                }
            )
            if bar is not None:
                bar.update(1)

    try:
        await asyncio.gather(*(one(p) for p in todo))
    finally:
        if bar is not None:
            bar.close()
        if owns_log:
            call_log.close()
    return ProbeReport(
        planned=len(probes),
        already_logged=len(probes) - len(todo),
        completed=len(todo) - len(failed),
        failed=failed,
        seconds=time.time() - started,
    )


def run_probes(client, probes: list[Probe], log, **options) -> ProbeReport:
    """`arun_probes` from synchronous code (`client` must be an `openai.AsyncOpenAI`)."""
    return asyncio.run(arun_probes(client, probes, log, **options))
