"""``y = x Wᵀ (+ b)`` with ``W`` GPTQ-packed (2, 3, 4, 8 bits), dequantized on the fly inside the product.

Importing this module registers the ``"triton"`` backend of :class:`~quantizers.qlinear.QuantLinear`
(``path``: the kernel that ran last, one of ``PATHS``: ``triton-gemv-bf16x2-splitk``, ``triton-dot-dq16``, …).

**Runtime layout** (:class:`Runtime`, built once per module by :func:`prepare`; the checkpoint layout
stays the export format):

* codes: the GPTQ ``qweight`` stream itself, packed along ``in`` (2/4/8 bits: 16/8/4 whole codes per
  int32; 3 bits: blocks of 32 codes in 3 words, codes 10 and 21 straddling), in *sorted-group* order.
  Without act-order ``g_idx`` is already sorted and the module's own ``qweight`` is used, no copy.
* act-order: ``perm = argsort(g_idx, stable)``; the code rows are repacked in that order and the kernels
  read ``x[:, perm[k]]`` instead of ``x[:, k]``: the same sum, but every group is a contiguous run of
  ``k``, so a tile needs one scale and one zero per column instead of one per element. The GEMV gathers
  its one row as it goes (or reads it gathered ahead, ``Config.gather``: the 2-bit default); for the dot
  kernel ``x``'s columns are put in that order once per call by a small kernel (:func:`gather_columns`:
  1.6–2.2 µs at M ≤ 16 on an H200, against 4.5–5.1 for ``index_select``), so its tiles read contiguous
  rows as without act-order (gathering inside the dot kernel, even a tile ahead, measured 2–10× slower:
  scattered 2-byte loads do not pipeline).
* launches overlap (sm_90 and newer, :func:`pdl_runs`): every kernel here is launched with programmatic
  dependent launch and waits (``gdc_wait``) for the kernel before it before reading anything, so its
  launch overlaps that kernel's end; the gather lets the product start once its stores are done. The
  CUDA GEMV goes further: its blocks load their first weights before they wait (a weight's first
  product is launched plainly, so whatever wrote the weights has finished: :attr:`Runtime.settled`).
* launches from Python (:class:`_Direct`): a plan's first call of each kind goes through Triton, later
  ones hand their arguments in order straight to the compiled kernel's launcher (Triton's per-call
  binding of some 40 arguments was most of a product's launch cost in an eager decode).
* ``scales`` (G, out) float16: the module's buffer. ``zeros`` (G, out) uint8, unpacked once (v1's
  ``zero − 1`` convention undone).

**Dequantization, bfloat16 pairs** (GEMV with bfloat16 ``x`` at 2, 3 and 4 bits, the default there;
:mod:`quantizers.kernels.ptx`): two codes of a packed block share a 32-bit register as two bfloat16
numbers ``128 + code`` (one shift, or a funnel shift where 3-bit codes straddle words, and one
and-or), one packed FMA subtracts ``128 + zero`` exactly, one packed FMA multiplies by the matching
pair of ``x`` and accumulates: about 2.4 instructions per code against 3.6–4.6 for the float32 path
below. Products are summed in bfloat16 over 4 pairs (8 at 2 bits) before each widening to float32:
relative error about 3e-3 against the float32 product at LLaMA-7B shapes, against 1.7e-3 for the
float32 path (bfloat16 output rounding alone). float16 ``x``, 8 bits, irregular groups and GPUs
before compute capability 8.0 take the float32 path (:func:`pair_path_runs`).

**Dequantization, float32** (GEMV, :func:`_code`): a code at bits ``p .. p + bits`` of a word with
``p + bits ≤ 23`` is masked in place and or-ed with the float32 exponent of ``2**(23 − p)``: the float
reads ``2**(23 − p) + code`` exactly, so one and-or plus one subtraction of ``2**(23 − p) + zero`` gives
``code − zero`` (no shift, no int→float conversion); codes above bit 23 are read the same way from the
word shifted right by 12. The dot kernel shifts each code down, converts it and subtracts the zero
(``code − zero`` is exact in 16 bits). The scale comes once per packed word (GEMV) or once per tile
(dot): ``Σ_k x_k s (q_k − z) = s Σ_k x_k (q_k − z)``. Accumulation is float32; the output has ``x``'s
dtype.

**Kernels** (picked by the row count ``M`` of ``x``; :func:`default_config`):

* ``gemv`` (``M ≤ GEMV_MAX_M``): one row of ``x`` per program, CUDA-core FMAs (bfloat16 pairs or
  float32) on (blocks, columns) tiles of packed words, the tile's ``x`` (gathered under act-order) read
  by every thread or once per program and regrouped (``xsplit``); split-K over enough programs to fill
  the GPU.
* ``cuda`` (1 to 8 rows, a tuning candidate, :mod:`quantizers.kernels.cuda`): the CUDA C++ GEMV of
  ``gemv.cu``, compiled at run time by NVRTC, at 2, 3 and 4 bits with 16-bit ``x`` and regular groups. A
  block of many warps covers 32 columns and splits its K range between its warps, which add up in
  shared memory (no split-K atomics); ``x`` waits in shared memory, the words, scales and zeros of the
  next steps in registers. Faster than ``gemv`` where one block per SM covers the GPU (4096×4096 on an
  H200: there its first weights arrive while the kernel before it ends), slower elsewhere; tuning
  decides. At 2 to 8 rows each dequantized pair serves every row (3 bits: faster than ``dot`` there).
* ``mma`` (2 to 16 rows, 4 bits, a tuning candidate): ``gemv.cu``'s tensor-core variant,
  ``mma.sync.m16n8k16`` fed straight from the GPTQ layout (act-order's ``x`` gathered first).
* ``dot`` (larger ``M``): one ``tl.dot`` (tensor cores) of (BM, BK) contiguous ``x`` with the dequantized
  (BK, BN) tile per K tile, optional split-K. At 2 and 4 bits with 16-bit ``x`` (``triton-dot-dq16``) each
  thread dequantizes runs of 8 codes it loaded itself straight into ``x``'s dtype, two codes per
  instruction (:func:`ptx.run_asm`: the codes' bits under the exponent of ``2**7`` (bfloat16) or
  ``2**10`` (float16), then one packed FMA subtracts ``2**e + zero``: exact; interpreted, the same per
  code in Triton); at up to 16 rows the weights are the left operand (``Config.swap``). Otherwise the
  tile's words are spread over their codes in plain ``k`` order and converted through float32.

**Tuning** (:func:`tuned_config`): a product without an explicit config times the :func:`candidates`
for its row count (several tiles; the GEMV for one row, dot tiles above) once per (bits, shape, groups,
act-order, row bucket, dtype, device), back to back over copies of its weights that outgrow the L2 cache
(as the benchmark does), and keeps the fastest for the process (the default unless another is 3% faster);
``HARNESS_KERNEL_TUNE=0`` keeps the hand-picked :func:`default_config`. Never during CUDA-graph capture.

Split-K partial sums meet in a float32 workspace by atomic adds; the last program of a tile (an atomic
counter says which) reads the sum back (the adds are relaxed atomics: one fence per program, on the
counter, instead of one per element), zeroing the workspace and the counter as it goes, and writes
the output: one launch, and the workspace stays zero between launches. One workspace per (device,
stream); the sum's order varies, so results can differ in the last bits from run to run.

Both kernels also run under Triton's CPU interpreter (``TRITON_INTERPRET=1`` set before Triton is
imported); there ``tl.dot`` takes float32 operands (the interpreter has no bfloat16 matmul) and
float32 → bfloat16 rounds toward zero (compiled: to nearest).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

import torch
import triton
import triton.language as tl

from quantizers.kernels import cuda, current_stream, device_index, gpu, l2_copies, ptx
from quantizers.kernels.ptx import PAIR_BITS, RUN_CONSTRAINTS, pair_asm, pair_constraints, run_asm
from quantizers.pack import unpack_rows
from quantizers.qlinear import Backend, QuantLinear, register_backend

try:  # the launch hooks Triton passes to a kernel's launcher (Triton 3.3 and newer); else no direct launches
    from triton import knobs as _knobs
except ImportError:  # pragma: no cover
    _knobs = None

try:  # grid dependency control (programmatic dependent launch, sm_90+): Triton 3.3 and newer
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older Triton: act-order's two launches simply run one after the other
    gdc_launch_dependents = gdc_wait = None

BLOCKS = {2: (16, 1), 3: (32, 3), 4: (8, 1), 8: (4, 1)}  # bits → (codes, int32 words) of one packed block
MAGIC: tl.constexpr = tl.constexpr(0x4B000000)  # float32 bits of 2**23: (MAGIC | q) reads as 2**23 + q
HIGH = 12  # codes above bit 23 are read from word >> HIGH: at bits 8..20 there (a kernel constexpr)
GEMV_MAX_M = 1  # rows of x up to which the GEMV kernel runs (one program per row); the tl.dot kernel above
PATHS = {"gemv": "triton-gemv-splitk", "gemv-pairs": "triton-gemv-bf16x2-splitk", "dot": "triton-dot",
         "dot-magic": "triton-dot-dq16", "cuda": "cuda-gemv", "mma": "cuda-mma",
         "mma-sw": "cuda-mma-sw"}
RUN_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}  # the names ptx.run_asm takes
# bits of 2**7 (bfloat16) and 2**10 (float16), whose ulp is 1: MAGIC16 | code = 2**e + code
MAGIC16 = {dtype: ptx.RUN_FLOATS[name][0] for dtype, name in RUN_DTYPE_NAMES.items()}
DQ16_BITS = (2, 4)  # where the dot kernel dequantizes into x's 16-bit dtype (magic_bits)
RUN_DTYPES = {MAGIC16[dtype]: name for dtype, name in RUN_DTYPE_NAMES.items()}  # MAGIC16 → ptx.run_asm's dtype


def interpreted() -> bool:
    """Whether the kernels run under Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    return not isinstance(_gemv_kernel, triton.runtime.JITFunction)


def runs_on(device: torch.device) -> bool:
    """Whether the kernels can take tensors on ``device``: compiled, a CUDA GPU; interpreted, any."""
    return interpreted() or device.type == "cuda"


# --------------------------------------------------------------------------------------------- kernels


