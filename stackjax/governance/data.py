"""Load real API call logs into one array-of-records form the calibration step fits.

Two sources:
- CSV in the `real-api` formats (`concise_cot_calls.csv`: prompt styles, 10 samples
  per call; `fewshot_addition_calls_gpt35.csv`: 1-16 few-shot examples), recognised
  by their columns;
- JSONL call logs, one object per API call, as the governed client writes them
  (schema `stackjax.call/1`, below).

Bad rows are never fitted silently: each is skipped with a reason, and the counts
travel with the records (`CallRecords.skipped`). A file that cannot be read at all
(missing, empty, wrong columns) raises `ValueError` naming it.

JSONL schema `stackjax.call/1` (one object per line; `?` marks optional fields):

    {"schema": "stackjax.call/1", "request_id": str, "model": str,
     "session_id"?: str, "turn"?: int, "started_at"?: float, "finished_at"?: float,
     "latency_s"?: float, "finish_reason"?: str,
     "action": {"context": float, "verbosity": float, "tools": float},   # each in [0, 1]
     "state": {"task_type": str (one of TASK_TYPES), "context_tokens"?: float,
               "complexity"?: float in [0, 1], "budget"?: float, ...},
     "leader"?: {"quality_target": float, "subsidy": float},
     "usage": {"prompt_tokens": int, "completion_tokens": int,
               "cached_tokens"?: int, "reasoning_tokens"?: int},
     "samples"?: int (completions drawn; default 1),
     "quality"?: {"score": float in [0, 1], "grader": str,
                  "trials"?: int, "successes"?: float}}

Token counts are the API's own usage fields; `completion_tokens` is divided by
`samples` so every record holds tokens per answer. For calls that draw n > 1
answers, the completion noise the fit then finds (`sigma_completion`) is that of a
mean of n answers: one answer varies more when answers to the same prompt vary
independently. Logs whose calls all draw the same n cannot tell prompt-level from
answer-level noise, so the fit does not try to; probe with n = 1 when a simulator
needs one answer's noise.
"""

import csv
import dataclasses
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np

from . import actions, features

CALL_SCHEMA = "stackjax.call/1"
_CONCISE_COLUMNS = {
    "model", "prompt_style", "exam", "problem_chars", "prompt_tokens", "completion_tokens",
    "samples", "sample_accuracy", "error",
}  # fmt: skip
_FEWSHOT_COLUMNS = {
    "model",
    "system_prompt",
    "num_shots",
    "problem_tokens",
    "prompt_tokens",
    "completion_tokens",
    "correct",
}


@dataclasses.dataclass
class CallRecords:
    """Real API calls as arrays, one row per call.

    Attributes:
        action: (n, 3) actions (c, p, u) in [0, 1].
        covariates: (n, N_COVARIATES) response-model covariates (see `features`).
        prompt_tokens: (n,) billed input tokens.
        completion_tokens: (n,) output tokens per answer.
        trials: (n,) graded answers (0 when the call has no quality label).
        successes: (n,) graded successes, possibly fractional for a [0, 1] judge score.
        group: (n,) task group (exam or task type), for cross-validation and cells.
        model: (n,) model name.
        grader: (n,) which grader produced the quality ("" if none).
        skipped: reason -> number of rows skipped.
    """

    action: np.ndarray
    covariates: np.ndarray
    prompt_tokens: np.ndarray
    completion_tokens: np.ndarray
    trials: np.ndarray
    successes: np.ndarray
    group: np.ndarray
    model: np.ndarray
    grader: np.ndarray
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompt_tokens)

    @property
    def n_skipped(self) -> int:
        return int(sum(self.skipped.values()))

    @property
    def tokens(self) -> np.ndarray:
        """Tokens per answer: prompt plus completion."""
        return self.prompt_tokens + self.completion_tokens

    @property
    def accuracy(self) -> np.ndarray:
        """Observed quality per call (NaN where unlabelled)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.trials > 0, self.successes / np.maximum(self.trials, 1e-12), np.nan)

    def subset(self, mask: np.ndarray) -> "CallRecords":
        """The rows where `mask` is true (skip counts are kept)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "skipped"}
        return CallRecords(**{k: v[mask] for k, v in fields.items()}, skipped=dict(self.skipped))

    def cells(self) -> np.ndarray:
        """A cell label per row: group | model | verbosity level | context share."""
        level = actions.verbosity_level(self.action[:, 1])
        return np.array(
            [
                f"{g}|{m}|{actions.VERBOSITY_LEVELS[v]}|c={c:.3f}"
                for g, m, v, c in zip(self.group, self.model, level, self.action[:, 0], strict=True)
            ]
        )

    @staticmethod
    def concatenate(parts: list["CallRecords"]) -> "CallRecords":
        if not parts:
            raise ValueError("no call records to concatenate")
        skipped: Counter = Counter()
        for part in parts:
            skipped.update(part.skipped)
        names = [f.name for f in dataclasses.fields(CallRecords) if f.name != "skipped"]
        return CallRecords(
            **{n: np.concatenate([getattr(p, n) for p in parts]) for n in names}, skipped=dict(skipped)
        )


