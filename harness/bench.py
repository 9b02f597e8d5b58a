"""Benchmarks that print figures: ``python -m harness.bench quantize|eval|kernels [--smoke]``.

``quantize``: a LLaMA-7B-shaped model with random weights (hidden 4096, intermediate 11008, 32 heads;
``--layers`` decoder layers), ``--nsamples`` × ``--seqlen`` random calibration tokens; seconds per
decoder layer split into forward passes + Hessian accumulation and solver, and peak GPU memory, for
RTN, GPTQ per-channel and GPTQ act-order + group 128, each on the plain path, the fast path and the fast
path with offloaded activations, with the codes' agreement and the loss ratio against the plain path.
``eval``: paper-protocol wikitext2 perplexity throughput of the same model against the floor
2 · parameters · tokens at the bf16 matrix rate measured in the same run.
``--smoke`` shrinks everything to a seconds-long CPU run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import torch

from harness.adapters import adapter_for
from harness.latency import time_call
from harness.perplexity import perplexity
from harness.pipeline import quantize_model

LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                vocab_size=32000, max_position_embeddings=4096)
SMOKE = dict(hidden_size=128, intermediate_size=344, num_attention_heads=4, num_key_value_heads=4,
             vocab_size=50257, max_position_embeddings=4096)


def build_model(layers: int, smoke: bool, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised LLaMA of the benchmark's shape, in float16 on a GPU, float32 on the CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(num_hidden_layers=layers, **(SMOKE if smoke else LLAMA_7B))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model.eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# The original GPTQ implementation (IST-DASLab/gptq), timed on the H200 on one LLaMA-7B-shaped layer with
# 128 × 2048 random calibration activations: seconds per layer (forwards + Hessian, solver, total).
ORIGINAL_H200 = {"gptq per-channel": (4.8, 10.7, 15.8), "gptq act-order g128": (3.3, 10.3, 13.8)}


def _agreement(plain: Any, fast: Any) -> dict[str, float]:
    """Share of equal codes and the ratio of summed solver losses, fast vs plain (same model, same data)."""
    equal = total = 0
    for key, res in plain.results.items():
        equal += int((res.codes == fast.results[key].codes).sum())
        total += res.codes.numel()
    lp = sum(m.get("loss", 0.0) for m in plain.modules)
    lf = sum(m.get("loss", 0.0) for m in fast.modules)
    return {"codes equal %": 100.0 * equal / max(total, 1), "loss fast/plain": lf / lp if lp else float("nan")}


def quantize_bench(layers: int, nsamples: int, seqlen: int, device: torch.device, smoke: bool,
                   batch: int, paths: tuple[str, ...] = ("plain", "fast", "fast+offload")) -> list[dict[str, Any]]:
    """Time the pipeline for each setting and path; returns one row per (setting, path).

    ``plain``: one module at a time, float32 Hessian products, GPTQ's torch column loop. ``fast``:
    shared Hessians and solves, early-stopped Hessian passes, tensor-core Hessian products and the
    GPU kernel for the column loop where available. ``fast+offload``: the same with the calibration
    activations in CPU memory. Codes and losses of every path are compared with ``plain``'s."""
    import quantizers
    from quantizers.gptq import GPTQConfig
    from quantizers.rtn import RTNConfig

    settings = [("rtn", RTNConfig(bits=4)), ("gptq per-channel", GPTQConfig(bits=4)),
                ("gptq act-order g128", GPTQConfig(bits=4, group_size=128, desc_act=True))]
    rows = []
    # warm-up: kernels, allocator and first-call costs stay out of the figures
    warm = build_model(1, smoke, device)
    for fast in (False, True):
        for qcfg in (GPTQConfig(bits=4), GPTQConfig(bits=4, group_size=128, desc_act=True)):
            quantize_model(warm, adapter_for(warm), quantizers.get("gptq"), qcfg,
                           torch.randint(0, warm.config.vocab_size, (2, min(seqlen, 64))), device, progress=False,
                           fast=fast)
    del warm
    for name, qcfg in settings:
        outs: dict[str, Any] = {}
        for path in (("fast",) if name == "rtn" else paths):
            model = build_model(layers, smoke, device)
            vocab = model.config.vocab_size
            calib = torch.randint(0, vocab, (nsamples, seqlen), generator=torch.Generator().manual_seed(1))
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            t0 = time.perf_counter()
            out = quantize_model(model, adapter_for(model), quantizers.get(name.split()[0]), qcfg, calib, device,
                                 true_sequential=True, progress=False, batch=batch, keep_results=name != "rtn",
                                 fast=path != "plain", offload=path.endswith("offload"))
            _sync(device)
            total = time.perf_counter() - t0
            outs[path] = out
            row = {
                "setting": name,
                "path": path,
                "fwd+hessian s/layer": out.timings["forward_hessian_s"] / layers,
                "solver s/layer": out.timings["solver_s"] / layers,
                "total s/layer": total / layers,
                "peak GPU GiB": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
                "loss sum": sum(m.get("loss", 0.0) for m in out.modules),
            }
            if "plain" in outs and path != "plain":
                row.update(_agreement(outs["plain"], out))
                row["speed-up vs plain"] = rows[-1 if path == "fast" else -2]["total s/layer"] / row["total s/layer"]
            if name in ORIGINAL_H200 and not smoke:
                row["speed-up vs original (H200)"] = ORIGINAL_H200[name][2] / row["total s/layer"]
            rows.append(row)
            del model
        del outs
    return rows


