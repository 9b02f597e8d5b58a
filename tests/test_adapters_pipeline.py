"""Adapters on every tiny random model, and the layer-by-layer pipeline against direct computations."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from harness.adapters import ADAPTERS, adapter_for, decoder_layers, linear_groups, weight_matrix
from harness.pipeline import HessianAccumulator, capture_layer_inputs, quantize_model
from quantizers.registry import Method
from quantizers.rtn import RTNConfig
from quantizers.rtn import quantize as rtn_quantize
from tests.conftest import requires_data, tiny_model

TINY = ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-opt", "tiny-gpt2", "tiny-gpt-neox"]
pytestmark = requires_data


@pytest.mark.parametrize("name", TINY)
def test_adapter_covers_every_linear(name):
    loaded = tiny_model(name)
    model = loaded.model
    adapter = adapter_for(model)
    assert adapter.model_type in ADAPTERS  # the tiny models all have a dedicated adapter
    layers = decoder_layers(model, adapter)
    assert len(layers) == model.config.num_hidden_layers
    groups = linear_groups(layers[0], adapter, true_sequential=True)
    assert len(groups) == 4  # attention in, attention out, mlp in, mlp out
    names = [n for g in groups for n in g]
    from harness.adapters import is_quantizable

    assert sorted(names) == sorted(n for n, m in layers[0].named_modules() if is_quantizable(m))
    for n in names:  # (out, in): the input dimension of the first group is the hidden size
        W = weight_matrix(layers[0].get_submodule(n), adapter)
        if n in groups[0]:
            assert W.shape[1] == model.config.hidden_size
    assert linear_groups(layers[0], adapter, true_sequential=False) == [names]


def test_generic_fallback_finds_layers():
    loaded = tiny_model("tiny-llama")
    model = loaded.model
    model.config.model_type = "somethingnew"
    adapter = adapter_for(model)
    assert adapter.layers == "model.layers" and adapter.sequential is None
    assert len(linear_groups(decoder_layers(model, adapter)[0], adapter, True)) == 1


def _calib(model, n=3, seqlen=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (n, seqlen), generator=g)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt", "tiny-gpt2"])
def test_captured_inputs_are_the_embeddings_output(name):
    model = tiny_model(name).model
    calib = _calib(model)
    inps, _ = capture_layer_inputs(model, adapter_for(model), calib, torch.device("cpu"))
    ref = torch.stack([model(calib[j : j + 1], output_hidden_states=True).hidden_states[0][0] for j in range(3)])
    torch.testing.assert_close(inps, ref)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_rtn_through_the_pipeline_equals_rtn_per_weight(name):
    model = tiny_model(name).model
    adapter = adapter_for(model)
    before = {n: weight_matrix(m, adapter).clone() for n, m in model.named_modules()
              if n.startswith(adapter.layers + ".") and hasattr(m, "weight") and m.weight.dim() == 2}
    cfg = RTNConfig(bits=3, group_size=16)
    from quantizers import get

    out = quantize_model(model, adapter, get("rtn"), cfg, None, torch.device("cpu"), progress=False)
    assert len(out.modules) == sum(len(g) for g in linear_groups(decoder_layers(model, adapter)[0], adapter, True)) * 2
    for rep in out.modules:
        mod = model.get_submodule(rep["module"])
        expected = rtn_quantize(before[rep["module"]], None, cfg).dequantize()
        torch.testing.assert_close(weight_matrix(mod, adapter), expected)


def _recording_method(store):
    """A real method (RTN) that also keeps the Hessian the pipeline handed it, per call."""

    def quantize(W, H, cfg):
        store.append(H.clone())
        return rtn_quantize(W, H, cfg)

    return Method("rtn_recording", RTNConfig, quantize, needs_hessian=True)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt"])
def test_hessians_come_from_the_already_quantized_model(name):
    """With true_sequential, every module's H is 2/n·XᵀX of its inputs in the *final* quantized
    model: layers before it and groups before it in its own layer were already quantized."""
    model = tiny_model(name).model
    adapter = adapter_for(model)
    calib = _calib(model, n=4, seqlen=16, seed=3)
    seen: list[torch.Tensor] = []
    out = quantize_model(model, adapter, _recording_method(seen), RTNConfig(bits=2), calib, torch.device("cpu"),
                         true_sequential=True, progress=False)
    accs = {}
    handles = []
    for rep in out.modules:
        mod = model.get_submodule(rep["module"])
        acc = accs[rep["module"]] = HessianAccumulator(weight_matrix(mod, adapter).shape[1], torch.device("cpu"))
        handles.append(mod.register_forward_hook(lambda _m, inp, _o, a=acc: a.add(inp[0])))
    with torch.no_grad():
        for j in range(calib.shape[0]):
            model(calib[j : j + 1])
    for h in handles:
        h.remove()
    for rep, H in zip(out.modules, seen, strict=True):
        torch.testing.assert_close(H, accs[rep["module"]].hessian(), rtol=1e-4, atol=1e-5)
        assert rep["tokens"] == calib.numel()
        assert 0 <= rep["output_rel_err"] < 1


def test_hessian_accumulator_is_two_over_n_xtx():
    g = torch.Generator().manual_seed(9)
    xs = [torch.randn(2, 5, 7, generator=g) for _ in range(3)]
    acc = HessianAccumulator(7, torch.device("cpu"))
    for x in xs:
        acc.add(x)
    X = torch.cat([x.reshape(-1, 7) for x in xs]).double()
    torch.testing.assert_close(acc.hessian().double(), 2 / X.shape[0] * X.T @ X, rtol=1e-5, atol=1e-6)


def test_output_rel_err_equals_direct_reconstruction_error():
    from harness.pipeline import _diagnostics

    g = torch.Generator().manual_seed(1)
    X = torch.randn(50, 12, generator=g)
    W = torch.randn(6, 12, generator=g)
    Q = rtn_quantize(W, None, RTNConfig(bits=3)).dequantize()
    H = 2 / 50 * X.T @ X
    d = _diagnostics(W, Q, H)
    direct = ((X @ (W - Q).T).square().sum() / (X @ W.T).square().sum()).item()
    assert d["output_rel_err"] == pytest.approx(direct, rel=1e-4)


def test_method_config_fields_have_community_names():
    names = {f.name for f in dataclasses.fields(RTNConfig)}
    assert {"bits", "group_size", "sym", "mse"} <= names


@pytest.mark.parametrize("name", TINY)
def test_batched_layer_forward_matches_one_row_at_a_time(name):
    """The layer kwargs are captured for one row; chunks of rows must give the same Hessians."""
    hs = {}
    for batch in (1, 3):
        model = tiny_model(name).model
        seen: list[torch.Tensor] = []
        quantize_model(model, adapter_for(model), _recording_method(seen), RTNConfig(bits=4),
                       _calib(model, n=5, seqlen=16, seed=4), torch.device("cpu"), progress=False, batch=batch)
        hs[batch] = seen
    for a, b in zip(hs[1], hs[3], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_diagnostics_compare_against_the_original_weights(dtype):
    """The write-back must not alias the weight the diagnostics compare with (float32 shares storage)."""
    model = tiny_model("tiny-llama").model.to(dtype)
    out = quantize_model(model, adapter_for(model), __import__("quantizers").get("gptq"),
                         __import__("quantizers.gptq", fromlist=["GPTQConfig"]).GPTQConfig(bits=2),
                         _calib(model, n=2, seqlen=16), torch.device("cpu"), progress=False)
    assert all(m["output_rel_err"] > 1e-4 for m in out.modules)


def test_a_broken_calibration_hessian_stops_the_run_naming_the_module():
    from harness.pipeline import QuantizationError
    from quantizers import get
    from quantizers.gptq import GPTQConfig

    model = tiny_model("tiny-llama").model
    with torch.no_grad():
        model.model.layers[0].post_attention_layernorm.weight[3] = float("inf")  # overflows the MLP inputs
    with pytest.raises(QuantizationError, match=r"model\.layers\.0\.mlp\.up_proj"):
        quantize_model(model, adapter_for(model), get("gptq"), GPTQConfig(bits=4), _calib(model, n=2, seqlen=8),
                       torch.device("cpu"), true_sequential=True, progress=False)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt", "tiny-gpt-neox"])
@pytest.mark.parametrize("true_sequential", [True, False])
def test_fast_path_gives_the_plain_path_results(name, true_sequential):
    """Shared Hessians and solves, early-stopped Hessian passes: same codes as one module at a time."""
    from quantizers import get
    from quantizers.gptq import GPTQConfig

    outs = {}
    for fast in (False, True):
        model = tiny_model(name).model
        outs[fast] = quantize_model(model, adapter_for(model), get("gptq"), GPTQConfig(bits=3, group_size=16),
                                    _calib(model, n=4, seqlen=16, seed=5), torch.device("cpu"),
                                    true_sequential=true_sequential, progress=False, keep_results=True,
                                    fast=fast, batch=2)
    plain, fast = outs[False], outs[True]
    assert [m["module"] for m in plain.modules] == [m["module"] for m in fast.modules]
    equal = total = 0
    for key, res in plain.results.items():
        equal += int((res.codes == fast.results[key].codes).sum())
        total += res.codes.numel()
    assert equal / total >= 0.999
    for a, b in zip(plain.modules, fast.modules, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3, abs=1e-9)
    if name == "tiny-llama":  # q/k/v and gate/up are fed one input each: one H, one solve
        shared = {m["name"]: set(m.get("hessian_shared_with", [])) for m in fast.modules if m["layer"] == 0}
        assert shared["self_attn.q_proj"] == {"self_attn.k_proj", "self_attn.v_proj"}
        assert shared["mlp.up_proj"] == {"mlp.gate_proj"}
        assert "self_attn.o_proj" not in {k for k, v in shared.items() if v}
        assert not any("hessian_shared_with" in m for m in plain.modules)


def test_offloaded_activations_give_the_same_model():
    from quantizers import get
    from quantizers.gptq import GPTQConfig

    weights = []
    for offload in (False, True):
        model = tiny_model("tiny-llama").model
        quantize_model(model, adapter_for(model), get("gptq"), GPTQConfig(bits=4), _calib(model, n=3, seqlen=16),
                       torch.device("cpu"), progress=False, offload=offload)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1])


@pytest.mark.gpu
def test_offload_on_the_gpu_keeps_activations_off_the_device_and_results_equal():
    from quantizers import get
    from quantizers.gptq import GPTQConfig

    dev = torch.device("cuda")
    res = {}
    for offload in (False, True):
        model = tiny_model("tiny-llama").model.half()
        torch.cuda.reset_peak_memory_stats(dev)
        out = quantize_model(model, adapter_for(model), get("gptq"), GPTQConfig(bits=4),
                             _calib(model, n=64, seqlen=256), dev, progress=False, offload=offload, batch=8)
        res[offload] = (out, torch.cuda.max_memory_allocated(dev))
    for a, b in zip(res[False][0].modules, res[True][0].modules, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
    assert res[True][1] < res[False][1]
