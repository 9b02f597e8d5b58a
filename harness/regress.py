"""``python -m harness.regress``: check a results store against a committed baseline.

    python -m harness.regress --baseline sweeps/baselines/regression.json --results results/regression
    python -m harness.regress --baseline FILE --results DIR --tolerance ppl=1% --tolerance acc=0:0.02
    python -m harness.regress --baseline FILE --results DIR --update      # write a new baseline

Runs are matched to baseline entries by their result-relevant config (the config the run hash is
made of), the latest run of each config counting. Each metric of an entry is compared with the
run's: it is *worse* when it moved the wrong way by more than ``max(abs, rel × |baseline|)``.
Exit status: 1 when a metric is worse, a metric is missing or a matched run failed (with
``--require-all`` also when an entry has no run), 2 when no entry matched or the input is unusable,
0 otherwise. Baselines live under ``sweeps/baselines/``.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from harness.errors import UserError

BASELINE_SCHEMA = 1
EXIT_OK, EXIT_WORSE, EXIT_NO_MATCH = 0, 1, 2


@dataclass(frozen=True)
class Tolerance:
    """How far a metric may move the wrong way: ``max(abs, rel × |baseline|)``."""

    rel: float
    abs: float
    lower_is_better: bool

    def allowed(self, base: float) -> float:
        """The largest change in the wrong direction that still passes."""
        return max(self.abs, self.rel * abs(base))


# Keyed by a metric's last name (``wikitext2/ppl`` → ``ppl``) or its ending (``output_rel_err`` → ``rel_err``).
# Results are deterministic on one CPU; these leave room for float noise across machines and BLAS builds.
DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "ppl": Tolerance(rel=0.005, abs=0.0, lower_is_better=True),
    "perplexity": Tolerance(rel=0.005, abs=0.0, lower_is_better=True),  # lm-eval's name (lambada)
    "nll": Tolerance(rel=0.0, abs=0.005, lower_is_better=True),  # 0.005 nats ≈ 0.5 % of perplexity
    "acc": Tolerance(rel=0.0, abs=0.01, lower_is_better=False),  # one accuracy point
    "acc_norm": Tolerance(rel=0.0, abs=0.01, lower_is_better=False),
    "exact_match": Tolerance(rel=0.0, abs=0.01, lower_is_better=False),
    "rel_err": Tolerance(rel=0.01, abs=1e-9, lower_is_better=True),  # per-module reconstruction errors
    "loss": Tolerance(rel=0.01, abs=1e-9, lower_is_better=True),
}


def tolerance_for(metric: str, table: dict[str, Tolerance]) -> Tolerance | None:
    """The tolerance of ``metric``: by its full name, its last name, then its ending; None = not compared."""
    leaf = metric.rsplit("/", 1)[-1]
    if metric in table:
        return table[metric]
    if leaf in table:
        return table[leaf]
    for key, tol in table.items():
        if "/" not in key and leaf.endswith("_" + key):
            return tol
    return None


def parse_tolerance(spec: str, table: dict[str, Tolerance]) -> tuple[str, Tolerance]:
    """``KEY=REL[:ABS]`` (REL as a fraction or ``0.5%``) → the key and its new tolerance; the
    direction is the one ``KEY`` already has."""
    key, sep, value = spec.partition("=")
    base = tolerance_for(key, table) if sep else None
    if base is None:
        known = ", ".join(table)
        raise UserError("--tolerance", f"{spec!r} is not KEY=REL[:ABS] for a known metric",
                        f"e.g. ppl=0.5% or nll=0:0.01; known: {known}")
    rel_s, _, abs_s = value.partition(":")
    try:
        rel = float(rel_s.rstrip("%")) / (100 if rel_s.endswith("%") else 1) if rel_s else 0.0
        absolute = float(abs_s) if abs_s else 0.0
    except ValueError:
        raise UserError("--tolerance", f"{spec!r}: {value!r} is not REL[:ABS]",
                        "e.g. ppl=0.5% or ppl=0.005:0.1") from None
    return key, Tolerance(rel=rel, abs=absolute, lower_is_better=base.lower_is_better)


@dataclass
class Check:
    """One metric of one baseline entry against the current run."""

    label: str
    metric: str
    baseline: float | None
    current: float | None
    allowed: float | None
    verdict: str  # ok | better | WORSE | missing metric | run failed | not run

    @property
    def failed(self) -> bool:
        return self.verdict in ("WORSE", "missing metric", "run failed")


def current_runs(results_dir: str | Path, study: str | None = None) -> dict[str, dict[str, Any]]:
    """The latest run of each result-relevant config in the store (as a flat row of
    :func:`harness.results.load`), keyed by the config's canonical JSON."""
    from harness import results

    df = results.load(results_dir)
    if df.empty:
        return {}
    if study is not None:
        df = df[df["study"] == study]
    return {row["relevant"]: row for row in df.to_dict("records")}


