"""Packed evaluation (``pack``), the QuantLinear backend (``kernel``) and speed (``eval.latency``).

The measurement functions run on a tiny model in process; the config keys go through the real CLI.
Packed scales are float16, so a packed run's perplexity differs from the fake-quantized run's by
that rounding only: a few 1e-6 relative on the tiny random models (asserted at 1e-4).
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

from harness import latency, results
from harness.adapters import adapter_for
from harness.errors import UserError
from harness.export import replace_linears
from harness.kernels import resolve_kernel, set_kernel, validate_kernel
from harness.pipeline import quantize_model
from harness.record import config_hash, relevant_config
from quantizers import get
from quantizers.pack import packed_nbytes
from quantizers.qlinear import QuantLinear
from quantizers.rtn import RTNConfig
from tests.conftest import compose, requires_data, tiny_model
from tests.test_cli import QUICK, harness

pytestmark = requires_data
CPU = torch.device("cpu")
SMALL = ["eval.latency_prefill=64", "eval.latency_prompt=8", "eval.latency_decode_tokens=4",
         "eval.latency_batch_sizes=[1,3]", "eval.latency_repeats=2", "eval.latency_warmup=1"]


@pytest.fixture(scope="module")
def packed_llama():
    """(fake-quantized model, the same model packed) of tiny-llama, RTN 4-bit groups of 32."""
    model = tiny_model("tiny-llama").model
    adapter = adapter_for(model)
    qcfg = RTNConfig(bits=4, group_size=32)
    out = quantize_model(model, adapter, get("rtn"), qcfg, None, CPU, keep_results=True, progress=False)
    packed = copy.deepcopy(model)
    replace_linears(packed, adapter, out.results, group_size=32)
    return model, packed


def test_measure_returns_positive_finite_figures_with_their_path(packed_llama):
    dense, packed = packed_llama
    for model, path in ((dense, latency.DENSE), (packed, "torch-dequant-cached")):
        m = latency.measure(model, CPU, prefill_tokens=32, prompt=4, decode_tokens=3, batch_sizes=[1, 2],
                            repeats=2, warmup=1)
        assert set(m) == {"latency/prefill_tokens_per_s", "latency/prefill_ms", "latency/prefill_path",
                          *(f"latency/decode_bs{b}_{k}" for b in (1, 2) for k in ("ms_per_token", "tokens_per_s",
                                                                                    "path"))}
        numbers = [v for k, v in m.items() if not k.endswith("_path")]
        assert all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in numbers)
        assert all(v == path for k, v in m.items() if k.endswith("_path"))
        assert m["latency/prefill_tokens_per_s"] == pytest.approx(32 / (m["latency/prefill_ms"] / 1000))


def test_decode_feeds_one_token_per_step_through_the_cache(packed_llama):
    _, packed = packed_llama
    calls = []
    handle = packed.register_forward_pre_hook(lambda _m, args, kw: calls.append(
        (tuple((args[0] if args else kw["input_ids"]).shape),
         (kw.get("cache") if "cache" in kw else kw.get("past_key_values")) is not None)),
        with_kwargs=True)
    try:
        d = latency.decode(packed, CPU, batch=2, prompt=5, steps=3, repeats=2, warmup=1)
    finally:
        handle.remove()
    # each of warm-up + repeats: one untimed (2, 5) prefill, then 3 steps of (2, 1) with the cache
    assert calls == [((2, 5), False), *[((2, 1), True)] * 3] * 3
    assert d["ms_per_token"] > 0 and d["tokens_per_s"] == pytest.approx(2 / (d["ms_per_token"] / 1000))


def test_time_call_measures_wall_time_on_the_cpu():
    import time

    assert latency.time_call(lambda: time.sleep(0.05), CPU) >= 0.05


def test_kernel_names_resolve_and_validate(packed_llama):
    _, packed = packed_llama
    assert resolve_kernel("auto", CPU) == "torch"
    assert resolve_kernel("torch", CPU) == "torch"
    validate_kernel("auto")
    validate_kernel("torch")
    with pytest.raises(UserError) as err:
        validate_kernel("trtion")
    assert err.value.key == "kernel" and "did you mean 'triton'?" in err.value.line()
    with pytest.raises(UserError) as err:
        validate_kernel("cutlass")
    assert err.value.key == "kernel" and "torch" in err.value.fix
    assert set_kernel(packed, "torch") == sum(isinstance(m, QuantLinear) for m in packed.modules()) == 14


def test_pack_enters_the_hash_and_kernel_and_latency_do_not():
    base = compose("model=tiny-llama", "quantizer=rtn")
    h = config_hash(relevant_config(base, "float32"))
    packed = relevant_config(compose("model=tiny-llama", "quantizer=rtn", "pack=true"), "float32")
    assert packed["pack"] is True and config_hash(packed) != h
    for speed in ("kernel=torch", "eval.latency=true", "eval.latency_batch_sizes=[4]"):
        assert config_hash(relevant_config(compose("model=tiny-llama", "quantizer=rtn", speed), "float32")) == h
    exported = relevant_config(compose("model=tiny-llama", "quantizer=rtn", "export=gptq"), "float32")
    both = relevant_config(compose("model=tiny-llama", "quantizer=rtn", "export=gptq", "pack=true"), "float32")
    assert "pack" not in both and config_hash(both) == config_hash(exported)  # export=gptq packs anyway


def test_packed_run_with_latency_through_the_cli(tmp_path):
    setting = ["model=tiny-llama", "quantizer=rtn", "quantizer.bits=4", "quantizer.group_size=32", "logger=none",
               *QUICK]
    harness(tmp_path, *setting)
    harness(tmp_path, *setting, "pack=true", "eval.latency=true", *SMALL)
    plain, packed = results.iter_records(tmp_path / "results")
    m = packed["metrics"]
    # speed: prefill at batch 1, decode at each batch size, each with the path that produced it
    assert math.isfinite(m["latency/prefill_tokens_per_s"]) and m["latency/prefill_tokens_per_s"] > 0
    for b in (1, 3):
        assert math.isfinite(m[f"latency/decode_bs{b}_ms_per_token"]) and m[f"latency/decode_bs{b}_ms_per_token"] > 0
        assert m[f"latency/decode_bs{b}_path"] == "torch-dequant-cached"
    assert m["latency/prefill_path"] == "torch-dequant-cached" and m["latency/kernel"] == "torch"
    assert packed["data"]["kernel"] == "torch" and packed["data"]["kernel_paths"] == {"torch-dequant-cached": 14}
    assert packed["timings"]["latency_s"] > 0 and "pack_s" in packed["timings"]
    assert packed["memory"]["eval_peak_bytes"] is None  # no GPU here
    assert not any(k.startswith("latency/") for k in plain["metrics"]) and plain["data"]["kernel"] is None
    # the packed model evaluates as the fake-quantized one, up to float16 scale rounding
    assert packed["metrics"]["wikitext2/ppl"] == pytest.approx(plain["metrics"]["wikitext2/ppl"], rel=1e-4)
    assert packed["relevant"]["pack"] is True and packed["config_hash"] != plain["config_hash"]
    # weight memory = the QuantLinear buffers (qweight + qzeros + scales + g_idx), by hand from the shapes
    by_hand = sum(packed_nbytes(4, i, o, i // 32) for o, i in (mod["shape"] for mod in packed["modules"]))
    assert packed["memory"]["weight_bytes"] == by_hand == plain["memory"]["weight_bytes"]
    # the flattened table has the figures as columns
    row = results.load(tmp_path / "results").iloc[-1]
    assert row["latency/decode_bs3_ms_per_token"] > 0 and row["memory.eval_peak_bytes"] is None


BAD = [
    (["quantizer=rtn", "quantizer.bits=5", "pack=true"], "pack"),
    (["kernel=trtion"], "kernel"),
    (["eval.latency=true", "eval.latency_batch_sizes=[0]"], "eval.latency_batch_sizes"),
    (["eval.latency=true", "eval.latency_repeats=0"], "eval.latency_repeats"),
    (["eval.latency=true", "eval.latency_prefill=4096"], "eval.latency_prefill"),  # tiny-llama's context: 2048
]


@pytest.mark.parametrize("overrides,key", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_pack_kernel_latency_is_one_line_exit_2(tmp_path, overrides, key):
    proc = harness(tmp_path, "model=tiny-llama", "logger=none", *overrides, *QUICK, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(f"error: {key}:"), proc.stderr
    assert "Traceback" not in proc.stderr
    if key == "kernel":
        assert "did you mean 'triton'?" in lines[0]


@pytest.mark.gpu
def test_packed_latency_on_the_gpu_names_the_kernel_and_eval_peak(tmp_path):
    harness(tmp_path, "model=tiny-llama", "model.dtype=float16", "quantizer=rtn", "quantizer.group_size=32",
            "pack=true", "eval.latency=true", "device=cuda", "logger=none", *SMALL, *QUICK)
    rec = next(results.iter_records(tmp_path / "results"))
    assert rec["data"]["kernel"] in ("torch", "triton")  # auto: triton where that backend is registered
    assert rec["metrics"]["latency/kernel"] == rec["data"]["kernel"]
    assert 0 < rec["memory"]["eval_peak_bytes"] <= rec["memory"]["gpu_max_allocated_bytes"]
    assert rec["metrics"]["latency/decode_bs1_ms_per_token"] > 0


def test_pack_on_fp16_is_the_dense_baseline(tmp_path):
    """A speed study crosses fp16 with pack=true: fp16 has nothing to pack, so it runs dense and
    shares the fp16 baseline's hash."""
    harness(tmp_path, "model=tiny-llama", "logger=none", "quantizer=fp16", *QUICK)
    harness(tmp_path, "model=tiny-llama", "logger=none", "quantizer=fp16", "pack=true", *QUICK)
    a, b = list(results.iter_records(tmp_path / "results"))
    assert a["config_hash"] == b["config_hash"] and b["data"]["kernel_paths"] == {}
    assert b["metrics"]["wikitext2/ppl"] == a["metrics"]["wikitext2/ppl"]


