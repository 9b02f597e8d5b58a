"""The benchmarks' smoke runs print their tables and write their JSON."""
from __future__ import annotations

import json

from harness import bench
from tests.conftest import requires_data


def test_quantize_smoke(tmp_path, capsys):
    assert bench.main(["quantize", "--smoke", "--layers", "1", "--nsamples", "2", "--seqlen", "32",
                       "--out", str(tmp_path / "q.json")]) == 0
    out = capsys.readouterr().out
    assert "gptq act-order g128" in out and "solver s/layer" in out
    rows = json.loads((tmp_path / "q.json").read_text())["result"]
    assert [(r["setting"], r["path"]) for r in rows] == [
        ("rtn", "fast"), ("gptq per-channel", "plain"), ("gptq per-channel", "fast"),
        ("gptq per-channel", "fast+offload"), ("gptq act-order g128", "plain"), ("gptq act-order g128", "fast"),
        ("gptq act-order g128", "fast+offload")]
    assert all(r["total s/layer"] > 0 for r in rows)
    for r in rows:
        if r["path"].startswith("fast") and r["setting"] != "rtn":  # same model, same data: same result
            assert r["codes equal %"] >= 99.9 and abs(r["loss fast/plain"] - 1) < 1e-3


@requires_data
def test_eval_smoke(tmp_path, capsys):
    assert bench.main(["eval", "--smoke", "--layers", "1", "--seqlen", "64", "--max-windows", "4",
                       "--out", str(tmp_path / "e.json")]) == 0
    res = json.loads((tmp_path / "e.json").read_text())["result"]
    assert res["tokens"] == 256 and res["time / floor"] > 0
