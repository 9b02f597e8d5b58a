"""The fused Triton product (``quantizers/kernels/triton_gemm.py``) against dequantize-then-matmul.

On the CPU the kernels run under Triton's interpreter. ``TRITON_INTERPRET`` is read when Triton and the
kernels are imported, so every kernel call runs in one child process started with it set, which saves
its outputs to a file; the references and every assertion are computed here, from the same seeds. This
process never imports the kernel module (importing it registers the ``triton`` backend), and a GPU
session's child compiles the kernels for real. The sm_90 compile test needs no GPU.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from quantizers.base import QuantResult
from tests.conftest import ROOT, run_child
from tests.test_pack import random_result

pytest.importorskip("triton")

K, N = 96, 64  # 96 = 32·3 holds every bit width; groups of 64 leave a ragged last group of 32
LAYOUTS = {  # group_size, act-order, irregular groups
    "channel": (None, False, False),
    "g32": (32, False, False),
    "g64-ragged": (64, False, False),
    "g32-act": (32, True, False),
    "g64-act": (64, True, False),
    "irregular-act": (None, True, True),
}
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
PATHS = {"gemv": "triton-gemv-splitk", "gemv-pairs": "triton-gemv-bf16x2-splitk", "dot": "triton-dot",
         "dot-magic": "triton-dot-dq16", "cuda": "cuda-gemv", "mma": "cuda-mma", "mma-sw": "cuda-mma-sw"}
TOL = {torch.bfloat16: 1e-2, torch.float16: 1e-3, torch.float32: 1e-5}  # relative, to the float32 product
# (name, config fields, rows of x): the defaults by M and the dot kernel (every case), then tiles that exercise
# the other code paths (one per case, in turn): dot without split-K, x read per element, prefetch on two rows,
# split-K over two row tiles, the GEMV on x gathered ahead (act-order)
RUNS = [
    ("gemv", {}, 1),
    ("dot-default", {}, 5),
    ("dot", {"kernel": "dot", "bm": 16, "bn": 32, "bk": 32, "split": 2}, 3),
    ("dot-s1", {"kernel": "dot", "bm": 16, "bn": 64, "bk": 64, "split": 1}, 20),
    ("gemv-s1-noxsplit", {"kernel": "gemv", "bn": 64, "bk": 32, "split": 1, "xsplit": False}, 1),
    ("gemv-prefetch", {"kernel": "gemv", "bn": 64, "bk": 64, "split": 2, "prefetch": True}, 2),
    ("dot-rowtiles", {"kernel": "dot", "bm": 16, "bn": 32, "bk": 32, "split": 3}, 17),
    ("gemv-gather", {"kernel": "gemv", "bn": 64, "bk": 32, "split": 2, "gather": True}, 1),
]


def layout_result(bits: int, layout: str, seed: int) -> QuantResult:
    gs, act, irregular = LAYOUTS[layout]
    res = random_result(bits, K, N, gs, seed=seed, permuted=act)
    if irregular:  # uneven groups in a shuffled order: the kernels gather scales per element
        g = torch.Generator().manual_seed(seed)
        G = 5
        g_idx = torch.sort(torch.randint(0, G, (K,), generator=g)).values
        g_idx[:G] = torch.arange(G)  # every group used
        g_idx = g_idx[torch.randperm(K, generator=g)].to(torch.int32)
        res = QuantResult(codes=res.codes, scales=torch.rand(N, G, generator=g) * 0.1 + 1e-3,
                          zeros=torch.randint(0, 2**bits, (N, G), generator=g, dtype=torch.int32), g_idx=g_idx,
                          bits=bits)
    return res


CASES = {f"{bits}-{layout}": (bits, layout) for bits in (2, 3, 4, 8) for layout in LAYOUTS}


def case_runs(name: str) -> list[int]:
    """Indices into RUNS of the runs of one case: both defaults, the dot kernel and one of the others, in
    turn (the dot kernel's no-split run among them)."""
    return [0, 1, 2, 3 + list(CASES).index(name) % (len(RUNS) - 3)]


def case_inputs(name: str, run: int) -> tuple[QuantResult, torch.Tensor, torch.Tensor | None, torch.dtype]:
    """The weight, x (M, K) and bias of one (case, run); the dtype rotates over cases and runs."""
    bits, layout = CASES[name]
    index = list(CASES).index(name)
    res = layout_result(bits, layout, seed=index)
    rows = RUNS[run][2]
    dtype = DTYPES[(index + run) % len(DTYPES)]
    g = torch.Generator().manual_seed(1000 + 10 * index + run)
    x = torch.randn(rows, K, generator=g).to(dtype)
    bias = torch.randn(N, generator=g) if (index + run) % 2 else None
    return res, x, bias, dtype


def reference(res: QuantResult, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x · Wᵀ + b in float32 with the weight as packed (scales rounded to float16, as stored)."""
    y = x.float() @ module_of(res, None, torch.float32).dequantize(torch.float32).T  # (M, N)
    return y + bias.float() if bias is not None else y


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).norm() / ref.norm())


def module_of(res: QuantResult, bias: torch.Tensor | None, dtype: torch.dtype, checkpoint_format: str = "gptq"):
    from quantizers.qlinear import QuantLinear

    return QuantLinear.from_result(res, bias, dtype, checkpoint_format=checkpoint_format)


# ------------------------------------------------------------------------------------------- children


def interpreted_results(out: str) -> None:
    """(child, TRITON_INTERPRET=1) every case through the kernels, the runtime layouts, a tiny model."""
    from quantizers.kernels import triton_gemm as tg

    assert tg.interpreted(), "the kernels are not interpreted"
    results: dict = {"runs": {}, "layout_exact": {}, "paths": {}}
    for name in CASES:
        for run in case_runs(name):
            label, fields, _ = RUNS[run]
            res, x, bias, dtype = case_inputs(name, run)
            m = module_of(res, bias, dtype, checkpoint_format="gptq_v2" if run == 1 else "gptq")
            rt = tg.runtime_of(m)
            cfg = tg.Config(**fields) if fields else None
            results["runs"][(name, label)] = tg.matmul(x, rt, m.bias, cfg)
            results["paths"][(name, label)] = rt.path
        rt = tg.runtime_of(m)
        results["layout_exact"][name] = bool(torch.equal(tg.unpack_runtime(rt), m.dequantize(torch.float32)))
        results["perm"] = results.get("perm", {}) | {name: rt.perm is not None}
    results["model"] = tiny_model_logits()
    res, x, bias, dtype = case_inputs("2-g64-act", len(RUNS) - 1)  # the GEMV on x gathered ahead
    rt = tg.runtime_of(module_of(res, bias, dtype))
    plan = tg._plan(rt, 1, dtype, x.device, bias is not None, tg.Config(**RUNS[-1][1]))
    results["gather_plan"] = (plan.gather_x, plan.pdl, plan.fixed["HAS_PERM"], plan.fixed["PDL"],
                              "launch_pdl" in plan.fixed)
    results["ragged"] = {}  # the 16-bit dot path with K and N off every tile (masked runs), both 16-bit dtypes
    for (bits, dtype), (cfg, M) in zip(RAGGED, [(tg.Config("dot", bm=16, bn=32, bk=32, split=2), 5),
                                                (tg.Config("dot", bm=16, bn=64, bk=64, split=1), 17)] * 2, strict=True):
        res, x = ragged_inputs(bits, dtype, M)
        rt = tg.runtime_of(module_of(res, None, dtype))
        results["ragged"][(bits, str(dtype))] = (tg.matmul(x, rt, None, cfg), rt.path)
    g = torch.Generator().manual_seed(7)  # act-order x for the dot kernel: columns put in sorted order
    x_cols = torch.randn(3, 1500, generator=g).to(torch.float16)[:, ::2]  # strided: 750 columns
    perm = torch.randperm(750, generator=g).to(torch.int32)
    results["gather"] = (tg.gather_columns(x_cols, perm), x_cols[:, perm.long()])
    keys = [(M, bits, act) for M in (1, 4, 16, 64, 2048) for bits in (2, 3, 4, 8) for act in (False, True)]
    results["candidates"] = {key: [c.name() for c in tg.candidates(*key)] for key in keys}
    results["defaults"] = {key: tg.default_config(*key).name() for key in keys}
    default = tg.default_config(x.shape[0], rt.bits, rt.perm is not None)
    results["tuned"] = tg.tuned_config(x, rt).name() == default.name()
    results["tuning"] = tg.tuning_enabled()
    results["pairs_interpreted"] = tg.pair_path_runs(torch.bfloat16, 4, int(tg.TILE), torch.device("cpu"))
    results["cuda_refusals"] = {}  # the CUDA GEMV asked for where it cannot run: one clear error, nothing launched
    for label, (bits, layout, M, dtype) in CUDA_REFUSALS.items():
        rt = tg.runtime_of(module_of(layout_result(bits, layout, seed=1), None, dtype))
        try:
            tg.matmul(torch.randn(M, K).to(dtype), rt, None, tg.Config("cuda", bn=32, bk=32, num_warps=4, split=1))
            results["cuda_refusals"][label] = None
        except ValueError as exc:
            results["cuda_refusals"][label] = str(exc)
    torch.save(results, out)


CUDA_REFUSALS = {  # bits, layout, rows, dtype → what the error names
    "8 bits": (8, "g32", 1, torch.bfloat16),
    "float32": (4, "g32", 1, torch.float32),
    "9 rows": (4, "g32", 9, torch.bfloat16),
    "groups": (4, "irregular-act", 1, torch.bfloat16),
    "cpu": (4, "channel", 1, torch.bfloat16),
}


RAGGED = [(2, torch.bfloat16), (4, torch.bfloat16), (2, torch.float16), (4, torch.float16)]


def ragged_inputs(bits: int, dtype: torch.dtype, M: int) -> tuple[QuantResult, torch.Tensor]:
    res = random_result(bits, 80, 48, 32, seed=bits + M)  # K = 80, N = 48: neither a multiple of 32
    return res, torch.randn(M, 80, generator=torch.Generator().manual_seed(M)).to(dtype)


def tiny_model_logits(device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """A one-layer LLaMA with every linear packed (4 bits, groups of 32, act-order): logits with the
    torch backend and the triton backend, for a prompt (dot) and one token (gemv)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import quantizers
    from quantizers.qlinear import QuantLinear, kernel_paths
    from quantizers.rtn import RTNConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=1, vocab_size=128, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    rtn = quantizers.get("rtn")
    for name, lin in list(model.model.layers.named_modules()):
        if isinstance(lin, torch.nn.Linear):
            res = rtn.quantize(lin.weight.data, None, RTNConfig(bits=4, group_size=32))
            perm = torch.randperm(lin.in_features, generator=torch.Generator().manual_seed(len(name)))
            act_order = (torch.arange(lin.in_features) // 32)[torch.argsort(perm)].to(torch.int32)  # shuffled groups
            res = QuantResult(codes=res.codes, scales=res.scales, zeros=res.zeros, g_idx=act_order, bits=4)
            parent, attr = name.rsplit(".", 1)
            setattr(model.model.layers.get_submodule(parent), attr,
                    QuantLinear.from_result(res, None, dtype, group_size=32))
    model = model.to(device=device, dtype=dtype)
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(1)).to(device)
    out = {}
    with torch.inference_mode():
        for backend in ("torch", "triton"):
            for mod in model.modules():
                if isinstance(mod, QuantLinear):
                    mod.backend = backend
            out[backend] = [model(ids).logits.float().cpu(), model(ids[:, :1]).logits.float().cpu()]
            out[f"paths-{backend}"] = kernel_paths(model)
    return out


def compiled_results(out: str) -> None:
    """(child, kernels compiled) LLaMA-7B shapes on CUDA through the default configs."""
    from quantizers import kernels
    from quantizers.kernels import triton_gemm as tg

    assert not tg.interpreted(), "the kernels are interpreted"
    results = {}
    for name, (bits, K_, N_, gs, act, M, dtype) in GPU_CASES.items():
        res, x = gpu_inputs(bits, K_, N_, gs, act, M, dtype, GPU_SHIFT.get(name, 0.0))
        m = module_of(res, None, dtype).cuda()
        rt = tg.runtime_of(m)
        y = tg.matmul(x.cuda(), rt, None)  # the tuned config
        results[name] = {"y": y.cpu(), "path": rt.path, "tuned": tg.tuned_config(x.cuda(), rt).name()}
        results[name]["skipped"] = {}
        for cfg in tg.candidates(M, bits, act):  # every candidate tuning may pick, each checked on its own
            try:
                results[name][cfg.name()] = tg.matmul(x.cuda(), rt, None, cfg).cpu()
            except ValueError as exc:  # the CUDA GEMV where the shape does not fit it (tuning skips it too)
                results[name]["skipped"][cfg.name()] = str(exc)
    results["model"] = tiny_model_logits("cuda", torch.float16)
    results["pdl"] = pdl_results()
    results["overlap"] = overlap_results()
    results["cuda"] = cuda_gemv_results()
    results["direct"] = direct_results()
    dev = torch.device("cuda")
    gate = {"bf16-4": tg.pair_path_runs(torch.bfloat16, 4, int(tg.TILE), dev),
            "fp16-4": tg.pair_path_runs(torch.float16, 4, int(tg.TILE), dev),
            "bf16-8": tg.pair_path_runs(torch.bfloat16, 8, int(tg.TILE), dev),
            "bf16-4-element": tg.pair_path_runs(torch.bfloat16, 4, int(tg.ELEMENT), dev)}
    idx = torch.cuda.current_device()
    real = kernels.gpu(dev)
    kernels._GPUS[idx] = replace(real, capability=(7, 5))  # a Turing card: no fma.rn.bf16x2
    gate["sm75"] = tg.pair_path_runs(torch.bfloat16, 4, int(tg.TILE), dev)
    kernels._GPUS[idx] = real
    results["gate"] = gate | {"capability": torch.cuda.get_device_capability(idx)}
    torch.save(results, out)


def pdl_results() -> dict:
    """Act-order through the dot kernel (x gathered ahead) and the GEMV on gathered x, with programmatic
    dependent launch (the default on sm_90+) and without (``HARNESS_KERNEL_PDL=0``)."""
    import os

    from quantizers.kernels import triton_gemm as tg

    out = {}
    for M, cfg in ((16, None), (1, tg.Config("gemv", bn=128, bk=64, num_warps=1, xsplit=False, gather=True))):
        res, x = gpu_inputs(4, 4096, 4096, 128, True, M, torch.bfloat16)
        rt = tg.runtime_of(module_of(res, None, torch.bfloat16).cuda())
        cfg = cfg or tg.default_config(M, 4, True)
        for flag in ("1", "0"):
            os.environ["HARNESS_KERNEL_PDL"] = flag
            rt.plans.clear()
            y = tg.matmul(x.cuda(), rt, None, cfg)
            plan = next(iter(rt.plans.values()))
            out[(M, flag)] = {"y": y.cpu(), "pdl": plan.pdl, "launch_pdl": plan.fixed.get("launch_pdl", False),
                              "gather": plan.gather_x}
        os.environ.pop("HARNESS_KERNEL_PDL")
    return out


OVERLAP_CHAINS = {  # label: rows, config fields (None: the default), act-order
    "gemv": (1, None, False),  # None: the default config
    "dot": (16, None, False),
    "cuda": (1, dict(bn=32, bk=128, num_warps=16, num_stages=2, split=1), False),
    "cuda-split": (1, dict(bn=32, bk=128, num_warps=8, num_stages=3, split=4), False),
    "cuda-act": (1, dict(bn=32, bk=128, num_warps=16, num_stages=3, split=1), True),  # x gathered in the kernel
    "cuda-act-gather": (1, dict(bn=32, bk=128, num_warps=16, num_stages=3, split=1, gather=True), True),
}


def overlap_results() -> dict:
    """Chains of products where each ``x`` is the previous ``y`` (once through a kernel between, once
    directly), 4096×4096 at 4 bits, with overlapped launches (the default on sm_90+) and without
    (``HARNESS_KERNEL_PDL=0``): run eagerly and replayed from a CUDA graph. Then a first product right after
    its weights were rewritten on the stream."""
    import os

    from quantizers.kernels import triton_gemm as tg

    out = {"hopper": torch.cuda.get_device_capability() >= (9, 0)}
    for label, (M, fields, act) in OVERLAP_CHAINS.items():
        cfg = tg.Config("cuda", **fields) if fields else tg.default_config(M, 4, act)
        x0 = torch.randn(M, 4096, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16).cuda()
        for flag in ("1", "0"):
            os.environ["HARNESS_KERNEL_PDL"] = flag
            rts = [tg.runtime_of(module_of(gpu_inputs(4, 4096, 4096, 128, act, M, torch.bfloat16)[0], None,
                                           torch.bfloat16).cuda()) for _ in range(3)]
            settled = [rt.settled for rt in rts]

            def chain(x0=x0, rts=rts, cfg=cfg):
                x = x0
                for rt in rts:
                    y = tg.matmul(x, rt, None, cfg)
                    x = (y.float() / y.float().abs().amax()).to(torch.bfloat16)  # a kernel between
                    x = tg.matmul(x, rt, None, cfg)  # and one product right after another
                    x = (x.float() / x.float().abs().amax()).to(torch.bfloat16)
                return x

            eager = [chain(), chain()]
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=stream):
                    y_graph = chain()
            replays = []
            for _ in range(3):
                graph.replay()
                torch.cuda.synchronize()
                replays.append(y_graph.clone().cpu())
            plans = [p for rt in rts for p in rt.plans.values()]
            out[(label, flag)] = {"eager": [e.cpu() for e in eager], "graph": replays, "settled_before": settled,
                                  "settled": [rt.settled for rt in rts], "pdl": {p.pdl for p in plans},
                                  "path": rts[0].path}
            del graph
        os.environ.pop("HARNESS_KERNEL_PDL")
    # the weights written by the kernel just before the first product on them (overlapped launches on)
    res, x = gpu_inputs(4, 4096, 4096, 128, False, 1, torch.bfloat16)
    rt = tg.runtime_of(module_of(res, None, torch.bfloat16).cuda())
    cfg = tg.Config("cuda", bn=32, bk=128, num_warps=16, num_stages=2, split=1)
    words = rt.qweight.clone()
    rt.qweight.zero_()
    torch.cuda.synchronize()
    rt.qweight.copy_(words)  # on the stream, right before the product
    out["rewritten"] = tg.matmul(x.cuda(), rt, None, cfg).cpu()
    return out


CUDA_RUNS = [  # (bits, K, N, group size, act-order), rows, dtype, bias, config fields
    ((4, 768, 4112, 256, False), 1, torch.bfloat16, False, dict(bn=32, bk=64, num_warps=8, num_stages=3, split=1)),
    ((4, 768, 4112, 256, False), 3, torch.float16, True, dict(bn=64, bk=32, num_warps=4, num_stages=2, split=0)),
    ((4, 2048, 200, 64, True), 8, torch.bfloat16, True, dict(bn=128, bk=64, num_warps=4, num_stages=2, split=3)),
    ((4, 4096, 4096, None, False), 1, torch.float16, False, dict(bn=32, bk=128, num_warps=16, num_stages=2, split=1)),
    ((2, 1024, 208, 128, False), 1, torch.bfloat16, True, dict(bn=32, bk=128, num_warps=8, num_stages=3, split=1)),
    ((2, 1024, 208, 128, True), 5, torch.float16, False, dict(bn=64, bk=64, num_warps=2, num_stages=4, split=0,
                                                               gather=True)),
    ((2, 4096, 11008, 128, False), 1, torch.bfloat16, False, dict(bn=32, bk=128, num_warps=32, num_stages=2, split=1)),
    ((2, 2048, 512, 2048, False), 2, torch.bfloat16, True, dict(bn=128, bk=128, num_warps=8, num_stages=2, split=2)),
    ((3, 1024, 224, 128, False), 1, torch.bfloat16, True, dict(bn=64, bk=128, num_warps=8, num_stages=3, split=1)),
    ((3, 2048, 512, 64, True), 5, torch.float16, False, dict(bn=64, bk=64, num_warps=4, num_stages=2, split=0)),
    ((3, 4096, 4096, 128, True), 1, torch.bfloat16, False, dict(bn=32, bk=128, num_warps=16, num_stages=2, split=1)),
    ((3, 4096, 11008, 128, False), 1, torch.bfloat16, False, dict(bn=32, bk=128, num_warps=16, num_stages=2,
                                                                  split=2)),
    # the tensor-core variant (4 bits, up to 16 rows)
    ((4, 4096, 11008, 128, False), 16, torch.bfloat16, False, dict(kernel="mma", num_warps=4, num_stages=3, split=0)),
    ((4, 4096, 4096, 128, True), 16, torch.bfloat16, True, dict(kernel="mma", num_warps=4, num_stages=4, split=1)),
    ((4, 1024, 200, 64, False), 5, torch.float16, True, dict(kernel="mma", num_warps=2, num_stages=2, split=3)),
    ((4, 2048, 520, 2048, True), 9, torch.bfloat16, False, dict(kernel="mma", num_warps=8, num_stages=2, split=1)),
    ((4, 11008, 4096, 128, False), 4, torch.bfloat16, False, dict(kernel="mma", num_warps=4, num_stages=3, split=0)),
    # x a chunk ahead: rows of both halves, one row, a ragged last split, one stage
    ((4, 4096, 11008, 128, True), 16, torch.bfloat16, True, dict(kernel="mma", num_warps=4, num_stages=3, split=0,
                                                                 prefetch=True)),
    ((4, 2048, 520, 128, False), 9, torch.float16, False, dict(kernel="mma", num_warps=2, num_stages=4, split=3,
                                                               prefetch=True)),
    ((4, 4096, 4096, 128, False), 1, torch.bfloat16, True, dict(kernel="mma", num_warps=8, num_stages=2, split=1,
                                                                prefetch=True)),
    ((4, 1024, 200, 64, True), 3, torch.bfloat16, False, dict(kernel="mma", num_warps=4, num_stages=1, split=0,
                                                              prefetch=True)),
    # the weights as mma's A operand (+sw): one and two n8 tiles of rows, 32 and 64 columns a block (N off the
    # tile), K split or not, groups of one chunk, one group, act-order (x gathered first), both dtypes, bias
    ((4, 4096, 11008, 128, False), 8, torch.bfloat16, True, dict(kernel="mma", bn=64, num_warps=4, num_stages=2,
                                                                 split=0, swap=True)),
    ((4, 11008, 4096, 128, True), 4, torch.bfloat16, False, dict(kernel="mma", bn=32, num_warps=4, num_stages=2,
                                                                 split=0, warps_per_sm=24, swap=True)),
    ((4, 2048, 520, 64, False), 16, torch.float16, True, dict(kernel="mma", bn=64, num_warps=4, num_stages=3,
                                                              split=3, swap=True)),
    ((4, 4096, 4096, 128, False), 1, torch.bfloat16, False, dict(kernel="mma", bn=64, num_warps=16, num_stages=2,
                                                                 split=1, swap=True)),
    ((4, 2048, 200, 2048, True), 11, torch.bfloat16, True, dict(kernel="mma", bn=32, num_warps=8, num_stages=4,
                                                                split=1, swap=True)),
    ((4, 1024, 520, 64, True), 3, torch.float16, False, dict(kernel="mma", bn=64, num_warps=2, num_stages=2,
                                                             split=2, swap=True)),
]


def counted(kernel, entered: list[int]):
    """``kernel``'s Triton entry (``JITFunction.run``), appending to ``entered`` on each call."""
    run = type(kernel).run.__get__(kernel)

    def entry(*args, **kwargs):
        entered.append(1)
        return run(*args, **kwargs)

    return entry


def direct_results() -> dict:
    """Products through Triton's launcher directly after the first call of each kind: fresh inputs, then
    ``x`` off 16-byte alignment and with a padded row stride (new kinds: through Triton again), then
    aligned again; Triton's own entry is counted to show which calls went where."""
    from quantizers.kernels import triton_gemm as tg

    out = {}
    for label, (M, act, bias) in {"gemv": (1, False, False), "gemv-act": (1, True, True), "dot": (16, False, True),
                                  "dot-act": (4, True, False)}.items():
        res, _ = gpu_inputs(4, 4096, 4096, 128, act, M, torch.bfloat16)
        b = torch.randn(4096, generator=torch.Generator().manual_seed(M)).to(torch.bfloat16) if bias else None
        m = module_of(res, b, torch.bfloat16).cuda()
        rt = tg.runtime_of(m)
        cfg = tg.default_config(M, 4, act)
        kernel = tg._dot_kernel if cfg.kernel == "dot" else tg._gemv_kernel
        entered: list[int] = []
        kernel.run = counted(kernel, entered)
        try:
            xs = [torch.randn(M, 4096, generator=torch.Generator().manual_seed(10 + i)).to(torch.bfloat16)
                  for i in range(5)]
            ys, counts = [], []
            for i, x in enumerate(xs):
                if i == 2:  # off alignment: a view one element into a buffer
                    buf = torch.empty(M * 4096 + 8, dtype=torch.bfloat16, device="cuda")
                    xc = buf[1:1 + M * 4096].view(M, 4096)
                    xc.copy_(x)
                elif i == 3:  # a padded row stride
                    xc = torch.zeros(M, 4096 + 8, dtype=torch.bfloat16, device="cuda")[:, :4096]
                    xc.copy_(x)
                else:
                    xc = x.cuda()
                ys.append(tg.matmul(xc, rt, m.bias, cfg).cpu())
                counts.append(len(entered))
            again = tg.matmul(xs[0].cuda(), rt, m.bias, cfg).cpu()
        finally:
            del kernel.run
        plan = next(p for p in rt.plans.values())
        out[label] = {"x": xs, "y": ys, "again": again, "entered": counts, "kinds": len(plan.launch.compiled),
                      "path": rt.path, "split": plan.workspace[0] > 0, "gather": plan.gather_x}
    return out


def cuda_gemv_results() -> dict:
    """The CUDA GEMV through ``matmul`` with explicit ``cuda`` configs: rows 1–8, both 16-bit dtypes, bias,
    column tiles that N does not fill, K split over blocks or not, act-order (x gathered by the kernel, or first)."""
    from quantizers.kernels import triton_gemm as tg

    out = {}
    for i, ((bits, K_, N_, gs, act), M, dtype, bias, fields) in enumerate(CUDA_RUNS):
        res, x = gpu_inputs(bits, K_, N_, gs, act, M, dtype)
        b = torch.randn(N_, generator=torch.Generator().manual_seed(i)).to(dtype) if bias else None
        m = module_of(res, b, dtype).cuda()
        rt = tg.runtime_of(m)
        cfg = tg.Config(**{"kernel": "cuda", **fields})
        y1 = tg.matmul(x.cuda(), rt, m.bias, cfg)
        y2 = tg.matmul(x.cuda(), rt, m.bias, cfg)
        plan = next(iter(rt.plans.values()))
        out[i] = {"y": y1.cpu(), "again": y2.cpu(), "path": rt.path, "gather": plan.gather_x, "pdl": plan.pdl,
                  "hopper": torch.cuda.get_device_capability() >= (9, 0), "permuted": rt.perm is not None}
    return out


GPU_CASES = {  # bits, K, N, group size, act-order, M, dtype
    f"{bits}b-{K_}x{N_}-{'act' if act else 'seq'}-m{M}": (bits, K_, N_, 128, act, M, torch.bfloat16)
    for bits in (2, 3, 4, 8) for (K_, N_) in ((4096, 11008),) for act in (False, True) for M in (1, 16)
} | {"4b-11008x4096-act-m1": (4, 11008, 4096, 128, True, 1, torch.bfloat16),
     "3b-11008x4096-act-m16": (3, 11008, 4096, 128, True, 16, torch.bfloat16),
     "4b-4096x4096-channel-m1-fp16": (4, 4096, 4096, None, False, 1, torch.float16),
     "4b-11008x4096-seq-m16-fp16-positive": (4, 11008, 4096, 128, False, 16, torch.float16),
     "4b-4096x11008-seq-m64-positive": (4, 4096, 11008, 128, False, 64, torch.bfloat16),
     "3b-4096x4096-act-m64": (3, 4096, 4096, 128, True, 64, torch.bfloat16),
     "4b-4096x11008-seq-m1-positive": (4, 4096, 11008, 128, False, 1, torch.bfloat16),
     "2b-4112x1008-act-m1-positive": (2, 4112, 1008, 128, True, 1, torch.bfloat16),
     # 2 to 8 rows: the CUDA GEMV's candidates too (act-order's x too large for shared memory at 8 × 11008)
     "3b-4096x11008-seq-m4": (3, 4096, 11008, 128, False, 4, torch.bfloat16),
     "3b-11008x4096-act-m8": (3, 11008, 4096, 128, True, 8, torch.bfloat16),
     "4b-4096x4096-act-m3-fp16": (4, 4096, 4096, 128, True, 3, torch.float16)}
# x shifted away from zero mean: the dot kernel takes (OFF + zero) · Σ x off a sum of x · (OFF + code)
# and for the GEMV's bfloat16 pairs (sums that do not cancel; K and N off the tiles)
GPU_SHIFT = {"4b-11008x4096-seq-m16-fp16-positive": 1.0, "4b-4096x11008-seq-m64-positive": 1.0,
             "4b-4096x11008-seq-m1-positive": 1.0, "2b-4112x1008-act-m1-positive": 1.0}


def gpu_inputs(bits, K_, N_, gs, act, M, dtype, shift: float = 0.0) -> tuple[QuantResult, torch.Tensor]:
    seed = hash((bits, K_, N_, act, M)) % 2**31
    res = random_result(bits, K_, N_, gs, seed=seed, permuted=act)
    x = (torch.randn(M, K_, generator=torch.Generator().manual_seed(seed)) + shift).to(dtype)
    return res, x


# ------------------------------------------------------------------------------------- CPU (interpreter)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_child("test_kernels", "interpreted_results", tmp_path_factory.mktemp("kernels") / "cpu.pt", True, 600)


@pytest.mark.parametrize("name", list(CASES))
def test_interpreted_kernels_match_dequantize_then_matmul(interpreted, name):
    for run in case_runs(name):
        label, _, rows = RUNS[run]
        res, x, bias, dtype = case_inputs(name, run)
        y = interpreted["runs"][(name, label)]
        assert y.shape == (rows, N) and y.dtype == dtype, (label, y.shape, y.dtype)
        err = rel_err(y, reference(res, x, bias))
        assert err < TOL[dtype], f"{name} {label} {dtype}: relative error {err:.2e}"
        kernel = (RUNS[run][1].get("kernel") or ("gemv" if rows == 1 else "dot"))
        bits, layout = CASES[name]
        # the dot kernel dequantizes into x's 16-bit dtype at 2 and 4 bits when every tile lies in one group;
        # else (3 and 8 bits, float32 x, irregular groups) through float32
        fits = dtype in (torch.float16, torch.bfloat16) and bits in (2, 4)
        if kernel == "dot" and fits and not LAYOUTS[layout][2]:
            kernel = "dot-magic"
        assert interpreted["paths"][(name, label)] == PATHS[kernel] + "-interpreted"


def test_dot_dequantizing_into_16_bits_masks_ragged_k_and_n(interpreted):
    for (bits, dtype), M in zip(RAGGED, [5, 17] * 2, strict=True):
        y, path = interpreted["ragged"][(bits, str(dtype))]
        res, x = ragged_inputs(bits, dtype, M)
        assert path == PATHS["dot-magic"] + "-interpreted" and y.shape == (M, 48)
        assert rel_err(y, reference(res, x, None)) < TOL[dtype], (bits, dtype)


def test_gather_columns_puts_x_in_sorted_order(interpreted):
    got, want = interpreted["gather"]
    assert got.is_contiguous() and torch.equal(got, want)


def test_gemv_with_gather_reads_x_in_sorted_order_and_interpreted_launches_plainly(interpreted):
    # gathered ahead, the GEMV reads no perm; no programmatic dependent launch off a GPU
    assert interpreted["gather_plan"] == (True, False, False, False, False)
    assert "gemv-gather" in {RUNS[r][0] for name in CASES if LAYOUTS[CASES[name][1]][1] for r in case_runs(name)}


def test_tuning_candidates_start_with_the_default_and_one_row_stays_on_the_gemv(interpreted):
    for key, names in interpreted["candidates"].items():
        M, _, _ = key
        assert names[0] == interpreted["defaults"][key] and len(names) == len(set(names)) >= 4, (key, names)
        kinds = {n.split()[0] for n in names}
        _, bits, _ = key
        want = ({"gemv", "cuda"} if M == 1 and bits in (2, 3, 4) else {"gemv"} if M == 1 else {"dot"})
        want |= {"cuda"} if 1 < M <= 8 and bits in (2, 3, 4) else set()  # the CUDA GEMV up to 8 rows
        want |= {"mma"} if 1 < M <= 16 and bits == 4 else set()  # its tensor-core variant up to 16
        assert kinds == want, names
    # interpreted, nothing is timed: a product without a config runs the hand-picked default
    assert interpreted["tuning"] is False and interpreted["tuned"] is True
    assert interpreted["pairs_interpreted"] is False  # inline PTX does not run interpreted


def test_cuda_gemv_refuses_what_it_cannot_run_with_one_clear_error(interpreted):
    expect = {"8 bits": "8 bits", "float32": "torch.float32", "9 rows": "9 rows", "groups": "groups", "cpu": "cpu"}
    assert set(interpreted["cuda_refusals"]) == set(expect)
    for label, msg in interpreted["cuda_refusals"].items():
        assert msg and msg.startswith("config 'cuda n32 k32 s1 x4/1': the CUDA GEMV does not take"), (label, msg)
        assert expect[label] in msg, (label, msg)


@pytest.mark.parametrize("name", list(CASES))
def test_runtime_layout_unpacks_to_the_checkpoint_weight(interpreted, name):
    assert interpreted["layout_exact"][name]
    _, layout = CASES[name]
    assert interpreted["perm"][name] == LAYOUTS[layout][1]  # act-order: codes reordered, x gathered


def test_a_wrong_convention_would_fail():
    """The tolerances separate a right answer from the likeliest wrong ones: a zero off by one (the v1
    ``zero − 1`` convention missed) and codes read one position off. (At 8 bits a zero off by one moves the
    product by about 1 %: the float16 and float32 runs, in turn with bfloat16 over the cases, catch it.)"""
    for bits in (2, 3, 4, 8):
        res = random_result(bits, K, N, 32, seed=bits)
        x = torch.randn(1, K, generator=torch.Generator().manual_seed(bits))
        ref = x @ res.dequantize().T
        off_zero = QuantResult(codes=res.codes, scales=res.scales, zeros=res.zeros + 1, g_idx=res.g_idx, bits=bits)
        shifted = QuantResult(codes=res.codes.roll(1, dims=1), scales=res.scales, zeros=res.zeros, g_idx=res.g_idx,
                              bits=bits)
        for wrong in (off_zero, shifted):
            assert rel_err(x @ wrong.dequantize().T, ref) > 5 * TOL[torch.float16]


def test_tiny_model_logits_agree_across_backends(interpreted):
    out = interpreted["model"]
    for torch_logits, triton_logits in zip(out["torch"], out["triton"], strict=True):
        assert rel_err(triton_logits, torch_logits.float()) < 1e-5
    assert out["paths-torch"] == {"torch-dequant-cached": 7}
    assert out["paths-triton"] == {"triton-gemv-splitk-interpreted": 7}  # the last call: one token


def test_bench_kernels_smoke_prints_rows(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_INTERPRET": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    out = tmp_path / "k.json"
    proc = subprocess.run([sys.executable, "-m", "harness.bench", "kernels", "--smoke", "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "| K×N" in proc.stdout and "triton µs" in proc.stdout, proc.stdout
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert rows and all(r["torch µs"] > 0 for r in rows)
    assert all(r["triton µs"] > 0 and r["rel err"] < 1e-2 for r in rows)  # the interpreter ran every row
    assert {r["act-order"] for r in rows} == {False, True} and {r["M"] for r in rows} >= {1, 4}
    for r in rows:  # bf16 activations: one row on the GEMV (no inline PTX interpreted), 4 bits dequantized to bf16
        kernel = "gemv" if r["M"] == 1 else ("dot-magic" if r["bits"] in (2, 4) else "dot")
        assert r["path"] == PATHS[kernel] + "-interpreted", r


def test_read_reference_is_left_out_off_cuda(monkeypatch):
    from harness.bench_kernels import Timer, read_only

    cpu = torch.device("cpu")
    assert read_only(4096, cpu, Timer(cpu)) is None
    monkeypatch.setenv("HARNESS_KERNEL_CUDA", "0")  # the CUDA path turned off: no read reference either
    assert read_only(4096, torch.device("cuda", 0), Timer(cpu)) is None


@pytest.mark.parametrize("flag", ["--bits", "--rows"])
def test_bench_kernels_bad_list_is_one_line_exit_2(flag):
    proc = subprocess.run([sys.executable, "-m", "harness.bench", "kernels", "--smoke", flag, "4,x"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{flag} takes comma-separated integers" in proc.stderr.strip().splitlines()[-1]


# ------------------------------------------------------------------------- sm_90, compiled without a GPU


@pytest.mark.parametrize("kernel,bits,x", [("gemv", 4, "bf16"), ("gemv", 2, "bf16"), ("gemv", 4, "fp16"),
                                           ("gemv", 3, "bf16"), ("dot", 4, "bf16"), ("dot", 2, "bf16"),
                                           ("dot", 3, "bf16"), ("dot", 4, "fp16"), ("dot", 8, "bf16"),
                                           ("dot", 8, "fp16")])
def test_default_configs_compile_for_sm90_without_spills(kernel, bits, x, tmp_path):
    """The default launch of each kernel (act-order, split-K, bias) compiled ahead of time for an
    H100/H200, in a child that does not interpret: it builds, and keeps its registers (no local memory)."""
    code = f"""
import json, sys
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from quantizers.kernels import triton_gemm as tg
M = 1 if "{kernel}" == "gemv" else 16
cfg = [c for c in tg.candidates(M, {bits}) if c.kernel == "{kernel}"][0]
fn = {{"gemv": tg._gemv_kernel, "dot": tg._dot_kernel}}["{kernel}"]
pairs = "{kernel}" == "gemv" and cfg.pairs and "{x}" == "bf16" and {bits} in tg.PAIR_BITS
consts = tg.constexprs(cfg, {bits}, split=True, grouping=0, has_bias=True, even_k=True, even_n=True, has_perm=True,
                       pairs=pairs, group_size=128, dot_f32=False,
                       magic=tg.magic_bits(torch.{ {"bf16": "bfloat16", "fp16": "float16"}[x] }, {bits}, 0))
consts |= dict(stride_xk=1, stride_yn=1)
ptr = {{"X": "*{x}", "QW": "*i32", "S": "*fp16", "Z": "*u8", "PERM": "*i32", "GIDX": "*i32", "BIAS": "*{x}",
       "Y": "*{x}", "WS": "*fp32", "WSI": "*i32", "CNT": "*i32"}}
sig = {{a: ptr.get(a, "constexpr" if a in consts else "i32") for a in fn.arg_names}}
aligned = set(ptr) | {{"N", "K", "M", "stride_xm", "stride_ym", "group_size"}}  # what the JIT sees at 7B shapes
attrs = {{(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if a in aligned and a not in consts}}
try:
    src = ASTSource(fn, sig, consts, attrs)
except TypeError as e:
    print(json.dumps({{"skip": str(e)}})); sys.exit(0)
c = triton.compile(src, target=GPUTarget("cuda", 90, 64), options={{"num_warps": cfg.num_warps,
                                                                     "num_stages": cfg.num_stages}})
open(sys.argv[1], "wb").write(c.asm["cubin"])
print(json.dumps({{"ok": True}}))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    cubin = tmp_path / "k.cubin"
    proc = subprocess.run([sys.executable, "-c", code, str(cubin)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    status = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in status:
        pytest.skip(f"ASTSource: {status['skip']}")
    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if cuobjdump.exists():
        usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(cubin)], capture_output=True,
                               text=True).stdout
        assert "STACK:0 " in usage and "LOCAL:0 " in usage, usage


def direct_plan_results(out: str) -> None:
    """(child, kernels compiled, no GPU needed) the direct launches' argument lists for plans of both Triton
    kernels, and Triton's own specialisation of the per-call ints next to :func:`tg._spec`."""
    import inspect

    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    from quantizers.kernels import triton_gemm as tg

    assert not tg.interpreted()
    results = {"plans": {}}
    cases = {"gemv": (1, False, tg.Config("gemv", bn=128, bk=64, num_warps=4)), "gemv-act": (1, True, None),
             "dot": (16, False, None), "dot-act-bias": (5, True, None)}
    for label, (M, act, cfg) in cases.items():
        res, x = gpu_inputs(4, 512, 256, 128, act, M, torch.bfloat16)
        b = torch.randn(256).to(torch.bfloat16) if "bias" in label else None
        rt = tg.runtime_of(module_of(res, b, torch.bfloat16))
        plan = tg._plan(rt, M, torch.bfloat16, torch.device("cpu"), b is not None, cfg or tg.default_config(M, 4, act))
        y = torch.empty(M, 256, dtype=torch.bfloat16)
        ws, wsi, cnt = plan.scratch
        call = (x, x.stride(0), x.stride(1), b if b is not None else y, y, y.stride(0), y.stride(1), ws, wsi, cnt)
        direct = plan.launch.arguments(call) if isinstance(plan.launch, tg._Direct) else None
        # what Triton's binder does with the same keywords: bind to the signature, options apart
        options = {k: v for k, v in plan.fixed.items() if k not in plan.kernel.arg_names}
        kwargs = {k: v for k, v in plan.fixed.items() if k in plan.kernel.arg_names}
        bound = inspect.signature(plan.kernel.fn).bind(**kwargs, **dict(zip(tg.CALL_ARGS, call, strict=True)))
        bound.apply_defaults()
        same = direct is not None and len(direct) == len(bound.arguments) and all(
            a is b or (type(a) is type(b) and not isinstance(a, torch.Tensor) and a == b)
            for a, b in zip(direct, bound.arguments.values(), strict=True))
        results["plans"][label] = {"direct": direct is not None, "same": same, "options": sorted(options),
                                   "kernel": plan.kernel.fn.__name__}
    ints = [0, 1, 2, 15, 16, 17, 31, 32, 576, 4096, 4104, 11008, 2**31 - 16, 2**31 - 1, 2**31, 2**31 + 16, 2**32,
            2**32 + 1, 2**63 - 16, 2**63, 2**63 + 16, -1, -16]
    results["ints"] = [(v, tg._spec(v), native_specialize_impl(BaseBackend, v, False, True, True)) for v in ints]
    torch.save(results, out)


@pytest.fixture(scope="module")
def direct_plans(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_child("test_kernels", "direct_plan_results", tmp_path_factory.mktemp("direct") / "d.pt", False, 300)


def test_direct_launch_passes_triton_the_arguments_its_binder_would(direct_plans):
    plans = direct_plans["plans"]
    assert {p["kernel"] for p in plans.values()} == {"_gemv_kernel", "_dot_kernel"}
    for label, p in plans.items():
        assert p["direct"] and p["same"], label  # every argument, in the kernel's order
        assert set(p["options"]) <= {"num_warps", "num_stages", "launch_pdl"}, label  # launch options, not arguments


def test_direct_launch_kinds_are_no_coarser_than_tritons_specialisation(direct_plans):
    """Two per-call ints of one kind (``_spec``) must specialise alike in Triton, or a direct launch could run
    a kernel compiled for other values."""
    seen: dict[int, tuple] = {}
    for v, kind, native in direct_plans["ints"]:
        assert seen.setdefault(kind, native) == native, (v, kind, native, seen[kind])
    assert len(seen) >= 5  # 1, multiples of 16, others, and the 64-bit widths apart


# ------------------------------------------------------------------------------------------------ GPU


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_child("test_kernels", "compiled_results", tmp_path_factory.mktemp("kernels") / "gpu.pt", False, 1200)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_compiled_kernels_match_dequantize_then_matmul_llama_shapes(compiled, name):
    bits, K_, N_, gs, act, M, dtype = GPU_CASES[name]
    res, x = gpu_inputs(bits, K_, N_, gs, act, M, dtype, GPU_SHIFT.get(name, 0.0))
    y = compiled[name]["y"]
    assert y.dtype == dtype and y.shape == (M, N_)
    ref = reference(res, x, None)
    assert rel_err(y, ref) < TOL[dtype]
    assert compiled[name]["path"] in PATHS.values(), compiled[name]["path"]
    if M > 1:  # the dot kernel: dequantizing into x's 16-bit dtype at 2 and 4 bits (groups of 128: one per tile)
        # or, where tuning picked it, the tensor-core CUDA variant (4 bits, up to 16 rows)
        allowed = {PATHS["dot-magic" if bits in (2, 4) else "dot"]}
        allowed |= {PATHS["mma"]} if bits == 4 and M <= 16 else set()
        allowed |= {PATHS["mma-sw"]} if bits == 4 and M <= 8 else set()  # its weights as mma's A: up to 8 rows
        allowed |= {PATHS["cuda"]} if bits in (2, 3, 4) and M <= 8 else set()  # the CUDA GEMV up to 8 rows
        assert compiled[name]["path"] in allowed, compiled[name]["path"]
    tuned = compiled[name]["tuned"]
    if M == 1 and dtype == torch.bfloat16 and bits in (2, 3, 4):  # the pairs unless tuning picked another path
        kind = "cuda" if tuned.startswith("cuda") else "gemv" if tuned.endswith("-pairs") else "gemv-pairs"
        assert compiled[name]["path"] == PATHS[kind]
    skipped = compiled[name]["skipped"]  # only the CUDA GEMV, only where the shape does not fit it
    assert all(k.startswith(("cuda", "mma")) and "does not take" in v for k, v in skipped.items()), skipped
    cuda_bits = bits in (2, 3, 4)
    x_too_large = act and 1 < M <= 8 and M * K_ * 2 > 48 * 1024  # next to all of act-order's x in shared memory
    assert bool(skipped) == (cuda_bits and ((M == 1 and K_ % 128 != 0) or x_too_large)), skipped
    others = {k: v for k, v in compiled[name].items() if k not in ("y", "path", "tuned", "skipped")}
    assert tuned in others and len(others) >= 4
    for label, y_cfg in others.items():
        assert y_cfg.dtype == dtype and rel_err(y_cfg, ref) < TOL[dtype], label


@pytest.mark.gpu
def test_act_order_gather_and_product_overlap_by_pdl_on_hopper(compiled):
    hopper = tuple(compiled["gate"]["capability"]) >= (9, 0)
    for M in (16, 1):
        res, x = gpu_inputs(4, 4096, 4096, 128, True, M, torch.bfloat16)
        ref = reference(res, x, None)
        on, off = compiled["pdl"][(M, "1")], compiled["pdl"][(M, "0")]
        assert on["gather"] and off["gather"]
        assert (on["pdl"], on["launch_pdl"]) == (hopper, hopper) and not (off["pdl"] or off["launch_pdl"])
        assert rel_err(on["y"], ref) < TOL[torch.bfloat16] and rel_err(off["y"], ref) < TOL[torch.bfloat16]
        assert rel_err(on["y"], off["y"].float()) < 1e-3  # the same sums, up to split-K's order


@pytest.mark.gpu
@pytest.mark.parametrize("label", list(OVERLAP_CHAINS))
def test_overlapped_launches_give_the_same_chained_products(compiled, label):
    out = compiled["overlap"]
    on, off = out[(label, "1")], out[(label, "0")]
    assert on["pdl"] == {out["hopper"]} and off["pdl"] == {False}
    assert on["path"] == off["path"] == PATHS["cuda" if label.startswith("cuda") else
                                              "dot-magic" if label == "dot" else "gemv-pairs"]
    assert on["settled_before"] == off["settled_before"] == [False] * 3  # fresh weights: the first product plain
    if label.startswith("cuda"):  # the CUDA GEMV reads weights before it waits: only once they are settled
        assert on["settled"] == off["settled"] == [True] * 3
    # one block per column tile: the same sums in the same order
    deterministic = label in ("cuda", "cuda-act", "cuda-act-gather")
    ref = off["eager"][0].float()
    assert ref.abs().amax() == 1.0  # the chain ran through (normalised each step)
    for y in on["eager"] + on["graph"] + off["eager"][1:] + off["graph"]:
        if deterministic:
            assert torch.equal(y, off["eager"][0])
        else:  # split-K adds in any order
            assert rel_err(y, ref) < 2e-2


@pytest.mark.gpu
def test_first_product_after_its_weights_are_written_reads_the_new_weights(compiled):
    res, x = gpu_inputs(4, 4096, 4096, 128, False, 1, torch.bfloat16)
    assert rel_err(compiled["overlap"]["rewritten"], reference(res, x, None)) < TOL[torch.bfloat16]


@pytest.mark.gpu
def test_pair_path_runs_only_where_it_can(compiled):
    gate = compiled["gate"]
    assert gate["bf16-4"] is (tuple(gate["capability"]) >= (8, 0))
    assert not (gate["fp16-4"] or gate["bf16-8"] or gate["bf16-4-element"] or gate["sm75"])


@pytest.mark.gpu
def test_compiled_tiny_model_logits_agree_across_backends(compiled):
    out = compiled["model"]
    for torch_logits, triton_logits in zip(out["torch"], out["triton"], strict=True):
        assert rel_err(triton_logits, torch_logits) < 1e-2  # float16 model: float32 sums against cuBLAS's
    assert sum(out["paths-triton"].values()) == 7 and set(out["paths-triton"]) <= set(PATHS.values())


@pytest.mark.parametrize("i", range(len(CUDA_RUNS)))
def test_cuda_runs_are_products_the_cuda_kernels_take(i):
    """The GPU table checked on the CPU: every row packs and its config is one the CUDA kernel accepts
    (a row that does not would fail the whole compiled fixture on the GPU)."""
    from quantizers.kernels import cuda
    from quantizers.kernels import triton_gemm as tg

    (bits, K_, N_, gs, act), M, dtype, bias, fields = CUDA_RUNS[i]
    res, _ = gpu_inputs(bits, K_, N_, gs, act, 1, dtype)
    rt = tg.runtime_of(module_of(res, None, dtype))
    assert cuda.supports(rt, M, dtype, tg.Config(**{"kernel": "cuda", **fields})) is None
    assert (rt.perm is not None) == (act and gs < K_)  # what the GPU test expects of the run's permutation


@pytest.mark.gpu
@pytest.mark.parametrize("i", range(len(CUDA_RUNS)))
def test_cuda_gemv_matches_dequantize_then_matmul(compiled, i):
    (bits, K_, N_, gs, act), M, dtype, bias, fields = CUDA_RUNS[i]
    res, x = gpu_inputs(bits, K_, N_, gs, act, M, dtype)
    b = torch.randn(N_, generator=torch.Generator().manual_seed(i)).to(dtype) if bias else None
    run = compiled["cuda"][i]
    kind = "mma-sw" if fields.get("swap") else fields.get("kernel", "cuda")
    assert run["path"] == PATHS[kind] and run["y"].dtype == dtype and run["y"].shape == (M, N_)
    # act-order: the GEMV gathers x as it stages it unless told otherwise; the tensor-core variant reads it gathered.
    # One group (group size K): the sorted order is the identity, so the runtime keeps no permutation
    assert run["permuted"] == (act and gs < K_)
    assert run["gather"] == (run["permuted"] and (fields.get("gather", False) or kind in ("mma", "mma-sw")))
    assert run["pdl"] == run["hopper"]  # overlapped launches on sm_90+
    ref = reference(res, x, b)
    assert rel_err(run["y"], ref) < TOL[torch.bfloat16]  # bfloat16-pair sums even for float16 x (float16 pairs)
    if fields["split"] == 1:  # one block per column tile: the same sums in the same order
        assert torch.equal(run["y"], run["again"])
    else:
        assert rel_err(run["again"], run["y"].float()) < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("label", ["gemv", "gemv-act", "dot", "dot-act"])
def test_direct_launches_match_dequantize_then_matmul(compiled, label):
    run = compiled["direct"][label]
    M, act, bias = {"gemv": (1, False, False), "gemv-act": (1, True, True), "dot": (16, False, True),
                    "dot-act": (4, True, False)}[label]
    res, _ = gpu_inputs(4, 4096, 4096, 128, act, M, torch.bfloat16)
    b = torch.randn(4096, generator=torch.Generator().manual_seed(M)).to(torch.bfloat16) if bias else None
    for x, y in zip(run["x"], run["y"], strict=True):
        assert rel_err(y, reference(res, x, b)) < TOL[torch.bfloat16]
    # Triton entered for the first call and for each new kind (x off alignment; a row stride off 16) only; the
    # fifth, aligned again, went straight to the launcher. Where x is gathered first, the product always
    # reads the gather's fresh contiguous copy: one kind
    assert run["entered"] == ([1] * 5 if run["gather"] else [1, 1, 2, 3, 3]), run["entered"]
    assert run["kinds"] == (1 if run["gather"] else 3)
    assert run["gather"] == (label == "dot-act")
    if not run["split"]:  # the same sums in the same order, whichever way it was launched
        assert torch.equal(run["again"], run["y"][0])
    else:
        assert rel_err(run["again"], run["y"][0].float()) < 1e-3