def matmul_rate(device: torch.device, smoke: bool) -> float:
    """Measured dense matrix-product rate in FLOP/s (bf16 on a GPU, float32 on the CPU), median of 10."""
    n = 512 if smoke else 8192
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    times = [time_call(lambda: a @ b, device) for _ in range(10)]
    return 2 * n**3 / statistics.median(times)


def eval_bench(layers: int, device: torch.device, smoke: bool, seqlen: int, max_windows: int | None,
               batch_size: int) -> dict[str, Any]:
    """wikitext2 paper-protocol perplexity throughput against the FLOP floor at the measured rate."""
    from harness import data
    from harness.models import load_tokenizer

    model = build_model(layers, smoke, device)
    tok = load_tokenizer("data:tokenizers/gpt2")
    tokens, _ = data.eval_tokens(tok, "wikitext2", seqlen, None)
    tokens = tokens.clamp_max(model.config.vocab_size - 1)  # the 7B shape has a 32k vocabulary
    perplexity(model, tokens, seqlen, 1, batch_size, device)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    res = perplexity(model, tokens, seqlen, max_windows, batch_size, device)
    _sync(device)
    seconds = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    rate = matmul_rate(device, smoke)
    floor = 2 * params * res["tokens"] / rate
    return {"tokens": res["tokens"], "seconds": seconds, "tokens/s": res["tokens"] / seconds,
            "matmul TFLOP/s": rate / 1e12, "floor s": floor, "time / floor": seconds / floor}


def _table(rows: list[dict[str, Any]]) -> str:
    from tabulate import tabulate

    return tabulate(rows, headers="keys", tablefmt="github", floatfmt=".4g", missingval="–")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["kernels"]:  # the packed-weight kernels: harness/bench_kernels.py
        from harness import bench_kernels

        return bench_kernels.main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m harness.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["quantize", "eval", "kernels"])
    parser.add_argument("--smoke", action="store_true", help="a tiny model on the CPU, for a quick check")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 2; smoke 2)")
    parser.add_argument("--nsamples", type=int, default=None, help="calibration rows (default 128; smoke 8)")
    parser.add_argument("--seqlen", type=int, default=None, help="tokens per row / window (default 2048; smoke 128)")
    parser.add_argument("--batch", type=int, default=8, help="rows per layer forward / windows per batch")
    parser.add_argument("--max-windows", type=int, default=None, help="eval: windows (default all; smoke 8)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    layers = args.layers or 2
    seqlen = args.seqlen or (128 if args.smoke else 2048)
    if args.what == "quantize":
        nsamples = args.nsamples or (8 if args.smoke else 128)
        rows = quantize_bench(layers, nsamples, seqlen, device, args.smoke, args.batch)
        header = f"quantize: {layers} layer(s), {nsamples}×{seqlen} calibration tokens, {device}"
        result: Any = rows
    else:
        max_windows = args.max_windows if args.max_windows is not None else (8 if args.smoke else None)
        result = eval_bench(layers, device, args.smoke, seqlen, max_windows, args.batch)
        rows = [result]
        header = f"eval: wikitext2, {layers} layer(s), windows of {seqlen}, {device}"
    print(header)
    print(_table(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"header": header, "device": str(device), "result": result}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
