"""Packed-weight kernels against dense bf16: ``python -m harness.bench kernels [--smoke] [--tune] [--out F]``.

For LLaMA-7B's linear shapes (K×N = 4096×4096, 4096×11008, 11008×4096), rows M ∈ {1, 4, 16, 64},
bits 2/3/4/8 with groups of 128, act-order off and on: the fused Triton product
(``quantizers/kernels/triton_gemm.py``, the config ``QuantLinear`` runs: tuned on first use, named
in ``config``), the hand-picked default config (``default µs``), ``torch.matmul`` with the bf16
weight, the torch backend of ``QuantLinear`` (its cached dequantized weight) and, at 4 bits without
act-order, torch's own int4 kernel (``torch._weight_int4pack_mm``), each measured in the same run on the
same activations.

Timing: GPU time of a CUDA graph that replays the product over enough weight copies to stream more than
twice the L2 cache (a decode step reads each layer's weight once, from HBM), median of 10 replays after a
warm-up, divided by the products in the graph; CUDA events. ``eager`` columns time the same products
launched from Python (CPU launch cost included). ``rel err``: the Triton output against the float32
product with the dequantized weight. ``read µs``: a kernel that only reads the same bytes (``stream.cu``,
the fastest of 54 launch shapes, timed the same way), for reference: ``× read`` is the kernel's time over
it, ``bf16 / read`` the speed-up over bf16 that reading alone shows, ``read shape`` the launch that was
fastest. A reference rather than a proven bound. A note per shape gives the same for the bf16 weight's
bytes next to ``torch.matmul``. ``--tune`` (instead of the table) times every candidate
config (M = 1, 16, 64, or ``--rows``) on 4096×11008 (3 and 4 bits, or ``--bits``) and prints them, to
refine ``candidates`` / ``default_config``.
``--smoke``: tiny shapes on the CPU (the kernels run only where Triton's interpreter is on:
``TRITON_INTERPRET=1``), seconds long, wall-clock medians.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from quantizers.kernels import l2_copies
from quantizers.qlinear import QuantLinear

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]  # (K, N): attention, up/gate, down projections
ROWS = (1, 4, 16, 64)
BITS = (2, 3, 4, 8)
GROUP = 128
SMOKE = {"shapes": [(64, 64)], "rows": (1, 4), "bits": (3, 4), "group": 32}


def random_linear(bits: int, K: int, N: int, group: int, act_order: bool, device: torch.device,
                  dtype: torch.dtype, seed: int) -> QuantLinear:
    """A packed (N, K) linear filled on ``device`` with random words (every bit pattern is a valid code
    stream and zero-point set), random scales and, with act-order, groups of ``group`` columns in a random
    column order (GPTQ's ``desc_act`` layout)."""
    g = torch.Generator(device=device).manual_seed(seed)
    G = math.ceil(K / group)
    m = QuantLinear(bits, K, N, G, bias=False, dtype=dtype, group_size=group).to(device)
    for buf in (m.qweight, m.qzeros):
        words = torch.randint(-2**31, 2**31, buf.shape, generator=g, device=device, dtype=torch.int64)
        buf.copy_(words.to(torch.int32))
    m.scales.copy_(torch.rand(m.scales.shape, generator=g, device=device) * 0.02 + 1e-3)
    g_idx = torch.arange(K, device=device) // group
    if act_order:
        g_idx = g_idx[torch.argsort(torch.randperm(K, generator=g, device=device))]
    m.g_idx.copy_(g_idx)
    return m


def copies_for(nbytes: int, device: torch.device) -> int:
    """Weight copies whose bytes exceed twice the L2 cache (at least 2), so each product reads HBM."""
    return l2_copies(nbytes, device, least=2)


class Timer:
    """Per-call times of ``fns`` (called in turn): GPU time from CUDA graph replays, or wall clock."""

    def __init__(self, device: torch.device, reps: int = 10) -> None:
        self.device, self.reps = device, reps
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def graph_us(self, fns: list[Callable[[], Any]], min_calls: int = 40) -> float:
        if self.device.type != "cuda":
            return self.wall_us(fns)
        for f in fns:  # warm-up: compiles, prepares layouts, allocates on both streams
            f()
        with torch.cuda.stream(self.stream):
            for f in fns:
                f()
        torch.cuda.synchronize(self.device)
        rounds = max(1, math.ceil(min_calls / len(fns)))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream):
            for _ in range(rounds):
                for f in fns:
                    f()
        graph.replay()
        times = []
        for _ in range(self.reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1000.0)
        del graph
        return statistics.median(times) / (rounds * len(fns))

    def eager_us(self, fns: list[Callable[[], Any]], calls: int = 50) -> float:
        if self.device.type != "cuda":
            return self.wall_us(fns)
        for f in fns:
            f()
        torch.cuda.synchronize(self.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(calls):
            fns[i % len(fns)]()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1000.0 / calls

    def wall_us(self, fns: list[Callable[[], Any]]) -> float:
        """Median wall clock of ``reps`` calls (the CPU: the smoke run, kernels interpreted, nothing to warm)."""
        times = []
        for i in range(self.reps):
            t0 = time.perf_counter()
            fns[i % len(fns)]()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e6


def int4mm(lin: QuantLinear) -> tuple[Callable[[torch.Tensor], torch.Tensor] | None, str]:
    """torch's tinygemm int4 kernel on ``lin``'s weight (4 bits, sorted groups), or (None, why not).

    ``_convert_weight_to_int4pack(uint8 (N, K/2), innerKTiles)`` (torch ≥ 2.5: codes of even k in the
    high nibble) and ``_weight_int4pack_mm(x, packed, group, scales_and_zeros (G, N, 2))`` computing
    ``w = (q − 8)·scale + zero``, so ``zero = scale·(8 − z)`` for GPTQ's ``scale·(q − z)``."""
    from quantizers.pack import unpack

    if lin.bits != 4:
        return None, "4 bits only"
    codes, zeros, scales, g_idx = unpack(lin.packed(), 4, lin.in_features, lin.out_features, lin.checkpoint_format)
    if not bool((g_idx[1:] >= g_idx[:-1]).all()):
        return None, "needs contiguous groups (act-order off)"
    group = lin.group_size or lin.in_features
    try:
        packed_u8 = ((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8).contiguous()  # (N, K/2)
        packed = torch._convert_weight_to_int4pack(packed_u8, 8)
        sz = torch.stack([scales, scales * (8 - zeros.float())], dim=2)  # (N, G, 2)
        sz = sz.transpose(0, 1).contiguous().to(torch.bfloat16)  # (G, N, 2)
        return (lambda x: torch._weight_int4pack_mm(x, packed, group, sz)), "torch._weight_int4pack_mm"
    except (RuntimeError, TypeError, AttributeError) as exc:
        return None, f"torch int4 kernel unavailable: {str(exc).splitlines()[0][:120]}"


def kernel_rows(device: torch.device, smoke: bool, timer: Timer, tg: Any | None,
                shapes: list[tuple[int, int]] | None = None,
                bits: list[int] | None = None) -> tuple[list[dict], list[str]]:
    """The main table: one row per (shape, M, bits, act-order)."""
    spec = dict(SMOKE if smoke else {"shapes": SHAPES, "rows": ROWS, "bits": BITS, "group": GROUP})
    spec["shapes"] = shapes or spec["shapes"]
    spec["bits"] = bits or spec["bits"]
    dtype = torch.bfloat16
    rows, notes = [], []
    for K, N in spec["shapes"]:
        dense = [torch.randn(N, K, device=device, dtype=dtype) * 0.02
                 for _ in range(copies_for(2 * K * N, device))]
        xs = {M: torch.randn(M, K, device=device, dtype=dtype) for M in spec["rows"]}
        bf16 = {}
        for M, x in xs.items():
            fns = [lambda w=w, x=x: torch.matmul(x, w.t()) for w in dense]
            bf16[M] = (timer.graph_us(fns), timer.eager_us(fns))
        dense_read = read_only(2 * K * N, device, timer)
        if dense_read:
            M0 = spec["rows"][0]
            notes.append(f"{K}×{N}: reading the bf16 weight's {2 * K * N / 1e6:.1f} MB alone takes "
                         f"{dense_read[0]:.3g} µs ({dense_read[1]}); torch.matmul at M = {M0}: {bf16[M0][0]:.3g} µs")
        for bits in spec["bits"]:
            for act in (False, True):
                base = random_linear(bits, K, N, spec["group"], act, device, dtype, seed=K + N + bits)
                lins = [base] + [copy.deepcopy(base) for _ in range(copies_for(base.weight_bytes(), device) - 1)]
                int4 = int4mm_copies(lins, xs[spec["rows"][0]], notes) if bits == 4 and not act else None
                read = read_only(runtime_bytes(tg.runtime_of(base)), device, timer) if tg is not None else None
                for M, x in xs.items():
                    row: dict[str, Any] = {"K×N": f"{K}×{N}", "M": M, "bits": bits, "act-order": act,
                                           "bf16 µs": bf16[M][0], "bf16 GB/s": 2 * K * N / bf16[M][0] / 1e3}
                    for m in lins:
                        m.backend = "torch"
                    row["torch µs"] = timer.graph_us([lambda m=m, x=x: m(x) for m in lins[:len(dense)]])
                    for m in lins:
                        m.reset_cache()  # the torch path's float weights: not kept while the kernels run
                    if tg is not None and tg.runs_on(device):
                        row.update(triton_columns(tg, lins, x, timer, *bf16[M]))
                    if read:  # a kernel that only reads the same bytes, for reference
                        row.update({"read µs": read[0], "bf16 / read": bf16[M][0] / read[0], "read shape": read[1]})
                        if "triton µs" in row:
                            row["× read"] = row["triton µs"] / read[0]
                    if int4:
                        row["int4mm µs"] = timer.graph_us([lambda f=f, x=x: f(x) for f in int4])
                        if "triton µs" in row:
                            row["× int4mm"] = row["int4mm µs"] / row["triton µs"]
                    rows.append(row)
                del lins, base, int4
        del dense, xs
    if tg is None:
        notes.append("triton is not installed: kernel columns left out")
    elif not tg.runs_on(device):
        notes.append("the Triton kernels are compiled for CUDA: on the CPU set TRITON_INTERPRET=1 to interpret them")
    order = {shape: i for i, shape in enumerate(f"{K}×{N}" for K, N in spec["shapes"])}
    rows.sort(key=lambda r: (order[r["K×N"]], r["M"], r["bits"], r["act-order"]))
    return rows, notes


def runtime_bytes(rt: Any) -> int:
    """Bytes a product reads of a runtime layout's weight: packed words, scales, zeros (and act-order's perm)."""
    return sum(t.numel() * t.element_size() for t in (rt.qweight, rt.scales, rt.zeros, rt.perm) if t is not None)


def read_only(nbytes: int, device: torch.device, timer: Timer) -> tuple[float, str] | None:
    """µs a kernel that only reads ``nbytes`` (rounded up to 16) takes, timed as the kernels are (copies past
    twice the L2, CUDA-graph replays): the fastest launch of :data:`cuda.READ_SHAPES` of ``stream.cu``, and its
    name. A reference rather than a proven bound (another access pattern might read faster). None off CUDA (or
    without NVRTC)."""
    from quantizers.kernels import cuda

    if device.type != "cuda" or not cuda.available(device):
        return None
    n = -(-nbytes // 16) * 16
    bufs = [torch.randint(-2**31, 2**31, (n // 4,), dtype=torch.int32, device=device)
            for _ in range(copies_for(n, device))]
    out = torch.zeros(cuda.READ_SLOTS, dtype=torch.int32, device=device)
    best: tuple[float, str] | None = None
    for shape in cuda.READ_SHAPES:
        us = timer.graph_us([lambda b=b, s=shape: cuda.read_xor(b, out, s) for b in bufs])
        if best is None or us < best[0]:
            best = (us, shape.name())
    del bufs
    return best


def int4mm_copies(lins: list[QuantLinear], x: torch.Tensor, notes: list[str]) -> list | None:
    """torch's int4 kernel on every copy (checked once against the float32 product), or None with a note."""
    fn, why = int4mm(lins[0])
    if fn is not None:
        try:
            err = rel_err(fn(x), x, lins[0])
            if err > 2e-2:
                raise RuntimeError(f"its result is off (relative error {err:.2g})")
            return [fn] + [int4mm(m)[0] for m in lins[1:]]
        except RuntimeError as exc:
            why = f"torch int4 kernel left out: {str(exc).splitlines()[0][:120]}"
    if why not in notes:
        notes.append(why)
    return None


def rel_err(y: torch.Tensor, x: torch.Tensor, lin: QuantLinear) -> float:
    ref = x.float() @ lin.dequantize(torch.float32).to(x.device).t()
    return float((y.float() - ref).norm() / ref.norm())


def triton_columns(tg: Any, lins: list[QuantLinear], x: torch.Tensor, timer: Timer, bf16: float,
                   bf16_eager: float) -> dict[str, Any]:
    """The tuned config (what ``QuantLinear`` runs), the hand-picked default, eager launches, error."""
    M = x.shape[0]
    for m in lins:
        m.backend = "triton"
    rts = [tg.runtime_of(m) for m in lins]
    cfg = tg.tuned_config(x, rts[0])  # what QuantLinear runs: tuned on first use (the default where tuning is off)
    out: dict[str, Any] = {}
    us = timer.graph_us([lambda rt=rt: tg.matmul(x, rt, None, cfg) for rt in rts])
    nbytes = runtime_bytes(rts[0])
    out.update({"triton µs": us, "× bf16": bf16 / us, "triton GB/s": nbytes / us / 1e3,
                "config": tg.fit_config(cfg, rts[0])[0].name()})
    if x.device.type == "cuda":
        default = tg.default_config(M, lins[0].bits, rts[0].perm is not None)  # the hand-picked config, untuned
        out["default µs"] = timer.graph_us([lambda rt=rt: tg.matmul(x, rt, None, default) for rt in rts])
        # launched from Python one after another, through QuantLinear: the CPU's share shows here
        out.update({"eager µs": timer.eager_us([lambda m=m: m(x) for m in lins]), "eager bf16 µs": bf16_eager})
    out["rel err"] = rel_err(tg.matmul(x, rts[0], None, cfg), x, lins[0])
    out["path"] = rts[0].path  # the kernel and dequantization path the tuned config ran
    return out


def tune_rows(device: torch.device, timer: Timer, tg: Any, bits_list: list[int] | None = None,
              rows_list: list[int] | None = None) -> list[dict]:
    """Every alternative config on 4096×11008 (groups of 128), ``bits_list`` (default 4 and 3 bits) at
    ``rows_list`` rows of x (default 1, 16, 64), act-order off (the main table compares act-order on
    and off with the defaults)."""
    K, N = 4096, 11008
    dtype = torch.bfloat16
    dense = [torch.randn(N, K, device=device, dtype=dtype) for _ in range(copies_for(2 * K * N, device))]
    rows = []
    for M in rows_list or (1, 16, 64):
        x = torch.randn(M, K, device=device, dtype=dtype)
        bf16 = timer.graph_us([lambda w=w, x=x: torch.matmul(x, w.t()) for w in dense])
        for bits in bits_list or (4, 3):
            base = random_linear(bits, K, N, GROUP, False, device, dtype, seed=bits)
            lins = [base] + [copy.deepcopy(base) for _ in range(copies_for(base.weight_bytes(), device) - 1)]
            rts = [tg.runtime_of(m) for m in lins]
            default = tg.default_config(M, bits)
            for cfg in tg.candidates(M, bits):  # the default first
                try:
                    us = timer.graph_us([lambda rt=rt, cfg=cfg, x=x: tg.matmul(x, rt, None, cfg) for rt in rts])
                    err = rel_err(tg.matmul(x, rts[0], None, cfg), x, lins[0])
                except Exception as exc:  # a config that does not build here is reported, not fatal
                    rows.append({"M": M, "bits": bits, "act-order": False, "config": cfg.name(),
                                 "error": str(exc).splitlines()[0][:100]})
                    continue
                rows.append({"M": M, "bits": bits, "act-order": False, "config": tg.fit_config(cfg, rts[0])[0].name(),
                             "default": cfg == default, "µs": us, "× bf16": bf16 / us, "rel err": err})
            del lins, rts, base
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    from tabulate import tabulate

    return tabulate(rows, headers="keys", tablefmt="github", floatfmt=".3g", missingval="–")


def _load_kernels() -> Any | None:
    try:
        from quantizers.kernels import triton_gemm
    except ImportError:
        return None
    return triton_gemm


def _int_list(parser: argparse.ArgumentParser, flag: str, text: str | None) -> list[int] | None:
    """``"3,4"`` → ``[3, 4]`` (None when the flag is not given); anything else ends in one usage error."""
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        parser.error(f"{flag} takes comma-separated integers, e.g. {flag} 3,4 (got {text!r})")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m harness.bench kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, seconds long")
    parser.add_argument("--tune", action="store_true",
                        help="instead of the table, time every alternative tile config on 4096×11008 (GPU)")
    parser.add_argument("--shapes", default=None, help="K×N list to run, e.g. 4096x11008,11008x4096 (default all)")
    parser.add_argument("--bits", default=None, help="bit widths to run, e.g. 3,4 (default 2,3,4,8)")
    parser.add_argument("--rows", default=None, help="--tune: rows M of x to time, e.g. 1,16 (default 1,16,64)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    bits, rows_m = _int_list(parser, "--bits", args.bits), _int_list(parser, "--rows", args.rows)
    if args.smoke:
        device = torch.device("cpu")
    else:
        device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                              ("cpu" if args.device == "auto" else args.device))
    torch.manual_seed(0)
    tg = _load_kernels()
    timer = Timer(device, reps=10 if device.type == "cuda" else 1)
    timing = ("CUDA-graph replays over weight copies > 2× L2, median of 10, per product" if device.type == "cuda"
              else "wall clock, median")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows: list[dict] = []
    tune: list[dict] = []
    notes: list[str] = []
    if args.tune:
        if tg is None or device.type != "cuda":
            print("error: --tune times the compiled kernels: it needs Triton and a CUDA GPU", file=sys.stderr)
            return 2
        header = f"kernels --tune: 4096×11008, bf16 activations, groups of {GROUP}, act-order off, {name}; {timing}"
        tune = tune_rows(device, timer, tg, bits, rows_m)
        print(header)
        print(_table(tune))
    else:
        header = f"kernels: bf16 activations, groups of {SMOKE['group'] if args.smoke else GROUP}, {name}; {timing}"
        shapes = [tuple(int(v) for v in sh.lower().replace("×", "x").split("x")) for sh in args.shapes.split(",")] \
            if args.shapes else None
        rows, notes = kernel_rows(device, args.smoke, timer, tg, shapes, bits)
        print(header)
        print(_table(rows))
        for note in notes:
            print(f"note: {note}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"header": header, "device": str(device), "timing": timing, "rows": rows, "tune": tune,
                       "notes": notes, "versions": {"torch": torch.__version__,
                                                    "triton": getattr(sys.modules.get("triton"), "__version__",
                                                                      None)}}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
