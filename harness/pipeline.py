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
    """H = (2/n) Σ x xᵀ over every token seen, accumulated in float32. x: (..., cols).

    With ``fast`` and float16/bfloat16 inputs on a GPU the product runs on tensor cores with a
    float32 result (``torch.mm(..., out_dtype=float32)``): products of 16-bit values are exact in
    float32, so only the order of the additions differs from the float32 product."""

    def __init__(self, cols: int, device: torch.device, fast: bool = False) -> None:
        self.sum = torch.zeros(cols, cols, dtype=torch.float32, device=device)
        self.n = 0
        self.fast = fast

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])  # (tokens, cols)
        self.n += x.shape[0]
        if self.fast and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
            try:
                self.sum += torch.mm(x.t(), x, out_dtype=torch.float32)
                return
            except (RuntimeError, TypeError):  # a torch without mm(out_dtype=...)
                self.fast = False
        x = x.float()
        self.sum.addmm_(x.t(), x)

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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, adapter: Adapter, calib: torch.Tensor, device: torch.device, offload: bool = False
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Run the model up to decoder layer 0 for each calibration row of ``calib`` (n, seqlen).

    Returns the hidden states entering layer 0, (n, seqlen, hidden) — on ``device``, or in pinned
    CPU memory with ``offload`` — and the keyword arguments the model passes to its layers (masks,
    rotary embeddings), which are the same for every row.
    """
    layers = decoder_layers(model, adapter)
    move_outside_layers(model, adapter.layers, device)
    captured: list[torch.Tensor] = []
    kwargs_seen: dict[str, Any] = {}

    def grab(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append(hidden.cpu() if offload else hidden)
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
    inps = torch.cat(captured, dim=0)
    if offload and device.type == "cuda":
        inps = inps.pin_memory()
    return inps, kwargs_seen


def _chunks(inps: torch.Tensor, batch: int, device: torch.device):
    """(start, rows on ``device``) for each chunk of ``batch`` rows of ``inps`` (which may live on the CPU)."""
    for j in range(0, inps.shape[0], batch):
        yield j, inps[j : j + batch].to(device, non_blocking=True)


def _run_layer(layer: nn.Module, inps: torch.Tensor, kwargs: dict[str, Any], outs: torch.Tensor | None,
               batch: int = 1, device: torch.device | None = None) -> None:
    """Forward ``inps`` (n, seqlen, hidden) through ``layer`` in chunks of ``batch`` rows, into ``outs``.

    The layer kwargs were captured for one row; masks and rotary tables broadcast over a chunk.
    ``inps``/``outs`` may be in CPU memory (offload): chunks travel to ``device`` and back."""
    device = device or inps.device
    for j, x in _chunks(inps, batch, device):
        out = layer(x, **kwargs)
        out = out[0] if isinstance(out, (tuple, list)) else out
        if outs is not None:
            outs[j : j + batch].copy_(out, non_blocking=True)
    _sync(device)


def _hessian_pass(layer: nn.Module, mods: dict[str, nn.Module], inps: torch.Tensor, kwargs: dict[str, Any],
                  batch: int, device: torch.device, fast: bool) -> tuple[dict[str, HessianAccumulator], dict[str, str]]:
    """One pass of the calibration rows through ``layer`` with a hook on each of ``mods``.

    Returns the accumulators and ``owner``: module → the module whose accumulator holds its H.
    Plain: one accumulator per module. ``fast``: linears fed by the very same input tensor (q/k/v;
    gate/up) share one accumulator, 16-bit products run on tensor cores, and each chunk's forward
    stops as soon as every hooked linear has seen it (the rest of the layer is not needed here)."""
    accs: dict[str, HessianAccumulator] = {}
    owner: dict[str, str] = {}
    chunk: dict[str, Any] = {"inputs": {}, "fired": set()}

    def hook(name: str):
        def fn(_m: nn.Module, inp: tuple, _out: Any) -> None:
            x = inp[0]  # the very tensor object (detach() would make a new one)
            first = name
            if fast:
                hit = chunk["inputs"].get(id(x))
                if hit is not None and hit[0] is x:
                    first = hit[1]
                else:
                    chunk["inputs"][id(x)] = (x, name)
            x = x.detach()
            if owner.setdefault(name, first) != first:
                raise RuntimeError(f"{name}: its input is shared differently from one calibration chunk to the next")
            if first == name:
                if name not in accs:
                    accs[name] = HessianAccumulator(x.shape[-1], device, fast=fast)
                accs[name].add(x)
            chunk["fired"].add(name)
            if fast and len(chunk["fired"]) == len(mods):
                raise _StopForward
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in mods.items()]
    try:
        for _j, x in _chunks(inps, batch, device):
            chunk["inputs"].clear()
            chunk["fired"].clear()
            try:
                layer(x, **kwargs)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in mods if n not in owner]
    if missing:
        raise QuantizationError(f"no calibration input reached {missing} (are they used in the layer's forward?)")
    _sync(device)
    return accs, owner


def _diagnostics(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor | None) -> dict[str, float]:
    """Output reconstruction error on the calibration activations, from H alone:
    ‖(W−Q)X‖² / ‖WX‖² = tr(ΔHΔᵀ) / tr(WHWᵀ) since H ∝ XXᵀ. Without H: the weight-space error."""
    D = W - Q  # (out, in)
    if H is None:
        return {"weight_rel_err": float((D.square().sum() / W.square().sum().clamp_min(1e-30)).item())}
    err = (D @ H * D).sum()
    ref = (W @ H * W).sum()
    return {"output_loss": float(err.item()), "output_rel_err": float((err / ref.clamp_min(1e-30)).item())}


def _solve(method: Method, qcfg: Any, Ws: list[torch.Tensor], H: torch.Tensor | None, device: torch.device,
           shared: bool) -> tuple[list[QuantResult], float]:
    """Quantize ``Ws`` (all fed the input behind ``H``): as one stacked problem when ``shared`` and the
    method can, else one by one. Returns the results and the seconds spent (synchronised)."""
    _sync(device)
    t0 = time.perf_counter()
    if shared and len(Ws) > 1 and method.shared is not None:
        results = list(method.shared(Ws, H, qcfg))
    else:
        # the plain path is the plain solver too (e.g. GPTQ's torch column loop, not its GPU kernel)
        solve = method.quantize if shared or method.plain is None else method.plain
        results = [solve(W, H, qcfg) for W in Ws]
    _sync(device)
    return results, time.perf_counter() - t0


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
    fast: bool = True,
    offload: bool = False,
) -> PipelineOutput:
    """Quantize every linear of every decoder layer of ``model`` in place (weights fake-quantized
    at the model's dtype). ``calib`` (n, seqlen) token ids is needed when ``method.needs_hessian``.

    Speed knobs (results agree to float rounding): ``batch`` calibration rows go through a layer at
    once; ``fast`` shares one H and one solve among linears fed the same input, stops Hessian passes
    early and uses tensor cores for 16-bit Hessian products (``fast=False`` is the plain path, one
    module at a time); ``offload`` keeps the calibration activations in CPU memory, for GPUs smaller
    than them (the decoder layers already visit the device one at a time)."""
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
        inps, kwargs = capture_layer_inputs(model, adapter, calib, device, offload=offload)
        outs = torch.empty_like(inps, pin_memory=offload and device.type == "cuda")
        _sync(device)
        t_fwd += time.perf_counter() - t0
    n_tokens = int(calib.numel()) if calib is not None and method.needs_hessian else 0

    for i in tqdm(range(len(layers)), desc=f"{method.name} layers", disable=not progress, leave=False):
        layer = layers[i]
        home = next(layer.parameters()).device
        layer.to(device)
        for group in linear_groups(layer, adapter, true_sequential if method.needs_hessian else False):
            mods = {name: layer.get_submodule(name) for name in group}
            owner = {name: name for name in group}
            hessians: dict[str, torch.Tensor | None] = {name: None for name in group}
            if method.needs_hessian:
                t0 = time.perf_counter()
                accs, owner = _hessian_pass(layer, mods, inps, kwargs, batch, device, fast)
                hessians = {n: a.hessian() for n, a in accs.items()}
                del accs
                t_fwd += time.perf_counter() - t0
            for n, H in hessians.items():
                if H is not None and not torch.isfinite(H).all():
                    names = ", ".join(f"{adapter.layers}.{i}.{m}" for m in mods if owner[m] == n)
                    raise QuantizationError(f"the calibration Hessian of {names} has NaN/Inf values "
                                            "(calibration overflowed; try model.dtype=float32 or bfloat16)")
            solved: dict[str, tuple[QuantResult, float, list[str]]] = {}
            for name, mod in mods.items():
                full = f"{adapter.layers}.{i}.{name}"
                # a copy: the write-back below reuses storage
                W = weight_matrix(mod, adapter).float().clone()
                H = hessians[owner[name]]
                if name not in solved:
                    members = [n for n in mods if owner[n] == owner[name]]
                    Ws = [W] + [weight_matrix(mods[n], adapter).float().clone() for n in members[1:]]
                    res_list, seconds = _solve(method, qcfg, Ws, H, device, shared=fast)
                    t_solve += seconds
                    rows = sum(w.shape[0] for w in Ws)
                    for n, w, r in zip(members, Ws, res_list, strict=True):
                        solved[n] = (r, seconds * w.shape[0] / rows, members)
                res, seconds, members = solved.pop(name)
                Q = res.dequantize()
                set_weight_matrix(mod, adapter, Q)
                report = {"module": full, "layer": i, "name": name, "shape": list(W.shape),
                          "seconds": seconds, "tokens": n_tokens}
                if len(members) > 1:
                    report["hessian_shared_with"] = [m for m in members if m != name]
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
            _run_layer(layer, inps, kwargs, outs, batch, device)  # inputs of the next layer, from quantized weights
            inps, outs = outs, inps
            t_fwd += time.perf_counter() - t0
        layer.to(home)
    del inps, outs
    return PipelineOutput(reports, {"forward_hessian_s": t_fwd, "solver_s": t_solve,
                                    "total_s": time.perf_counter() - t_start}, results)
