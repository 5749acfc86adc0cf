"""Append-only JSONL call logs that lose nothing, and the redaction of secrets.

Every record is one line written by a single `os.write` on a file opened with
`O_APPEND`, under a lock, then fsynced: a crash mid-write leaves at most one
truncated last line, concurrent writers in one process (threads or asyncio tasks)
never interleave, and a resumed run appends after whatever is there (a truncated
line is first closed with a newline, so the reader skips and counts it).

Before a line is written, secrets are removed: any string registered with the log
(the API key in use) and anything shaped like an API key or a bearer token.
"""

import json
import os
import re
import threading
from collections import Counter
from pathlib import Path

REDACTED = "[REDACTED]"
# API keys of the common providers ("sk-...", "sk-proj-..."), bearer tokens, and
# Authorization / api-key header lines.
_SECRET_PATTERNS = (
    re.compile(r"sk-[A-Za-z0-9_\-]{6,}"),
    re.compile(r"(?i)bearer\s+[A-Za-z0-9_\-\.=:/+]+"),
    re.compile(r"(?i)(authorization|api[-_]key)(['\"]?\s*[:=]\s*['\"]?)[^'\",\s}]+"),
)


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    """`text` with every secret in `secrets`, and anything that looks like an API key
    or an Authorization header, replaced by `[REDACTED]`."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    text = _SECRET_PATTERNS[0].sub(REDACTED, text)
    text = _SECRET_PATTERNS[1].sub(REDACTED, text)
    return _SECRET_PATTERNS[2].sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)


class CallLog:
    """An append-only JSONL log, safe against crashes and concurrent writers.

    Arguments:
        path: the log file (created with its folder if missing; appended to if present).
        secrets: strings that must never be written (e.g. the API key in use).
        fsync: fsync after every line (default); turn off only for throwaway logs.
    """

    def __init__(self, path: str | Path, *, secrets: tuple[str, ...] = (), fsync: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._secrets = tuple(s for s in secrets if s)
        self._fsync = fsync
        self._lock = threading.Lock()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._close_truncated_line()

    def _close_truncated_line(self) -> None:
        size = os.fstat(self._fd).st_size
        if size == 0:
            return
        with open(self.path, "rb") as handle:
            handle.seek(size - 1)
            if handle.read(1) != b"\n":
                self._write(b"\n")

    def _write(self, data: bytes) -> None:
        with self._lock:
            if self._fd < 0:
                raise ValueError(f"{self!r} is closed")
            written = os.write(self._fd, data)
            while written < len(data):  # a short write on a full disk or a signal
                written += os.write(self._fd, data[written:])
            if self._fsync:
                os.fsync(self._fd)

    def append(self, record: dict) -> None:
        """Write one record as one line (secrets removed), flushed and fsynced."""
        line = json.dumps(record, separators=(",", ":"), allow_nan=False, default=_jsonable)
        if "\n" in line:  # json.dumps escapes newlines; this guards the one-line invariant
            raise ValueError("record: serialised to more than one line")
        self._write((redact(line, self._secrets) + "\n").encode("utf-8"))

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> "CallLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CallLog({str(self.path)!r})"


def _jsonable(value):
    """numpy / jax scalars and arrays as plain JSON values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to a call log")


def read_log(path: str | Path) -> tuple[list[dict], dict[str, int]]:
    """Every valid record of a JSONL log, and the count of skipped lines by reason.

    A line that is not valid JSON (a write cut off by a crash) or not an object is
    skipped and counted, never fatal. A missing file reads as empty.
    """
    path = Path(path)
    if not path.exists():
        return [], {}
    records, skipped = [], Counter()
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                skipped["truncated or invalid JSON line"] += 1
                continue
            if not isinstance(obj, dict):
                skipped["not a JSON object"] += 1
                continue
            records.append(obj)
    return records, dict(skipped)
