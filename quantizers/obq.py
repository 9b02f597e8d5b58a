"""OBQ — Optimal Brain Quantization (Frantar & Alistarh 2022, "OBC"), one weight at a time.

Every row of ``W`` is quantized independently and greedily: pick the not-yet-quantized weight whose
rounding costs least, ``(w_j − q_j)² / [H⁻¹]_jj``, quantize it, move the rest of the row by the OBS
update ``w −= (w_j − q_j) / [H⁻¹]_jj · H⁻¹[j, :]`` and drop ``j`` from the row's inverse Hessian
(rank-1 downdate ``H⁻¹ −= H⁻¹[:, j] H⁻¹[j, :] / H⁻¹_jj``). Rows are batched, each with its own copy
of ``H⁻¹`` (a ``(batch, in, in)`` tensor), so the cost is O(out · in³) — see :func:`estimate_cost`.

Rules taken from ``TrueOBS.quantize`` in IST-DASLab/OBC (``trueobs.py``):

* outliers first: ``outlier = .25 * scale**2``; if any pending weight's error ``(w − q)²`` exceeds
  it (half a grid step) and the greedy pick is not an exact zero (``sel &= w[rangecount, j] != 0``),
  the pending weight with the largest *error* (not score) is taken instead. With groups the
  thresholds differ per weight, so the largest error is taken among the outliers only (per-channel
  this is exactly OBC's ``argmax(err)``);
* exact zeros in ``W`` are pruned weights: ``prepare_sparse`` takes them out of ``H⁻¹`` before the
  greedy loop and they stay 0. Here they are simply picked first (their score is 0, and the same
  downdate removes them), which gives the same result without a Cholesky per row;
* ``H⁻¹`` is downdated in OBC's symmetric form ``u = H⁻¹[j, :] / √d; H⁻¹ −= u uᵀ``.

Differences from OBC, on purpose: dead inputs and damping follow the GPTQ protocol (dead first, then
``damp_percent · mean(diag H)``, raised step by step if Cholesky fails; OBC defaults to no damping
and adds ``I`` on failure); ``H⁻¹`` is computed in float64 from the symmetric part of ``H``;
with ``group_size`` the group grids are fixed up front from the original weights (OBC has no
groups). Quantized slots are periodically compacted out of the batch (all rows of a batch have the
same number left), which leaves the arithmetic on the remaining slots unchanged and saves ~60 %.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from quantizers.base import GridConfig, QuantConfigError, QuantResult, n_groups
from quantizers.grid import find_params
from quantizers.registry import QUANTIZERS, Method

CPU_BUDGET_BYTES = 64 * 2**20  # per batch on CPU: small batches stay in cache and are fastest there
CUDA_FREE_FRACTION = 0.5  # share of free device memory one batch may take
MAX_DAMP_PERCENT = 10.0
# Rough effective FLOP/s (as counted by estimate_cost) of this implementation in fp32, for a refusal
# guard, not a benchmark. The rank-1 downdate is memory-bound (2 FLOP per 8 bytes moved) and small
# layers are bound by per-step kernel launches, so peak-FLOP figures (e.g. 25e12) are ~60× too high.
# Measured: H200 0.12 (192×576) – 0.55 (3072×768) TFLOP/s; 2-core CPU ~1e10 (64×576, 64×1536).
NOMINAL_FLOPS = {"cuda": 4e11, "cpu": 1e10}


@dataclass
class OBQConfig(GridConfig):
    """OBQ's knobs on top of the grid's.

    ``outlier_first`` defaults to True because OBC's ``quantize`` always applies its outlier rule
    (there is no switch in the OBC code). ``batch_rows=None`` sizes batches from free memory.
    ``float64`` runs the per-row inverse-Hessian arithmetic in double precision (2× memory/time).
    """

    damp_percent: float = 0.01
    outlier_first: bool = True
    batch_rows: int | None = None
    float64: bool = False

    def validate(self) -> OBQConfig:
        super().validate()
        p = self.damp_percent
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0 <= p <= MAX_DAMP_PERCENT):
            raise QuantConfigError(
                "damp_percent", f"{p!r} is not a damping fraction",
                f"use a number in [0, {MAX_DAMP_PERCENT}], e.g. 0.01 (paper) or 0.05 (GPTQModel)",
            )
        for key in ("outlier_first", "float64"):
            if not isinstance(getattr(self, key), bool):
                raise QuantConfigError(key, f"{getattr(self, key)!r} is not a boolean", "use true or false")
        b = self.batch_rows
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b <= 0):
            raise QuantConfigError(
                "batch_rows", f"{b!r} is not a positive row count", "use a positive integer, or null (auto)"
            )
        return self


def inverse_hessian(H: torch.Tensor, damp_percent: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Damped inverse of ``H`` (in, in) → ``Hinv`` (in, in) float64, ``dead`` (in,) bool, damping used.

    Only the symmetric part ``(H + Hᵀ)/2`` is used (a float32 ``XᵀX`` is not exactly symmetric, and
    Cholesky would read one triangle only). Dead inputs (``H_ii = 0``) get ``H_ii = 1``; then
    ``damp · mean(diag H)`` is added. If Cholesky fails the damping is raised (``max(2p, p + 0.01)``)
    until it succeeds; the final value is returned.
    """
    H = H.detach().to(torch.float64)
    H = (H + H.T) / 2
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    mean_diag = torch.diagonal(H).mean()
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    p = float(damp_percent)
    while p <= MAX_DAMP_PERCENT:
        L, info = torch.linalg.cholesky_ex(H + (p * mean_diag) * eye)
        if int(info) == 0:
            return torch.cholesky_inverse(L), dead, p
        p = max(2 * p, p + 0.01)
    raise QuantConfigError(
        "damp_percent", f"H is not positive definite even with damping {MAX_DAMP_PERCENT}",
        "check the calibration statistics (NaN/Inf inputs?)",
    )


