"""GPTQ — Algorithm 1 of Frantar et al. 2022 ("GPTQ", arXiv 2210.17323), as ``fasterquant`` in
IST-DASLab/gptq (``gptq.py``), with AutoGPTQ's ``static_groups`` / ``g_idx`` and GPTQModel's damping
increase.

Columns are quantized one at a time, left to right (or in descending ``diag(H)`` with ``desc_act``);
the rounding error of each is spread over the not-yet-quantized columns with a row of ``Hinv``, the
upper Cholesky factor of ``(H + damp·I)⁻¹``. Lazy batch: inside a block of ``block_size`` columns
the update is applied per column to the block (``W1``), and the block's scaled errors (``Err1``)
reach the rest of the matrix once per block. ``stats["loss"]`` is the sum of the reference's
``Losses``, ``Σ (w − q)² / Hinv_jj² / 2``.

The in-block column loop exists twice, with the same arithmetic: a plain torch loop (about a dozen
small ops per column, so bound by kernel launches on a GPU) and a Triton kernel
(``quantizers/kernels/gptq_block.py``) that walks a block's columns in one launch — for non-static
groups one launch per run of columns between group starts, the group's grid being found in torch on
the updated block in between. ``quantize(..., kernel="auto")`` takes the kernel on a CUDA GPU. Both
give the same codes and grids; the loss is summed in another order. The kernel caps the block at
``TRITON_MAX_BLOCK`` columns: the result does not depend on the block size (below), only the
rounding of the lazy update does. Rows are independent, so linears fed the same input (q/k/v,
gate/up) are solved as one stacked problem by :func:`quantize_shared`.

Where this differs from the reference, on purpose:

* a group's grid (non-static groups) is found on the fully error-updated weights of the group. The
  reference reads ``W[:, j:j+group_size]``, which misses the updates of earlier columns of the same
  block when a group starts mid-block (``group_size`` not a multiple of ``block_size``), so its
  result depends on ``block_size`` there. Where groups start at block starts (the default 128/128,
  per-channel) the two are the same;
* per-channel, the grid is found on ``W`` after dead columns are zeroed (the reference finds it
  before, so a dead input's weights still widen the range);
* ``desc_act`` sorts with a stable argsort, so ties in ``diag(H)`` (dead inputs) are ordered the
  same on every device;
* if Cholesky fails the damping rises by ``damp_auto_increment`` up to ``damp_max``, then
  :class:`HessianError` (never a silent fall-back to RTN).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial
from itertools import pairwise

import torch

from quantizers.base import GridConfig, QuantConfigError, QuantResult, n_groups
from quantizers.grid import codes_of, find_params
from quantizers.registry import QUANTIZERS, Method


@dataclass
class GPTQConfig(GridConfig):
    """GPTQ's knobs on top of the grid's (names as AutoGPTQ / GPTQModel).

    ``damp_percent`` is the fraction of ``mean(diag H)`` added to the diagonal; when Cholesky fails
    it is raised by ``damp_auto_increment`` (0: no retry) until it works or exceeds ``damp_max``.
    ``static_groups`` only matters with a ``group_size``.
    """

    desc_act: bool = False
    static_groups: bool = False
    damp_percent: float = 0.01
    block_size: int = 128
    damp_auto_increment: float = 0.01
    damp_max: float = 1.0

    def validate(self) -> GPTQConfig:
        """Check the settings (grid ones included) and normalise aliases; raise :class:`QuantConfigError`."""
        super().validate()
        for key in ("desc_act", "static_groups"):
            if not isinstance(getattr(self, key), bool):
                raise QuantConfigError(key, f"{getattr(self, key)!r} is not a boolean", "use true or false")

        def number(key: str) -> float:
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise QuantConfigError(key, f"{v!r} is not a finite number", "use a number such as 0.01")
            return float(v)

        if number("damp_percent") <= 0:
            raise QuantConfigError(
                "damp_percent", f"{self.damp_percent!r} must be > 0", "use e.g. 0.01 (paper) or 0.05 (GPTQModel)"
            )
        if number("damp_auto_increment") < 0:
            raise QuantConfigError(
                "damp_auto_increment", f"{self.damp_auto_increment!r} must be >= 0", "use e.g. 0.01, or 0 for no retry"
            )
        if number("damp_max") < self.damp_percent:
            raise QuantConfigError(
                "damp_max", f"{self.damp_max!r} is below damp_percent={self.damp_percent!r}",
                "use a damp_max >= damp_percent, e.g. 1.0",
            )
        b = self.block_size
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise QuantConfigError("block_size", f"{b!r} is not a positive column count", "use e.g. 128")
        return self


class HessianError(ValueError):
    """``H`` cannot be used: it holds NaN/Inf, or Cholesky fails even at ``damp_max``."""


def _grid(x: torch.Tensor, cfg: GPTQConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference grid of ``x`` (rows, cols) → scale (rows,), zero (rows,)."""
    return find_params(x, cfg.bits, cfg.sym, cfg.mse, cfg.mse_grid, cfg.mse_maxshrink, cfg.mse_norm)


