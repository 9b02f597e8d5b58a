"""The local results store: ``<results_dir>/runs.jsonl``, one JSON record per line, append-only.

Appends take an exclusive lock and write the whole line with one ``write`` on an ``O_APPEND``
descriptor, then fsync, so concurrent jobs never interleave and a crash never leaves a half
record behind a finished one. Readers skip (and report) a truncated or corrupt line.
"""
from __future__ import annotations

import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

STORE = "runs.jsonl"
SCHEMA_VERSION = 1


def store_path(results_dir: str | Path) -> Path:
    return Path(results_dir) / STORE


def append(results_dir: str | Path, record: dict[str, Any]) -> Path:
    """Append ``record`` as one line to the store; returns the store's path."""
    path = store_path(results_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, sort_keys=True, default=_jsonable) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        # A previous writer killed mid-line would glue our record onto its fragment: start afresh.
        size = os.fstat(fd).st_size
        if size and _last_byte(path, size) != b"\n":
            line = b"\n" + line
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)  # closing releases the lock
    return path


def _last_byte(path: Path, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(size - 1)
        return f.read(1)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=_jsonable)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def iter_records(results_dir: str | Path, problems: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """Yield the records of the store in order. Unreadable lines are skipped; each is described
    (with its line number) in ``problems`` when a list is given."""
    path = store_path(results_dir)
    if not path.exists():
        return
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
                if not isinstance(rec, dict):
                    raise ValueError("not a JSON object")
            except ValueError as exc:
                if problems is not None:
                    problems.append(f"{path}:{number}: unreadable record skipped ({str(exc)[:80]})")
                continue
            yield rec


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")