def compare(baseline: dict[str, Any], runs: dict[str, dict[str, Any]], table: dict[str, Tolerance]) -> list[Check]:
    """Every metric of every baseline entry against the matching run."""
    from harness.results import relevant_key

    checks: list[Check] = []
    for entry in baseline.get("entries", []):
        label = entry.get("label", entry.get("config_hash", "?"))
        run = runs.get(relevant_key(entry["relevant"]))
        if run is None or run.get("status") != "ok":
            verdict = "not run" if run is None else "run failed"
            checks.append(Check(label, "–", None, None, None, verdict))
            continue
        for metric, base in sorted(entry.get("metrics", {}).items()):
            tol = tolerance_for(metric, table) or Tolerance(0.0, 0.0, lower_is_better=True)
            cur = run.get(metric)
            if cur is None or cur != cur:  # missing or NaN
                checks.append(Check(label, metric, base, None, tol.allowed(base), "missing metric"))
                continue
            worse_by = (cur - base) if tol.lower_is_better else (base - cur)
            verdict = "WORSE" if worse_by > tol.allowed(base) else ("better" if worse_by < 0 else "ok")
            checks.append(Check(label, metric, base, float(cur), tol.allowed(base), verdict))
    return checks


def exit_status(checks: list[Check], require_all: bool = False) -> int:
    """1 if any check failed (or, with ``require_all``, an entry has no run); 2 if no entry matched."""
    if not any(c.verdict != "not run" for c in checks):
        return EXIT_NO_MATCH
    if any(c.failed or (require_all and c.verdict == "not run") for c in checks):
        return EXIT_WORSE
    return EXIT_OK