def inverse_hessian(H: torch.Tensor, cfg: GPTQConfig) -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor of the damped inverse: ``cholesky → cholesky_inverse → upper cholesky``.

    ``H`` (cols, cols) float32, dead inputs already fixed; not modified. Returns ``Hinv`` (cols, cols)
    upper triangular with ``UᵀU = (H + p·mean(diag H)·I)⁻¹``, the ``p`` used and how many times it
    was raised. Raises :class:`HessianError` if even ``p = damp_max`` fails.
    """
    mean_diag = torch.mean(torch.diagonal(H))
    diag = torch.arange(H.shape[0], device=H.device)
    retries = 0
    while True:
        p = cfg.damp_percent + retries * cfg.damp_auto_increment
        if p > cfg.damp_max * (1 + 1e-9):
            raise HessianError(
                f"Cholesky of H failed for every damp_percent from {cfg.damp_percent} up to damp_max={cfg.damp_max}; "
                "H is far from positive definite (check the calibration inputs) or damp_max is too small"
            )
        Hd = H.clone()
        Hd[diag, diag] += p * mean_diag
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            Hinv, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info) == 0 and bool(torch.isfinite(Hinv).all()):
                return Hinv, p, retries
        if cfg.damp_auto_increment == 0:
            raise HessianError(
                f"Cholesky of H failed at damp_percent={cfg.damp_percent} and damp_auto_increment is 0"
            )
        retries += 1


KERNELS = ("auto", "torch", "triton")
TRITON_MAX_BLOCK = 256  # widest block the Triton kernel keeps in registers; wider ones are split


def _triton_kernel(kernel: str, device: torch.device):
    """The module of the Triton block kernel if ``kernel`` picks it for ``device``, else ``None``.

    ``auto``: on a CUDA device when triton imports. ``triton``: wherever the kernel can run (a CUDA
    device, or any device under ``TRITON_INTERPRET=1``), else ``RuntimeError``. ``torch``: never.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r}: use one of {', '.join(KERNELS)}")
    if kernel == "torch" or (kernel == "auto" and device.type != "cuda"):
        return None
    try:
        from quantizers.kernels import gptq_block
    except ImportError as e:
        if kernel == "triton":
            raise RuntimeError(f"kernel='triton' needs triton ({e})") from e
        return None
    if gptq_block.runs_on(device):
        return gptq_block
    if kernel == "triton":
        raise RuntimeError(f"kernel='triton' cannot run on {device} (a CUDA GPU, or TRITON_INTERPRET=1)")
    return None


