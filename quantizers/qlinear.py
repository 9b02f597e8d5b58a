"""A linear layer that holds GPTQ-packed weights (see :mod:`quantizers.pack`) and multiplies with them.

The packed buffers (``qweight``, ``qzeros``, ``scales``, ``g_idx``, ``bias``) are the checkpoint's
tensors under the names serving stacks use, so a model's ``state_dict`` *is* the checkpoint.

How the product is computed is the kernel layer, picked by ``backend`` from :data:`BACKENDS`:

* ``"torch"`` (any device): unpack and dequantize to a float (out, in) weight, then ``F.linear``.
  With ``cache_weight`` (default) the weight is built once, on first use, and kept (``path =
  "torch-dequant-cached"``: fast, but it holds the full float weight, so memory is not the packed
  size); without it the weight is rebuilt on every call and dropped (``path = "torch-dequant"``).
* a fused GPU kernel (Triton, ``quantizers/kernels/triton_gemm.py``) registers itself under its own
  name with :func:`register_backend` when its module is imported; layouts it derives from the buffers
  live in ``_prepared`` and are dropped with the cached weight.

``path`` names what actually ran, so every latency can be recorded with the kernel that produced it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quantizers.base import QuantResult
from quantizers.pack import FORMATS, check_packable, dequantize_packed, pack, packed_shapes


@dataclass(frozen=True)
class Backend:
    """A way to compute ``QuantLinear.forward``: ``fn(module, x) -> y`` and the ``path`` it reports."""

    name: str
    fn: Callable[[QuantLinear, torch.Tensor], torch.Tensor]
    path: Callable[[QuantLinear], str]


BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    """Add a kernel (e.g. ``"triton"``); a second registration under one name is an error."""
    if backend.name in BACKENDS:
        raise ValueError(f"backend {backend.name!r} is already registered")
    BACKENDS[backend.name] = backend


class QuantLinear(nn.Module):
    """``y = x Wᵀ + b`` with ``W`` (out, in) stored GPTQ-packed at ``bits``.

    ``dtype`` is the compute dtype of the float weight and of ``bias`` (the model's dtype).
    ``group_size`` (None: per-channel) is informational; the groups are what ``g_idx`` says.
    """

    def __init__(self, bits: int, in_features: int, out_features: int, n_groups: int, bias: bool,
                 dtype: torch.dtype = torch.float16, group_size: int | None = None,
                 checkpoint_format: str = "gptq", backend: str = "torch", cache_weight: bool = True) -> None:
        super().__init__()
        check_packable(bits, in_features, out_features)
        if checkpoint_format not in FORMATS:
            raise ValueError(f"unknown checkpoint_format {checkpoint_format!r} (use one of {FORMATS})")
        self.bits, self.in_features, self.out_features = bits, in_features, out_features
        self.group_size, self.checkpoint_format, self.dtype = group_size, checkpoint_format, dtype
        self.cache_weight = cache_weight
        shapes = packed_shapes(bits, in_features, out_features, n_groups)
        self.register_buffer("qweight", torch.zeros(shapes["qweight"], dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(shapes["qzeros"], dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(shapes["scales"], dtype=torch.float16))
        self.register_buffer("g_idx", torch.zeros(shapes["g_idx"], dtype=torch.int32))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)
        self._weight: torch.Tensor | None = None  # the torch path's cached (out, in) float weight
        self._prepared: dict[str, Any] = {}  # other backends' layouts derived from the buffers, by backend name
        self.backend = backend

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        if name not in BACKENDS:
            raise ValueError(f"unknown QuantLinear backend {name!r} (registered: {', '.join(BACKENDS)})")
        self._backend = name

    @property
    def path(self) -> str:
        """The kernel or fallback that ``forward`` uses now, e.g. ``torch-dequant-cached``."""
        return BACKENDS[self._backend].path(self)

    @property
    def n_groups(self) -> int:
        return int(self.scales.shape[0])

    @classmethod
    def from_result(cls, result: QuantResult, bias: torch.Tensor | None, dtype: torch.dtype,
                    group_size: int | None = None, **kwargs) -> QuantLinear:
        """Pack ``result`` (an (out, in) weight's codes) into a new module; ``bias`` (out,) or None."""
        out_f, in_f = result.codes.shape
        m = cls(result.bits, in_f, out_f, result.n_groups, bias is not None, dtype=dtype, group_size=group_size,
                **kwargs)
        for name, t in pack(result, m.checkpoint_format).items():
            getattr(m, name).copy_(t)
        if bias is not None:
            m.bias.copy_(bias.detach())
        return m

    def packed(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.qweight, "qzeros": self.qzeros, "scales": self.scales, "g_idx": self.g_idx}

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (out, in) weight in ``dtype`` (default: the module's), on the buffers' device."""
        return dequantize_packed(self.packed(), self.bits, self.in_features, self.out_features,
                                 dtype or self.dtype, self.checkpoint_format)

    def weight_bytes(self) -> int:
        """Bytes of the packed weight: qweight + qzeros + scales + g_idx (bias not included)."""
        return sum(t.numel() * t.element_size() for t in self.packed().values())

    def reset_cache(self) -> None:
        self._weight = None
        self._prepared = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return BACKENDS[self._backend].fn(self, x)

    # Buffers replaced or moved (load_state_dict, .to(), .half()) invalidate the cached weight and layouts.
    def _apply(self, fn, recurse: bool = True):
        self.reset_cache()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self.reset_cache()
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"n_groups={self.n_groups}, bias={self.bias is not None}, backend={self._backend}")


def _torch_forward(m: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    if m._weight is not None and m._weight.dtype == x.dtype and m._weight.device == x.device:
        w = m._weight
    else:
        w = m.dequantize(x.dtype).to(x.device)  # (out, in)
        if m.cache_weight:
            m._weight = w
    b = m.bias.to(x.dtype) if m.bias is not None else None
    return F.linear(x, w, b)


register_backend(Backend("torch", _torch_forward,
                         lambda m: "torch-dequant-cached" if m.cache_weight else "torch-dequant"))


def kernel_paths(model: nn.Module) -> dict[str, int]:
    """How many QuantLinear modules of ``model`` run on each path (for the latency record)."""
    out: dict[str, int] = {}
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            out[mod.path] = out.get(mod.path, 0) + 1
    return out
