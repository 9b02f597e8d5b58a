"""GPTQ's in-block column loop as one Triton launch (the lazy batch update stays a torch matmul).

The plain solver (``quantizers/gptq.py``) runs ~12 small torch ops per column, so on a GPU it is
bound by kernel launches. Here each program owns ``BLOCK_R`` rows and keeps the block's weights
``W1`` (BLOCK_R, BC) in registers while it walks the columns ``start .. stop − 1``; rows are
independent in GPTQ, so programs never talk to each other.

Per column ``i`` it does exactly the torch path's arithmetic, in the same order:
``c = clamp(round(w / s) + z, 0, maxq)``, ``q = s·(c − z)``, ``err = (w − q) / d``,
``loss += (w − q)² / d²``, ``W1[:, i+1:] −= err · Hinv1[i, i+1:]``, with ``d = Hinv1[i, i]``.
Divisions are IEEE round-to-nearest (``div_rn``), rounding is half-to-even like ``torch.round``
(adding and removing 1.5·2²³ rounds any ``|x| < 2²²`` to an integer; larger values are clamped to
0 or ``maxq`` anyway), and the launch asks for no multiply-add fusion, so ``W1 − err·h`` is rounded
twice as torch's ``W1 -= err ⊗ h`` is. The kernel also runs under Triton's CPU interpreter
(``TRITON_INTERPRET=1``), which the tests use.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# BLOCK_R · BC per program. At 4 warps ptxas (sm_90) gives 8×128, 16×64, 32×32 and 4×256 tiles 72–164
# registers a thread and no spills; 16×128 takes 234 and 32×128 spills.
TILE_ELEMS = 1024


@triton.jit(do_not_specialize=["start", "stop"])
def _gptq_block_kernel(
    W1, stride_w,  # (rows, count) fp32 block weights; columns >= stop are written back updated
    Hinv1, stride_hr, stride_hc,  # (count, count) fp32 upper Cholesky factor of the block
    S, stride_sr, stride_sc,  # (rows, count) fp32 scale of every row / column (stride 0 to broadcast)
    Z, stride_zr, stride_zc,  # (rows, count) fp32 zero point, integral values
    C, stride_c,  # (rows, count) uint8 codes out, columns start .. stop − 1
    E, stride_e,  # (rows, count) fp32 Err1 out, columns start .. stop − 1
    L,  # (rows,) fp32 per-row loss Σ (w − q)² / d², accumulated into
    rows, count, start, stop, maxq,
    BLOCK_R: tl.constexpr, BC: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
    cols = tl.arange(0, BC)  # (BC,)
    rmask = r < rows
    tile = rmask[:, None] & (cols < count)[None, :]
    W = tl.load(W1 + r[:, None] * stride_w + cols[None, :], mask=tile, other=0.0)  # (BLOCK_R, BC)
    Ct = tl.zeros((BLOCK_R, BC), dtype=tl.float32)
    Et = tl.zeros((BLOCK_R, BC), dtype=tl.float32)
    loss = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for i in range(start, stop):
        here = (cols == i)[None, :]
        w = tl.sum(tl.where(here, W, 0.0), 1)  # (BLOCK_R,) column i, exact (one nonzero term)
        s = tl.load(S + r * stride_sr + i * stride_sc, mask=rmask, other=1.0)
        z = tl.load(Z + r * stride_zr + i * stride_zc, mask=rmask, other=0.0)
        x = tl.math.div_rn(w, s)
        x = (x + 12582912.0) - 12582912.0  # + 1.5·2²³ − 1.5·2²³: round to integer, ties to even
        c = tl.minimum(tl.maximum(x + z, 0.0), maxq)
        q = s * (c - z)
        d = tl.load(Hinv1 + i * stride_hr + i * stride_hc)
        diff = w - q
        err = tl.math.div_rn(diff, d)
        loss += tl.math.div_rn(diff * diff, d * d)
        h = tl.load(Hinv1 + i * stride_hr + cols * stride_hc, mask=(cols > i) & (cols < count), other=0.0)  # (BC,)
        W = W - err[:, None] * h[None, :]  # columns <= i see h = 0 and keep their value
        Ct = tl.where(here, c[:, None], Ct)
        Et = tl.where(here, err[:, None], Et)
    done = rmask[:, None] & ((cols >= start) & (cols < stop))[None, :]
    tl.store(C + r[:, None] * stride_c + cols[None, :], Ct.to(tl.uint8), mask=done)
    tl.store(E + r[:, None] * stride_e + cols[None, :], Et, mask=done)
    rest = rmask[:, None] & ((cols >= stop) & (cols < count))[None, :]
    tl.store(W1 + r[:, None] * stride_w + cols[None, :], W, mask=rest)
    total = tl.load(L + r, mask=rmask, other=0.0)
    tl.store(L + r, total + loss, mask=rmask)


def runs_on(device: torch.device) -> bool:
    """Whether the kernel can take tensors on ``device``: compiled, a CUDA GPU; interpreted, any."""
    if isinstance(_gptq_block_kernel, triton.runtime.JITFunction):
        return device.type == "cuda"
    return True


def block_rows(count: int, rows: int) -> int:
    """Rows per program for a block of ``count`` columns: ``TILE_ELEMS / BC`` (8 at BC = 128), at most
    the rows there are (rounded up to a power of two)."""
    bc = triton.next_power_of_2(count)
    return max(1, min(TILE_ELEMS // bc, triton.next_power_of_2(rows)))


def gptq_block(
    W1: torch.Tensor,
    Hinv1: torch.Tensor,
    S: torch.Tensor,
    Z: torch.Tensor,
    codes: torch.Tensor,
    Err1: torch.Tensor,
    loss: torch.Tensor,
    maxq: int,
    start: int = 0,
    stop: int | None = None,
    block_r: int | None = None,
    num_warps: int = 4,
) -> None:
    """Quantize columns ``start .. stop − 1`` of one block in place (GPTQ's inner loop).

    ``W1`` (rows, count) fp32 the block's current weights: every column from ``start`` on must hold
    all updates so far; on return the columns from ``stop`` on hold the updates of the quantized
    ones (the columns before ``stop`` are left stale). ``Hinv1`` (count, count) fp32, ``S`` and ``Z``
    (rows, count) fp32 the grid of every entry (expanded views are fine). Written: ``codes``
    (rows, count) uint8 and ``Err1`` (rows, count) fp32 in columns ``start .. stop − 1``;
    ``loss`` (rows,) fp32 gets ``Σ (w − q)² / d²`` over those columns added. Every tensor's last
    dimension must be contiguous except ``Hinv1``, ``S`` and ``Z``'s (a contiguous ``Hinv1`` loads
    faster). ``block_r``: rows per program (a power of
    two; default :func:`block_rows`).
    """
    rows, count = W1.shape
    stop = count if stop is None else stop
    if not 0 <= start <= stop <= count:
        raise ValueError(f"bad column range {start}..{stop} for a block of {count} columns")
    for name, t in (("W1", W1), ("codes", codes), ("Err1", Err1)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} needs a contiguous last dimension, got strides {t.stride()}")
    if start == stop:
        return
    block_r = block_rows(count, rows) if block_r is None else block_r
    grid = (triton.cdiv(rows, block_r),)
    _gptq_block_kernel[grid](
        W1, W1.stride(0), Hinv1, *Hinv1.stride(), S, S.stride(0), S.stride(1), Z, Z.stride(0), Z.stride(1),
        codes, codes.stride(0), Err1, Err1.stride(0), loss,
        rows, count, start, stop, float(maxq),
        BLOCK_R=block_r, BC=triton.next_power_of_2(count), num_warps=num_warps,
        enable_fp_fusion=False,  # W1 − err·h rounded twice, as torch does it
    )
