"""Speed of a model as it is stored: prefill throughput and per-token decode latency.

Measurements follow one rule (DESIGN, convention 9): GPU time from CUDA events after a
synchronisation, CPU time from ``time.perf_counter``; warm-up iterations run first and are not
counted; each figure is the median over ``repeats``. Every figure comes with the kernel path of
the model's linear layers when it was measured (:func:`linear_path`), so a latency can always be
traced to the kernel or fallback that produced it.

* prefill: one forward of a (batch, tokens) block of random ids, KV cache built, logits of the last
  position only (what ``generate`` asks for), reported as tokens per second.
* decode: a (batch, prompt) prefill (not timed), then ``steps`` forwards of one token per sequence
  with the KV cache (``use_cache=True``), greedy next token; reported as milliseconds per step
  (one step yields one token per sequence).

The functions return dicts and print nothing.
"""
from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from quantizers.qlinear import kernel_paths

DENSE = "dense"  # the path of a model without packed linears: nn.Linear / Conv1D matmuls


def linear_path(model: nn.Module) -> str:
    """The kernel path(s) of ``model``'s packed linears as one string, e.g. ``torch-dequant-cached``
    or ``triton-a:84,torch-dequant:84`` when modules differ; ``dense`` when none is packed."""
    paths = kernel_paths(model)
    if not paths:
        return DENSE
    if len(paths) == 1:
        return next(iter(paths))
    return ",".join(f"{p}:{n}" for p, n in sorted(paths.items()))


def time_call(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds that ``fn()`` takes on ``device``: CUDA events around it on a GPU (the queue drained
    first, the end event waited for), ``time.perf_counter`` on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _median_time(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int,
                 setup: Callable[[], Any] | None = None) -> float:
    """Median seconds of ``fn(setup())`` over ``repeats`` timed runs after ``warmup`` untimed ones;
    ``setup`` (untimed) prepares each run's input."""
    times = []
    for i in range(warmup + repeats):
        arg = setup() if setup is not None else None
        t = time_call(lambda a=arg: fn(a), device)
        if i >= warmup:
            times.append(t)
    return statistics.median(times)


def _forward_kwargs(model: nn.Module) -> dict[str, Any]:
    """``logits_to_keep=1`` where the model accepts it, as ``generate`` does for the prompt."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def _cache_arg(model: nn.Module) -> str:
    """The forward keyword that takes the KV cache: ``cache`` (transformers 5.x) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(out: Any) -> Any:
    """The KV cache a forward returned, under either name."""
    cache = out.get("cache") if hasattr(out, "get") else None
    return cache if cache is not None else out.past_key_values


def _random_ids(model: nn.Module, shape: tuple[int, int], device: torch.device, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, shape, generator=g).to(device)


@torch.inference_mode()
def prefill(model: nn.Module, device: torch.device, tokens: int, batch: int = 1, repeats: int = 5,
            warmup: int = 1, seed: int = 0) -> dict[str, Any]:
    """Prefill throughput: one forward of (batch, tokens) ids with the KV cache built.

    Returns ``tokens_per_s`` (batch · tokens / median seconds), ``ms`` (median per forward),
    ``tokens``, ``batch``, ``repeats``, ``warmup`` and ``path``."""
    ids = _random_ids(model, (batch, tokens), device, seed)  # (batch, tokens)
    kw = _forward_kwargs(model)
    sec = _median_time(lambda _: model(ids, use_cache=True, **kw), device, repeats, warmup)
    return {"tokens_per_s": batch * tokens / sec, "ms": 1000.0 * sec, "tokens": tokens, "batch": batch,
            "repeats": repeats, "warmup": warmup, "path": linear_path(model)}


@torch.inference_mode()
def decode(model: nn.Module, device: torch.device, batch: int, prompt: int = 128, steps: int = 128,
           repeats: int = 5, warmup: int = 1, seed: int = 0) -> dict[str, Any]:
    """Decode latency with a KV cache: after an untimed (batch, prompt) prefill, ``steps`` forwards of
    one token per sequence, each fed the previous step's greedy token.

    Returns ``ms_per_token`` (median over repeats of the loop's time / steps: the time to produce one
    token for each of the ``batch`` sequences), ``tokens_per_s`` (batch / that time), ``batch``,
    ``prompt``, ``steps``, ``repeats``, ``warmup`` and ``path``."""
    ids = _random_ids(model, (batch, prompt), device, seed)  # (batch, prompt)
    kw, cache_arg = _forward_kwargs(model), _cache_arg(model)

    def setup() -> tuple[Any, torch.Tensor]:  # a fresh cache holding the prompt
        out = model(ids, use_cache=True, **kw)
        return _cache_of(out), out.logits[:, -1:].argmax(-1)  # (batch, 1)

    def loop(state: tuple[Any, torch.Tensor]) -> None:
        cache, nxt = state
        for _ in range(steps):
            out = model(nxt, use_cache=True, **{cache_arg: cache})
            cache, nxt = _cache_of(out), out.logits[:, -1:].argmax(-1)

    sec = _median_time(loop, device, repeats, warmup, setup=setup)
    per_token = sec / steps
    return {"ms_per_token": 1000.0 * per_token, "tokens_per_s": batch / per_token, "batch": batch,
            "prompt": prompt, "steps": steps, "repeats": repeats, "warmup": warmup, "path": linear_path(model)}


def measure(model: nn.Module, device: torch.device, prefill_tokens: int = 2048, prompt: int = 128,
            decode_tokens: int = 128, batch_sizes: tuple[int, ...] | list[int] = (1, 16), repeats: int = 5,
            warmup: int = 1, seed: int = 0) -> dict[str, Any]:
    """Prefill at batch 1 and decode at each of ``batch_sizes``, as flat record metrics:

    ``latency/prefill_tokens_per_s``, ``latency/prefill_ms``, ``latency/prefill_path``, and per batch
    size ``b``: ``latency/decode_bs<b>_ms_per_token``, ``latency/decode_bs<b>_tokens_per_s``,
    ``latency/decode_bs<b>_path``."""
    p = prefill(model, device, prefill_tokens, 1, repeats, warmup, seed)
    out: dict[str, Any] = {"latency/prefill_tokens_per_s": p["tokens_per_s"], "latency/prefill_ms": p["ms"],
                           "latency/prefill_path": p["path"]}
    for b in batch_sizes:
        d = decode(model, device, b, prompt, decode_tokens, repeats, warmup, seed)
        out.update({f"latency/decode_bs{b}_ms_per_token": d["ms_per_token"],
                    f"latency/decode_bs{b}_tokens_per_s": d["tokens_per_s"],
                    f"latency/decode_bs{b}_path": d["path"]})
    return out