def new_baseline(runs: dict[str, dict[str, Any]], table: dict[str, Tolerance],
                 previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """A baseline from the successful runs: each config's compared metrics (those with a
    tolerance). The previous baseline's ``note`` and ``tolerances`` are kept."""
    entries = []
    for run in runs.values():
        if run.get("status") != "ok":
            continue
        metrics = {k: float(v) for k, v in run.items()
                   if ("/" in k) and isinstance(v, (int, float)) and v == v and tolerance_for(k, table) is not None}
        entries.append({"label": run_label(run), "config_hash": run.get("config_hash"),
                        "relevant": json.loads(run["relevant"]), "metrics": metrics})
    entries.sort(key=lambda e: (e["label"], e["config_hash"] or ""))
    previous = previous or {}
    return {"schema_version": BASELINE_SCHEMA, "note": previous.get("note", ""),
            "tolerances": previous.get("tolerances", {}), "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "entries": entries}


def run_label(row: dict[str, Any]) -> str:
    """``tiny-llama rtn w4 g128 act-order`` from a flat row (``fp16`` for the baseline)."""
    method = row.get("relevant.quantizer.method", "?")
    model = row.get("model.name") or "?"
    if method == "fp16":
        return f"{model} fp16"
    bits, group = _int(row.get("relevant.quantizer.bits")), _int(row.get("relevant.quantizer.group_size"))
    parts = [model, method, f"w{bits}"] + ([f"g{group}"] if group is not None else [])
    parts += ["act-order"] if row.get("relevant.quantizer.desc_act") in (True, 1) else []
    return " ".join(parts)


def _int(v: Any) -> int | None:
    """A whole number from a DataFrame cell (pandas turns ints with gaps into floats, gaps into NaN)."""
    return None if v is None or v != v else int(v)


def render(checks: list[Check]) -> str:
    """The baseline-vs-current table."""
    from tabulate import tabulate

    rows = []
    for c in checks:
        delta = None if c.current is None or c.baseline is None else c.current - c.baseline
        pct = "–" if delta is None or not c.baseline else f"{100 * delta / abs(c.baseline):+.2f}%"
        rows.append([c.label, c.metric, _num(c.baseline), _num(c.current), _num(delta, sign=True), pct,
                     _num(c.allowed), c.verdict])
    headers = ["run", "metric", "baseline", "current", "Δ", "Δ %", "allowed", "verdict"]
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def _num(v: float | None, sign: bool = False) -> str:
    if v is None:
        return "–"
    return f"{v:+.6g}" if sign else f"{v:.6g}"


def _tolerances(baseline: dict[str, Any], specs: list[str]) -> dict[str, Tolerance]:
    table = dict(DEFAULT_TOLERANCES)
    for key, t in (baseline.get("tolerances") or {}).items():
        base = tolerance_for(key, table)
        lower = t.get("lower_is_better", base.lower_is_better if base else True)
        table[key] = Tolerance(rel=float(t.get("rel", 0.0)), abs=float(t.get("abs", 0.0)), lower_is_better=lower)
    for spec in specs:
        key, tol = parse_tolerance(spec, table)
        table[key] = tol
    return table


def _read_baseline(path: Path, must_exist: bool) -> dict[str, Any]:
    if not path.exists():
        if must_exist:
            raise UserError("--baseline", f"{path} does not exist", "give a baseline file, or write one with --update")
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError("--baseline", f"{path} is not readable JSON ({str(exc)[:80]})",
                        "restore it, or write a new one with --update") from None
    if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
        raise UserError("--baseline", f"{path} has no 'entries' list", "write a new baseline with --update")
    return data


def run(argv: list[str] | None = None) -> int:
    """The CLI; returns the exit status."""
    from harness import results

    p = argparse.ArgumentParser(prog="python -m harness.regress", description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", required=True, type=Path, help="baseline JSON (under sweeps/baselines/)")
    p.add_argument("--results", required=True, type=Path, help="results_dir of the runs to check")
    p.add_argument("--study", help="only the runs of this study")
    p.add_argument("--tolerance", action="append", default=[], metavar="KEY=REL[:ABS]",
                   help="per metric (full name, last name or ending): e.g. ppl=0.5%%, nll=0:0.01 (repeatable)")
    p.add_argument("--require-all", action="store_true", help="fail when a baseline entry has no run")
    p.add_argument("--update", action="store_true", help="write the current runs as the new baseline")
    args = p.parse_args(argv)

    baseline = _read_baseline(args.baseline, must_exist=not args.update)
    table = _tolerances(baseline, args.tolerance)
    if not results.store_path(args.results).exists():
        raise UserError("--results", f"no {results.STORE} in {args.results}",
                        "give the results_dir of a harness run or study")
    runs = current_runs(args.results, args.study)
    if args.update:
        new = new_baseline(runs, table, baseline)
        if not new["entries"]:
            raise UserError("--results", f"no successful run in {args.results}"
                            + (f" for study {args.study!r}" if args.study else ""), "run the study first")
        results.write_json_atomic(args.baseline, new)
        print(f"wrote {len(new['entries'])} baseline entries to {args.baseline}")
        return EXIT_OK
    checks = compare(baseline, runs, table)
    print(render(checks))
    status = exit_status(checks, args.require_all)
    failed = {c.label for c in checks if c.failed or (args.require_all and c.verdict == "not run")}
    not_run = {c.label for c in checks if c.verdict == "not run"}
    passed = {c.label for c in checks} - failed - not_run
    if status == EXIT_NO_MATCH:
        print(f"no run in {args.results} matches an entry of {args.baseline}: compare runs of the same "
              "config (study, model, protocol), or write a new baseline with --update", file=sys.stderr)
    elif not_run:
        print(f"{len(not_run)} baseline entries have no run in {args.results}", file=sys.stderr)
    print(f"regression: {len(passed)} passed, {len(failed)} failed")
    return status


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors are one line and exit status 2."""
    try:
        sys.exit(run(argv))
    except UserError as exc:
        print(f"error: {exc.line()}", file=sys.stderr)
        sys.exit(EXIT_NO_MATCH)


if __name__ == "__main__":
    main()