def quantize(W: torch.Tensor, H: torch.Tensor, cfg: GPTQConfig, kernel: str = "auto") -> QuantResult:
    """GPTQ-quantize ``W`` (out, in), any float dtype, with ``H`` (in, in) = 2/n Σ x xᵀ.

    Works in float32 on ``W.device``; ``W`` and ``H`` are not modified. ``codes``, ``g_idx`` come
    back in the original column order, so ``dequantize()`` is the reference's final ``Q``.
    ``stats``: ``loss`` (Σ Losses), ``damp_percent_used``, ``damp_retries``, ``dead_columns``,
    ``triton`` (whether the Triton block kernel ran), ``seconds``.

    ``kernel`` picks the in-block column loop and is not part of the config (it changes speed, not
    the algorithm): ``"torch"`` the plain loop; ``"triton"`` one Triton launch per block (or per group
    segment), the same arithmetic; ``"auto"`` Triton on a CUDA GPU when it imports, else torch.
    """
    return quantize_shared([W], H, cfg, kernel)[0]


def quantize_shared(
    Ws: list[torch.Tensor], H: torch.Tensor, cfg: GPTQConfig, kernel: str = "auto"
) -> list[QuantResult]:
    """GPTQ for several weights ``Ws`` [(out_k, in)] fed the same input, so sharing ``H`` (in, in).

    Rows are independent in GPTQ, so the rows are stacked into one (Σ out_k, in) problem and solved
    once (one Cholesky, one pass over the columns); each result is what :func:`quantize` returns for
    its ``W`` (same codes, grid and ``g_idx``; ``loss`` its own rows' share). ``stats["seconds"]``
    is the shared solve's.
    """
    cfg.validate()
    tick = time.perf_counter()
    if not Ws:
        raise ValueError("quantize_shared needs at least one weight")
    cols, dev = Ws[0].shape[1], Ws[0].device
    for W in Ws:
        if W.dim() != 2 or W.shape[1] != cols or W.device != dev:
            raise ValueError(f"weights sharing H need one column count and device; got {tuple(W.shape)} on "
                             f"{W.device}, expected (*, {cols}) on {dev}")
    W = torch.cat([W.detach().to(torch.float32) for W in Ws])  # (Σ rows, cols), a fresh copy
    codes, scales, zeros, g_idx, loss_rows, stats = _solve(W, H, cfg, kernel)
    results, r0 = [], 0
    for Wk in Ws:
        r1 = r0 + Wk.shape[0]
        results.append(QuantResult(
            codes=codes[r0:r1], scales=scales[r0:r1], zeros=zeros[r0:r1], g_idx=g_idx, bits=cfg.bits,
            stats={"loss": float(loss_rows[r0:r1].sum()), **stats, "seconds": time.perf_counter() - tick},
        ))
        r0 = r1
    return results