def _should_compact(size: int, remaining: int) -> bool:
    """Drop quantized slots once ≥ 1/8 of the batch's current width (and ≥ 16 slots) are done."""
    return remaining > 0 and size - remaining >= max(size // 8, 16)


def _obq_batch(
    w: torch.Tensor, Hinv: torch.Tensor, s: torch.Tensor, z: torch.Tensor, maxq: int,
    outlier_first: bool, compact: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """OBQ on ``b`` rows at once: ``w``, ``s`` (scale), ``z`` (zero) (b, n), ``Hinv`` (n, n).

    Returns codes (b, n) uint8, order (b, n) int64 (original column quantized at each step) and
    score (b, n) (``(w_j − q_j)² / H⁻¹_jj`` of each step's pick, OBC's ``Losses`` before the ½).
    """
    b, n = w.shape
    dev = w.device
    ar = torch.arange(b, device=dev)
    w = w.clone()
    Hb = Hinv.expand(b, n, n).clone()  # (b, m, m): one inverse Hessian per row
    cols = torch.arange(n, device=dev).expand(b, n).contiguous()  # original column of each slot
    pending = torch.ones(b, n, dtype=torch.bool, device=dev)
    pruned = w == 0  # OBC's prepare_sparse: exact zeros are fixed first
    thr = 0.25 * s * s  # OBC's `outlier`: error beyond half a step
    codes = torch.zeros(b, n, dtype=torch.uint8, device=dev)
    order = torch.empty(b, n, dtype=torch.int64, device=dev)
    score = torch.empty(b, n, dtype=w.dtype, device=dev)
    m = n
    for t in range(n):
        qc = torch.clamp(torch.round(w / s) + z, 0, maxq)  # (b, m) codes at the current weights
        q = s * (qc - z)
        err = (w - q).square_()
        diag = torch.diagonal(Hb, dim1=1, dim2=2)
        scores = (err / diag).masked_fill_(~pending, math.inf)
        j = scores.masked_fill(pruned & pending, -1.0).argmin(1)  # (b,)
        if outlier_first:
            err.masked_fill_(~pending | (err <= thr), 0)  # errors of pending outliers only
            sel = (err > 0).any(1) & (w[ar, j] != 0)
            j = torch.where(sel, err.argmax(1), j)
        orig = cols[ar, j]
        order[:, t] = orig
        score[:, t] = scores[ar, j]
        codes[ar, orig] = qc[ar, j].to(torch.uint8)
        d = diag[ar, j]
        row = Hb[ar, j]  # (b, m) copy of H⁻¹[j, :]
        w.addcmul_(row, ((w[ar, j] - q[ar, j]) / d).unsqueeze(1), value=-1)
        pending[ar, j] = False
        if t == n - 1:
            break
        row /= torch.sqrt(d).unsqueeze(1)
        Hb.addcmul_(row.unsqueeze(2), row.unsqueeze(1), value=-1)  # H⁻¹ −= u uᵀ, in place
        remaining = n - t - 1
        if compact and _should_compact(m, remaining):
            del diag  # a view: it would keep the old H⁻¹ alive through the gathers
            # every row has `remaining` pending slots; a stable sort keeps them in column order
            keep = torch.sort((~pending).to(torch.uint8), dim=1, stable=True).indices[:, :remaining]
            Hb = Hb.gather(2, keep.unsqueeze(1).expand(b, m, remaining))  # columns, then rows:
            Hb = Hb.gather(1, keep.unsqueeze(2).expand(b, remaining, remaining))  # peak (m + r)·m
            w, s, z, thr, cols, pruned, pending = (
                x.gather(1, keep) for x in (w, s, z, thr, cols, pruned, pending)
            )
            m = remaining
    return codes, order, score


def quantize_rows(
    W: torch.Tensor, Hinv: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int, *,
    outlier_first: bool = True, batch_rows: int = 32, dtype: torch.dtype = torch.float32,
    compact: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The OBQ loop on prepared inputs, ``batch_rows`` rows at a time.

    ``W``, ``scale``, ``zero`` (out, in) (scale/zero per weight, i.e. the group grid expanded by
    ``g_idx``), ``Hinv`` (in, in) the damped inverse Hessian. Returns codes (out, in) uint8, order
    (out, in) int64 and score (out, in), as :func:`_obq_batch`. ``compact=False`` only for tests.
    """
    W, Hinv, scale, zero = (x.to(dtype) for x in (W, Hinv, scale, zero))
    parts = [
        _obq_batch(W[r:r + batch_rows], Hinv, scale[r:r + batch_rows], zero[r:r + batch_rows], maxq,
                   outlier_first, compact)
        for r in range(0, W.shape[0], batch_rows)
    ]
    return tuple(torch.cat(p) for p in zip(*parts, strict=True))  # type: ignore[return-value]


def _auto_batch_rows(rows: int, cols: int, dtype_bytes: int, device: torch.device) -> int:
    """Rows per batch that fit the memory budget (see ``estimate_cost``'s per-row peak)."""
    if device.type == "cuda":  # free on the device plus what torch's allocator caches but does not use
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        budget = (torch.cuda.mem_get_info(device)[0] + cached) * CUDA_FREE_FRACTION
    else:
        budget = CPU_BUDGET_BYTES
    return max(1, min(rows, int(budget // _peak_bytes_per_row(cols, dtype_bytes))))


def quantize(W: torch.Tensor, H: torch.Tensor, cfg: OBQConfig) -> QuantResult:
    """Quantize ``W`` (out, in), any float dtype, with Hessian ``H`` (in, in); inputs are not modified.

    Runs on ``W.device``. ``stats``: ``loss`` = ½·tr((W − Q) H (W − Q)ᵀ) with the *given* (undamped)
    ``H`` and the original ``W``, summed over rows, in float64; ``loss_obs`` = OBC's printed "error",
    the sum of ½·score over all steps (equals the same trace with the damped ``H`` and dead columns
    zeroed); ``damp_percent_used``, ``batch_rows``, ``seconds``, ``dead_columns``.
    """
    cfg.validate()
    tick = time.perf_counter()
    dev = W.device
    out_f, in_f = W.shape
    Wf = W.detach().to(torch.float32).clone()
    Hinv, dead, damp = inverse_hessian(H.to(dev), cfg.damp_percent)
    Wf[:, dead] = 0
    ng = n_groups(in_f, cfg.group_size)
    gs = in_f if cfg.group_size is None else cfg.group_size
    scales = torch.empty(out_f, ng, dtype=torch.float32, device=dev)
    zeros = torch.empty(out_f, ng, dtype=torch.float32, device=dev)
    for g in range(ng):  # group grids fixed up front from the original weights
        scales[:, g], zeros[:, g] = find_params(
            Wf[:, g * gs:(g + 1) * gs], cfg.bits, cfg.sym, cfg.mse, cfg.mse_grid, cfg.mse_maxshrink, cfg.mse_norm
        )
    g_idx = torch.arange(in_f, device=dev, dtype=torch.int32) // gs
    dtype = torch.float64 if cfg.float64 else torch.float32
    batch = cfg.batch_rows or _auto_batch_rows(out_f, in_f, 8 if cfg.float64 else 4, dev)
    codes, _, score = quantize_rows(
        Wf, Hinv, scales[:, g_idx.long()], zeros[:, g_idx.long()], cfg.maxq,
        outlier_first=cfg.outlier_first, batch_rows=batch, dtype=dtype,
    )
    res = QuantResult(codes=codes, scales=scales, zeros=zeros.to(torch.int32), g_idx=g_idx, bits=cfg.bits)
    E = W.detach().to(torch.float64) - res.dequantize().to(torch.float64)  # (out, in)
    loss = 0.5 * ((E @ H.to(dev, torch.float64)) * E).sum()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    res.stats = {
        "loss": float(loss), "loss_obs": float(score.to(torch.float64).sum() / 2),
        "damp_percent_used": damp, "batch_rows": batch, "seconds": time.perf_counter() - tick,
        "dead_columns": int(dead.sum()),
    }
    return res


def _downdate_elements(cols: int) -> int:
    """Σ over steps of (current width)²: H⁻¹ entries one row touches, with compaction as implemented."""
    total, m = 0, cols
    for t in range(cols - 1):  # the last step has no downdate
        total += m * m
        if _should_compact(m, cols - t - 1):
            m = cols - t - 1
    return total


def _peak_bytes_per_row(cols: int, dtype_bytes: int) -> int:
    """H⁻¹ copy plus the first compaction's half-gathered copy: cols·(cols + first) ≈ 1.9·cols² elements."""
    first = cols - max(cols // 8, 16)
    return cols * (cols + max(first, 0)) * dtype_bytes


def estimate_cost(shapes: list[tuple[int, int]], device_kind: str, dtype_bytes: int = 4) -> dict:
    """Predicted cost of OBQ on weights of the given (rows, cols) shapes; pure arithmetic.

    FLOPs = Σ rows · (2 · Σ_steps width² + 20 · cols²): the rank-1 downdate is one multiply-add per
    remaining H⁻¹ entry per step (Σ width² ≈ 0.38·cols³ per row with compaction, ≈ cols³ without),
    plus ~40 elementwise ops per remaining weight per step (Σ width ≈ cols²/2). ``peak_bytes_per_row``
    is the largest per-row working set (multiply by the batch size). ``seconds`` divides by a nominal
    effective throughput (:data:`NOMINAL_FLOPS`), a rough guide; ``device_kind`` is "cuda" or "cpu".
    """
    if device_kind not in NOMINAL_FLOPS:
        raise ValueError(f"device_kind {device_kind!r} is not one of {sorted(NOMINAL_FLOPS)}")
    flops = sum(r * (2 * _downdate_elements(c) + 20 * c * c) for r, c in shapes)
    scale = dtype_bytes / 4  # throughput is bandwidth-bound: float64 moves twice the bytes
    return {
        "flops": float(flops),
        "peak_bytes_per_row": max((_peak_bytes_per_row(c, dtype_bytes) for _, c in shapes), default=0),
        "seconds": flops * scale / NOMINAL_FLOPS[device_kind],
        "flops_per_second": NOMINAL_FLOPS[device_kind] / scale,
        "device_kind": device_kind,
    }


QUANTIZERS.register("obq", Method("obq", OBQConfig, quantize, needs_hessian=True, estimate=estimate_cost))