def test_speed_study_runs_dense_baseline_and_packed_gptq(tmp_path):
    small = ["eval.latency_prefill=32", "eval.latency_prompt=8", "eval.latency_decode_tokens=4",
             "eval.latency_batch_sizes=[1,2]", "eval.latency_repeats=1", "eval.latency_warmup=0"]
    harness(tmp_path, "study=speed", "model=tiny-llama", "quantizer.bits=4", "quantizer.desc_act=false", "logger=none",
            *QUICK, *small)
    recs = list(results.iter_records(tmp_path / "results"))
    recs.sort(key=lambda r: r["relevant"]["quantizer"]["method"] != "fp16")
    assert [(r["relevant"]["quantizer"]["method"], r["relevant"].get("pack")) for r in recs] == [
        ("fp16", None), ("gptq", True), ("gptq", True)]
    assert all(r["status"] == "ok" and r["metrics"]["latency/decode_bs2_ms_per_token"] > 0 for r in recs)
    assert recs[0]["metrics"]["latency/prefill_path"] == "dense"
    assert recs[1]["metrics"]["latency/prefill_path"] != "dense"
    assert recs[1]["memory"]["weight_bytes"] < recs[0]["memory"]["weight_bytes"] / 3
    # the report's trade-off table shows the decode latency at the smallest batch
    from harness import report

    tables = report.tradeoff_tables(report.select(results.load(tmp_path / "results")))
    (table,) = tables
    lat = [row[table.columns.index("Latency (ms)")] for row in table.rows]
    assert all(v not in ("", "–") and float(v) > 0 for v in lat)
    assert any("decode ms/token with a KV cache at batch 1" in n for n in table.notes)