@triton.jit
def _code(lo, hw, nxt, magic, s: tl.constexpr, BITS: tl.constexpr, HIGH: tl.constexpr):
    """The code at bit ``s`` of the words ``lo`` (blocks, BN) uint32, as the float32 ``2**(23 − p) + code``.

    A code below bit 23 is masked in place (``p = s``, one and-or, no shift) and given the exponent that
    makes its lowest bit worth 1; codes above come from ``hw = lo >> HIGH`` (``p = s − HIGH`` ≥ 8); one
    running into the next word ``nxt`` (3 bits: codes 10 and 21 of each 32) is shifted down (``p = 0``).
    ``magic`` is ``MAGIC`` passed at run time: in a register, mask-and-or is one instruction."""
    MAXQ: tl.constexpr = (1 << BITS) - 1
    if s + BITS > 32:
        c = ((lo >> s) | (nxt << (32 - s))) & MAXQ
        e = magic
    elif s + BITS <= 23:
        c = lo & (MAXQ << s)
        e = magic - (s << 23)
    else:
        c = hw & (MAXQ << (s - HIGH))
        e = magic - ((s - HIGH) << 23)
    return (c | e).to(tl.float32, bitcast=True)


@triton.jit
def _load_words(QW, t, offs_b, offs_n, n_ok, N, K, BB: tl.constexpr, PER: tl.constexpr, WORDS: tl.constexpr,
                UNMASKED: tl.constexpr, STREAM: tl.constexpr):
    """The packed words of tile ``t`` (``BB`` blocks × BN columns) as uint32: ``w0`` and, at 3 bits, the
    block's second and third words ``w1``, ``w2`` (else copies of ``w0``). ``STREAM``: read once."""
    ptrs = QW + ((t * BB + offs_b) * WORDS)[:, None] * N + offs_n[None, :]  # (BB, BN) first word of each block
    mask = (((t * BB + offs_b) * PER) < K)[:, None] & n_ok[None, :]
    w0 = _load(ptrs, mask, UNMASKED, STREAM)
    w1 = w0
    w2 = w0
    if WORDS == 3:
        w1 = _load(ptrs + N, mask, UNMASKED, STREAM)
        w2 = _load(ptrs + 2 * N, mask, UNMASKED, STREAM)
    return w0, w1, w2


@triton.jit
def _group(t, BK: tl.constexpr, group_size, GROUP_LOG: tl.constexpr):
    """The group of K tile ``t`` (the tile lies in one group): a shift where a group is ``2**GROUP_LOG`` tiles
    (:func:`_group_log`), else a division."""
    if GROUP_LOG >= 0:
        g = t >> GROUP_LOG
    else:
        g = (t * BK) // group_size
    return g


@triton.jit
def _load(ptrs, mask, UNMASKED: tl.constexpr, STREAM: tl.constexpr):
    if UNMASKED:
        if STREAM:
            w = tl.load(ptrs, eviction_policy="evict_first")
        else:
            w = tl.load(ptrs)
    else:
        if STREAM:
            w = tl.load(ptrs, mask=mask, other=0, eviction_policy="evict_first")
        else:
            w = tl.load(ptrs, mask=mask, other=0)
    return w.to(tl.uint32, bitcast=True)


@triton.jit
def _select_code(w0, w1, w2, hw0, hw1, hw2, magic, j: tl.constexpr, BITS: tl.constexpr, HIGH: tl.constexpr):
    """Code ``j`` of each block (see :func:`_code`) from the block's words."""
    bit: tl.constexpr = BITS * j
    if bit // 32 == 0:
        f = _code(w0, hw0, w1, magic, bit % 32, BITS, HIGH)
    elif bit // 32 == 1:
        f = _code(w1, hw1, w2, magic, bit % 32, BITS, HIGH)
    else:
        f = _code(w2, hw2, w2, magic, bit % 32, BITS, HIGH)
    return f


@triton.jit
def _column(xt, j: tl.constexpr, BB: tl.constexpr, PER: tl.constexpr, LOG_PER: tl.constexpr):
    """Column ``j`` of ``xt`` (BB, PER) as (BB,), by halving the last dimension ``LOG_PER`` times."""
    cur = xt
    for level in tl.static_range(LOG_PER):
        a, b = tl.split(tl.reshape(cur, (BB, PER >> (level + 1), 2)))
        if (j >> level) & 1:
            cur = b
        else:
            cur = a
    return tl.reshape(cur, (BB,))


PAIR_ASM2: tl.constexpr = tl.constexpr(pair_asm(2))
PAIR_ASM3: tl.constexpr = tl.constexpr(pair_asm(3))
PAIR_ASM4: tl.constexpr = tl.constexpr(pair_asm(4))
PAIR_IO2: tl.constexpr = tl.constexpr(pair_constraints(2))
PAIR_IO3: tl.constexpr = tl.constexpr(pair_constraints(3))
PAIR_IO4: tl.constexpr = tl.constexpr(pair_constraints(4))


@triton.jit
def _block_dot(w0, w1, w2, zz, xp, BITS: tl.constexpr, BB: tl.constexpr):
    """``Σ x (code − zero)`` of each packed block (words ``w0`` and, at 3 bits, ``w1``, ``w2``: (BB, BN)
    uint32), by :func:`ptx.pair_asm`; ``zz`` (BN,) the zeros as :func:`ptx.zero_pair` packs them, ``xp``
    (BB, pairs) the pairs of ``x`` in :func:`ptx.pair_plan` order."""
    P: tl.constexpr = 16 // BITS if BITS != 3 else 16  # pairs per block
    LOG_P: tl.constexpr = 3 if BITS == 2 else (4 if BITS == 3 else 2)
    zc = zz[None, :]
    if BITS == 2:
        r = tl.inline_asm_elementwise(PAIR_ASM2, PAIR_IO2, [
            w0, zc, _column(xp, 0, BB, P, LOG_P)[:, None], _column(xp, 1, BB, P, LOG_P)[:, None],
            _column(xp, 2, BB, P, LOG_P)[:, None], _column(xp, 3, BB, P, LOG_P)[:, None],
            _column(xp, 4, BB, P, LOG_P)[:, None], _column(xp, 5, BB, P, LOG_P)[:, None],
            _column(xp, 6, BB, P, LOG_P)[:, None], _column(xp, 7, BB, P, LOG_P)[:, None]],
            dtype=tl.float32, is_pure=True, pack=1)
    elif BITS == 3:
        r = tl.inline_asm_elementwise(PAIR_ASM3, PAIR_IO3, [
            w0, w1, w2, zc, _column(xp, 0, BB, P, LOG_P)[:, None], _column(xp, 1, BB, P, LOG_P)[:, None],
            _column(xp, 2, BB, P, LOG_P)[:, None], _column(xp, 3, BB, P, LOG_P)[:, None],
            _column(xp, 4, BB, P, LOG_P)[:, None], _column(xp, 5, BB, P, LOG_P)[:, None],
            _column(xp, 6, BB, P, LOG_P)[:, None], _column(xp, 7, BB, P, LOG_P)[:, None],
            _column(xp, 8, BB, P, LOG_P)[:, None], _column(xp, 9, BB, P, LOG_P)[:, None],
            _column(xp, 10, BB, P, LOG_P)[:, None], _column(xp, 11, BB, P, LOG_P)[:, None],
            _column(xp, 12, BB, P, LOG_P)[:, None], _column(xp, 13, BB, P, LOG_P)[:, None],
            _column(xp, 14, BB, P, LOG_P)[:, None], _column(xp, 15, BB, P, LOG_P)[:, None]],
            dtype=tl.float32, is_pure=True, pack=1)
    else:
        r = tl.inline_asm_elementwise(PAIR_ASM4, PAIR_IO4, [
            w0, zc, _column(xp, 0, BB, P, LOG_P)[:, None], _column(xp, 1, BB, P, LOG_P)[:, None],
            _column(xp, 2, BB, P, LOG_P)[:, None], _column(xp, 3, BB, P, LOG_P)[:, None]],
            dtype=tl.float32, is_pure=True, pack=1)
    return r


@triton.jit
def _finish(acc, y_ptrs, ws_ptrs, wsi_ptrs, cnt_ptr, mask, bias, SPLIT: tl.constexpr):
    """Write ``acc + bias`` to ``y_ptrs``; with ``SPLIT`` add ``acc`` into the workspace (``ws_ptrs``
    float32, ``wsi_ptrs`` the same words as int32) instead and let the last of the K-split programs of
    this tile (counted on ``cnt_ptr``) write the total."""
    if SPLIT:
        # the adds are relaxed (no fence per element); the barrier orders every thread's adds before the
        # counter's acq_rel add (one thread), which publishes them; the last program reads after its acquire
        tl.atomic_add(ws_ptrs, acc, mask=mask, sem="relaxed")
        tl.debug_barrier()
        done = tl.atomic_add(cnt_ptr, 1, sem="acq_rel")
        last = done == tl.num_programs(1) - 1
        total = tl.atomic_xchg(wsi_ptrs, tl.zeros_like(acc).to(tl.int32), mask=mask & last, sem="relaxed")
        acc = tl.where(mask & last, total.to(tl.float32, bitcast=True), 0.0)  # read and re-zeroed in one step
        tl.atomic_xchg(cnt_ptr, 0, mask=last, sem="relaxed")
        mask = mask & last
    tl.store(y_ptrs, (acc + bias).to(y_ptrs.dtype.element_ty), mask=mask)


# GROUPING (how the tile finds scales and zeros): TILE, the whole tile lies in one group (a (BN,) scale
# and zero); ELEMENT, groups are irregular (scale and zero gathered for every element).
TILE: tl.constexpr = tl.constexpr(0)
ELEMENT: tl.constexpr = tl.constexpr(2)


