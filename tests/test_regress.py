"""Regression checks: the committed baseline, a deliberately degraded quantizer caught by the real
regress CLI, --update, tolerances and exit statuses."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import regress
from harness.errors import UserError
from tests.conftest import ROOT, requires_data

pytestmark = requires_data
BASELINE = ROOT / "sweeps" / "baselines" / "regression.json"
# The regression study's RTN 4-bit job, run alone (same result-relevant config as its baseline entry).
RTN4 = ["study=regression", "hydra.mode=RUN", "quantizer=rtn", "quantizer.bits=4", "logger=none", "print_table=false"]

# The real CLI with RTN swapped for a sloppy copy: one code in four is rounded one step up — the
# kind of bug a refactor of the grid code could bring in. The config (and so the match) is unchanged.
DEGRADED = """
import dataclasses, sys
import torch, quantizers
from quantizers.registry import QUANTIZERS
rtn = quantizers.get("rtn")
def sloppy(W, H, cfg):
    res = rtn.quantize(W, H, cfg)
    off = torch.arange(res.codes.numel()).reshape(res.codes.shape) % 4 == 0
    res.codes[off] = (res.codes[off].int() + 1).clamp(max=2 ** cfg.bits - 1).to(res.codes.dtype)
    return res
QUANTIZERS._items["rtn"] = dataclasses.replace(rtn, quantize=sloppy)
from harness.cli import main
main(sys.argv[1:])
"""


def run_harness(tmp: Path, results_dir: Path, *overrides: str, code: str | None = None) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HARNESS_CACHE=str(tmp / "cache"))
    head = ["-c", code] if code else ["-m", "harness"]
    proc = subprocess.run([sys.executable, *head, f"results_dir={results_dir}", *overrides], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def regress_cli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.regress", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("regress")
    run_harness(tmp, tmp / "good", *RTN4)
    run_harness(tmp, tmp / "degraded", *RTN4, code=DEGRADED)
    return {"tmp": tmp, "good": tmp / "good", "degraded": tmp / "degraded"}


def test_a_fresh_run_matches_the_committed_baseline(runs):
    proc = regress_cli("--baseline", BASELINE, "--results", runs["good"], "--study", "regression")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "tiny-llama rtn w4" in proc.stdout and "WORSE" not in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "regression: 1 passed, 0 failed"
    assert "4 baseline entries have no run" in proc.stderr


def test_a_degraded_quantizer_is_caught(runs):
    proc = regress_cli("--baseline", BASELINE, "--results", runs["degraded"], "--study", "regression")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    [row] = [ln for ln in proc.stdout.splitlines() if "modules/weight_rel_err" in ln]
    assert "WORSE" in row
    assert proc.stdout.strip().splitlines()[-1] == "regression: 0 passed, 1 failed"


def test_require_all_fails_when_baseline_entries_did_not_run(runs):
    proc = regress_cli("--baseline", BASELINE, "--results", runs["good"], "--require-all")
    assert proc.returncode == 1 and "not run" in proc.stdout


def test_update_writes_a_baseline_that_then_passes(runs, tmp_path):
    out = tmp_path / "baselines" / "new.json"
    proc = regress_cli("--baseline", out, "--results", runs["degraded"], "--update")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    [entry] = data["entries"]
    assert entry["label"] == "tiny-llama rtn w4" and entry["relevant"]["quantizer"]["bits"] == 4
    assert {"wikitext2/ppl", "wikitext2/nll", "modules/weight_rel_err"} <= set(entry["metrics"])
    assert regress_cli("--baseline", out, "--results", runs["degraded"]).returncode == 0
    # against the degraded baseline the good quantizer is better, never "worse"
    proc = regress_cli("--baseline", out, "--results", runs["good"])
    assert proc.returncode == 0 and "better" in proc.stdout


def test_nothing_matched_exits_2(runs, tmp_path):
    data = json.loads(BASELINE.read_text())
    for e in data["entries"]:
        e["relevant"]["eval"]["seqlen"] = 64  # another protocol
    other = tmp_path / "other.json"
    other.write_text(json.dumps(data))
    proc = regress_cli("--baseline", other, "--results", runs["good"])
    assert proc.returncode == 2 and "--update" in proc.stderr


def test_bad_input_is_one_line_exit_2(runs, tmp_path):
    for args, key in [(["--baseline", tmp_path / "none.json", "--results", runs["good"]], "--baseline"),
                      (["--baseline", BASELINE, "--results", tmp_path], "--results"),
                      (["--baseline", BASELINE, "--results", runs["good"], "--tolerance", "ppl=lots"], "--tolerance")]:
        proc = regress_cli(*args)
        assert proc.returncode == 2 and proc.stderr.startswith(f"error: {key}") and "Traceback" not in proc.stderr


def test_the_committed_baseline_covers_the_regression_study():
    data = json.loads(BASELINE.read_text())
    labels = {e["label"] for e in data["entries"]}
    assert {"tiny-llama fp16", "tiny-llama rtn w4", "tiny-llama rtn w3"} <= labels
    assert all(e["relevant"]["model"]["dtype"] == "bfloat16" for e in data["entries"])
    for e in data["entries"]:  # every quantized entry carries a reconstruction error, the metric that moves
        assert e["relevant"]["quantizer"]["method"] == "fp16" or any(k.endswith("rel_err") for k in e["metrics"])


# --- tolerances and verdicts, on made-up numbers ------------------------------------------------

def _entry(metrics: dict[str, float]) -> dict:
    return {"label": "m", "relevant": {"quantizer": {"method": "rtn"}}, "metrics": metrics}


def _runs(**metrics: float) -> dict[str, dict]:
    return {'{"quantizer":{"method":"rtn"}}': {"status": "ok", **{k.replace("__", "/"): v for k, v in metrics.items()}}}


def test_tolerances_and_verdicts():
    table = dict(regress.DEFAULT_TOLERANCES)
    base = {"entries": [_entry({"wikitext2/ppl": 10.0, "lambada/acc": 0.5, "modules/output_rel_err": 0.01})]}
    ok = regress.compare(base, _runs(wikitext2__ppl=10.04, lambada__acc=0.495, modules__output_rel_err=0.0099), table)
    # metrics in sorted order: lambada/acc, modules/output_rel_err, wikitext2/ppl
    assert [c.verdict for c in ok] == ["ok", "better", "ok"] and regress.exit_status(ok) == 0
    bad = regress.compare(base, _runs(wikitext2__ppl=10.06, lambada__acc=0.48, modules__output_rel_err=0.0102), table)
    assert [c.verdict for c in bad] == ["WORSE", "WORSE", "WORSE"] and regress.exit_status(bad) == 1
    missing = regress.compare(base, _runs(wikitext2__ppl=10.0), table)
    assert "missing metric" in [c.verdict for c in missing] and regress.exit_status(missing) == 1
    failed = regress.compare(base, {'{"quantizer":{"method":"rtn"}}': {"status": "failed"}}, table)
    assert [c.verdict for c in failed] == ["run failed"] and regress.exit_status(failed) == 1
    assert regress.exit_status(regress.compare(base, {}, table)) == 2


def test_tolerance_specs():
    table = dict(regress.DEFAULT_TOLERANCES)
    assert regress.parse_tolerance("ppl=1%", table) == ("ppl", regress.Tolerance(0.01, 0.0, True))
    assert regress.parse_tolerance("wikitext2/nll=0:0.02", table)[1] == regress.Tolerance(0.0, 0.02, True)
    assert regress.parse_tolerance("acc=0:0.05", table)[1].lower_is_better is False
    assert regress.tolerance_for("modules/weight_rel_err", table) is table["rel_err"]
    assert regress.tolerance_for("wikitext2/windows", table) is None
    with pytest.raises(UserError, match="--tolerance"):
        regress.parse_tolerance("windows=1%", table)