class _Builder:
    """Accumulates parsed rows and skip reasons."""

    def __init__(self):
        self.rows: list[tuple] = []
        self.skipped: Counter = Counter()

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    def add(self, action, covariate_row, prompt, completion, trials, successes, group, model, grader):
        self.rows.append((action, covariate_row, prompt, completion, trials, successes, group, model, grader))

    def build(self, source: str) -> CallRecords:
        if not self.rows:
            reasons = ", ".join(f"{k}: {v}" for k, v in self.skipped.items()) or "no rows"
            raise ValueError(f"{source}: no usable rows ({reasons})")
        cols = list(zip(*self.rows, strict=True))
        return CallRecords(
            action=np.asarray(cols[0], dtype=float),
            covariates=np.asarray(cols[1], dtype=float),
            prompt_tokens=np.asarray(cols[2], dtype=float),
            completion_tokens=np.asarray(cols[3], dtype=float),
            trials=np.asarray(cols[4], dtype=float),
            successes=np.asarray(cols[5], dtype=float),
            group=np.asarray(cols[6], dtype=object).astype(str),
            model=np.asarray(cols[7], dtype=object).astype(str),
            grader=np.asarray(cols[8], dtype=object).astype(str),
            skipped=dict(self.skipped),
        )


def _number(row: dict, key: str, builder: _Builder, *, allow_negative: bool = False) -> float | None:
    raw = row.get(key)
    if raw is None or str(raw).strip() == "":
        builder.skip(f"missing {key}")
        return None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        builder.skip(f"non-numeric {key}")
        return None
    if not math.isfinite(value):
        builder.skip(f"non-finite {key}")
        return None
    if value < 0 and not allow_negative:
        builder.skip(f"negative {key}")
        return None
    return value


def _read_csv_rows(path: Path) -> tuple[list[str], list[dict]]:
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"{path}: the file is empty")
    reader = csv.DictReader(text.splitlines())
    columns = reader.fieldnames or []
    return columns, list(reader)


def _truncated(row: dict) -> bool:
    # DictReader fills missing trailing fields with None: a cut-off last line.
    return any(v is None for v in row.values()) or None in row


def _load_concise(rows: list[dict], builder: _Builder) -> None:
    for row in rows:
        if _truncated(row):
            builder.skip("truncated row")
            continue
        if str(row.get("error", "0")).strip() not in ("0", "0.0", ""):
            builder.skip("api error")
            continue
        style = row["prompt_style"].strip()
        if style not in actions.PROMPT_STYLE_LEVEL:
            builder.skip("unknown prompt_style")
            continue
        exam = row["exam"].strip()
        if exam not in features.EXAM_TASK:
            builder.skip("unknown exam")
            continue
        values = [_number(row, k, builder) for k in ("problem_chars", "prompt_tokens", "completion_tokens")]
        samples = _number(row, "samples", builder)
        accuracy = _number(row, "sample_accuracy", builder)
        if any(v is None for v in values) or samples is None or accuracy is None:
            continue
        if samples < 1 or accuracy > 1:
            builder.skip("samples < 1 or sample_accuracy > 1")
            continue
        chars, prompt, completion = values
        level = actions.PROMPT_STYLE_LEVEL[style]
        task = features.TASK_TYPES.index(features.EXAM_TASK[exam])
        model = row["model"].strip()
        cov = features.covariates(np.array([task]), features.model_tier(model), chars / 4.0, 0.5)[0]
        builder.add(
            (0.0, actions.VERBOSITY_P[level], 0.0),
            cov,
            prompt,
            completion / samples,
            samples,
            round(accuracy * samples),
            exam,
            model,
            "multiple_choice",
        )


