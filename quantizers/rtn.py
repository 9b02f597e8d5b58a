"""Round-to-nearest: every weight to its nearest grid point, no calibration data."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from quantizers.base import GridConfig, QuantResult, n_groups
from quantizers.grid import codes_of, find_params
from quantizers.registry import QUANTIZERS, Method


@dataclass
class RTNConfig(GridConfig):
    """RTN has only the grid's knobs."""


def quantize(W: torch.Tensor, H: torch.Tensor | None, cfg: RTNConfig) -> QuantResult:
    """Quantize ``W`` (out, in) group by group along the input dimension. ``H`` is ignored."""
    cfg.validate()
    W = W.float()
    out_f, in_f = W.shape
    ng = n_groups(in_f, cfg.group_size)
    gs = in_f if cfg.group_size is None else cfg.group_size
    codes = torch.empty(out_f, in_f, dtype=torch.uint8, device=W.device)
    scales = torch.empty(out_f, ng, dtype=torch.float32, device=W.device)
    zeros = torch.empty(out_f, ng, dtype=torch.int32, device=W.device)
    for g in range(ng):
        cols = slice(g * gs, min((g + 1) * gs, in_f))
        scale, zero = find_params(W[:, cols], cfg.bits, cfg.sym, cfg.mse, cfg.mse_grid, cfg.mse_maxshrink, cfg.mse_norm)
        codes[:, cols] = codes_of(W[:, cols], scale[:, None], zero[:, None], cfg.maxq).to(torch.uint8)
        scales[:, g], zeros[:, g] = scale, zero.to(torch.int32)
    g_idx = torch.arange(in_f, device=W.device, dtype=torch.int32) // gs
    return QuantResult(codes=codes, scales=scales, zeros=zeros, g_idx=g_idx, bits=cfg.bits)


QUANTIZERS.register("rtn", Method("rtn", RTNConfig, quantize, needs_hessian=False))