@triton.jit(do_not_specialize=["tiles_per_split"])  # 1 or more: one compiled kernel
def _gemv_kernel(
    X, stride_xm, stride_xk,  # (M, K) activations
    QW,  # (K·bits/32, N) int32 packed codes, sorted-group order
    S, Z,  # (G, N) float16 scales, uint8 zeros
    PERM,  # (K,) int32 column of x for each sorted k (HAS_PERM)
    GIDX,  # (K,) int32 group of each sorted k (ELEMENT)
    BIAS,  # (N,) (HAS_BIAS)
    Y, stride_ym, stride_yn,  # (M, N) output
    WS, WSI, CNT,  # split-K workspace (M, N) float32 (and as int32) and counters (M · N tiles) int32, zero on entry
    N, K, group_size, tiles_per_split,
    magic,  # MAGIC, passed at run time (see _code)
    BITS: tl.constexpr, PER: tl.constexpr, WORDS: tl.constexpr, BB: tl.constexpr, BN: tl.constexpr,
    SPLIT: tl.constexpr, GROUPING: tl.constexpr, HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, HIGH: tl.constexpr, XSPLIT: tl.constexpr, LOG_PER: tl.constexpr,
    PREFETCH: tl.constexpr, PAIRS: tl.constexpr, GROUP_LOG: tl.constexpr, D: tl.constexpr, ZLO: tl.constexpr,
    ZLO_SHIFT: tl.constexpr, ZHI: tl.constexpr, PDL: tl.constexpr,
):
    """One row ``m`` of ``x`` × a (K range, BN) slice of ``W``: program (n tile, k split, m).

    CUDA-core FMAs on (BB blocks, BN columns) tiles of packed words. ``PAIRS``: one inline-PTX block per
    packed block (:func:`_block_dot`), two codes per instruction; else per code one and-or, one
    subtraction, one FMA (:func:`_code`). The scale once per block. ``GROUPING`` TILE or ELEMENT (the
    float32 path only). ``PDL``: launched while the kernel before it may still run (as in
    :func:`_dot_kernel`)."""
    if PDL:
        gdc_wait()
    pid_n, pid_k, m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    BK: tl.constexpr = BB * PER  # codes of k per tile
    offs_n = pid_n * BN + tl.arange(0, BN)  # (BN,)
    n_ok = offs_n < N
    offs_b = tl.arange(0, BB)  # (BB,) packed blocks of the tile
    x_row = X + m * stride_xm
    t0 = pid_k * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, tl.cdiv(K, BK))
    acc = tl.zeros((BB, BN), dtype=tl.float32)
    if PREFETCH:  # registers hold the next tile's words while this one is computed
        wn0, wn1, wn2 = _load_words(QW, t0, offs_b, offs_n, n_ok, N, K, BB, PER, WORDS, EVEN_K and EVEN_N, True)
    for t in range(t0, t1):
        if PREFETCH:
            w0, w1, w2 = wn0, wn1, wn2
            wn0, wn1, wn2 = _load_words(QW, tl.minimum(t + 1, t1 - 1), offs_b, offs_n, n_ok, N, K, BB, PER, WORDS,
                                        EVEN_K and EVEN_N, True)
        else:
            w0, w1, w2 = _load_words(QW, t, offs_b, offs_n, n_ok, N, K, BB, PER, WORDS, EVEN_K and EVEN_N, True)
        if not PAIRS:  # the float32 path's high halves (see _select_code)
            hw0 = w0 >> HIGH
            hw1 = w1 >> HIGH
            hw2 = w2 >> HIGH
        if GROUPING == TILE:  # one scale and zero per column
            g = _group(t, BK, group_size, GROUP_LOG)
            sc = tl.load(S + g * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)  # (BN,)
            if PAIRS:  # the zero as ptx.zero_pair packs it
                zu = tl.load(Z + g * N + offs_n, mask=n_ok, other=0).to(tl.uint32)
                zz = (ZLO | (zu << ZLO_SHIFT)) | ((ZHI | zu) << 16)
            else:
                zf = tl.load(Z + g * N + offs_n, mask=n_ok, other=0).to(tl.float32)  # (BN,)
        part = tl.zeros((BB, BN), dtype=tl.float32)
        if XSPLIT:  # the tile's x read once (gathered under act-order), one element per thread
            kt = t * BK + tl.arange(0, BK)
            if HAS_PERM:
                xkt = tl.load(PERM + kt, mask=kt < K, other=0)
            else:
                xkt = kt
            xs = tl.load(x_row + xkt * stride_xk, mask=kt < K, other=0.0)  # (BK,)
        if PAIRS:  # bfloat16 x, TILE grouping, 2, 3 or 4 bits: packed pairs (see ptx.pair_asm); the x pairs:
            P: tl.constexpr = PER // 2  # pairs (j, j + D) per block, runs of D pairs over 2D codes
            pidx = tl.arange(0, P)
            klo = t * BK + (tl.arange(0, BB) * PER)[:, None] + ((pidx // D) * (2 * D) + pidx % D)[None, :]
            khi = klo + D
            if XSPLIT:  # regrouped into the pairs
                xg = xs.to(tl.uint16, bitcast=True)
                lo, hi = tl.split(tl.permute(tl.reshape(xg, (BB, PER // (2 * D), 2, D)), (0, 1, 3, 2)))
                lo = tl.reshape(lo, (BB, P))
                hi = tl.reshape(hi, (BB, P))
            elif EVEN_K:
                if HAS_PERM:
                    xlo = tl.load(PERM + klo)
                    xhi = tl.load(PERM + khi)
                else:
                    xlo = klo
                    xhi = khi
                lo = tl.load(x_row + xlo * stride_xk)
                hi = tl.load(x_row + xhi * stride_xk)
            else:
                if HAS_PERM:
                    xlo = tl.load(PERM + klo, mask=klo < K, other=0)
                    xhi = tl.load(PERM + khi, mask=khi < K, other=0)
                else:
                    xlo = klo
                    xhi = khi
                lo = tl.load(x_row + xlo * stride_xk, mask=klo < K, other=0.0)
                hi = tl.load(x_row + xhi * stride_xk, mask=khi < K, other=0.0)
            lo = lo.to(tl.uint16, bitcast=True)
            hi = hi.to(tl.uint16, bitcast=True)
            part = _block_dot(w0, w1, w2, zz, lo.to(tl.uint32) | (hi.to(tl.uint32) << 16), BITS, BB)
        if XSPLIT and not PAIRS:
            xt = tl.reshape(xs.to(tl.float32), (BB, PER))
        for j in tl.static_range(0 if PAIRS else PER):
            k = t * BK + offs_b * PER + j  # (BB,) sorted k of code j of each block
            k_ok = k < K
            if XSPLIT:
                xj = _column(xt, j, BB, PER, LOG_PER)
            else:
                if HAS_PERM:
                    xk = tl.load(PERM + k, mask=k_ok, other=0)
                else:
                    xk = k
                if EVEN_K:
                    xj = tl.load(x_row + xk * stride_xk).to(tl.float32)  # (BB,)
                else:
                    xj = tl.load(x_row + xk * stride_xk, mask=k_ok, other=0.0).to(tl.float32)
            f = _select_code(w0, w1, w2, hw0, hw1, hw2, magic, j, BITS, HIGH)  # (BB, BN) 2**(23 − p) + code
            s = (BITS * j) % 32
            p = (s + BITS <= 32) * (s - (s + BITS > 23) * HIGH)
            if GROUPING == TILE:  # (2**(23 − p) + code) − (2**(23 − p) + zero) = code − zero, exactly
                part += xj[:, None] * (f - (zf + (1 << (23 - p)))[None, :])
            else:  # scale and zero of every element
                ge = tl.load(GIDX + k, mask=k_ok, other=0)
                sz = ge[:, None] * N + offs_n[None, :]
                se = tl.load(S + sz, mask=n_ok[None, :], other=0.0).to(tl.float32)
                ze = tl.load(Z + sz, mask=n_ok[None, :], other=0).to(tl.float32)
                part += xj[:, None] * ((f - (ze + (1 << (23 - p)))) * se)
        if GROUPING == TILE:
            acc += part * sc[None, :]  # one multiply per packed word
        else:
            acc += part
    y = tl.sum(acc, axis=0)  # (BN,)
    if HAS_BIAS:
        bias = tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    else:
        bias = 0.0
    _finish(y, Y + m * stride_ym + offs_n * stride_yn, WS + m * N + offs_n, WSI + m * N + offs_n,
            CNT + m * tl.num_programs(0) + pid_n, n_ok, bias, SPLIT)


@triton.jit
def _half_code(w, j: tl.constexpr, BITS: tl.constexpr, MAGIC: tl.constexpr, DT: tl.constexpr):
    """Code ``j`` of a run of 8 codes (``w``: the run at bit 0, uint32) as the 16-bit float ``DT`` whose bits
    are ``MAGIC | code``: ``2**e + code`` exactly (bfloat16 ``0x4300`` = 128, float16 ``0x6400`` = 1024): no
    integer-to-float conversion."""
    if j == 0:
        c = w
    else:
        c = w >> (BITS * j)
    return ((c & ((1 << BITS) - 1)) | MAGIC).to(tl.uint16).to(DT, bitcast=True)


@triton.jit
def _half_codes(w, START: tl.constexpr, STRIDE: tl.constexpr, COUNT: tl.constexpr, BITS: tl.constexpr,
                MAGIC: tl.constexpr, DT: tl.constexpr):
    """Codes ``START, START + STRIDE, …`` (``COUNT`` of them) of each run ``w`` as (…, 2, …, 2): a tree of
    joins (evens, then odds, on the last dimension), so that flattening puts code ``START + i·STRIDE`` at
    ``i`` and a run's codes stay in the registers of the thread that loaded it."""
    if COUNT == 1:
        out = _half_code(w, START, BITS, MAGIC, DT)
    else:
        out = tl.join(_half_codes(w, START, 2 * STRIDE, COUNT // 2, BITS, MAGIC, DT),
                      _half_codes(w, START + STRIDE, 2 * STRIDE, COUNT // 2, BITS, MAGIC, DT))
    return out


@triton.jit
def _gather_cols_kernel(X, stride_xm, stride_xk, PERM, Y, K, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """``Y[m, j] = X[m, PERM[j]]`` for one row ``m`` and ``BLOCK`` columns ``j``: program (column block, row).
    ``PDL``: launched as a programmatic dependent of the kernel before (it waits for it before reading
    ``x``), and the kernel launched next the same way may start once this one has stored (it waits for
    this one's results itself)."""
    if PDL:
        gdc_wait()
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = tl.program_id(1)
    ok = j < K
    src = tl.load(PERM + j, mask=ok, other=0)
    tl.store(Y + m * K + j, tl.load(X + m * stride_xm + src * stride_xk, mask=ok), mask=ok)
    if PDL:  # after the store: letting it launch at the start measured slower where its programs fill the GPU
        gdc_launch_dependents()


def gather_columns(x: torch.Tensor, perm: torch.Tensor, pdl: bool = False) -> torch.Tensor:
    """``x[:, perm]`` as a contiguous (M, K) tensor, by one small kernel (act-order ahead of the ``dot``
    kernel; it runs wherever the other kernels do, interpreted included). ``pdl``: launched with
    programmatic dependent launch, overlapping the kernels before and after it (:func:`pdl_runs`)."""
    M, K = x.shape
    y = torch.empty((M, K), dtype=x.dtype, device=x.device)
    key = (M, K, pdl, x.get_device())  # the device's index (−1: the CPU), as plans are keyed
    launch = _GATHERS.get(key)
    if launch is None:
        fixed = dict(K=K, BLOCK=GATHER_BLOCK, PDL=pdl, **({"launch_pdl": True} if pdl else {}))
        launch = _GATHERS[key] = launcher(_gather_cols_kernel, (triton.cdiv(K, GATHER_BLOCK), M), fixed,
                                          ("X", "stride_xm", "stride_xk", "PERM", "Y"), 3)
    launch((x, x.stride(0), x.stride(1), perm, y))
    return y


GATHER_BLOCK = 1024  # columns a program of the gather
_GATHERS: dict[tuple, _ThroughTriton] = {}  # the gather's launches by (rows, K, overlapped, device index)


@triton.jit
def _repeat8(w):
    """``w`` (…) as (…, 2, 2, 2), every element ``w``'s: 8 copies of one register, no instruction."""
    w = tl.join(w, w)
    w = tl.join(w, w)
    return tl.join(w, w)


RUN_IO: tl.constexpr = tl.constexpr(RUN_CONSTRAINTS)


@triton.jit(do_not_specialize=["tiles_per_split"])  # 1 or more: one compiled kernel
def _dot_kernel(
    X, stride_xm, stride_xk, QW, S, Z, GIDX, BIAS, Y, stride_ym, stride_yn, WS, WSI, CNT,
    M, N, K, group_size, tiles_per_split,
    BITS: tl.constexpr, PER: tl.constexpr, WORDS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    BK: tl.constexpr, SPLIT: tl.constexpr, GROUPING: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr, DOT_F32: tl.constexpr, MAGIC: tl.constexpr, SWAP: tl.constexpr, GROUP_LOG: tl.constexpr,
    PDL: tl.constexpr, RUN_ASM: tl.constexpr, RUN_ZERO: tl.constexpr,
):
    """A (BM, BN) tile of ``y`` over a K range, one ``tl.dot`` of (BM, BK) × (BK, BN) per K tile: program
    (n tile, k split, m tile). The tile's packed words are loaded once and spread over the ``PER`` codes
    each holds (a broadcast, shifted per code: 3 bits pick each code's word and the next one's low bits
    for the straddling codes), so the code tile comes out in plain ``k`` order and ``x`` is read as
    contiguous rows (act-order: ``x``'s columns already in sorted order). ``GROUPING`` TILE (the tile lies in one
    group: the scale multiplies the tile's sum) or ELEMENT (scale and zero of every element).

    ``MAGIC`` (:func:`magic_bits`: 2 and 4 bits, 16-bit ``x``, TILE grouping): the words are read as a
    (BN, runs of 8 codes) tile (4 bits: a word; 2 bits: a 16-bit half) and each thread turns its own runs
    into ``code − zero`` in ``x``'s dtype by :func:`ptx.run_asm` (compiled; interpreted: an and-or per
    code, :func:`_half_codes`, minus ``MAGIC | zero``): exact, no conversion unit, and Triton loads the
    runs straight into the registers ``tl.dot`` reads, where the broadcast path spreads every word over
    threads and goes through shared memory element by element. ``SWAP``: the weights are ``tl.dot``'s
    left operand and ``y`` is accumulated transposed. ``PDL``: launched while the kernel before it
    (act-order's gather, or any other) may still run; nothing is read before ``gdc_wait`` returns (that
    kernel done, its writes visible), so only the launch and the program set-up overlap it."""
    if PDL:
        gdc_wait()
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    MAXQ: tl.constexpr = (1 << BITS) - 1
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    m_ok = offs_m < M
    n_ok = offs_n < N
    offs_k = tl.arange(0, BK)
    t0 = pid_k * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, tl.cdiv(K, BK))
    if SWAP:  # the weights are the left operand of the product: accumulated as yᵀ
        acc = tl.zeros((BN, BM), dtype=tl.float32)
    else:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    if MAGIC:  # the (BN, runs) words of tile 0 that hold each run of 8 codes (bits 8·BITS·r on of a column)
        run = tl.arange(0, BK // 8)
        if BITS == 2:  # a run is one 16-bit half of a word: read as such, no shift
            wa_base = QW.to(tl.pointer_type(tl.uint16)) + (run // 2)[None, :] * (2 * N) + (2 * offs_n)[:, None]
            wa_base += (run % 2)[None, :]
        else:  # 4 bits: a run is a word
            wa_base = QW + run[None, :] * N + offs_n[:, None]
        x_base = X + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    for t in range(t0, t1):
        k = t * BK + offs_k  # (BK,) sorted k
        k_ok = k < K
        if MAGIC:  # (BN, runs of 8 codes) words, each thread dequantizes its own runs into x's dtype
            runs_ok = n_ok[:, None] & ((t * BK + 8 * run) < K)[None, :]
            step = (t * (BK * BITS // 32)) * N  # words before this tile: one scalar step, not a pointer per word
            if BITS == 2:
                if EVEN_K and EVEN_N:
                    vw = tl.load(wa_base + 2 * step, eviction_policy="evict_first").to(tl.uint32)
                else:
                    vw = tl.load(wa_base + 2 * step, mask=runs_ok, other=0, eviction_policy="evict_first")
                    vw = vw.to(tl.uint32)
            else:
                vw = _load(wa_base + step, runs_ok, EVEN_K and EVEN_N, True)
            xt = tl.load(x_base + (t * BK) * stride_xk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # (BM, BK)
            DT: tl.constexpr = X.dtype.element_ty
            g = _group(t, BK, group_size, GROUP_LOG)
            sc = tl.load(S + g * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)  # (BN,)
            zu = tl.load(Z + g * N + offs_n, mask=n_ok, other=0)
            if DOT_F32:  # the interpreter (no inline PTX; its 16-bit float arithmetic works on the raw bits)
                q = tl.reshape(_half_codes(vw, 0, 1, 8, BITS, MAGIC, DT), (BN, BK))  # MAGIC | code
                zm = (zu.to(tl.uint16) | MAGIC).to(DT, bitcast=True)  # MAGIC | zero
                d = q.to(tl.float32) - zm.to(tl.float32)[:, None]
                if SWAP:
                    prod = tl.dot(d, tl.trans(xt.to(tl.float32)), input_precision="ieee")
                else:
                    prod = tl.dot(xt.to(tl.float32), tl.trans(d), input_precision="ieee")
            else:  # code − zero, exact in x's dtype, two codes per instruction (ptx.run_asm)
                nz = (zu.to(tl.uint32) | RUN_ZERO) * 0x10001  # −(2**e + zero) in both halves
                runs = tl.reshape(_repeat8(vw), (BN, BK))  # each code's run (the same register)
                zb = tl.broadcast_to(nz[:, None], (BN, BK))
                d = tl.inline_asm_elementwise(RUN_ASM, RUN_IO, [runs, zb], dtype=X.dtype.element_ty, is_pure=True,
                                              pack=8)
                if SWAP:
                    prod = tl.dot(d, tl.trans(xt))
                else:
                    prod = tl.dot(xt, tl.trans(d))
            if SWAP:
                acc += prod * sc[:, None]
            else:
                acc += prod * sc[None, :]
        else:  # the codes spread over the tile by broadcasting, converted through float32
            if WORDS == 1:  # 2, 4, 8 bits: PER whole codes per word; the (BK / PER, BN) words over PER rows
                BW: tl.constexpr = BK // PER
                rows = t * BW + tl.arange(0, BW)
                ptrs = QW + rows[:, None] * N + offs_n[None, :]
                if EVEN_K and EVEN_N:
                    w = tl.load(ptrs, eviction_policy="evict_first")
                else:
                    w = tl.load(ptrs, mask=(rows * PER < K)[:, None] & n_ok[None, :], other=0,
                                eviction_policy="evict_first")
                w = w.to(tl.uint32, bitcast=True)
                shifts = (tl.arange(0, PER) * BITS).to(tl.uint32)
                c = tl.reshape(tl.broadcast_to(w[:, None, :], (BW, PER, BN)) >> shifts[None, :, None], (BK, BN))
            else:  # 3 bits: blocks of 32 codes in 3 words; codes 10 and 21 run into the next word
                BB3: tl.constexpr = BK // 32
                blk = t * BB3 + tl.arange(0, BB3)
                ptrs = QW + (blk * 3)[:, None] * N + offs_n[None, :]
                if EVEN_K and EVEN_N:
                    w0 = tl.load(ptrs, eviction_policy="evict_first")
                    w1 = tl.load(ptrs + N, eviction_policy="evict_first")
                    w2 = tl.load(ptrs + 2 * N, eviction_policy="evict_first")
                else:
                    ok = (blk * 32 < K)[:, None] & n_ok[None, :]
                    w0 = tl.load(ptrs, mask=ok, other=0, eviction_policy="evict_first")
                    w1 = tl.load(ptrs + N, mask=ok, other=0, eviction_policy="evict_first")
                    w2 = tl.load(ptrs + 2 * N, mask=ok, other=0, eviction_policy="evict_first")
                w0 = w0.to(tl.uint32, bitcast=True)[:, None, :]
                w1 = w1.to(tl.uint32, bitcast=True)[:, None, :]
                w2 = w2.to(tl.uint32, bitcast=True)[:, None, :]
                bit = tl.arange(0, 32) * 3  # code j of a block starts at bit 3j of the block's 96
                word = (bit // 32)[None, :, None]
                shift = (bit % 32).to(tl.uint32)[None, :, None]
                lo = tl.where(word == 0, w0, tl.where(word == 1, w1, w2))  # (BB3, 32, BN)
                hi = tl.where(word == 0, w1, w2)
                c = (lo >> shift) | tl.where(shift > 29, hi << ((32 - shift) & 31), 0)
                c = tl.reshape(c, (BK, BN))
            xt = tl.load(X + offs_m[:, None] * stride_xm + k[None, :] * stride_xk,
                         mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # (BM, BK)
            q = (c & MAXQ).to(tl.float32)  # (BK, BN) codes
            if GROUPING == TILE:
                g = _group(t, BK, group_size, GROUP_LOG)
                sc = tl.load(S + g * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)  # (BN,)
                zf = tl.load(Z + g * N + offs_n, mask=n_ok, other=0).to(tl.float32)
                d = q - zf[None, :]  # code − zero: an integer, exact in 16 bits
            else:
                ge = tl.load(GIDX + k, mask=k_ok, other=0)
                sz = ge[:, None] * N + offs_n[None, :]
                se = tl.load(S + sz, mask=n_ok[None, :], other=0.0).to(tl.float32)
                ze = tl.load(Z + sz, mask=n_ok[None, :], other=0).to(tl.float32)
                d = (q - ze) * se
            if DOT_F32:
                prod = tl.dot(xt.to(tl.float32), d, input_precision="ieee")
            else:
                prod = tl.dot(xt, d.to(xt.dtype))
            if GROUPING == TILE:
                acc += prod * sc[None, :]
            else:
                acc += prod
    if SWAP:
        acc = tl.trans(acc)
    if HAS_BIAS:
        bias = tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    else:
        bias = 0.0
    _finish(acc, Y + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
            WS + offs_m[:, None] * N + offs_n[None, :], WSI + offs_m[:, None] * N + offs_n[None, :],
            CNT + pid_m * tl.num_programs(0) + pid_n, m_ok[:, None] & n_ok[None, :], bias, SPLIT)


# ------------------------------------------------------------------------------------------ runtime layout


@dataclass
class Runtime:
    """What the kernels read for one packed linear of ``K`` inputs and ``N`` outputs (see module doc).

    ``qweight`` (K·bits/32, N) int32 in sorted-group order; ``scales`` (G, N) float16; ``zeros`` (G, N)
    uint8; ``perm`` (K,) int32 column of ``x`` for each sorted ``k`` (None: identity); ``g_sorted``
    (K,) int32 group of each sorted ``k``; ``group_size``: groups are ``k // group_size`` in sorted
    order (None when they are not that regular; one group: ``K``). ``path``: the kernel that ran last.
    """

    bits: int
    K: int
    N: int
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    perm: torch.Tensor | None
    g_sorted: torch.Tensor
    group_size: int | None
    key: tuple = ()
    path: str = "triton"
    plans: dict = field(default_factory=dict)  # launch plans by (rows, dtype, device, bias, config)
    # a product has been launched on these weights without overlapping the kernel before it, so whatever
    # wrote them has finished: from then on the CUDA GEMV may read them before it waits (see the module doc)
    settled: bool = False
    scratch: torch.Tensor | None = None  # a float32 stand-in for the workspace when nothing is split


def _buffers_key(m: QuantLinear) -> tuple:
    """Where ``m``'s buffers are and how often they were written (read every call: straight from the
    buffer dict, as ints)."""
    b = m._buffers
    return tuple((t.data_ptr(), t._version, t.get_device()) for t in (b["qweight"], b["qzeros"], b["scales"],
                                                                        b["g_idx"]))


def regular_group_size(g_sorted: torch.Tensor, n_groups: int) -> int | None:
    """``gs`` such that ``g_sorted == arange(K) // gs`` (``K`` for one group), else None."""
    K = g_sorted.numel()
    if n_groups == 1:
        return K if bool((g_sorted == 0).all()) else None
    gs = int((g_sorted == 0).sum())
    if gs == 0:
        return None
    ref = torch.arange(K, device=g_sorted.device) // gs
    return gs if torch.equal(g_sorted.long(), ref) and -(-K // gs) == n_groups else None


def prepare(m: QuantLinear) -> Runtime:
    """Build the runtime layout of ``m`` on its buffers' device (a copy of the codes only with act-order)."""
    bits, K, N = m.bits, m.in_features, m.out_features
    maxq = (1 << bits) - 1
    g_idx = m.g_idx.long()
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= m.n_groups):
        raise ValueError(f"g_idx must lie in [0, {m.n_groups})")
    perm = torch.argsort(g_idx, stable=True)
    if bool((perm == torch.arange(K, device=perm.device)).all()):
        qweight, perm_t = m.qweight.contiguous(), None
    else:  # act-order: repack the code rows in sorted-group order
        from quantizers.pack import pack_rows

        qweight = pack_rows(unpack_rows(m.qweight, bits, K)[perm], bits)
        perm_t = perm.to(torch.int32)
    stored = unpack_rows(m.qzeros.t().contiguous(), bits, N)  # (N, G)
    zeros = (stored + 1) & maxq if m.checkpoint_format == "gptq" else stored
    g_sorted = g_idx[perm].to(torch.int32).contiguous()
    return Runtime(bits=bits, K=K, N=N, qweight=qweight, scales=m.scales.contiguous(),
                   zeros=zeros.t().to(torch.uint8).contiguous(), perm=perm_t, g_sorted=g_sorted,
                   group_size=regular_group_size(g_sorted, m.n_groups), key=_buffers_key(m),
                   scratch=torch.zeros(1, dtype=torch.float32, device=qweight.device))


def runtime_of(m: QuantLinear) -> Runtime:
    """``m``'s runtime layout, built on first use and rebuilt when its buffers change."""
    cache = m.__dict__.setdefault("_prepared", {})
    rt = cache.get("triton")
    if rt is None or rt.key != _buffers_key(m):
        rt = cache["triton"] = prepare(m)
    return rt


def unpack_runtime(rt: Runtime) -> torch.Tensor:
    """The (N, K) float32 weight the kernels multiply with, in the *original* column order (a check)."""
    codes = unpack_rows(rt.qweight, rt.bits, rt.K).float()  # (K, N) sorted order
    g = rt.g_sorted.long()
    w_sorted = rt.scales.float()[g] * (codes - rt.zeros.float()[g])  # (K, N)
    w = torch.empty_like(w_sorted)
    w[rt.perm.long() if rt.perm is not None else slice(None)] = w_sorted
    return w.t().contiguous()


# ------------------------------------------------------------------------------------------------ launch


@dataclass(frozen=True)
class Config:
    """Launch parameters of one product.

    ``kernel`` "gemv" or "dot"; ``bn`` columns and ``bk`` codes of ``k`` per tile (powers of two; ``bk`` a
    multiple of the packed block, 16/32/8/4 codes at 2/3/4/8 bits; dot at least 16 codes); ``bm`` rows
    of ``x`` per dot tile (≥ 16); ``split``: K splits, 0 for enough programs to give every SM
    ``warps_per_sm`` warps; ``num_warps``, ``num_stages`` as Triton's. gemv only: ``xsplit`` reads the
    tile's ``x`` (gathered by ``perm`` under act-order) once per program and hands it out through
    shared memory instead of every thread reading every element; ``prefetch`` loads the next tile's
    words before multiplying the current one; ``pairs`` multiplies in bfloat16 pairs where it can
    (bfloat16 ``x``, 2/3/4 bits, regular groups; else the float32 path runs, as with ``pairs=False``);
    ``gather`` (act-order): ``x``'s columns are put in sorted order by :func:`gather_columns` ahead of the
    launch, as the dot kernel's always are, instead of each tile reading ``x[perm[k]]``.
    dot only: ``swap`` makes the dequantized weights the left operand of ``tl.dot`` (``y`` accumulated
    transposed), where the 16-bit path runs (else ignored).
    cuda (:func:`cuda.shape`): ``bn`` columns a block (32 × columns a thread), ``bk`` codes of ``k`` a
    step, ``num_warps`` warps a block, ``num_stages`` steps in flight, ``split`` K splits (0: enough blocks
    to give every SM ``warps_per_sm`` warps); under act-order the kernel reads ``x[perm[k]]`` as it stages
    ``x`` unless ``gather``. mma (the CUDA GEMV's tensor-core variant): ``num_warps``, ``num_stages``,
    ``split``/``warps_per_sm`` as cuda's; ``prefetch`` loads a lane's ``x`` of a chunk one chunk ahead, 32
    bytes a row in two loads, instead of 8 bytes a row as each step needs it; ``swap`` (``+sw``) makes the
    weights mma's A operand (``bn`` 32 or 64 columns a block; ``x`` staged in shared memory, the zero taken off
    once per group) instead of its B."""

    kernel: str = "gemv"
    bn: int = 128
    bk: int = 64
    bm: int = 16
    split: int = 0
    warps_per_sm: int = 16
    num_warps: int = 1
    num_stages: int = 1
    xsplit: bool = True
    prefetch: bool = False
    pairs: bool = True
    swap: bool = False
    gather: bool = False

    def name(self) -> str:
        split = f"s{self.split}" if self.split else f"w{self.warps_per_sm}"
        if self.kernel == "gemv":
            flags = ("+x" if self.xsplit else "") + ("+pf" if self.prefetch else "") + ("" if self.pairs else "-pairs")
            flags += "+g" if self.gather else ""
            return f"gemv n{self.bn} k{self.bk} {split} x{self.num_warps}{flags}"
        if self.kernel == "cuda":
            gather = "+g" if self.gather else ""
            return f"cuda n{self.bn} k{self.bk} {split} x{self.num_warps}/{self.num_stages}{gather}"
        if self.kernel == "mma":
            if self.swap:  # the weights as mma's A operand
                return f"mma n{self.bn} k64 {split} x{self.num_warps}/{self.num_stages}+sw"
            return f"mma n32 k64 {split} x{self.num_warps}/{self.num_stages}" + ("+pf" if self.prefetch else "")
        swap = "+sw" if self.swap else ""
        return f"{self.kernel} m{self.bm} n{self.bn} k{self.bk} {split} x{self.num_warps}/{self.num_stages}{swap}"


# Hand-picked: the fastest over LLaMA-7B's three shapes on an H200 (sweeps/measurements/LOG.md) at 3 and 4
# bits, no register spills on sm_90; tuning (:func:`tuned_config`) starts from them.
# ``python -m harness.bench kernels --tune`` times every candidate on the GPU.
GEMV_CONFIGS = {
    2: Config("gemv", bn=128, bk=64, num_warps=1, warps_per_sm=32, xsplit=False),
    3: Config("gemv", bn=128, bk=64, num_warps=1, xsplit=False),
    4: Config("gemv", bn=128, bk=64, num_warps=1, xsplit=False),
    8: Config("gemv", bn=128, bk=64, num_warps=1),
}


# The CUDA GEMV's candidates: the fastest few of 40 shapes on an H200 at the three LLaMA-7B shapes, 2 and 4 bits
# (sweeps/measurements/LOG.md): one block of 8 to 32 warps per 32 columns, no K split across blocks. With
# overlapped launches (sm_90+) three steps ahead (x16/4) is the fastest at 4096×4096, 2 bits.
CUDA_CONFIGS = [Config("cuda", bn=32, bk=128, num_warps=16, num_stages=2, split=1),
                Config("cuda", bn=32, bk=128, num_warps=16, num_stages=3, split=1),
                Config("cuda", bn=32, bk=128, num_warps=16, num_stages=4, split=1),
                Config("cuda", bn=32, bk=64, num_warps=32, num_stages=3, split=1),
                Config("cuda", bn=32, bk=128, num_warps=32, num_stages=2, split=1),
                Config("cuda", bn=32, bk=128, num_warps=8, num_stages=2, split=1),
                Config("cuda", bn=32, bk=128, num_warps=8, num_stages=3, split=1)]


# The CUDA GEMV's candidates for 2 to 8 rows (K split as x's rows need shared memory): the fastest two of four at
# 4096×11008 on an H200, 4 rows (3 bits: 18.3 µs, 1.35× bf16, where the dot kernel took 29.8)
CUDA_ROWS_CONFIGS = [Config("cuda", bn=32, bk=128, num_warps=8, num_stages=2, split=1),
                     Config("cuda", bn=64, bk=64, num_warps=8, num_stages=2, warps_per_sm=16)]


# The tensor-core variant's: at 4096×11008 on an H200, 8 warps, 2 stages took 14.0 µs at 4 rows (x as each step
# needs it) and 17.7 at 16 (x a chunk ahead; 25.8 without). The others: block shapes and waves around those.
MMA_CONFIGS = [Config("mma", num_warps=8, num_stages=2, warps_per_sm=16),
               Config("mma", num_warps=4, num_stages=4, warps_per_sm=32),
               Config("mma", num_warps=4, num_stages=3, warps_per_sm=16),
               Config("mma", num_warps=8, num_stages=2, warps_per_sm=16, prefetch=True),
               Config("mma", num_warps=4, num_stages=2, warps_per_sm=12, prefetch=True),
               Config("mma", num_warps=8, num_stages=2, warps_per_sm=24, prefetch=True),
               Config("mma", num_warps=4, num_stages=2, warps_per_sm=32, prefetch=True),
               Config("mma", num_warps=16, num_stages=2, warps_per_sm=16, prefetch=True)]


# The tensor-core variant with the weights as mma's A operand (+sw), for 2 to 8 rows: the fastest three of ten
# shapes on an H200 (sweeps/measurements/LOG.md): 4096×4096, 4 rows, 6.63 µs against 8.0 for the variant above;
# 11008×4096, 8 rows, 14.2 against 16.3. At one row and at 4096×11008 it is slower than the kernels above.
MMA_SWAP_CONFIGS = [Config("mma", bn=64, num_warps=4, num_stages=2, warps_per_sm=16, swap=True),
                    Config("mma", bn=32, num_warps=4, num_stages=2, warps_per_sm=24, swap=True),
                    Config("mma", bn=64, num_warps=16, num_stages=2, split=1, swap=True)]


def default_config(M: int, bits: int, act_order: bool = False) -> Config:
    """The hand-picked table: GEMV up to ``GEMV_MAX_M`` rows, else dot tiles sized by ``M``. Under
    act-order the 4-bit GEMV reads the tile's gathered ``x`` once per program (``xsplit``): 11.4 µs
    against 13.8 per thread at 4096×11008 on an H200, where without act-order per thread is faster; the
    2-bit GEMV reads ``x`` gathered ahead by its own kernel (``gather``)."""
    if M <= GEMV_MAX_M:
        if act_order and bits == 2:  # x gathered ahead (PDL): 9.6–9.7 µs against 10.0–10.2 per tile (4096×11008)
            return replace(GEMV_CONFIGS[bits], gather=True)
        return replace(GEMV_CONFIGS[bits], xsplit=True) if act_order and bits == 4 else GEMV_CONFIGS[bits]
    if M <= 16:  # the 16-bit dequantization (2, 4 bits): 32 columns of weights as the left operand, 2 warps
        if bits in DQ16_BITS:
            return Config("dot", bm=16, bn=32, bk=128, num_warps=2, num_stages=3, warps_per_sm=12, swap=True)
        return Config("dot", bm=16, bn=128, bk=128, num_warps=4, num_stages=3)
    if M <= 32:
        if bits in DQ16_BITS:
            return Config("dot", bm=32, bn=64, bk=128, num_warps=4, num_stages=3)
        return Config("dot", bm=32, bn=128, bk=64, num_warps=4, num_stages=4)
    if M <= 64:
        return Config("dot", bm=64, bn=64, bk=128, num_warps=4, num_stages=3)
    return Config("dot", bm=128, bn=128, bk=64, num_warps=8, num_stages=3, split=1)


def candidates(M: int, bits: int, act_order: bool = False) -> list[Config]:
    """What tuning (and ``bench kernels --tune``) times for ``M`` rows: the hand-picked default first,
    then other tile shapes (same result up to the order of float32 sums). One row: the GEMV only (a
    16-row tensor-core tile wastes 15 rows)."""
    out = [default_config(M, bits, act_order)]
    if M == 1:
        out += [Config("gemv", bn=128, bk=32, num_warps=1, prefetch=True),
                Config("gemv", bn=128, bk=64, num_warps=1, prefetch=True, warps_per_sm=8),
                Config("gemv", bn=128, bk=64, num_warps=1),  # x read once per program (best under act-order)
                Config("gemv", bn=128, bk=64, num_warps=1, warps_per_sm=32),
                Config("gemv", bn=64, bk=64, num_warps=1, warps_per_sm=32),
                Config("gemv", bn=128, bk=128, num_warps=1, warps_per_sm=8),
                Config("gemv", bn=128, bk=128, num_warps=2),
                Config("gemv", bn=256, bk=128, num_warps=2, warps_per_sm=8),
                Config("gemv", bn=512, bk=64, num_warps=4),
                Config("gemv", bn=128, bk=64, num_warps=1, warps_per_sm=8, prefetch=True, xsplit=False)]
        if bits in PAIR_BITS:  # the float32 path the bfloat16 pairs replace (what float16 x runs)
            out.append(replace(out[0], pairs=False))
        if act_order:  # x put in sorted order by its own kernel first (overlapped by PDL), then the plain GEMV
            out += [replace(GEMV_CONFIGS[bits], gather=True), replace(GEMV_CONFIGS[bits], gather=True, warps_per_sm=32)]
        if bits in cuda.BITS:  # the CUDA GEMV (where it can run: tuning skips it elsewhere)
            out += CUDA_CONFIGS
        return list(dict.fromkeys(out))
    bm = min(max(16, triton.next_power_of_2(M)), 128)
    if bm <= 32:
        out += [Config("dot", bm=bm, bn=64, bk=128, num_warps=4, num_stages=4, warps_per_sm=32),
                Config("dot", bm=bm, bn=128, bk=128, num_warps=4, num_stages=3),
                Config("dot", bm=bm, bn=128, bk=64, num_warps=4, num_stages=4),
                Config("dot", bm=bm, bn=64, bk=128, num_warps=4, num_stages=3),
                Config("dot", bm=bm, bn=256, bk=128, num_warps=8, num_stages=3),
                Config("dot", bm=bm, bn=128, bk=128, num_warps=4, num_stages=3, warps_per_sm=32),
                # 12 warps an SM: the programs of 4-warp tiles fit one wave where three or four stay resident
                # (120–170 registers a thread); 16 can leave a second, nearly empty wave (688 programs at
                # 4096×11008 against 528 slots)
                Config("dot", bm=bm, bn=64, bk=128, num_warps=4, num_stages=3, warps_per_sm=12),
                Config("dot", bm=bm, bn=128, bk=64, num_warps=4, num_stages=4, warps_per_sm=12),
                # the 16-bit path's weights as the left operand (x's registers need no shuffling into it)
                Config("dot", bm=bm, bn=32, bk=128, num_warps=2, num_stages=3, warps_per_sm=12, swap=True),
                Config("dot", bm=bm, bn=32, bk=256, num_warps=2, num_stages=3, warps_per_sm=8, swap=True)]
    else:
        out += [Config("dot", bm=bm, bn=64, bk=128, num_warps=4, num_stages=3),
                Config("dot", bm=bm, bn=64, bk=128, num_warps=4, num_stages=3, warps_per_sm=12),
                Config("dot", bm=bm, bn=128, bk=128, num_warps=8, num_stages=3),
                Config("dot", bm=bm, bn=128, bk=64, num_warps=8, num_stages=3),
                Config("dot", bm=bm, bn=64, bk=128, num_warps=4 if bm <= 64 else 8, num_stages=3, split=1),
                Config("dot", bm=bm, bn=128, bk=64, num_warps=8, num_stages=3, split=1),
                Config("dot", bm=bm, bn=32, bk=128, num_warps=2, num_stages=3, warps_per_sm=12, swap=True)]
    if bits not in DQ16_BITS:  # swap only changes the 16-bit path
        out = [c for c in out if not c.swap]
    if bits in cuda.BITS and M <= cuda.MAX_ROWS:  # the CUDA GEMV, its dequantized pairs reused across the rows
        out += CUDA_ROWS_CONFIGS
        if act_order:  # x gathered first: all of it need not fit next to the block's
            out.append(replace(CUDA_ROWS_CONFIGS[0], gather=True))
    if bits == 4 and M <= cuda.MMA_ROWS:  # the tensor-core CUDA variant (where it can run: tuning skips it elsewhere)
        out += MMA_CONFIGS
        if M <= 8:  # the weights as its A operand: x's rows one n8 tile
            out += MMA_SWAP_CONFIGS
    return list(dict.fromkeys(out))


_WORKSPACE: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few programs, so that split-K is exercised
    return gpu(device).sms


def pair_path_runs(dtype: torch.dtype, bits: int, grouping: int, device: torch.device) -> bool:
    """Whether the GEMV's bfloat16-pair path can take a product: bfloat16 ``x``, 2/3/4 bits, a tile in
    one group, compiled (the interpreter has no inline PTX) for a GPU with packed bfloat16 FMAs
    (``fma.rn.bf16x2``: compute capability 8.0 or newer)."""
    if dtype != torch.bfloat16 or bits not in PAIR_BITS or grouping != int(TILE) or interpreted():
        return False
    return device.type == "cuda" and gpu(device).capability >= ptx.MIN_CAPABILITY


PDL_CAPABILITY = (9, 0)  # griddepcontrol (programmatic dependent launch): Hopper and newer


def pdl_runs(device: torch.device) -> bool:
    """Whether launches overlap the kernel before them by programmatic dependent launch on ``device``:
    compiled, a GPU of compute capability 9.0 or newer, a Triton with grid dependency control, and not
    switched off (``HARNESS_KERNEL_PDL=0``)."""
    if interpreted() or device.type != "cuda" or gdc_wait is None:
        return False
    if os.environ.get("HARNESS_KERNEL_PDL", "1") in ("0", "false", "no"):
        return False
    return gpu(device).capability >= PDL_CAPABILITY


def magic_bits(dtype: torch.dtype, bits: int, grouping: int) -> int:
    """The dot kernel's ``MAGIC`` for ``x`` of ``dtype``: the bits of ``2**e`` in that 16-bit float (its
    mantissa holds the code) at 2 and 4 bits when a tile lies in one group, else 0: the float32 conversion
    path (8 bits, whose runs of 8 codes span two words and whose codes do not fit bfloat16's mantissa;
    3 bits, whose runs straddle words: read as bytes, shifted per run, or funnel-shifted out of their two
    words into :func:`ptx.run_asm`'s pairs, they measured slower than that path on an H200 (the last:
    41–50 µs against 30–31 at 4096×11008, M = 4 and 16); float32 ``x``; irregular groups)."""
    magic = MAGIC16.get(dtype, 0)
    return magic if bits in DQ16_BITS and grouping == int(TILE) else 0


def workspace(device: torch.device, numel: int, counters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zeroed float32 (≥ numel,) scratch, the same as int32, and zeroed int32 (≥ counters,) counters for
    split-K on ``device``'s current stream; kernels leave them zero again, so they are allocated once and
    reused."""
    if device.type == "cuda":
        idx = device_index(device)
        key = (idx, current_stream(idx))
    else:
        key = (device.type, 0)
    ws, wsi, cnt = _WORKSPACE.get(key, (None, None, None))
    if ws is None or ws.numel() < numel or cnt.numel() < counters:
        size = max(numel, 0 if ws is None else ws.numel())
        ncnt = max(counters, 0 if cnt is None else cnt.numel())
        ws = torch.zeros(size, dtype=torch.float32, device=device)
        cnt = torch.zeros(ncnt, dtype=torch.int32, device=device)
        wsi = ws.view(torch.int32)
        _WORKSPACE[key] = (ws, wsi, cnt)
    return ws, wsi, cnt


def fit_config(cfg: Config, rt: Runtime) -> tuple[Config, int]:
    """``cfg`` with ``bk`` adjusted to the layout and the groups, and the kernels' ``GROUPING``: TILE
    (0) when a tile lies in one group, else ELEMENT (2). ``bk`` shrinks until a tile fits in a group
    (down to the packed block, and to 16 codes for dot: ``tl.dot`` takes K ≥ 16). ``cuda`` configs are
    taken as they are, as are ``mma`` ones (:func:`cuda.supports` says where they fit)."""
    if cfg.kernel in ("cuda", "mma"):
        return cfg, int(TILE)
    per = BLOCKS[rt.bits][0]
    floor = max(per, 16) if cfg.kernel == "dot" else per
    bk = max(cfg.bk, floor)
    gs = rt.group_size
    if gs is None:
        return replace(cfg, bk=bk), int(ELEMENT)
    if gs >= rt.K:
        return replace(cfg, bk=bk), int(TILE)
    while bk > floor and gs % bk:
        bk //= 2
    return replace(cfg, bk=bk), int(TILE if gs % bk == 0 else ELEMENT)


def pair_consts(bits: int) -> dict:
    """The GEMV's constexprs of the pair path at ``bits`` (placeholders where it has none)."""
    if bits not in PAIR_BITS:
        return dict(D=1, ZLO=0, ZLO_SHIFT=0, ZHI=0)
    zlo, shift, zhi = ptx.zero_pair(bits)
    return dict(D=ptx.pair_distance(bits), ZLO=zlo, ZLO_SHIFT=shift, ZHI=zhi)


def _group_log(group_size: int | None, bk: int) -> int:
    """``log2(group_size / bk)`` when a group is a power-of-two number of ``bk``-code tiles, else −1."""
    if group_size is None or group_size % bk:
        return -1
    tiles = group_size // bk
    return tiles.bit_length() - 1 if tiles & (tiles - 1) == 0 else -1


@dataclass(frozen=True)
class _Plan:
    """Everything about one launch that depends on the rows, dtype and config but not on the tensors of
    the call: built once per (M, dtype, bias, config) and kept on the :class:`Runtime`."""

    workspace: tuple[int, int]  # float32 words and counters of split-K scratch; (0, 0): none
    path: str
    gather_x: bool = False  # act-order (dot kernel, or GEMV with Config.gather): x's columns sorted once per call
    pdl: bool = False  # launched with programmatic dependent launch (sm_90+): overlaps the kernel before
    cuda_launch: cuda.Launch | None = None  # the CUDA GEMV runs this product
    scratch: tuple = ()  # (float32, int32, counters) stand-ins for the workspace when nothing is split (not read)
    launch: _ThroughTriton | None = None  # the Triton kernel's launches (None: the CUDA GEMV's)

    @property
    def kernel(self):
        """The Triton kernel launched (None: the CUDA GEMV's product)."""
        return None if self.launch is None else self.launch.kernel

    @property
    def grid(self) -> tuple:
        return () if self.launch is None else self.launch.grid

    @property
    def fixed(self) -> dict:
        """The Triton kernel's arguments that are the same every call (empty for the CUDA GEMV)."""
        return {} if self.launch is None else self.launch.fixed


CALL_ARGS = ("X", "stride_xm", "stride_xk", "BIAS", "Y", "stride_ym", "stride_yn", "WS", "WSI", "CNT")  # per call
CALLER_ARGS = 4  # of which the caller's (x, its strides, the bias; BIAS is y when there is none)


def _spec(v: int) -> int:
    """What Triton specialises an int argument on: equal to 1, a multiple of 16, beyond 32 bits, beyond 63."""
    return (v == 1) | (v % 16 == 0) << 1 | (not -2**31 <= v < 2**31) << 2 | (v >= 2**63) << 3


class _ThroughTriton:
    """Launches of one Triton kernel with a fixed grid and fixed arguments, each through Triton's own
    ``kernel[grid](**arguments)`` (the interpreter; a Triton without what :class:`_Direct` uses)."""

    def __init__(self, kernel, grid: tuple, fixed: dict, names: tuple[str, ...]) -> None:
        self.kernel, self.grid, self.fixed, self.names = kernel, grid, fixed, names

    def __call__(self, call: tuple):
        """Launch with ``call``'s values for the arguments ``names``; returns what Triton returns."""
        return self.kernel[self.grid](**self.fixed, **dict(zip(self.names, call, strict=True)))


class _Direct(_ThroughTriton):
    """Launches of one Triton kernel without Triton's per-call work.

    ``kernel[grid](**arguments)`` binds the keyword arguments (some 40 for the products), works out their
    specialisation and looks the compiled kernel up on every call: most of a product's launch cost from
    Python. Here the first call of each kind goes through Triton as usual (it compiles where needed) and
    keeps the compiled kernel it returns; later calls of that kind hand the arguments, in the kernel's
    order, straight to the compiled kernel's launcher, as Triton itself does at the end of a call. Calls
    are of one kind when their first ``varying`` per-call values (the caller's: ``x``, its strides, the
    bias) specialise alike: tensors by dtype and 16-byte alignment, ints by :func:`_spec` (each at least as
    fine as Triton's own specialisation). The others are this module's own and specialise alike every call
    (``y`` and the workspace: fresh from torch's allocator, 16-byte aligned, fixed dtypes and strides), and
    the fixed arguments are the same. Launch hooks (profilers) are passed on as Triton passes them."""

    def __init__(self, kernel, grid: tuple, fixed: dict, names: tuple[str, ...], varying: int) -> None:
        super().__init__(kernel, grid, fixed, names)
        self.varying = varying
        order = kernel.arg_names
        self.args = [fixed.get(name) for name in order]
        self.slots = tuple(order.index(name) for name in names)
        self.compiled: dict[tuple, object] = {}

    @staticmethod
    def usable(kernel, fixed: dict, names: tuple[str, ...]) -> bool:
        """Whether every argument of ``kernel`` is fixed or passed per call, and this Triton has the pieces
        a direct launch uses."""
        order = getattr(kernel, "arg_names", None)
        return (order is not None and _knobs is not None and set(names) <= set(order)
                and all(name in fixed or name in names for name in order))

    def arguments(self, call: tuple) -> list:
        """The kernel's arguments in its order with ``call``'s values in their places."""
        args = self.args.copy()
        for i, v in zip(self.slots, call, strict=True):
            args[i] = v
        return args

    def __call__(self, call: tuple):
        kind = tuple((v.data_ptr() & 15, v.dtype) if isinstance(v, torch.Tensor) else _spec(v)
                     for v in call[:self.varying])
        kernel = self.compiled.get(kind)
        if kernel is None:  # the first call of its kind: through Triton, which returns the kernel it ran
            kernel = super().__call__(call)
            if all(hasattr(kernel, a) for a in ("run", "function", "packed_metadata", "launch_metadata")):
                self.compiled[kind] = kernel
            return kernel
        args = self.arguments(call)
        stream = current_stream(call[0].get_device())
        enter, grid = _knobs.runtime.launch_enter_hook, self.grid
        meta = kernel.launch_metadata(grid, stream, *args) if enter is not None else None
        kernel.run(grid[0], grid[1], grid[2] if len(grid) > 2 else 1, stream, kernel.function, kernel.packed_metadata,
                   meta, enter, _knobs.runtime.launch_exit_hook, *args)
        return kernel


def launcher(kernel, grid: tuple, fixed: dict, names: tuple[str, ...], varying: int) -> _ThroughTriton:
    """Launches of ``kernel`` on ``grid`` with the arguments ``fixed`` and, per call, ``names`` (the first a
    tensor on the launch's device; the first ``varying`` the caller's, see :class:`_Direct`):
    :class:`_Direct` where it can run, else through Triton each time."""
    if not interpreted() and _Direct.usable(kernel, fixed, names):
        return _Direct(kernel, grid, fixed, names, varying)
    return _ThroughTriton(kernel, grid, fixed, names)


def _plan(rt: Runtime, M: int, dtype: torch.dtype, device: torch.device, has_bias: bool,
          config: Config | None) -> _Plan:
    pdl = pdl_runs(device)
    if config is not None and config.kernel in ("cuda", "mma"):
        # act-order: the GEMV gathers x as it stages it unless told otherwise; the tensor-core variant reads it
        # gathered first
        gather_x = rt.perm is not None and (config.gather or config.kernel == "mma")
        try:
            launch = cuda.prepare(rt, M, dtype, device, has_bias, config, pdl, perm=not gather_x)
        except ValueError as exc:  # what it does not take, or a device it cannot run on
            raise ValueError(f"config {config.name()!r}: {exc}") from None
        kind = "mma-sw" if config.kernel == "mma" and config.swap else config.kernel
        return _Plan(launch.workspace, PATHS[kind], gather_x, pdl, cuda_launch=launch,
                     scratch=(rt.scratch, None, rt.scratch))
    cfg, grouping = fit_config(config or default_config(M, rt.bits, rt.perm is not None), rt)
    K, N = rt.K, rt.N
    n_tiles = triton.cdiv(N, cfg.bn)
    m_tiles = M if cfg.kernel == "gemv" else triton.cdiv(M, cfg.bm)
    k_tiles = triton.cdiv(K, cfg.bk)
    programs = triton.cdiv(cfg.warps_per_sm * _sm_count(device), cfg.num_warps)
    split = cfg.split or triton.cdiv(programs, n_tiles * m_tiles)
    split = max(1, min(split, k_tiles))
    tiles_per_split = triton.cdiv(k_tiles, split)
    split = triton.cdiv(k_tiles, tiles_per_split)  # no empty programs
    pairs = cfg.kernel == "gemv" and cfg.pairs and pair_path_runs(dtype, rt.bits, grouping, device)
    # act-order: x's columns put in sorted order by gather_columns before the launch (dot; GEMV with cfg.gather),
    # else the GEMV reads x[perm[k]] as it goes
    gather_x = rt.perm is not None and (cfg.kernel == "dot" or cfg.gather)
    fixed = dict(
        QW=rt.qweight, S=rt.scales, Z=rt.zeros, GIDX=rt.g_sorted, N=N, K=K, group_size=rt.group_size or K,
        tiles_per_split=tiles_per_split, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **constexprs(cfg, rt.bits, split=split > 1, grouping=grouping, has_bias=has_bias, even_k=K % cfg.bk == 0,
                     even_n=N % cfg.bn == 0, has_perm=rt.perm is not None and not gather_x, pairs=pairs,
                     group_size=rt.group_size, dot_f32=interpreted() or dtype == torch.float32,
                     magic=magic_bits(dtype, rt.bits, grouping), pdl=pdl),
    )
    if pdl:
        fixed["launch_pdl"] = True
    path = PATHS["gemv-pairs" if pairs else cfg.kernel]
    if cfg.kernel == "dot" and fixed["MAGIC"]:
        path = PATHS["dot-magic"]
    if cfg.kernel == "gemv":
        kernel = _gemv_kernel
        fixed.update(PERM=rt.perm if rt.perm is not None else rt.g_sorted, magic=int(MAGIC))
    else:
        kernel = _dot_kernel
        fixed.update(M=M)
    grid = (n_tiles, split, m_tiles)
    return _Plan((M * N, m_tiles * n_tiles) if split > 1 else (0, 0),
                 path + ("-interpreted" if interpreted() else ""), gather_x, pdl,
                 scratch=(rt.scratch, rt.scratch.view(torch.int32), rt.g_sorted),
                 launch=launcher(kernel, grid, fixed, CALL_ARGS, CALLER_ARGS))


def constexprs(cfg: Config, bits: int, *, split: bool, grouping: int, has_bias: bool, even_k: bool, even_n: bool,
               has_perm: bool, pairs: bool, group_size: int | None, dot_f32: bool, magic: int = 0,
               pdl: bool = False) -> dict:
    """The compile-time arguments of ``cfg``'s kernel (what Triton specialises on), from the launch's
    facts; :func:`_plan` adds the tensors and runtime sizes. One place, so that an ahead-of-time build
    compiles exactly what a launch runs."""
    per, words = BLOCKS[bits]
    out = dict(BITS=bits, PER=per, WORDS=words, BN=cfg.bn, SPLIT=split, GROUPING=grouping, HAS_BIAS=has_bias,
               EVEN_K=even_k, EVEN_N=even_n)
    if cfg.kernel == "gemv":
        out.update(HAS_PERM=has_perm, HIGH=HIGH, BB=cfg.bk // per,
                   XSPLIT=cfg.xsplit and cfg.bk >= 32 * cfg.num_warps,  # each thread gathers whole elements
                   LOG_PER=per.bit_length() - 1, PREFETCH=cfg.prefetch, PAIRS=pairs,
                   GROUP_LOG=_group_log(group_size, cfg.bk), PDL=pdl, **pair_consts(bits))
    elif cfg.kernel == "dot":
        run = RUN_DTYPES.get(magic)  # the 16-bit path's PTX (ptx.run_asm) and its −2**e, where it runs
        out.update(BM=cfg.bm, BK=cfg.bk, DOT_F32=dot_f32, MAGIC=magic, SWAP=cfg.swap and magic != 0, PDL=pdl,
                   RUN_ASM=run_asm(bits, run) if run else "", RUN_ZERO=ptx.run_zero(run) if run else 0,
                   GROUP_LOG=_group_log(group_size, cfg.bk))
    else:
        raise ValueError(f"unknown kernel {cfg.kernel!r} (gemv or dot)")
    return out


# ------------------------------------------------------------------------------------------------ tuning


def tuning_enabled() -> bool:
    """Whether a product without an explicit config picks the fastest candidate on first use
    (compiled kernels only; ``HARNESS_KERNEL_TUNE=0`` keeps the hand-picked :func:`default_config`)."""
    return not interpreted() and os.environ.get("HARNESS_KERNEL_TUNE", "1") not in ("0", "false", "no")


_TUNED: dict[tuple, Config] = {}
TUNE_REPS = 5  # timed batches per candidate (the median counts)
TUNE_CALLS = 16  # products per batch, at least one per weight copy
TUNE_COPIES = 32  # weight copies at most (small layers stay partly in L2)
TUNE_MARGIN = 0.03  # a candidate replaces the best so far only when this much faster (noise keeps the default)
SLEEP_PER_CALL = 1_000_000  # GPU cycles of wait queued ahead of each batch, per product: longer than its launches
# (at 200 000, about 0.1 ms, the act-order products' two launches (gather, dot) from Python could outlast
# the wait on an H200's host, and tuning then timed the host: it picked tiles twice as slow as the default)


def _tune_key(rt: Runtime, M: int, x: torch.Tensor, has_bias: bool) -> tuple:
    bucket = 1 if M == 1 else min(triton.next_power_of_2(M), 4096)
    return (rt.bits, rt.K, rt.N, rt.group_size, rt.perm is not None, bucket, x.dtype, str(x.device), has_bias)


def _weight_copies(rt: Runtime) -> list[Runtime]:
    """``rt`` and copies of its weights, enough (up to ``TUNE_COPIES``) that a round over them streams more
    than twice the L2 cache, as a decode step does; fewer when memory is short."""
    wanted = l2_copies(rt.qweight.nbytes + rt.scales.nbytes + rt.zeros.nbytes, rt.qweight.device, most=TUNE_COPIES)
    copies = [rt]
    try:
        while len(copies) < wanted:
            copies.append(replace(rt, qweight=rt.qweight.clone(), scales=rt.scales.clone(), zeros=rt.zeros.clone(),
                                  settled=False, plans={}))
    except torch.cuda.OutOfMemoryError:
        pass
    return copies


def _time_config(x: torch.Tensor, rts: list[Runtime], bias: torch.Tensor | None, cfg: Config) -> float:
    """Median GPU time of one product with ``cfg``: batches of ``TUNE_CALLS`` products round-robin over
    the weight copies ``rts``, queued behind a GPU-side wait so that they run back to back (the CPU's
    launch cost is not counted; each reads its weights from HBM)."""
    for rt in rts:
        matmul(x, rt, bias, cfg)  # compile and build the plans
    calls = max(TUNE_CALLS, len(rts))
    times = []
    for _ in range(TUNE_REPS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(SLEEP_PER_CALL * calls)
        start.record()
        for i in range(calls):
            matmul(x, rts[i % len(rts)], bias, cfg)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return sorted(times)[len(times) // 2]


def tuned_config(x: torch.Tensor, rt: Runtime, bias: torch.Tensor | None = None) -> Config:
    """The config a product of ``x`` with ``rt`` runs without an explicit one: the fastest of
    :func:`candidates`, timed once per (bits, shape, groups, act-order, row bucket, dtype, device) and
    remembered for the process; the default where tuning is off or a CUDA graph is being captured."""
    return _resolve(x, rt, bias)[0]


def _resolve(x: torch.Tensor, rt: Runtime, bias: torch.Tensor | None) -> tuple[Config, bool]:
    """:func:`tuned_config` and whether it is final (False: the default, only because a CUDA graph is
    being captured before this shape was tuned)."""
    M = x.shape[0]
    default = default_config(M, rt.bits, rt.perm is not None)
    if not tuning_enabled() or x.device.type != "cuda":
        return default, True
    key = _tune_key(rt, M, x, bias is not None)
    if key in _TUNED:
        return _TUNED[key], True
    if torch.cuda.is_current_stream_capturing():
        return default, False
    best, best_ms = default, float("inf")
    with torch.cuda.device(x.device):
        rts = _weight_copies(rt)
        for cfg in candidates(M, rt.bits, rt.perm is not None):  # the default first
            try:
                ms = _time_config(x, rts, bias, cfg)
            except Exception:  # noqa: BLE001 - a config this GPU cannot build (shared memory, registers) is skipped
                continue
            if ms < best_ms * (1 - TUNE_MARGIN):
                best, best_ms = cfg, ms
        del rts
    _TUNED[key] = best
    return _TUNED[key], True


def matmul(x: torch.Tensor, rt: Runtime, bias: torch.Tensor | None = None,
           config: Config | None = None) -> torch.Tensor:
    """``x`` (M, K) float16 / bfloat16 / float32 times the dequantized ``W``ᵀ (K, N), plus ``bias`` (N,):
    (M, N) in ``x``'s dtype. ``config`` picks the kernel and tiles (default: :func:`tuned_config`);
    ``rt.path`` records the one that ran."""
    M, K = x.shape
    if K != rt.K:
        raise ValueError(f"x has {K} columns, the weight {rt.K} inputs")
    index = x.get_device()  # −1 on the CPU
    if index >= 0 and index != torch.cuda.current_device():
        with torch.cuda.device(index):  # kernels launch on the current device
            return matmul(x, rt, bias, config)
    y = torch.empty((M, rt.N), dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    key = (M, x.dtype, index, bias is not None, config)
    plan = rt.plans.get(key)
    if plan is None:
        cfg, final = (config, True) if config is not None else _resolve(x, rt, bias)
        plan = _plan(rt, M, x.dtype, x.device, bias is not None, cfg)
        if final:  # config None: the tuned plan, looked up directly from now on
            rt.plans[key] = rt.plans[(M, x.dtype, index, bias is not None, cfg)] = plan
    if plan.gather_x:
        x = gather_columns(x, rt.perm, plan.pdl)
    ws, wsi, cnt = workspace(x.device, *plan.workspace) if plan.workspace[0] else plan.scratch
    if plan.cuda_launch is not None:
        # its blocks read the weights before they wait for the kernel before them: safe once a plain launch
        # has followed whatever wrote them (or right after the gather, which does not write them)
        cuda.run(plan.cuda_launch, x, rt, bias, y, (ws, cnt), plan.pdl and (plan.gather_x or rt.settled))
        rt.settled = True
        rt.path = plan.path
        return y
    call = (x, x.stride(0), x.stride(1), bias if bias is not None else y, y, y.stride(0), y.stride(1), ws, wsi, cnt)
    plan.launch(call)
    rt.path = plan.path
    return y


# ----------------------------------------------------------------------------------------------- backend


def _forward(m: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    if not x.is_cuda and not runs_on(x.device):
        raise RuntimeError(f"the triton backend needs CUDA tensors (got {x.device}; or set TRITON_INTERPRET=1 "
                           "before Triton is imported to run it interpreted)")
    rt = runtime_of(m)
    if rt.qweight.get_device() != x.get_device():
        raise RuntimeError(f"x is on {x.device}, the packed weight on {rt.qweight.device}")
    y = matmul(x.reshape(-1, m.in_features), rt, m._buffers["bias"])
    return y.reshape(*x.shape[:-1], m.out_features)


def _path(m: QuantLinear) -> str:
    rt = m.__dict__.get("_prepared", {}).get("triton")
    return rt.path if rt is not None else "triton"


register_backend(Backend("triton", _forward, _path))
