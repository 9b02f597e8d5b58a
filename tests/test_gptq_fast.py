"""GPTQ's Triton block kernel against the plain torch column loop, and the shared (stacked-rows) solve.

The CPU tests run the kernel under Triton's interpreter. ``TRITON_INTERPRET`` is read when a kernel
is defined, so the kernel runs in a child process started with it set (one child for every case, its
results saved to a file); this process never sets it, so a GPU session here still compiles the
kernel. The torch path and every assertion run here.
"""
from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest
import torch

from quantizers.base import n_groups
from quantizers.gptq import GPTQConfig, quantize, quantize_shared
from tests.conftest import run_child
from tests.test_gptq import make_problem, seed_of

pytest.importorskip("triton")

ROWS, COLS, DEAD = 12, 72, (5, 61)  # 72 columns: groups of 32 leave a ragged last group of 8; 12 rows: a
# partly masked program (8 or 16 rows a program)
VARIANTS = {  # block sizes chosen so that groups start mid-block, at block starts and across blocks
    "per_channel": {"block_size": 40},
    "group": {"group_size": 32},
    "group_desc_act": {"group_size": 32, "desc_act": True, "block_size": 48},
    "static_desc_act": {"group_size": 32, "static_groups": True, "desc_act": True, "block_size": 64},
    "mse_group": {"group_size": 32, "mse": True, "block_size": 32},
}
CASES = {f"{v}-{bits}-{'sym' if sym else 'asym'}": (v, bits, sym)
         for v in VARIANTS for bits in (2, 3, 4, 8) for sym in (False, True)}
SHARED_CASES = {"per_channel": {}, "group_desc_act": {"group_size": 32, "desc_act": True}}
SHARED_ROWS = (16, 8, 8)  # q, k, v of a small grouped-query attention


def case_problem(name: str) -> tuple[torch.Tensor, torch.Tensor, GPTQConfig]:
    variant, bits, sym = CASES[name]
    W, H = make_problem(seed_of("fast", name), rows=ROWS, cols=COLS, dead=DEAD)
    return W, H, GPTQConfig(bits=bits, sym=sym, **VARIANTS[variant])


def shared_problem(name: str) -> tuple[list[torch.Tensor], torch.Tensor, GPTQConfig]:
    W, H = make_problem(seed_of("shared", name), rows=sum(SHARED_ROWS), cols=COLS, dead=DEAD)
    return list(W.split(SHARED_ROWS)), H, GPTQConfig(bits=4, **SHARED_CASES[name])


def block_problem() -> dict[str, torch.Tensor]:
    """One block of 48 columns for 20 rows (three programs of 8 rows, the last one partly masked)."""
    g = torch.Generator().manual_seed(seed_of("block"))
    rows, count = 20, 48
    X = torch.randn(2 * count, count, generator=g)
    Hinv1 = torch.linalg.cholesky(torch.linalg.inv(X.T @ X / count + 0.1 * torch.eye(count)), upper=True)
    W1 = torch.randn(rows, count, generator=g)
    S = (W1.abs().amax(1, keepdim=True) / 7).expand(rows, count)
    Z = torch.full((rows, count), 8.0)
    return {"W1": W1, "Hinv1": Hinv1, "S": S, "Z": Z}


def torch_block(p: dict[str, torch.Tensor], start: int, stop: int, maxq: int):
    """The torch path's inner loop on columns start .. stop − 1: codes, Err1, W1 after, Σ (w − q)² / d²."""
    W1, Hinv1 = p["W1"].clone(), p["Hinv1"]
    codes, Err1, loss = torch.zeros_like(W1), torch.zeros_like(W1), torch.zeros(W1.shape[0])
    for i in range(start, stop):
        w, d, s, z = W1[:, i], Hinv1[i, i], p["S"][:, i], p["Z"][:, i]
        c = torch.clamp(torch.round(w / s) + z, 0, maxq)
        q = s * (c - z)
        loss += (w - q) ** 2 / d**2
        err = (w - q) / d
        W1[:, i:] -= err.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
        codes[:, i], Err1[:, i] = c, err
    return codes, Err1, W1, loss


def fields(res) -> dict:
    return {"codes": res.codes.cpu(), "scales": res.scales.cpu(), "zeros": res.zeros.cpu(), "g_idx": res.g_idx.cpu(),
            "loss": res.stats["loss"], "triton": res.stats["triton"]}


