"""GPTQ checkpoints end to end: tiny models quantized by the real pipeline, exported, loaded back.

The checkpoint stores scales in float16 (the format's dtype), so the reloaded model equals the
fake-quantized model *with float16-rounded scales* exactly, the in-memory packed model bit for bit,
and the pipeline's float32-scale model to within that rounding.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import quantizers
from harness.adapters import adapter_for, set_weight_matrix
from harness.export import (
    footprint,
    footprint_of_shapes,
    is_gptq_checkpoint,
    load_gptq_checkpoint,
    replace_linears,
    save_gptq_checkpoint,
)
from harness.perplexity import perplexity
from harness.pipeline import quantize_model
from quantizers.gptq import GPTQConfig
from quantizers.pack import dequantize_packed, pack
from quantizers.qlinear import QuantLinear, kernel_paths
from tests.conftest import requires_data, tiny_model

pytestmark = requires_data
CPU = torch.device("cpu")
SEQLEN = 32


@dataclass
class Exported:
    name: str
    model: torch.nn.Module  # fake-quantized by the pipeline (float32 scales)
    adapter: object
    results: dict
    qcfg: GPTQConfig
    path: Path
    summary: dict
    tokens: torch.Tensor  # (1, 4·SEQLEN) random ids


CASES = {
    # LLaMA: 4 bits, groups of 32 with act-order (permuted g_idx), asymmetric
    "tiny-llama": GPTQConfig(bits=4, group_size=32, desc_act=True, damp_percent=0.01),
    # GPT-2 (Conv1D, tied lm_head): 3 bits per channel, symmetric
    "tiny-gpt2": GPTQConfig(bits=3, sym=True, damp_percent=0.01),
}


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory) -> Exported:
    name, qcfg = request.param, CASES[request.param]
    loaded = tiny_model(name)
    model, tok = loaded.model, loaded.tokenizer
    adapter = adapter_for(model)
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(0, model.config.vocab_size, (4, SEQLEN), generator=g)
    out = quantize_model(model, adapter, quantizers.get("gptq"), qcfg, calib, CPU, keep_results=True,
                         progress=False)
    path = tmp_path_factory.mktemp(name) / "checkpoint"
    summary = save_gptq_checkpoint(model, tok, out.results, qcfg, path, true_sequential=True, meta={"run_id": "t"})
    tokens = torch.randint(0, model.config.vocab_size, (1, 4 * SEQLEN), generator=g)
    return Exported(name, model, adapter, out.results, qcfg, path, summary, tokens)


@torch.no_grad()
def _logits(model, tokens):
    return model(tokens[:, : 2 * SEQLEN]).logits


def _ppl(model, tokens) -> float:
    return perplexity(model, tokens, SEQLEN, None, 2, CPU)["ppl"]


def test_config_files(exported):
    cfg = json.loads((exported.path / "config.json").read_text())
    qc = cfg["quantization_config"]
    q = exported.qcfg
    assert qc == json.loads((exported.path / "quantize_config.json").read_text())
    assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] == "gptq"
    assert qc["bits"] == q.bits and qc["group_size"] == (q.group_size or -1)
    assert (qc["desc_act"], qc["sym"], qc["static_groups"], qc["true_sequential"]) == (
        q.desc_act, q.sym, q.static_groups, True)
    assert qc["damp_percent"] == q.damp_percent and qc["meta"]["run_id"] == "t"
    assert cfg["model_type"] == exported.model.config.model_type
    assert is_gptq_checkpoint(exported.path)
    assert not is_gptq_checkpoint(exported.path.parent)
    assert (exported.path / "tokenizer_config.json").is_file()


def test_tensor_names_shapes_and_dtypes(exported):
    bits = exported.qcfg.bits
    with safe_open(str(exported.path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.metadata() == {"format": "pt"}
        for name, r in exported.results.items():
            out_f, in_f = r.codes.shape
            assert f"{name}.weight" not in keys
            qw, qz = f.get_tensor(f"{name}.qweight"), f.get_tensor(f"{name}.qzeros")
            sc, gi = f.get_tensor(f"{name}.scales"), f.get_tensor(f"{name}.g_idx")
            assert qw.dtype == qz.dtype == gi.dtype == torch.int32 and sc.dtype == torch.float16
            assert qw.shape == (in_f * bits // 32, out_f) and qz.shape == (r.n_groups, out_f * bits // 32)
            assert sc.shape == (r.n_groups, out_f) and gi.shape == (in_f,)
            assert torch.equal(gi, r.g_idx)
            has_bias = exported.model.get_submodule(name).bias is not None
            assert (f"{name}.bias" in keys) == has_bias
    if exported.name == "tiny-gpt2":  # tied lm_head: stored once, as the embedding
        assert "lm_head.weight" not in keys and "transformer.wte.weight" in keys
    assert exported.summary["modules"] == len(exported.results) and exported.summary["v1_wrapped_zeros"] == 0


def test_reload_reproduces_logits_and_perplexity(exported, tmp_path):
    model, adapter, results, tokens = exported.model, exported.adapter, exported.results, exported.tokens
    loaded, tok = load_gptq_checkpoint(exported.path, torch.float32)
    assert tok is not None
    assert {n for n, m in loaded.named_modules() if isinstance(m, QuantLinear)} == set(results)
    assert kernel_paths(loaded) == {"torch-dequant-cached": len(results)}
    got = _logits(loaded, tokens)

    # 1. the same model packed in memory (what a run with export=gptq evaluates): bit for bit
    packed = copy.deepcopy(model)
    assert sorted(replace_linears(packed, adapter, results)) == sorted(results)
    assert torch.equal(_logits(packed, tokens), got)
    assert _ppl(packed, tokens) == _ppl(loaded, tokens)
    # exporting the packed model writes the same tensors
    save_gptq_checkpoint(packed, None, results, exported.qcfg, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as a, \
            safe_open(str(exported.path / "model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())

    # 2. the fake-quantized model with float16-rounded scales: the checkpoint's exact weights
    ref16 = copy.deepcopy(model)
    for name, r in results.items():
        W = dequantize_packed(pack(r), r.bits, r.codes.shape[1], r.codes.shape[0])
        set_weight_matrix(ref16.get_submodule(name), adapter, W)
    torch.testing.assert_close(got, _logits(ref16, tokens), rtol=0, atol=1e-5)
    assert _ppl(ref16, tokens) == pytest.approx(_ppl(loaded, tokens), rel=1e-9)

    # 3. the pipeline's own model (float32 scales): apart only by the float16 scale rounding
    fq = _logits(model, tokens)
    assert (got - fq).abs().max() <= 2e-3 * fq.abs().max()
    assert _ppl(loaded, tokens) == pytest.approx(_ppl(model, tokens), rel=1e-4)

    # 4. float16 (the GPU dtype): same buffers, float16 compute
    half, _ = load_gptq_checkpoint(exported.path, torch.float16)
    q = next(m for m in half.modules() if isinstance(m, QuantLinear))
    assert q.scales.dtype == torch.float16 and q.qweight.dtype == torch.int32
    got16 = _logits(half, tokens)
    assert got16.dtype == torch.float16
    assert (got16.float() - got).abs().max() <= 1e-2 * got.abs().max()


def test_footprint_by_hand(exported):
    loaded, _ = load_gptq_checkpoint(exported.path, torch.float32)
    fp = footprint(loaded)
    if exported.name == "tiny-llama":  # 2 layers; hidden 64, kv 2 heads × 16 = 32, mlp 160; 4 bits, groups of 32
        per_layer = [(64, 64), (64, 32), (64, 32), (64, 64), (64, 160), (64, 160), (160, 64)]  # (in, out)
        size = {(in_f, out_f): in_f * 4 // 8 * out_f + (in_f // 32) * (out_f * 4 // 32) * 4
                + (in_f // 32) * out_f * 2 + in_f * 4 for in_f, out_f in per_layer}
        assert size[(64, 64)] == 2048 + 64 + 256 + 256  # q_proj, written out
        assert size[(160, 64)] == 5120 + 160 + 640 + 640  # down_proj: 5 groups
    else:  # 3 bits per channel: c_attn 64→192, c_proj 64→64, c_fc 64→256, mlp.c_proj 256→64
        per_layer = [(64, 192), (64, 64), (64, 256), (256, 64)]
        size = {(in_f, out_f): in_f * 3 // 8 * out_f + (out_f * 3 // 32) * 4 + out_f * 2 + in_f * 4
                for in_f, out_f in per_layer}
        assert size[(64, 192)] == 4608 + 72 + 384 + 256
    n_weights = 2 * sum(i * o for i, o in per_layer)
    q_bytes = 2 * sum(size[s] for s in per_layer)
    assert fp["weight_bytes_quantized"] == q_bytes
    assert fp["weight_bytes_fp16_equivalent"] == 2 * n_weights
    assert fp["bits_per_weight"] == pytest.approx(8 * q_bytes / n_weights)
    assert fp["quantized_modules"] == len(exported.results) and fp["quantized_weights"] == n_weights
    assert exported.qcfg.bits < fp["bits_per_weight"] < exported.qcfg.bits + 1.5
    shapes = [tuple(r.codes.shape) for r in exported.results.values()]
    est = footprint_of_shapes(shapes, exported.qcfg.bits, exported.qcfg.group_size)
    assert est == {k: fp[k] for k in est}
    base = footprint_of_shapes(shapes, None)
    assert base["weight_bytes_quantized"] == base["weight_bytes_fp16_equivalent"] and base["bits_per_weight"] == 16
    on_disk = exported.summary["bytes"]  # the file holds packed + other tensors (+ a small header)
    assert 0 < on_disk - (fp["weight_bytes_quantized"] + fp["other_bytes"]) < 64 * 1024


def test_export_refuses_what_loaders_would_misread(exported, tmp_path):
    model, results = exported.model, exported.results
    if exported.qcfg.desc_act:  # permuted g_idx without desc_act: kernels would ignore g_idx
        with pytest.raises(ValueError, match="desc_act"):
            save_gptq_checkpoint(model, None, results, GPTQConfig(bits=exported.qcfg.bits, group_size=32), tmp_path)
    with pytest.raises(ValueError, match="results is empty"):
        save_gptq_checkpoint(model, None, {}, exported.qcfg, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="not a GPTQ checkpoint"):
        load_gptq_checkpoint(tmp_path, torch.float32)
