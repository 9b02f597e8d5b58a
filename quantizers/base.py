"""What every quantizer returns and the config fields they share."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

MIN_BITS, MAX_BITS = 2, 8


class QuantConfigError(ValueError):
    """An impossible quantizer setting. ``key`` is the config field at fault, ``fix`` the remedy."""

    def __init__(self, key: str, message: str, fix: str = "") -> None:
        super().__init__(f"{key}: {message}" + (f" ({fix})" if fix else ""))
        self.key, self.message, self.fix = key, message, fix


@dataclass
class GridConfig:
    """The uniform grid's knobs, shared by RTN, GPTQ and OBQ.

    ``group_size=None`` is one group per output row (per-channel); ``-1`` is accepted as the
    community's alias for it and normalised to ``None`` by :meth:`validate`.
    ``mse`` turns on the reference clipping search (grid of ``mse_grid`` steps, shrinking the range
    by up to ``mse_maxshrink``, error measured with the ``mse_norm``-norm).
    """

    bits: int = 4
    group_size: int | None = None
    sym: bool = False
    mse: bool = False
    mse_grid: int = 100
    mse_maxshrink: float = 0.8
    mse_norm: float = 2.4

    def validate(self) -> GridConfig:
        """Check the settings and normalise aliases in place; raise :class:`QuantConfigError`."""
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not (
            MIN_BITS <= self.bits <= MAX_BITS
        ):
            raise QuantConfigError(
                "bits", f"{self.bits!r} is outside {MIN_BITS}–{MAX_BITS}",
                f"use an integer {MIN_BITS}..{MAX_BITS}"
            )
        if self.group_size == -1:
            self.group_size = None
        gs = self.group_size
        if gs is not None and (isinstance(gs, bool) or not isinstance(gs, int) or gs <= 0):
            raise QuantConfigError(
                "group_size", f"{self.group_size!r} is not a positive group size",
                "use a positive integer, or null / -1 for per-channel",
            )
        for key, ok, rule in (("mse_grid", self.mse_grid > 0, "a positive number of steps"),
                              ("mse_maxshrink", 0.0 <= self.mse_maxshrink < 1.0, "a fraction in [0, 1)"),
                              ("mse_norm", self.mse_norm > 0, "a positive exponent (2.4 in the reference)")):
            if not ok:
                raise QuantConfigError(key, f"{getattr(self, key)!r} is not {rule}", f"use {rule}")
        return self

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1


def n_groups(in_features: int, group_size: int | None) -> int:
    """Number of column groups; the last one may be ragged."""
    return 1 if group_size is None else -(-in_features // group_size)


@dataclass
class QuantResult:
    """Integer codes and their grid for one ``(out, in)`` weight.

    ``codes`` (out, in) in ``[0, 2**bits - 1]``; ``scales`` and ``zeros`` (out, n_groups), zeros
    integral; ``g_idx`` (in,) the group of every input column in the *original* column order, so
    ``dequantize()`` is exact whatever order the columns were processed in. ``stats`` holds the
    method's diagnostics (loss, damping actually used, ...), plain Python numbers only.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    stats: dict[str, Any] = field(default_factory=dict)

    def dequantize(self) -> torch.Tensor:
        """(out, in) float32 weight: ``scale[g] · (code − zero[g])`` with ``g = g_idx[col]``."""
        g = self.g_idx.long()
        return self.scales[:, g].float() * (self.codes.float() - self.zeros[:, g].float())

    @property
    def n_groups(self) -> int:
        return int(self.scales.shape[1])
