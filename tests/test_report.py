"""The results store as a DataFrame, and the report CLI's tables and plots, from real runs."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from harness import report, results
from tests.conftest import ROOT, requires_data, slot_record

pytestmark = requires_data
GRID = ["model=tiny-llama", "model.dtype=bfloat16", "logger=none", "print_table=false", "quantizer=fp16,rtn,gptq",
        "quantizer.bits=4,3", "quantizer.group_size=null,32", "eval.seqlen=128", "eval.max_windows=2",
        "calib.nsamples=4", "calib.seqlen=64", "--multirun"]


def report_cli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.report", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp16, then RTN and GPTQ at 4 and 3 bits, per-channel and g32 (9 runs), then a torn line."""
    tmp = tmp_path_factory.mktemp("report")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HARNESS_CACHE=str(tmp / "cache"))
    proc = subprocess.run([sys.executable, "-m", "harness", f"results_dir={tmp / 'results'}", *GRID], cwd=tmp,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    with open(results.store_path(tmp / "results"), "a") as f:
        f.write('{"schema_version": 1, "status": "ok", "metr')  # a writer killed mid-line
    return tmp / "results"


@pytest.fixture(scope="module")
def md(store: Path) -> subprocess.CompletedProcess:
    proc = report_cli("--results", store, "--out", store / "report-md")
    assert proc.returncode == 0, proc.stderr
    return proc


def test_load_is_one_row_per_run_with_flat_columns(store):
    problems: list[str] = []
    df = results.load(store, problems)
    assert len(df) == 9 and (df["status"] == "ok").all() and (df["schema_version"] == results.SCHEMA_VERSION).all()
    assert {"config.quantizer.bits", "config.model.name", "wikitext2/ppl", "wikitext2/nll", "timings.total_s",
            "memory.peak_rss_bytes", "relevant.quantizer.method", "modules/weight_rel_err", "bits_per_weight",
            "weight_bytes", "run_id", "config_hash"} <= set(df.columns)
    assert len(problems) == 1 and ":10:" in problems[0] and df.attrs["problems"] == problems
    first = next(results.iter_records(store))
    assert df.iloc[0]["wikitext2/ppl"] == first["metrics"]["wikitext2/ppl"]


def test_bits_per_weight_counts_scale_and_zero_overhead():
    rec = {"relevant": {"quantizer": {"method": "rtn", "bits": 4, "group_size": 32}},
           "model": {"dtype": "float16", "n_params": 1000}, "modules": [{"shape": [8, 64]}]}
    assert results.footprint(rec) == {"bits_per_weight": 4 + 2 * (16 + 4) / 64,
                                      "weight_bytes": (8 * 64 * 4 + 8 * 2 * 20 + (1000 - 512) * 16) / 8}
    rec["relevant"]["quantizer"]["group_size"] = None
    assert results.footprint(rec)["bits_per_weight"] == 4 + 20 / 64
    base = {"relevant": {"quantizer": {"method": "fp16"}}, "model": {"dtype": "float32", "n_params": 10}}
    assert results.footprint(base) == {"bits_per_weight": 32.0, "weight_bytes": 40.0}


def test_pivot_table_markdown(md, store):
    out = md.stdout
    assert "#### tiny-llama (bfloat16) · wikitext2 perplexity · evaluation: first 2 windows of 128" in out
    lines = out.splitlines()
    header = next(ln for ln in lines if ln.startswith("| Method"))
    assert [c.strip() for c in header.strip("|").split("|")] == ["Method", "Bits", "per-channel", "g32"]
    body = lines[lines.index(header) + 2: lines.index(header) + 7]
    assert body[0].startswith("| fp16") and [r.split("|")[1].strip() for r in body] == ["fp16", "rtn", "gptq",
                                                                                          "rtn", "gptq"]
    df = report.select(results.load(store))
    rtn4 = df[(df["_method"] == "rtn") & (df["_bits"] == 4) & (df["_group"].isna())].iloc[0]
    gptq4 = df[(df["_method"] == "gptq") & (df["_bits"] == 4) & (df["_group"].isna())].iloc[0]
    best = min(rtn4["wikitext2/ppl"], gptq4["wikitext2/ppl"])
    assert f"**{best:.2f}**" in out and f"{max(rtn4['wikitext2/ppl'], gptq4['wikitext2/ppl']):.2f}" in out
    assert "bold: best ppl per column within a bit width" in out and "reduced protocol" in out


def test_tradeoff_table_and_plots(md, store):
    out = md.stdout
    header = next(ln for ln in out.splitlines() if ln.startswith("| Method") and "Bits/weight" in ln)
    assert "Weights (MiB)" in header and "Latency (ms)" in header and "wikitext2 ppl" in header
    rows = [ln for ln in out.splitlines()[out.splitlines().index(header) + 2:] if ln.startswith("|")]
    assert len(rows) == 9 and rows[0].split("|")[5].strip() == "16.00"  # the bfloat16 baseline on top
    assert all(r.split("|")[7].strip() == "–" for r in rows)  # no latency measured yet
    bpw = [float(r.split("|")[5]) for r in rows]
    assert bpw == sorted(bpw, reverse=True) and 4 < bpw[1] < 5
    files = {p.name: p for p in (store / "report-md").iterdir()}
    assert "tables.md" in files
    pngs = [p for n, p in files.items() if n.endswith(".png")]
    assert {n.split("_")[0] for n in map(lambda p: p.name, pngs)} == {"pareto", "module"}
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000 for p in pngs)