def _load_fewshot(rows: list[dict], builder: _Builder) -> None:
    task = features.TASK_TYPES.index(features.EXAM_TASK["fewshot-addition"])
    for row in rows:
        if _truncated(row):
            builder.skip("truncated row")
            continue
        keys = ("num_shots", "problem_tokens", "prompt_tokens", "completion_tokens")
        values = [_number(row, k, builder) for k in keys]
        correct = _number(row, "correct", builder)
        if any(v is None for v in values) or correct is None:
            continue
        if correct not in (0.0, 1.0):
            builder.skip("correct not 0/1")
            continue
        shots, problem_tokens, prompt, completion = values
        model = row["model"].strip()
        cov = features.covariates(np.array([task]), features.model_tier(model), problem_tokens, 0.5)[0]
        builder.add(
            (float(actions.shots_to_context(shots)), 0.0, 0.0),
            cov,
            prompt,
            completion,
            1.0,
            correct,
            "fewshot-addition",
            model,
            "numeric",
        )


def load_csv(path: str | Path) -> CallRecords:
    """Load a real-api CSV (either format, told apart by its columns)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    columns, rows = _read_csv_rows(path)
    builder = _Builder()
    if _CONCISE_COLUMNS <= set(columns):
        _load_concise(rows, builder)
    elif _FEWSHOT_COLUMNS <= set(columns):
        _load_fewshot(rows, builder)
    else:
        missing_a = sorted(_CONCISE_COLUMNS - set(columns))
        missing_b = sorted(_FEWSHOT_COLUMNS - set(columns))
        raise ValueError(
            f"{path}: not a known call-log CSV; the prompt-style format lacks columns {missing_a}, "
            f"the few-shot format lacks {missing_b}"
        )
    return builder.build(str(path))


def _parse_call(obj: dict, builder: _Builder) -> None:
    if not isinstance(obj, dict):
        builder.skip("not a JSON object")
        return
    try:
        action = obj["action"]
        a = tuple(float(action[k]) for k in ("context", "verbosity", "tools"))
        usage = obj["usage"]
        prompt, completion = float(usage["prompt_tokens"]), float(usage["completion_tokens"])
        state = obj.get("state", {})
        task_name = state["task_type"]
        model = str(obj["model"])
    except (KeyError, TypeError, ValueError):
        builder.skip("missing or malformed field")
        return
    if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in a):
        builder.skip("action outside [0, 1]")
        return
    if not (math.isfinite(prompt) and math.isfinite(completion)) or prompt < 0 or completion < 0:
        builder.skip("negative or non-finite tokens")
        return
    if task_name not in features.TASK_TYPES:
        builder.skip("unknown task_type")
        return
    samples = float(obj.get("samples", 1) or 1)
    trials, successes, grader = 0.0, 0.0, ""
    quality = obj.get("quality")
    if quality is not None:
        try:
            score = float(quality["score"])
            trials = float(quality.get("trials", 1))
            successes = float(quality.get("successes", score * trials))
            grader = str(quality.get("grader", "unknown"))
        except (KeyError, TypeError, ValueError):
            builder.skip("malformed quality")
            return
        if not (0.0 <= score <= 1.0 and 0.0 <= successes <= trials):
            builder.skip("quality outside [0, 1]")
            return
    task = features.TASK_TYPES.index(task_name)
    cov = features.covariates(
        np.array([task]),
        features.model_tier(model),
        float(state.get("context_tokens", 0.0)),
        float(state.get("complexity", 0.5)),
    )[0]
    builder.add(a, cov, prompt, completion / samples, trials, successes, task_name, model, grader)


def load_jsonl(path: str | Path) -> CallRecords:
    """Load a JSONL call log; a truncated last line (a crash mid-write) is skipped and counted."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"{path}: the file is empty")
    builder = _Builder()
    lines = text.split("\n")
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            last = number == len(lines) - 1 or all(not rest.strip() for rest in lines[number + 1 :])
            builder.skip("truncated last line" if last else "invalid JSON line")
            continue
        _parse_call(obj, builder)
    return builder.build(str(path))


def load(paths: str | Path | list) -> CallRecords:
    """Load and concatenate call logs: `.csv` files in the real-api formats, `.jsonl` call logs."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    parts = []
    for path in paths:
        suffix = Path(path).suffix.lower()
        if suffix == ".csv":
            parts.append(load_csv(path))
        elif suffix in (".jsonl", ".json", ".ndjson"):
            parts.append(load_jsonl(path))
        else:
            raise ValueError(f"{path}: expected a .csv or .jsonl call log, got '{suffix}'")
    return CallRecords.concatenate(parts)
