"""Triton kernels for the quantizers (each also runs on the CPU under ``TRITON_INTERPRET=1``)."""
from __future__ import annotations

import math

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
