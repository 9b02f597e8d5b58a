"""Triton kernels for the quantizers (each also runs on the CPU under ``TRITON_INTERPRET=1``), the CUDA C++
GEMV (:mod:`quantizers.kernels.cuda`), and what both need to know of a GPU."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def l2_copies(nbytes: int, device: torch.device, least: int = 1, most: int | None = None) -> int:
    """How many copies of ``nbytes`` of weights a round of products must cycle through so that together
    they exceed twice ``device``'s L2 cache, and every product reads its weights from memory as a decode
    step does (between ``least`` and ``most``; 1 off CUDA, where there is no such cache to outgrow)."""
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)
    n = max(least, math.ceil(2 * l2 / nbytes))
    return n if most is None else min(n, most)


@dataclass(frozen=True)
class GPU:
    """What the launch plans need to know of one CUDA device (read once per process)."""

    index: int
    sms: int
    capability: tuple[int, int]


_GPUS: dict[int, GPU] = {}


def device_index(device: torch.device) -> int:
    """CUDA ``device``'s index (the current device's for a bare ``cuda``): what plans and caches are keyed by."""
    return device.index if device.index is not None else torch.cuda.current_device()


def gpu(device: torch.device) -> GPU:
    """The facts of CUDA ``device`` (the current device for a bare ``cuda``)."""
    idx = device_index(device)
    facts = _GPUS.get(idx)
    if facts is None:
        props = torch.cuda.get_device_properties(idx)
        facts = _GPUS[idx] = GPU(idx, props.multi_processor_count, (props.major, props.minor))
    return facts


_RAW_STREAM = None


def current_stream(index: int) -> int:
    """The handle of device ``index``'s current CUDA stream, read as Triton's launcher reads it (torch's raw
    accessor, without building a ``torch.cuda.Stream``; the public API where a torch lacks it)."""
    global _RAW_STREAM
    if _RAW_STREAM is None:
        try:
            from torch._C import _cuda_getCurrentRawStream as raw
        except ImportError:  # pragma: no cover - a torch without the accessor
            def raw(idx: int) -> int:
                return torch.cuda.current_stream(idx).cuda_stream
        _RAW_STREAM = raw
    return _RAW_STREAM(index)
