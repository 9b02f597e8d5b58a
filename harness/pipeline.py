"""The layer-by-layer quantization pipeline of the GPTQ paper.

Inputs of decoder layer *i* are the outputs of the already-quantized layers < *i*. Per layer:
move it to the device, accumulate each linear's H = (2/n)·Σ x xᵀ over the n calibration tokens
(float32, forward hooks), quantize, write the dequantized weights back, recompute the layer's
outputs with them, move it back. Only one decoder layer is on the device at a time.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from harness.adapters import Adapter, decoder_layers, linear_groups, set_weight_matrix, weight_matrix
from quantizers import QuantResult
from quantizers.registry import Method


class QuantizationError(RuntimeError):
    """The run cannot go on (e.g. a broken calibration Hessian); the message names the module."""


@dataclass
class PipelineOutput:
    modules: list[dict[str, Any]]  # per-linear diagnostics, in quantization order
    timings: dict[str, float]  # forward_hessian_s, solver_s, total_s
    results: dict[str, QuantResult] = field(default_factory=dict)  # full module name → codes (CPU)


class HessianAccumulator:
    """H = (2/n) Σ x xᵀ over every token seen, accumulated in float32. x: (..., cols)."""

    def __init__(self, cols: int, device: torch.device) -> None:
        self.sum = torch.zeros(cols, cols, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # (tokens, cols)
        self.sum.addmm_(x.t(), x)
        self.n += x.shape[0]

    def hessian(self) -> torch.Tensor:
        return self.sum * (2.0 / max(self.n, 1))


class _StopForward(Exception):
    pass


def move_outside_layers(model: nn.Module, layers_path: str, device: torch.device) -> None:
    """Move every parameter and buffer that is not inside the decoder layers to ``device``."""
    prefix = layers_path + "."
    for name, mod in model.named_modules():
        if name == layers_path or name.startswith(prefix):
            continue
        for p in mod.parameters(recurse=False):
            p.data = p.data.to(device)
        for bname, b in list(mod.named_buffers(recurse=False)):
            mod._buffers[bname] = b.to(device)


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, adapter: Adapter, calib: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Run the model up to decoder layer 0 for each calibration row of ``calib`` (n, seqlen).

    Returns the hidden states entering layer 0, (n, seqlen, hidden), and the keyword arguments the
    model passes to its layers (masks, rotary embeddings), which are the same for every row.
    """
    layers = decoder_layers(model, adapter)
    move_outside_layers(model, adapter.layers, device)
    captured: list[torch.Tensor] = []
    kwargs_seen: dict[str, Any] = {}

    def grab(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append(hidden)
        kwargs_seen.clear()
        kwargs_seen.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for j in range(calib.shape[0]):
            try:
                model(calib[j : j + 1].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return torch.cat(captured, dim=0), kwargs_seen


def _run_layer(layer: nn.Module, inps: torch.Tensor, kwargs: dict[str, Any], outs: torch.Tensor | None,
               batch: int = 1) -> None:
    """Forward ``inps`` (n, seqlen, hidden) through ``layer`` in chunks of ``batch`` rows.

    The layer kwargs were captured for one row; masks and rotary tables broadcast over a chunk."""
    for j in range(0, inps.shape[0], batch):
        out = layer(inps[j : j + batch], **kwargs)
        out = out[0] if isinstance(out, (tuple, list)) else out
        if outs is not None:
            outs[j : j + batch] = out


def _diagnostics(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor | None) -> dict[str, float]:
    """Output reconstruction error on the calibration activations, from H alone:
    ‖(W−Q)X‖² / ‖WX‖² = tr(ΔHΔᵀ) / tr(WHWᵀ) since H ∝ XXᵀ. Without H: the weight-space error."""
    D = W - Q  # (out, in)
    if H is None:
        return {"weight_rel_err": float((D.square().sum() / W.square().sum().clamp_min(1e-30)).item())}
    err = (D @ H * D).sum()
    ref = (W @ H * W).sum()
    return {"output_loss": float(err.item()), "output_rel_err": float((err / ref.clamp_min(1e-30)).item())}


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    adapter: Adapter,
    method: Method,
    qcfg: Any,
    calib: torch.Tensor | None,
    device: torch.device,
    true_sequential: bool = True,
    keep_results: bool = False,
    progress: bool = True,
    batch: int = 1,
) -> PipelineOutput:
    """Quantize every linear of every decoder layer of ``model`` in place (weights fake-quantized
    at the model's dtype). ``calib`` (n, seqlen) token ids is needed when ``method.needs_hessian``;
    ``batch`` calibration rows go through a layer at once (a speed knob: results agree to float
    rounding)."""
    t_start = time.perf_counter()
    layers = decoder_layers(model, adapter)
    reports: list[dict[str, Any]] = []
    results: dict[str, QuantResult] = {}
    t_fwd = t_solve = 0.0
    inps = outs = kwargs = None
    if method.needs_hessian:
        if calib is None:
            raise ValueError(f"{method.name} needs calibration data")
        t0 = time.perf_counter()
        inps, kwargs = capture_layer_inputs(model, adapter, calib, device)
        outs = torch.empty_like(inps)
        t_fwd += time.perf_counter() - t0
    n_tokens = int(calib.numel()) if calib is not None and method.needs_hessian else 0

    for i in tqdm(range(len(layers)), desc=f"{method.name} layers", disable=not progress, leave=False):
        layer = layers[i]
        home = next(layer.parameters()).device
        layer.to(device)
        for group in linear_groups(layer, adapter, true_sequential if method.needs_hessian else False):
            mods = {name: layer.get_submodule(name) for name in group}
            hessians: dict[str, torch.Tensor | None] = {name: None for name in group}
            if method.needs_hessian:
                t0 = time.perf_counter()
                accs = {n: HessianAccumulator(weight_matrix(m, adapter).shape[1], device) for n, m in mods.items()}
                handles = [
                    m.register_forward_hook(lambda _m, inp, _out, a=accs[n]: a.add(inp[0].detach()))
                    for n, m in mods.items()
                ]
                try:
                    _run_layer(layer, inps, kwargs, None, batch)
                finally:
                    for h in handles:
                        h.remove()
                hessians = {n: a.hessian() for n, a in accs.items()}
                t_fwd += time.perf_counter() - t0
            for name, mod in mods.items():
                full = f"{adapter.layers}.{i}.{name}"
                H = hessians[name]
                if H is not None and not torch.isfinite(H).all():
                    raise QuantizationError(f"the calibration Hessian of {full} has NaN/Inf values "
                                            "(calibration overflowed; try model.dtype=float32 or bfloat16)")
                W = weight_matrix(mod, adapter).float().clone()  # a copy: the write-back below reuses storage
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                res = method.quantize(W, H, qcfg)
                Q = res.dequantize()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds = time.perf_counter() - t0
                t_solve += seconds
                set_weight_matrix(mod, adapter, Q)
                report = {"module": full, "layer": i, "name": name, "shape": list(W.shape),
                          "seconds": seconds, "tokens": n_tokens}
                report.update(_diagnostics(W, Q, H))
                report.update({k: v for k, v in res.stats.items() if k != "seconds"})
                reports.append(report)
                if keep_results:
                    results[full] = QuantResult(res.codes.cpu(), res.scales.cpu(), res.zeros.cpu(),
                                                res.g_idx.cpu(), res.bits, dict(res.stats))
                del H
            hessians.clear()
        if method.needs_hessian:
            t0 = time.perf_counter()
            _run_layer(layer, inps, kwargs, outs, batch)  # inputs of the next layer, from quantized weights
            inps, outs = outs, inps
            t_fwd += time.perf_counter() - t0
        layer.to(home)
    del inps, outs
    return PipelineOutput(reports, {"forward_hessian_s": t_fwd, "solver_s": t_solve,
                                    "total_s": time.perf_counter() - t_start}, results)