def interpreted_results(out: str) -> None:
    """(child, TRITON_INTERPRET=1) Every CPU case through the kernel, saved to ``out``."""
    from quantizers.kernels import gptq_block

    assert gptq_block.runs_on(torch.device("cpu")), "the kernel is not interpreted"
    results: dict = {"cases": {}, "shared": {}, "block": {}}
    for name in CASES:
        W, H, cfg = case_problem(name)
        results["cases"][name] = fields(quantize(W, H, cfg, kernel="triton"))
    W, H = make_problem(seed_of("fast", "wide"), rows=8, cols=300, dead=DEAD)
    results["wide"] = fields(quantize(W, H, GPTQConfig(bits=4, block_size=512), kernel="triton"))
    for name in SHARED_CASES:
        Ws, H, cfg = shared_problem(name)
        results["shared"][name] = {
            "shared": [fields(r) for r in quantize_shared(Ws, H, cfg, kernel="triton")],
            "separate": [fields(quantize(W, H, cfg, kernel="triton")) for W in Ws],
        }
    p = block_problem()
    for start, stop in ((0, 48), (5, 30)):
        rows, count = p["W1"].shape
        W1, codes = p["W1"].clone(), torch.zeros(rows, count, dtype=torch.uint8)
        Err1, loss = torch.zeros(rows, count), torch.zeros(rows)
        gptq_block.gptq_block(W1, p["Hinv1"], p["S"], p["Z"], codes, Err1, loss, 15, start, stop, block_r=8)
        results["block"][(start, stop)] = {"codes": codes, "Err1": Err1, "W1": W1, "loss": loss}
    torch.save(results, out)


def compiled_results(out: str) -> None:
    """(child, kernel compiled) The GPU cases through the kernel on CUDA, saved to ``out``."""
    import triton

    from quantizers.kernels import gptq_block

    assert isinstance(gptq_block._gptq_block_kernel, triton.runtime.JITFunction), "the kernel is interpreted"
    results = {}
    for name in GPU_VARIANTS:
        W, H, cfg = gpu_problem(name)
        results[name] = fields(quantize(W.cuda(), H.cuda(), cfg, kernel="triton"))
    torch.save(results, out)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("gptq_fast") / "cpu.pt"
    return run_child("test_gptq_fast", "interpreted_results", out, True, 600)


def assert_agree(fast: dict, ref, min_same: float = 1.0) -> float:
    """Fast-path fields against the torch path's result ``ref``; returns the share of equal codes."""
    assert fast["triton"] and not ref.stats["triton"]
    assert fast["codes"].dtype == torch.uint8 and fast["codes"].shape == ref.codes.shape
    assert torch.equal(fast["g_idx"], ref.g_idx)
    same = (fast["codes"] == ref.codes).float().mean().item()
    assert same >= min_same, f"only {same:.4%} of codes agree"
    if same == 1.0:  # grids found on the fly (non-static groups) agree too when every code does
        assert torch.equal(fast["scales"], ref.scales) and torch.equal(fast["zeros"], ref.zeros)
    assert fast["loss"] == pytest.approx(ref.stats["loss"], rel=1e-3)
    return same


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_torch_path(interpreted, name):
    W, H, cfg = case_problem(name)
    ref = quantize(W, H, cfg, kernel="torch")
    # the kernel does the torch loop's arithmetic in the same order (the interpreter never fuses a
    # multiply-add): every code and grid is equal
    assert_agree(interpreted["cases"][name], ref, min_same=1.0)
    assert interpreted["cases"][name]["loss"] == pytest.approx(ref.stats["loss"], rel=1e-5)


def test_kernel_on_blocks_wider_than_its_cap(interpreted):
    W, H = make_problem(seed_of("fast", "wide"), rows=8, cols=300, dead=DEAD)
    ref = quantize(W, H, GPTQConfig(bits=4, block_size=512), kernel="torch")  # one block; the kernel's are 256 + 44
    assert_agree(interpreted["wide"], ref, min_same=0.99)