def test_latex_and_csv(store, tmp_path):
    tex = report_cli("--results", store, "--format", "latex", "--out", tmp_path / "tex")
    assert tex.returncode == 0 and r"\toprule" in tex.stdout and r"\textbf{" in tex.stdout
    assert (tmp_path / "tex" / "tables.tex").read_text().count(r"\begin{tabular}") == 2
    csv = report_cli("--results", store, "--format", "csv", "--out", tmp_path / "csv")
    assert csv.returncode == 0
    [pivot] = list((tmp_path / "csv").glob("pivot_*.csv"))
    df = pd.read_csv(pivot)
    assert list(df.columns) == ["Method", "Bits", "per-channel", "g32"] and df.iloc[0]["Method"] == "fp16"
    assert df["per-channel"].dtype == float


def test_missing_cells_act_order_columns_and_variants(store, tmp_path):
    """Made-up variants of a real record: a cell no run fills shows "–"; act-order gets columns."""
    recs = [r for r in results.iter_records(store) if r["relevant"]["quantizer"]["method"] in ("fp16", "gptq")]
    extra = copy.deepcopy(next(r for r in recs if r["relevant"]["quantizer"].get("bits") == 4))
    extra["relevant"]["quantizer"].update(desc_act=True, group_size=128)
    extra["metrics"]["wikitext2/ppl"] = 1.0
    sym = copy.deepcopy(extra)
    sym["relevant"]["quantizer"]["sym"] = True
    with open(results.store_path(tmp_path), "w") as f:
        for r in [*recs, extra, sym]:
            f.write(json.dumps(r) + "\n")
    [pivot] = [report.render(t) for t in report.pivot_tables(report.select(results.load(tmp_path)))]
    header = next(ln for ln in pivot.splitlines() if ln.startswith("| Method"))
    assert [c.strip() for c in header.strip("|").split("|")][2:] == ["per-channel", "g128 act-order", "g32"]
    rows = {ln.split("|")[1].strip(): ln for ln in pivot.splitlines() if "| 4 " in ln}
    assert set(rows) == {"gptq", "gptq sym"}
    assert rows["gptq sym"].split("|")[3].strip() == "–" and "**1.00**" in rows["gptq"]


def test_pareto_front():
    pts = [(16.0, 10.0), (4.3, 11.0), (4.6, 10.5), (3.3, 14.0), (3.6, 15.0), (4.6, 12.0)]
    assert report.pareto_front(pts) == [(3.3, 14.0), (4.3, 11.0), (4.6, 10.5), (16.0, 10.0)]
    assert report.pareto_front([(1, 0.5), (2, 0.4), (3, 0.7)], lower_is_better=False) == [(1, 0.5), (3, 0.7)]


def test_unknown_study_is_one_line_exit_2(store):
    proc = report_cli("--results", store, "--study", "nope")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: --study")
    assert "Traceback" not in proc.stderr


def test_devices_table_from_the_sweeps_slots(md, store):
    """The sweep's jobs each held a slot (CPU: slot 0, one at a time): the report's devices.md says so."""
    text = (store / "report-md" / "devices.md").read_text()
    assert "#### Devices of the sweep" in text and "no two jobs overlapped on one GPU" in text
    assert "Devices of the sweep" not in md.stdout  # not among the paper tables
    row = next(line for line in text.splitlines() if line.startswith("| slot-0"))
    assert [c.strip() for c in row.strip("|").split("|")][1:4] == ["cpu", "0", "9"]


def test_devices_table_names_overlapping_jobs():
    table = report.device_table([slot_record("aaaaaaaaaa", 0, 10), slot_record("bbbbbbbbbb", 5, 12)])
    assert table.rows == [["GPU-a", "cuda:0", "0", "2", "17.0", "142%"]]
    assert table.notes[1] == "1 pairs of jobs overlapped on one GPU: aaaaaaaa/bbbbbbbb"
    assert report.device_table([{"run_id": "x"}]) is None
