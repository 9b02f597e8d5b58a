"""The uniform quantization grid of the GPTQ reference code (scale / zero, sym / asym, clipping).

Rules copied from the reference because they change results: ``maxq = 2**bits − 1``; the range
always contains 0; symmetric grids put ``zero = (maxq + 1) / 2``; asymmetric ``zero =
round(−min / scale)``; an all-zero row gets ``[−1, 1]``; rounding is half-to-even (torch.round).
"""
from __future__ import annotations

import torch


def find_params(
    x: torch.Tensor,
    bits: int,
    sym: bool,
    mse: bool = False,
    grid: int = 100,
    maxshrink: float = 0.8,
    norm: float = 2.4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row grid of ``x`` (rows, cols) → ``scale`` (rows,), ``zero`` (rows,) in float32.

    ``mse`` searches ``p = 1 − i/grid`` for ``i < maxshrink·grid`` (so the range shrinks by up to
    ``maxshrink``, as the reference's ``maxshrink=.8``) and keeps per row the ``p`` with the least
    ``Σ|q(x) − x|^norm``.
    """
    x = x.float()
    maxq = 2**bits - 1
    zero_vec = torch.zeros(x.shape[0], device=x.device)
    xmin = torch.minimum(x.min(1).values, zero_vec)
    xmax = torch.maximum(x.max(1).values, zero_vec)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        neg = xmin < 0
        xmin = torch.where(neg, -xmax, xmin)  # reference quirk: an all-positive row keeps xmin = 0
    dead = (xmin == 0) & (xmax == 0)
    xmin = torch.where(dead, -torch.ones_like(xmin), xmin)
    xmax = torch.where(dead, torch.ones_like(xmax), xmax)
    scale = (xmax - xmin) / maxq
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale)
    if mse:
        best = torch.full_like(scale, float("inf"))
        for i in range(int(maxshrink * grid)):
            p = 1 - i / grid
            xmin1, xmax1 = p * xmin, p * xmax
            scale1 = (xmax1 - xmin1) / maxq
            zero1 = zero if sym else torch.round(-xmin1 / scale1)
            q = fake_quantize(x, scale1.unsqueeze(1), zero1.unsqueeze(1), maxq)
            err = (q - x).abs_().pow_(norm).sum(1)
            better = err < best
            best = torch.where(better, err, best)
            scale = torch.where(better, scale1, scale)
            zero = torch.where(better, zero1, zero)
    return scale, zero


def codes_of(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes ``clamp(round(x / scale) + zero, 0, maxq)`` as float (same shape as ``x``)."""
    return torch.clamp(torch.round(x / scale) + zero, 0, maxq)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Round ``x`` to the grid and map back: ``scale · (codes − zero)``."""
    return scale * (codes_of(x, scale, zero, maxq) - zero)