@pytest.mark.parametrize("start,stop", [(0, 48), (5, 30)])
def test_block_kernel_is_the_torch_loop(interpreted, start, stop):
    p = block_problem()
    codes, Err1, W1, loss = torch_block(p, start, stop, 15)
    got = interpreted["block"][(start, stop)]
    done = slice(start, stop)
    assert torch.equal(got["codes"][:, done].float(), codes[:, done])
    assert (got["codes"][:, :start] == 0).all() and (got["codes"][:, stop:] == 0).all()  # nothing else written
    assert torch.equal(got["Err1"][:, done], Err1[:, done])
    assert torch.equal(got["W1"][:, stop:], W1[:, stop:])  # the rest of the block carries the updates
    assert torch.equal(got["W1"][:, :start], p["W1"][:, :start])
    torch.testing.assert_close(got["loss"], loss, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", list(SHARED_CASES))
def test_shared_solve_equals_separate_solves(interpreted, name):
    Ws, H, cfg = shared_problem(name)
    ref_shared = quantize_shared(Ws, H, cfg, kernel="torch")
    got = interpreted["shared"][name]
    for k, W in enumerate(Ws):
        ref = quantize(W, H, cfg, kernel="torch")
        for res in (fields(ref_shared[k]), got["shared"][k]):  # torch and Triton, stacked
            assert torch.equal(res["codes"], ref.codes)
            assert torch.equal(res["scales"], ref.scales) and torch.equal(res["zeros"], ref.zeros)
            assert torch.equal(res["g_idx"], ref.g_idx)
            assert res["loss"] == pytest.approx(ref.stats["loss"], rel=1e-5)
        assert got["shared"][k]["loss"] == pytest.approx(got["separate"][k]["loss"], rel=1e-6)
        assert ref_shared[k].scales.shape == (W.shape[0], n_groups(COLS, cfg.group_size))
    assert sum(r.stats["loss"] for r in ref_shared) == pytest.approx(
        quantize(torch.cat(Ws), H, cfg, kernel="torch").stats["loss"], rel=1e-5)


def test_kernel_choice():
    W, H, cfg = case_problem("group-4-asym")
    assert quantize(W, H, cfg).stats["triton"] is False  # auto: torch on a CPU
    with pytest.raises(ValueError, match="kernel"):
        quantize(W, H, cfg, kernel="cuda")
    from quantizers.kernels import gptq_block

    if not gptq_block.runs_on(torch.device("cpu")):  # compiled here (no TRITON_INTERPRET)
        with pytest.raises(RuntimeError, match="triton"):
            quantize(W, H, cfg, kernel="triton")
    with pytest.raises(ValueError, match="column count"):
        quantize_shared([W, W[:, :50]], H, cfg)
    # a speed knob, not a config field: the run's config (and its hash) cannot see it
    assert "kernel" not in {f.name for f in dataclasses.fields(GPTQConfig)}


@pytest.mark.parametrize("count", [128, 256, 32])
def test_kernel_compiles_for_sm90_without_fused_multiply_add_or_spills(count, tmp_path):
    """Compiled ahead of time for an H100/H200 (no GPU needed): the launch's ``enable_fp_fusion=False``
    keeps ``W1 − err·h`` two roundings, divisions are IEEE, and the tile fits in registers."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from quantizers.kernels import gptq_block

    kernel = gptq_block._gptq_block_kernel
    if not isinstance(kernel, triton.runtime.JITFunction):
        pytest.skip("this process imported the kernel under TRITON_INTERPRET=1")
    ptr = {"W1": "*fp32", "Hinv1": "*fp32", "S": "*fp32", "Z": "*fp32", "C": "*u8", "E": "*fp32", "L": "*fp32"}
    consts = {"BLOCK_R": gptq_block.block_rows(count, 4096), "BC": triton.next_power_of_2(count)}
    signature = {a: ptr.get(a, "fp32" if a == "maxq" else "constexpr" if a in consts else "i32")
                 for a in kernel.arg_names}
    try:
        src = ASTSource(kernel, signature, consts)
    except TypeError as e:  # another triton's ahead-of-time API
        pytest.skip(f"ASTSource: {e}")
    options = {"num_warps": 4, "enable_fp_fusion": False}  # as gptq_block() launches it
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    ptx = compiled.asm["ptx"]
    assert "fma.rn.f32" not in ptx and "div.rn.f32" in ptx
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if cuobjdump.exists():
        cubin = tmp_path / "gptq_block.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(cubin)], capture_output=True,
                               text=True).stdout
        assert "STACK:0 " in usage and "LOCAL:0 " in usage, usage  # no register spills


GPU_VARIANTS = {
    "per_channel": {},
    "group_desc_act": {"group_size": 128, "desc_act": True},
    "static_desc_act": {"group_size": 128, "desc_act": True, "static_groups": True},
    "sym_group32": {"group_size": 32, "sym": True},
    "mse_group": {"group_size": 128, "mse": True, "bits": 3},
}


def gpu_problem(name: str) -> tuple[torch.Tensor, torch.Tensor, GPTQConfig]:
    W, H = make_problem(seed_of("fast-gpu", name), rows=4096, cols=4096, dead=(7, 1000))
    return W, H, GPTQConfig(**{"bits": 4, **GPU_VARIANTS[name]})


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_child("test_gptq_fast", "compiled_results", tmp_path_factory.mktemp("gptq_fast") / "gpu.pt", False, 1200)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", list(GPU_VARIANTS))
def test_compiled_kernel_matches_torch_path_4096(compiled, name):
    W, H, cfg = gpu_problem(name)
    ref = quantize(W.cuda(), H.cuda(), cfg, kernel="torch")
    ref = dataclasses.replace(ref, codes=ref.codes.cpu(), scales=ref.scales.cpu(), zeros=ref.zeros.cpu(),
                              g_idx=ref.g_idx.cpu())
    assert_agree(compiled[name], ref, min_same=0.999)
