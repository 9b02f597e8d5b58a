"""The CUDA GEMV (``quantizers/kernels/gemv.cu``) without a GPU: the source compiles for sm_80 and sm_90
in every setting the launches use, with no register spills (nvcc where installed; the GPU run compiles
it with NVRTC), and the launcher's checks and its split of K."""
from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from quantizers.kernels import cuda
from quantizers.kernels.triton_gemm import Config

NVCC = shutil.which("nvcc") or next((str(p) for p in Path("/usr/local").glob("cuda*/bin/nvcc")), None)


def compiles_without_spills(arch: str, source: Path, flags: list[str], threads: int, tmp_path: Path) -> None:
    """``source`` with ``flags`` compiles for ``sm_<arch>`` by nvcc, with no register spills or stack, and a
    block of ``threads`` fits an SM's registers."""
    proc = subprocess.run([NVCC, f"-arch=sm_{arch}", "-cubin", "-o", str(tmp_path / "k.cubin"), *flags,
                           "-Xptxas", "-v", str(source)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = proc.stdout + proc.stderr
    regs = re.search(r"Used (\d+) registers", report)
    assert regs and "0 bytes spill stores" in report and "0 bytes stack frame" in report, report
    assert int(regs.group(1)) * threads <= 65536, report  # a block fits an SM's registers


def G(c: int = 1, w: int = 8, u: int = 4, depth: int = 3, split: int = 1, bits: int = 4, **kw) -> Config:
    """A ``cuda`` launch config by the kernel's own units: ``c`` columns a thread, ``w`` warps, ``u`` packed
    blocks a step (a word each at 2 and 4 bits, three at 3 bits), ``depth`` steps in flight."""
    return Config("cuda", bn=32 * c, bk=u * cuda.BLOCK[bits][0], num_warps=w, num_stages=depth, split=split, **kw)


VARIANTS = [  # bits, config, rows, dtype, split, bias, pdl, perm: the tuning candidates' shapes and the extremes
    (4, G(c=1, w=16, u=16, depth=2), 1, torch.bfloat16, False, False, False, False),
    (4, G(c=1, w=32, u=8, depth=3), 1, torch.bfloat16, False, True, False, False),
    (2, G(c=1, w=16, u=8, depth=3, bits=2), 1, torch.bfloat16, False, False, False, False),
    (2, G(c=1, w=32, u=4, depth=3, bits=2), 1, torch.float16, True, False, False, False),
    (4, G(c=4, w=4, u=8, depth=2), 8, torch.bfloat16, True, True, False, False),
    (2, G(c=2, w=2, u=4, depth=4, bits=2), 5, torch.float16, False, True, False, False),
    (4, G(c=1, w=4, u=4, depth=1), 1, torch.float16, False, False, False, False),
    # overlapped launches (sm_90+): the weights of the first steps loaded before the wait
    (4, G(c=1, w=16, u=16, depth=2), 1, torch.bfloat16, False, False, True, False),
    (2, G(c=1, w=16, u=8, depth=4, bits=2), 1, torch.bfloat16, False, False, True, False),
    (4, G(c=1, w=8, u=16, depth=3), 4, torch.float16, True, True, True, False),
    # act-order: x gathered by the block as it is staged
    (4, G(c=1, w=16, u=16, depth=3), 1, torch.bfloat16, False, False, True, True),
    (2, G(c=1, w=32, u=8, depth=2, bits=2), 1, torch.bfloat16, False, False, True, True),
    (4, G(c=4, w=4, u=8, depth=2), 8, torch.float16, True, True, False, True),
    (2, G(c=2, w=2, u=4, depth=4, bits=2), 5, torch.bfloat16, False, True, False, True),
    # 3 bits: blocks of 3 words, codes straddling them
    (3, G(c=1, w=16, u=4, depth=2, bits=3), 1, torch.bfloat16, False, False, False, False),
    (3, G(c=1, w=8, u=4, depth=3, bits=3), 1, torch.float16, True, True, True, False),
    (3, G(c=1, w=16, u=4, depth=3, bits=3), 1, torch.bfloat16, False, False, True, True),
    (3, G(c=4, w=4, u=2, depth=2, bits=3), 8, torch.bfloat16, True, True, False, True),
    (3, G(c=1, w=32, u=2, depth=3, bits=3), 1, torch.float16, False, False, True, False),
    (3, G(c=1, w=32, u=4, depth=2, bits=3), 1, torch.bfloat16, False, True, True, False),
    # tuning's candidates for 2 to 8 rows at their most registers
    (3, G(c=2, w=8, u=2, depth=2, bits=3), 8, torch.bfloat16, True, False, True, False),
    (2, G(c=2, w=8, u=4, depth=2, bits=2), 8, torch.bfloat16, True, True, True, False),
    (3, G(c=1, w=16, u=2, depth=3, bits=3), 8, torch.float16, True, False, True, False),
    (4, G(c=1, w=4, u=16, depth=2), 8, torch.bfloat16, True, False, True, True),
]


MMA_VARIANTS = [  # config, rows, dtype, split, bias, pdl: the tensor-core variant
    (Config("mma", num_warps=4, num_stages=3), 16, torch.bfloat16, True, False, True),
    (Config("mma", num_warps=4, num_stages=4), 16, torch.float16, False, True, False),
    (Config("mma", num_warps=8, num_stages=2), 1, torch.bfloat16, True, True, True),
    (Config("mma", num_warps=2, num_stages=4), 9, torch.bfloat16, False, False, True),
    (Config("mma", num_warps=16, num_stages=3), 16, torch.bfloat16, True, True, False),
    # x a chunk ahead
    (Config("mma", num_warps=4, num_stages=3, prefetch=True), 16, torch.bfloat16, True, False, True),
    (Config("mma", num_warps=8, num_stages=2, prefetch=True), 4, torch.float16, False, True, True),
    (Config("mma", num_warps=2, num_stages=4, prefetch=True), 9, torch.bfloat16, True, True, False),
    (Config("mma", num_warps=4, num_stages=1, prefetch=True), 16, torch.bfloat16, False, False, True),
    (Config("mma", num_warps=16, num_stages=2, prefetch=True), 16, torch.bfloat16, True, True, True),
    # the weights as mma's A operand (+sw): tuning's shapes, two n8 tiles of rows, both dtypes
    (Config("mma", bn=64, num_warps=4, num_stages=2, swap=True), 8, torch.bfloat16, True, True, True),
    (Config("mma", bn=32, num_warps=4, num_stages=2, swap=True), 3, torch.float16, False, False, True),
    (Config("mma", bn=64, num_warps=16, num_stages=2, split=1, swap=True), 8, torch.bfloat16, False, True, True),
    (Config("mma", bn=64, num_warps=4, num_stages=3, swap=True), 16, torch.bfloat16, True, True, False),
    (Config("mma", bn=32, num_warps=8, num_stages=4, swap=True), 1, torch.float16, True, False, True),
]


@pytest.mark.skipif(NVCC is None, reason="no nvcc")
@pytest.mark.parametrize("arch", ["80", "90"])
@pytest.mark.parametrize("i", range(len(MMA_VARIANTS)))
def test_tensor_core_variant_compiles_without_spills(arch, i, tmp_path):
    cfg, rows, dtype, split, bias, pdl = MMA_VARIANTS[i]
    if pdl and arch == "80":
        pytest.skip("griddepcontrol (programmatic dependent launch) is sm_90+")
    d = cuda.defines(4, cfg, rows, dtype, split, bias, pdl)
    assert d["PERM"] == 0 and d["MMA"] == (2 if cfg.swap else 1)
    assert d["C"] == (cfg.bn // 32 if cfg.swap else 1) and d.get("XAHEAD", 0) == int(cfg.prefetch and not cfg.swap)
    compiles_without_spills(arch, cuda.SOURCE, [f"-DGV_{k}={v}" for k, v in d.items()], 32 * cfg.num_warps, tmp_path)


def test_tensor_core_variant_supports_names_what_it_does_not_take():
    ok = Config("mma", num_warps=4, num_stages=3)
    assert cuda.supports(_Rt(), 16, torch.bfloat16, ok) is None
    assert cuda.supports(_Rt(N=11008, K=11008), 1, torch.float16, ok) is None
    assert "2 bits" in cuda.supports(_Rt(bits=2), 16, torch.bfloat16, ok)
    assert "17 rows" in cuda.supports(_Rt(), 17, torch.bfloat16, ok)
    assert "64 codes" in cuda.supports(_Rt(group_size=32), 16, torch.bfloat16, ok)
    assert "multiple of 8" in cuda.supports(_Rt(N=4100), 16, torch.bfloat16, ok)
    assert "48 KiB" in cuda.supports(_Rt(), 16, torch.bfloat16, Config("mma", num_warps=32, num_stages=2))
    assert cuda.shape(ok, 4) == (1, 4, 8, 3)  # a step: 64 codes, 8 word rows
    assert cuda.split_k(_Rt(K=4096), ok, 16, 128, 132) == (5, 13)  # 4 blocks of 4 warps an SM; x not in shared memory
    sw = Config("mma", bn=64, num_warps=4, num_stages=2, split=1, swap=True)  # the weights as A: x in shared memory
    assert cuda.shape(sw, 4) == (2, 4, 8, 2) and cuda.supports(_Rt(), 16, torch.bfloat16, sw) is None
    assert cuda.split_k(_Rt(K=4096), sw, 8, 64, 132) == (1, 64)  # 8 × 4096 × 2 bytes and Σx fit: one block
    assert cuda.split_k(_Rt(K=4096), sw, 16, 64, 132) == (2, 32)  # 16 rows do not
    assert "48 KiB" in cuda.supports(_Rt(), 16, torch.bfloat16, replace(sw, num_warps=16))


def test_launch_shape_reads_the_config_in_the_kernels_units():
    assert cuda.shape(Config("cuda", bn=64, bk=128, num_warps=16, num_stages=3), 4) == (2, 16, 16, 3)
    assert cuda.shape(Config("cuda", bn=32, bk=128, num_warps=8, num_stages=2), 2) == (1, 8, 8, 2)
    assert cuda.shape(Config("cuda", bn=32, bk=128, num_warps=8, num_stages=2), 3) == (1, 8, 4, 2)  # 4 blocks of 32
    d = cuda.defines(2, G(c=2, w=4, u=8, depth=3, bits=2), 3, torch.float16, True, False, True)
    assert d == dict(BITS=2, C=2, W=4, U=8, DEPTH=3, ROWS=3, F16=1, SPLIT=1, HAS_BIAS=0, PDL=1, PERM=0)


@pytest.mark.skipif(NVCC is None, reason="no nvcc")
@pytest.mark.parametrize("arch", ["80", "90"])
@pytest.mark.parametrize("i", range(len(VARIANTS)))
def test_gemv_source_compiles_without_spills(arch, i, tmp_path):
    bits, cfg, rows, dtype, split, bias, pdl, perm = VARIANTS[i]
    if pdl and arch == "80":
        pytest.skip("griddepcontrol (programmatic dependent launch) is sm_90+; the launcher asks for it there only")
    flags = [f"-DGV_{k}={v}" for k, v in cuda.defines(bits, cfg, rows, dtype, split, bias, pdl, perm).items()]
    compiles_without_spills(arch, cuda.SOURCE, flags, 32 * cfg.num_warps, tmp_path)


class _Rt:  # what cuda.supports and the split read of a Runtime
    def __init__(self, bits=4, K=4096, N=4096, group_size=128):
        self.bits, self.K, self.N, self.group_size = bits, K, N, group_size
        self.qweight, self.scales, self.perm = torch.empty(0), torch.empty(0), None


def test_supports_names_what_it_does_not_take():
    ok = G(c=1, w=8, u=8, depth=2)
    assert cuda.supports(_Rt(), 1, torch.bfloat16, ok) is None
    assert cuda.supports(_Rt(), 8, torch.float16, ok) is None
    assert "8 bits" in cuda.supports(_Rt(bits=8), 1, torch.bfloat16, ok)
    assert cuda.supports(_Rt(bits=3), 1, torch.bfloat16, G(u=4, bits=3)) is None
    assert "256 codes" in cuda.supports(_Rt(bits=3), 1, torch.bfloat16, G(u=8, bits=3))  # a step spans two groups
    assert "torch.float32" in cuda.supports(_Rt(), 1, torch.float32, ok)
    assert "9 rows" in cuda.supports(_Rt(), 9, torch.bfloat16, ok)
    assert "64 codes" in cuda.supports(_Rt(group_size=32), 1, torch.bfloat16, ok)  # a step spans two groups
    assert "groups" in cuda.supports(_Rt(group_size=None), 1, torch.bfloat16, ok)
    assert cuda.supports(_Rt(group_size=4096), 1, torch.bfloat16, ok) is None  # one group
    assert "multiple of 4" in cuda.supports(_Rt(N=4098), 1, torch.bfloat16, G(c=4))
    act = _Rt()
    act.perm = torch.arange(4097, dtype=torch.int32)[1:]  # 4 bytes past an aligned start
    assert "act-order permutation" in cuda.supports(act, 1, torch.bfloat16, ok)
    act.perm = torch.arange(4096, dtype=torch.int32)
    assert cuda.supports(act, 1, torch.bfloat16, ok) is None
    assert cuda.supports(act, 6, torch.bfloat16, ok) is None  # 48 KiB of x: the most it copies whole
    assert "act-order x of 7 × 4096" in cuda.supports(act, 7, torch.bfloat16, ok)
    assert cuda.supports(act, 7, torch.bfloat16, G(c=1, w=8, u=8, depth=2, gather=True)) is None  # x gathered first


def test_available_needs_a_cuda_device_and_can_be_turned_off(monkeypatch):
    assert not cuda.available(torch.device("cpu"))
    monkeypatch.setenv("HARNESS_KERNEL_CUDA", "0")
    assert not cuda.available(torch.device("cuda", 0))


@pytest.mark.parametrize("K,rows,split,want", [(4096, 1, 1, (1, 64)), (4096, 1, 3, (3, 22)), (11008, 8, 1, (2, 86)),
                                               (4096, 1, 100, (64, 1)), (4096, 1, 0, (5, 13))])
def test_split_covers_every_step_once_and_keeps_x_in_shared_memory(K, rows, split, want):
    rt = _Rt(K=K)
    cfg = G(u=8, split=split, warps_per_sm=32)  # split 0: 4 blocks of 8 warps an SM over 128 tiles, 132 SMs
    got = cuda.split_k(rt, cfg, rows, 128, 132)
    assert got == want
    blocks, per = got
    steps = K // (8 * 8)
    assert (blocks - 1) * per < steps <= blocks * per  # no empty block, nothing left over
    assert rows * per * 8 * 8 * 2 <= cuda.X_SMEM
    if rows * K * 2 <= cuda.X_SMEM // 2:  # act-order, where it runs: all of x beside the block's pairs
        blocks, per = cuda.split_k(rt, cfg, rows, 128, 132, perm=True)
        assert (blocks - 1) * per < steps <= blocks * per
        assert rows * per * 8 * 8 * 2 + rows * K * 2 <= cuda.X_SMEM


def test_launch_parameters_follow_the_kernels_signature():
    """The C values a launch passes (``Params.KINDS``: p an address, i an int) against ``gemv``'s parameter
    list in gemv.cu, one by one: a slot off would hand the kernel a pointer as an int or the reverse."""
    src = cuda.SOURCE.read_text()
    # the one signature (GV_KERNEL) of the kernels, each of which opens with it
    body = re.search(r'#define GV_KERNEL\s*\\\s*extern "C" __global__ void __launch_bounds__\(\w+\) gemv\((.*?)\)\n',
                     src, re.S)
    params = body.group(1).replace("\\", " ")
    assert src.count("GV_KERNEL {") == 3 and 'extern "C"' not in src.replace(body.group(0), "")
    kinds = "".join("p" if "*" in p else "i" if re.match(r"\s*int\s", p) else "?" for p in params.split(","))
    assert kinds == cuda.Params.KINDS, (kinds, cuda.Params.KINDS)
    p = cuda.Params()
    values = [16 * (i + 1) for i in range(len(kinds))]
    p.fill(values)
    assert [v.value for v in p.values] == values and len(p.array) == len(kinds)
    with pytest.raises(ValueError):  # one value too many or too few is an error, not a shifted launch
        p.fill(values + [0])


def _mma_16816(a_regs, b_regs, c):
    """``mma.m16n8k16`` over a warp, as the PTX ISA lays out its fragments: ``a_regs[lane]`` four pairs,
    ``b_regs[lane]`` two pairs, ``c[lane]`` four floats (each pair (low, high)); returns ``d[lane]``."""
    import numpy as np

    A, B = np.zeros((16, 16)), np.zeros((16, 8))
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for r, (row, col) in enumerate(((g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8))):
            A[row, col], A[row, col + 1] = a_regs[lane][r]
        for r, row in enumerate((2 * t, 2 * t + 8)):
            B[row, g], B[row + 1, g] = b_regs[lane][r]
    D = A @ B
    out = []
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        out.append([c[lane][e] + D[g + 8 * (e >> 1), 2 * t + (e & 1)] for e in range(4)])
    return out


def _gptq_problem(rng, K: int, N: int, gs: int, rows: int):
    """Random 4-bit codes, zeros, power-of-two scales and small-integer x (every product exact in float32):
    (codes, zeros, scales, x, GPTQ words (K / 8, N), the dequantized W (K, N))."""
    import numpy as np

    q = rng.integers(0, 16, (K, N))
    z = rng.integers(0, 16, (K // gs, N))
    s = 2.0 ** rng.integers(-2, 3, (K // gs, N))
    x = rng.integers(-3, 4, (rows, K)).astype(float)
    qw = np.zeros((K // 8, N), dtype=np.int64)
    for i in range(8):
        qw |= q[i::8] << (4 * i)  # GPTQ: word row r holds codes 8r … 8r + 7, code i at bit 4i
    W = s[np.arange(K) // gs] * (q - z[np.arange(K) // gs])
    return q, z, s, x, qw, W


@pytest.mark.parametrize("rows", [16, 5])
def test_tensor_core_variant_maps_gptq_words_onto_mma_fragments(rows):
    """The tensor-core variant's indexing emulated for one warp over a 32-column tile (two chunks of 64 codes,
    groups of 64): which words, x values, zeros and scales each lane takes, fed to mma.m16n8k16 as the PTX
    ISA lays out its fragments, must give x · W exactly (small integers, power-of-two scales)."""
    import numpy as np

    K, N, gs = 128, 32, 64
    q, z, s, x, qw, W = _gptq_problem(np.random.default_rng(rows), K, N, gs, rows)

    xr = lambda r, k: x[r, k] if r < rows else 0.0  # noqa: E731 - rows past M read as zeros
    tot = [[[0.0] * 4 for _ in range(4)] for _ in range(32)]
    for c in range(K // 64):
        grp = (8 * c) // (gs // 8)
        acc = [[[0.0] * 4 for _ in range(32)] for _ in range(4)]  # [tile][lane][e]
        for step in range(4):
            a_regs = []
            for lane in range(32):
                g, t = lane >> 2, lane & 3
                k = 64 * c + 16 * t + 4 * step
                a_regs.append([(xr(g, k), xr(g, k + 1)), (xr(g + 8, k), xr(g + 8, k + 1)),
                               (xr(g, k + 2), xr(g, k + 3)), (xr(g + 8, k + 2), xr(g + 8, k + 3))])
            for i in range(4):  # n8 tile i: the tile's column 4g + i in lane (g, ·)
                b_regs = []
                for lane in range(32):
                    g, t = lane >> 2, lane & 3
                    n = 4 * g + i
                    w = int(qw[8 * c + 2 * t + (step >> 1), n])
                    zi = int(z[grp, n])
                    pairs = []
                    for byte in (2 * (step & 1), 2 * (step & 1) + 1):  # codes 2b (low nibble), 2b + 1 (high)
                        pairs.append((((w >> 8 * byte) & 15) - zi, ((w >> (8 * byte + 4)) & 15) - zi))
                    b_regs.append(pairs)
                acc[i] = _mma_16816(a_regs, b_regs, acc[i])
        for lane in range(32):  # times the scales of output columns 8t + i (c0, c2) and 8t + 4 + i (c1, c3)
            t = lane & 3
            for i in range(4):
                for e in range(4):
                    tot[lane][i][e] += acc[i][lane][e] * s[grp, 8 * t + 4 * (e & 1) + i]
    y = np.full((16, N), np.nan)
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for i in range(4):
            for e in range(4):
                y[g + 8 * (e >> 1), 8 * t + 4 * (e & 1) + i] = tot[lane][i][e]
    assert not np.isnan(y).any()  # every (row, column) written once
    assert np.array_equal(y[:rows], x @ W)
    assert not y[rows:].any()


@pytest.mark.parametrize("rows,c,gs", [(1, 2, 128), (5, 1, 64), (16, 2, 64), (9, 1, 256)])
def test_swapped_tensor_core_variant_maps_gptq_words_onto_mma_fragments(rows, c, gs):
    """The "+sw" tensor-core variant (gemv.cu, GV_MMA 2) emulated for one warp over a 32·c-column tile and
    four chunks of 64 codes: the words each lane loads as mma's A (codes as 128 + code), x's staged pairs as
    its B, Σx of each chunk, and the zero and scale applied at each group's last chunk, must give x · W
    exactly (small integers, power-of-two scales), every (row, column) written once."""
    import numpy as np

    K, N = 256, 32 * c
    q, z, s, x, qw, W = _gptq_problem(np.random.default_rng(rows * 10 + c), K, N, gs, rows)
    # x staged as the GEMV stages it: V4 j of a row holds pairs (x_8j+i, x_8j+i+4), i = 0 … 3; Σx per chunk
    pairs = [[[(x[m, 8 * j + i], x[m, 8 * j + i + 4]) for i in range(4)] for j in range(K // 8)] for m in range(rows)]
    xsum = [[x[m, 64 * ch:64 * ch + 64].sum() for ch in range(K // 64)] for m in range(rows)]
    T, NB = 2 * c, (rows + 7) // 8
    col = lambda g, j: 32 * (j >> 2) + 4 * g + (j & 3)  # noqa: E731 - word j of lane (g, ·): its column
    code2 = lambda w, p: (128 + ((w >> 4 * p) & 15), 128 + ((w >> (4 * p + 16)) & 15))  # noqa: E731 - lop3 | 2**7
    acc = [[[[0.0] * 4 for _ in range(32)] for _ in range(NB)] for _ in range(T)]  # [tile][nb][lane][e]
    tot = [[[[0.0] * 4 for _ in range(32)] for _ in range(NB)] for _ in range(T)]
    xs = [[[0.0, 0.0] for _ in range(NB)] for _ in range(32)]
    for ch in range(K // 64):
        for lane in range(32):
            g, t = lane >> 2, lane & 3
            for nb in range(NB):
                for h in range(2):
                    if 8 * nb + 2 * t + h < rows:
                        xs[lane][nb][h] += xsum[8 * nb + 2 * t + h][ch]
        for step in range(4):
            r, p = step >> 1, 2 * (step & 1)
            for i in range(T):
                a_regs = []
                for lane in range(32):
                    g, t = lane >> 2, lane & 3
                    wa, wb = (int(qw[8 * ch + 2 * t + r, col(g, 2 * i + hf)]) for hf in (0, 1))
                    a_regs.append([code2(wa, p), code2(wb, p), code2(wa, p + 1), code2(wb, p + 1)])
                for nb in range(NB):
                    b_regs = []
                    for lane in range(32):
                        g, t = lane >> 2, lane & 3
                        m = 8 * nb + g
                        v = pairs[m][8 * ch + 2 * t + r] if m < rows else [(0.0, 0.0)] * 4
                        b_regs.append([v[p], v[p + 1]])
                    acc[i][nb] = _mma_16816(a_regs, b_regs, acc[i][nb])
        if ((8 * ch + 8) // (gs // 8)) != (8 * ch) // (gs // 8) or ch == K // 64 - 1:  # the group's last chunk
            grp = (8 * ch) // (gs // 8)
            for lane in range(32):
                g = lane >> 2
                for j in range(4 * c):
                    i, half, n = j >> 1, j & 1, col(g, j)
                    for nb in range(NB):
                        for h in range(2):
                            e = 2 * half + h
                            a = acc[i][nb][lane][e] - (128 + z[grp, n]) * xs[lane][nb][h]
                            tot[i][nb][lane][e] += s[grp, n] * a
                            acc[i][nb][lane][e] = 0.0
                xs[lane] = [[0.0, 0.0] for _ in range(NB)]
    y = np.full((rows, N), np.nan)
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for i in range(T):
            for nb in range(NB):
                for e in range(4):
                    j, m = 2 * i + (e >> 1), 8 * nb + 2 * t + (e & 1)
                    if m < rows:
                        assert np.isnan(y[m, col(g, j)])
                        y[m, col(g, j)] = tot[i][nb][lane][e]
    assert not np.isnan(y).any()  # every (row, column) written once
    assert np.array_equal(y, x @ W)


def _consts(f16: bool) -> dict[str, int]:
    """gemv.cu's float constants for float16 (``GV_F16``) or bfloat16 ``x``, read from the source."""
    src = cuda.SOURCE.read_text()
    block = src[src.index("#if GV_F16\n#define MAGIC"):]
    block = block[:block.index("#endif")]
    f16_part, bf16_part = block.split("#else")
    return {k: int(v, 16) for k, v in re.findall(r"#define (\w+) (0x[0-9A-F]+)u", f16_part if f16 else bf16_part)}


def _window3(w: list[int], s: int) -> int:
    """gemv.cu's ``window3`` over the block's words ``w`` (as Python ints), 32 bits."""
    if s < 0:
        return (w[0] << -s) & 0xFFFFFFFF
    i, o = s >> 5, s & 31
    if o == 0:
        return w[i]
    if i == 2 or s + 19 <= 32 * (i + 1):
        return w[i] >> o
    return ((w[i + 1] << 32 | w[i]) >> o) & 0xFFFFFFFF  # shf.r.clamp: (hi:lo) >> o


@pytest.mark.parametrize("f16", [False, True])
def test_three_bit_pairs_give_exact_code_minus_zero_and_sums(f16):
    """The 3-bit block of gemv.cu emulated with its own constants: each pair register holds exactly
    ``(code_j − z, code_{j+4} − z)``, and with small-integer x (exact in 16 bits) a block's sum is exact."""
    import numpy as np

    c = _consts(f16)
    mask = int(re.search(r"lop3_or_and\(t, (0x[0-9a-f]+)u, MAGIC2\), ONE_SIXTEENTH", cuda.SOURCE.read_text()).group(1),
               16)
    from tests.test_ptx import bf16_bits, bf16_round, f16_bits

    to_float = (lambda h: float(np.uint16(h).view(np.float16))) if f16 else (
        lambda h: float(np.uint32(h << 16).view(np.float32)))

    def to_bits(v: float) -> int:  # nearest 16-bit float, ties to even (the PTX tests' roundings)
        a = np.array([v], dtype=np.float64)
        return int((f16_bits(a) if f16 else bf16_bits(bf16_round(a)))[0])

    def fma2(a: int, b: int, d: int) -> int:  # per half: a·b + d, rounded once
        lo = to_bits(to_float(a & 0xFFFF) * to_float(b & 0xFFFF) + to_float(d & 0xFFFF))
        hi = to_bits(to_float(a >> 16) * to_float(b >> 16) + to_float(d >> 16))
        return hi << 16 | lo

    rng = np.random.default_rng(7)
    for _ in range(40):
        codes = [int(v) for v in rng.integers(0, 8, 32)]
        z = int(rng.integers(0, 8))
        x = [int(v) for v in rng.integers(-3, 4, 32)]
        stream = sum(q << (3 * j) for j, q in enumerate(codes))
        words = [(stream >> (32 * i)) & 0xFFFFFFFF for i in range(3)]
        nz3 = (c["NZ_BASE"] | z) << 16 | (c["NZ16_BASE"] | z << 4)
        total = 0.0
        for r in range(4):
            a = 0x80008000
            for i in range(4):
                j = 8 * r + i
                t = _window3(words, 3 * j - 4)
                q = fma2((t & mask) | c["MAGIC"] * 0x10001, c["ONE_SIXTEENTH"], nz3)
                assert (to_float(q & 0xFFFF), to_float(q >> 16)) == (codes[j] - z, codes[j + 4] - z), (j, z)
                xp = to_bits(x[j + 4]) << 16 | to_bits(x[j])  # staged as (x_j, x_j+4)
                a = fma2(q, xp, a if i else 0x80008000)
            total += to_float(a & 0xFFFF) + to_float(a >> 16)
        assert total == sum(xv * (q - z) for xv, q in zip(x, codes, strict=True))


def test_every_tuning_candidate_of_the_cuda_kernels_takes_the_llama_shapes():
    """Tuning's ``cuda`` candidates at 2–8 rows and ``mma`` candidates at 2–16 fit every row count they are
    offered for on LLaMA-7B's shapes (tuning would skip a refused one silently; the GPU tests expect none
    skipped there, act-order's x at 8 × 11008 aside)."""
    from quantizers.kernels.triton_gemm import CUDA_ROWS_CONFIGS, MMA_CONFIGS

    for K, N in ((4096, 4096), (4096, 11008), (11008, 4096)):
        for bits in cuda.BITS:
            for cfg in CUDA_ROWS_CONFIGS:
                for M in (2, 5, 8):
                    assert cuda.supports(_Rt(bits=bits, K=K, N=N), M, torch.bfloat16, cfg) is None, (cfg.name(), M)
        for cfg in MMA_CONFIGS:
            for M in (2, 9, 16):
                assert cuda.supports(_Rt(K=K, N=N), M, torch.bfloat16, cfg) is None, (cfg.name(), K, N, M)


# --------------------------------------------------------------------- the read reference (stream.cu)


READ_VARIANTS = [cuda.READ_SHAPES[0], cuda.ReadShape(8, 256, 8, 1), cuda.ReadShape(2, 1024, 4, 2, True),
                 cuda.ReadShape(4, 512, 2, 0, True), cuda.ReadShape(1, 1024, 8, 1, True),
                 cuda.ReadShape(0, 128, 1, 0), cuda.ReadShape(0, 256, 8, 1), cuda.ReadShape(0, 512, 4, 0, True)]


@pytest.mark.skipif(NVCC is None, reason="no nvcc")
@pytest.mark.parametrize("arch", ["80", "90"])
@pytest.mark.parametrize("shape", READ_VARIANTS, ids=lambda s: s.name().replace(" ", "-"))
def test_read_kernel_compiles_without_spills(arch, shape, tmp_path):
    pdl = shape.pdl if arch == "90" else 0  # griddepcontrol is sm_90+; the launcher asks for it there only
    flags = [f"-DRS_TPB={shape.threads}", f"-DRS_UNROLL={shape.unroll}", f"-DRS_PDL={pdl}",
             f"-DRS_CHUNK={int(shape.chunk)}", f"-DRS_SLOTS={cuda.READ_SLOTS}"]
    compiles_without_spills(arch, cuda.READ_SOURCE, flags, shape.threads, tmp_path)


def test_read_shapes_are_distinct_launches_that_fit_a_block():
    names = [s.name() for s in cuda.READ_SHAPES]
    assert len(set(names)) == len(names) == 54
    assert all(s.threads <= 1024 and s.threads % 32 == 0 and s.blocks * s.threads <= 2048 for s in cuda.READ_SHAPES)


@pytest.mark.parametrize("threads,unroll,n16,blocks", [(128, 1, 1000, 8), (256, 8, 2048, 1), (256, 8, 2049, 2),
                                                       (1024, 4, 1, 1)])
def test_one_round_grid_gives_every_word_one_load(threads, unroll, n16, blocks):
    shape = cuda.ReadShape(0, threads, unroll)
    assert shape.grid(n16, 132) == blocks and blocks * threads * unroll >= n16 > (blocks - 1) * threads * unroll
    assert cuda.ReadShape(2, 1024, 4).grid(n16, 132) == 264  # persistent: blocks a multiprocessor


def test_read_xor_names_what_it_cannot_read():
    out = torch.zeros(cuda.READ_SLOTS, dtype=torch.int32)
    with pytest.raises(ValueError, match="reads a CUDA tensor"):
        cuda.read_xor(torch.zeros(64, dtype=torch.int32), out)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", READ_VARIANTS, ids=lambda s: s.name().replace(" ", "-"))
def test_read_xor_reads_every_word_once(shape):
    import numpy as np

    n = 4 * (132 * 1024 * 3 + 77)  # 32-bit words: no multiple of a grid's round
    gen = torch.Generator().manual_seed(n)
    host = torch.randint(-2**31, 2**31, (n,), dtype=torch.int64, generator=gen).to(torch.int32)
    want = int(np.bitwise_xor.reduce(host.numpy()))
    buf, out = host.cuda(), torch.zeros(cuda.READ_SLOTS, dtype=torch.int32, device="cuda")

    def result() -> int:
        return int(np.bitwise_xor.reduce(out.cpu().numpy()))

    cuda.read_xor(buf, out, shape)
    assert result() == want
    buf[-1] ^= 1 << 30  # the last word (the remainder's loop) and the first count
    buf[0] ^= 1
    out.zero_()
    cuda.read_xor(buf, out, shape)
    assert result() == want ^ (1 << 30) ^ 1
    cuda.read_xor(buf, out, shape)  # folded into out: the same words again cancel
    assert result() == 0
    with pytest.raises(ValueError, match="16-byte aligned"):
        cuda.read_xor(buf[1:5], out, shape)
    with pytest.raises(ValueError, match="4096 contiguous int32"):
        cuda.read_xor(buf, out[:1], shape)