def _solve(W: torch.Tensor, H: torch.Tensor, cfg: GPTQConfig, kernel: str):
    """The solver on ``W`` (rows, cols) float32, which it overwrites. Returns codes (rows, cols)
    uint8, scales (rows, n_groups), zeros (rows, n_groups) int32, g_idx (cols,) int32, the loss of
    every row (rows,) and the other stats."""
    dev = W.device
    rows, cols = W.shape
    if H.shape != (cols, cols):
        raise ValueError(f"H has shape {tuple(H.shape)}, expected ({cols}, {cols}) for W of shape {(rows, cols)}")
    fast = _triton_kernel(kernel, dev)
    H = H.detach().to(device=dev, dtype=torch.float32, copy=True)  # (cols, cols)
    if not bool(torch.isfinite(H).all()):
        raise HessianError("H contains NaN or Inf (check the calibration inputs)")

    dead = torch.diagonal(H) == 0  # (cols,) inputs that were never active
    H[dead, dead] = 1
    W[:, dead] = 0

    gs, maxq = cfg.group_size, cfg.maxq
    dynamic = gs is not None and not cfg.static_groups  # grids found in the loop, at each group start
    ng = n_groups(cols, gs)
    scales = torch.zeros(rows, ng, device=dev)  # (rows, n_groups)
    zeros = torch.zeros(rows, ng, device=dev)  # (rows, n_groups), integral values
    if gs is None:  # per-channel: one grid per row, before the loop
        scales[:, 0], zeros[:, 0] = _grid(W, cfg)
    elif cfg.static_groups:  # every group's grid up front, original column order
        for g in range(ng):
            scales[:, g], zeros[:, g] = _grid(W[:, g * gs:(g + 1) * gs], cfg)

    perm = torch.arange(cols, device=dev)
    if cfg.desc_act:
        perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
        W = W[:, perm]
        H = H[perm][:, perm]
    # group of each processed column; non-static groups are runs of gs *processed* columns
    if gs is None:
        group = torch.zeros(cols, dtype=torch.long, device=dev)
    else:
        group = (perm if cfg.static_groups else torch.arange(cols, device=dev)) // gs
    group_of = group.tolist()

    Hinv, damp_used, retries = inverse_hessian(H, cfg)
    del H

    def group_grid(W1: torch.Tensor, Err1: torch.Tensor, i1: int, i: int) -> None:
        """Grid of the non-static group starting at processed column ``j = i1 + i`` of the block ``W1``."""
        j, i2 = i1 + i, i1 + W1.shape[1]
        # the group's weights with every error so far: the block part lives in W1, the part past
        # the block still owes this block's pending update Err1 @ Hinv[i1:i2, i2:end]
        end = min(j + gs, cols)
        Wg = W1[:, i:i + (end - j)]
        if end > i2:
            rest = W[:, i2:end]
            if i > 0:
                rest = rest - Err1.matmul(Hinv[i1:i2, i2:end])
            Wg = torch.cat([Wg, rest], 1)
        scales[:, group_of[j]], zeros[:, group_of[j]] = _grid(Wg, cfg)

    codes = torch.zeros(rows, cols, dtype=torch.uint8, device=dev)  # processed order
    loss_rows = torch.zeros(rows, device=dev)  # Σ (w − q)² / d² of every row
    bs = min(cfg.block_size, TRITON_MAX_BLOCK) if fast is not None else cfg.block_size
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()  # (rows, count) the block, updated column by column
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if fast is not None:
            Hinv1c = Hinv1.contiguous()  # coalesced row loads (cholesky_ex hands back Hinv column-major)
            if dynamic:  # one launch per run of columns between group starts, whose grids come from W1 as updated
                starts = [i for i in range(count) if (i1 + i) % gs == 0]
                for a, b in pairwise(sorted({0, *starts, count})):
                    if a in starts:
                        group_grid(W1, Err1, i1, a)
                    g = group_of[i1 + a]
                    S, Z = scales[:, g:g + 1].expand(rows, count), zeros[:, g:g + 1].expand(rows, count)
                    fast.gptq_block(W1, Hinv1c, S, Z, codes[:, i1:i2], Err1, loss_rows, maxq, start=a, stop=b)
            else:  # one launch for the block, given the grid of each of its columns (rows, count)
                S, Z = scales[:, group[i1:i2]], zeros[:, group[i1:i2]]
                fast.gptq_block(W1, Hinv1c, S, Z, codes[:, i1:i2], Err1, loss_rows, maxq)
        else:
            C1 = torch.zeros_like(W1)  # codes of the block
            Losses1 = torch.zeros_like(W1)
            for i in range(count):
                j = i1 + i
                w = W1[:, i]
                d = Hinv1[i, i]
                if dynamic and j % gs == 0:
                    group_grid(W1, Err1, i1, i)
                scale, zero = scales[:, group_of[j]], zeros[:, group_of[j]]
                c = codes_of(w, scale, zero, maxq)
                q = scale * (c - zero)
                C1[:, i] = c
                Losses1[:, i] = (w - q) ** 2 / d**2

                err1 = (w - q) / d
                W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
                Err1[:, i] = err1
            codes[:, i1:i2] = C1.to(torch.uint8)
            loss_rows += Losses1.sum(1)
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])

    invperm = torch.argsort(perm)
    stats = {
        "damp_percent_used": float(damp_used),
        "damp_retries": int(retries),
        "dead_columns": int(dead.sum()),
        "triton": fast is not None,
    }
    return codes[:, invperm], scales, zeros.to(torch.int32), group[invperm].to(torch.int32), loss_rows / 2, stats


QUANTIZERS.register("gptq", Method("gptq", GPTQConfig, quantize, needs_hessian=True, shared=quantize_shared,
                                   plain=partial(quantize, kernel="torch")))
