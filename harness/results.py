"""The local results store: ``<results_dir>/runs.jsonl``, one JSON record per line, append-only.

Appends take an exclusive lock and write the whole line with one ``write`` on an ``O_APPEND``
descriptor, then fsync, so concurrent jobs never interleave and a crash never leaves a half
record behind a finished one. Readers skip (and report) a truncated or corrupt line.
:func:`load` turns the store into a pandas DataFrame, one row per run, for reports and checks.
"""
from __future__ import annotations

import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

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
    for _number, rec in _numbered_records(results_dir, problems):
        yield rec


def _numbered_records(results_dir: str | Path, problems: list[str] | None) -> Iterator[tuple[int, dict[str, Any]]]:
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
            yield number, rec


# --- the store as a table ----------------------------------------------------------------------

DTYPE_BITS = {"float32": 32, "float16": 16, "bfloat16": 16, "float64": 64}
SCALE_BITS = 16  # one float16 scale per group and output row
_NOT_DIAGNOSTICS = {"layer", "seconds", "tokens"}  # per-module fields that are not error measures


def load(results_dir: str | Path, problems: list[str] | None = None) -> pd.DataFrame:
    """The store as a DataFrame, one row per run in store order, with flattened columns:

    ``line`` (the store line), the record's scalar fields (``run_id``, ``status``, ``study``,
    ``config_hash``, ``schema_version``, ``run_dir``, ``error``, ...), ``model.*``, ``protocol.*``,
    ``config.*`` (the resolved config), ``relevant.*`` (the result-relevant config) and ``relevant``
    (the same as canonical JSON, to match runs across stores), every metric under its own key
    (``wikitext2/ppl``), ``modules/<diagnostic>`` (its mean over the quantized modules),
    ``timings.*``, ``memory.*``, ``git.commit`` and the :func:`footprint` columns.

    A truncated or corrupt line is skipped; it is described with its line number in ``problems``
    (when a list is given) and in ``df.attrs["problems"]``, as is a record of an unknown schema
    version (which is kept).
    """
    import pandas as pd

    found: list[str] = []
    rows = []
    for number, rec in _numbered_records(results_dir, found):
        version = rec.get("schema_version")
        if version != SCHEMA_VERSION:
            found.append(f"{store_path(results_dir)}:{number}: schema_version {version!r}, this harness writes "
                         f"{SCHEMA_VERSION}; loaded as is")
        rows.append(flatten_record(rec, line=number))
    if problems is not None:
        problems.extend(found)
    df = pd.DataFrame(rows)
    df.attrs["problems"] = found
    return df


def flatten_record(rec: dict[str, Any], line: int | None = None) -> dict[str, Any]:
    """One record as a flat row (the columns of :func:`load`)."""
    row: dict[str, Any] = {"line": line}
    for key, value in rec.items():
        if key in ("config", "relevant", "model", "protocol", "timings", "memory"):
            row.update(_flatten(value or {}, key))
        elif key == "metrics":
            row.update(value or {})
        elif key == "modules":
            row.update(module_summary(value or []))
        elif key == "env":
            git = (value or {}).get("git") or {}
            row.update({"git.commit": git.get("commit"), "git.dirty": git.get("dirty")})
        elif key != "data" and not isinstance(value, (dict, list)):
            row[key] = value
    row["relevant"] = relevant_key(rec.get("relevant") or {})
    row.update(footprint(rec))
    return row


def relevant_key(relevant: dict[str, Any]) -> str:
    """The result-relevant config as canonical JSON: equal strings mean runs that should agree."""
    return json.dumps(relevant, sort_keys=True, separators=(",", ":"), default=str)


def module_summary(modules: list[dict[str, Any]]) -> dict[str, float]:
    """The mean over modules of each numeric per-module diagnostic (``weight_rel_err``,
    ``output_rel_err``, a solver's ``loss``...), as ``modules/<name>``; empty without modules."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for mod in modules:
        for k, v in mod.items():
            if k in _NOT_DIAGNOSTICS or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            sums[k] = sums.get(k, 0.0) + float(v)
            counts[k] = counts.get(k, 0) + 1
    return {f"modules/{k}": sums[k] / counts[k] for k in sums}


def footprint(rec: dict[str, Any]) -> dict[str, float | None]:
    """Storage cost of a run's weights: ``bits_per_weight`` of the quantized linears, counting one
    16-bit scale and one ``bits``-bit zero per group and output row (per-channel: one group per
    row), and ``weight_bytes`` of the whole model (the rest of the parameters at the model's dtype).
    For the unquantized baseline both are those of the model's dtype; ``None`` where unknown."""
    q = (rec.get("relevant") or {}).get("quantizer") or {}
    model = rec.get("model") or {}
    dtype_bits = DTYPE_BITS.get(str(model.get("dtype") or (rec.get("relevant") or {}).get("model", {}).get("dtype")))
    n_params = model.get("n_params")
    shapes = [m["shape"] for m in rec.get("modules") or [] if len(m.get("shape") or ()) == 2]
    if q.get("method") == "fp16" or not q.get("bits"):
        if q.get("method") != "fp16" or dtype_bits is None:
            return {"bits_per_weight": None, "weight_bytes": None}
        return {"bits_per_weight": float(dtype_bits),
                "weight_bytes": n_params * dtype_bits / 8 if n_params else None}
    if not shapes:
        return {"bits_per_weight": None, "weight_bytes": None}
    bits, group = q["bits"], q.get("group_size")
    total_bits = n_weights = 0
    for rows, cols in shapes:
        groups = -(-cols // group) if group and group > 0 else 1
        total_bits += rows * cols * bits + rows * groups * (SCALE_BITS + bits)
        n_weights += rows * cols
    rest = (n_params - n_weights) * dtype_bits if n_params and dtype_bits else None
    return {"bits_per_weight": total_bits / n_weights,
            "weight_bytes": (total_bits + rest) / 8 if rest is not None else None}


def _flatten(obj: dict[str, Any], prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in obj.items():
        key = f"{prefix}.{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key))
        elif isinstance(v, list):
            out[key] = tuple(v) if all(not isinstance(x, (dict, list)) for x in v) else json.dumps(v, default=str)
        else:
            out[key] = v
    return out


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")
