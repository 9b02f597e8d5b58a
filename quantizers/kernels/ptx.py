"""Inline PTX of the GEMV's bfloat16-pair path and of the dot kernel's runs of 8 codes (:func:`run_asm`), as
plain strings (no Triton here, so that the CPU tests can read and check the assembly without a GPU).

:func:`pair_asm` is one packed block of codes (one word at 2 and 4 bits, three at 3 bits) against
bfloat16 ``x``: ``Σ x (code − zero)`` as float32. Two codes ``j`` and ``j + d`` of the block share one
32-bit register as a pair of bfloat16 numbers (:func:`pair_plan`): one shift of the block (a funnel
shift across two words where 3-bit codes straddle) and one and-or (``lop3``) put code ``j + d`` at the
bottom of the high half and code ``j`` at bit ``p`` of the low half, both under the bits of 128, so the
pair reads ``(128 + 2**p · code_j, 128 + code_{j+d})`` exactly (a code fits bfloat16's 7 mantissa bits:
2, 3 and 4 bits do, 8 bits do not). One packed FMA ``× (2**−p, 1) + (−(128/2**p + zero), −(128 + zero))``
leaves ``code − zero`` in both halves exactly; one packed FMA multiplies by the matching pair of ``x``
and accumulates. Every ``CHAIN`` pairs (each step rounds to bfloat16) the two halves are widened to
float32 (exact) and added to a float32 sum.

Operands: ``$0`` the float32 sum; ``$1 …`` the block's words; then ``−(128/2**p + zero)`` and
``−(128 + zero)`` as one register (:func:`zero_pair`); then the pairs of ``x`` in :func:`pair_plan`
order, ``x_j`` in the low half and ``x_{j+d}`` in the high half.
"""
from __future__ import annotations

PAIR_BITS = (2, 3, 4)  # widths with a pair path
MIN_CAPABILITY = (8, 0)  # fma.rn.bf16x2 (sm_80); every other instruction here is older
WORDS = {2: 1, 3: 3, 4: 1}  # 32-bit words per block (16, 32 and 8 codes)
BF16_128 = 0x4300  # bfloat16 bits of 128.0: ulp 1, so (BF16_128 | code) reads 128 + code


def pair_distance(bits: int) -> int:
    """``d``: code ``j`` pairs with code ``j + d`` (16 bits apart at 2 and 4 bits; 12 bits at 3 bits)."""
    return 4 if bits == 3 else 16 // bits


def low_shift(bits: int) -> int:
    """``p``: the bit of the low half where code ``j`` lands (``16 − bits · d``), so that code ``j + d``
    lands at bit 16."""
    return 16 - bits * pair_distance(bits)


def pair_plan(bits: int) -> list[tuple[int, int]]:
    """The pairs ``(j, j + d)`` of codes of one block, in operand order: runs of ``d`` pairs cover ``2d``
    consecutive codes (2 bits: (0, 8) … (7, 15); 4 bits: (0, 4) … (3, 7); 3 bits: (0, 4) … (3, 7),
    (8, 12) … (27, 31))."""
    if bits not in PAIR_BITS:
        raise ValueError(f"the pair path takes {PAIR_BITS} bits, not {bits}")
    d = pair_distance(bits)
    codes = WORDS[bits] * 32 // bits
    return [(run + i, run + i + d) for run in range(0, codes, 2 * d) for i in range(d)]


def zero_pair(bits: int) -> tuple[int, int, int]:
    """``(base, shift, high)``: the register ``$zeros`` of a zero ``z`` is ``(base | z << shift) | high(z) << 16``
    with ``high(z) = 0xC300 | z``: bfloat16 ``−(128/2**p + z)`` and ``−(128 + z)``."""
    p = low_shift(bits)
    return {0: (0xC300, 0, 0xC300), 4: (0xC100, 4, 0xC300)}[p]


def chain(bits: int) -> int:
    """Pairs accumulated in bfloat16 before each widening to float32: one word's (8 products per half at
    2 bits, 4 at 4 bits), 4 at 3 bits."""
    return 8 if bits == 2 else 4


def pair_asm(bits: int) -> str:
    """The PTX block for one packed block of ``bits``-bit codes (see the module docstring)."""
    plan = pair_plan(bits)
    words, p = WORDS[bits], low_shift(bits)
    maxq = (1 << bits) - 1
    mask = (maxq << 16) | (maxq << p)
    magic = BF16_128 * 0x10001
    mult = (0x3F80 << 16) | {0: 0x3F80, 4: 0x3D80}[p]  # (2**−p, 1.0): 0x3D80 is 1/16
    zeros, x0 = f"${words + 1}", words + 2
    body = [".reg .b32 t, q, a, lo, hi, s, mul, nz;", f"mov.b32 mul, {mult:#010x};",
            "mov.b32 nz, 0x80008000;"]  # (−0.0, −0.0): x · v + (−0) = x · v, sign kept
    n = chain(bits)
    for idx, (j, _) in enumerate(plan):
        start = bits * j - p  # the window of the block stream that puts code j at bit p
        w, o = divmod(start, 32)
        if start < 0:
            body.append(f"shl.b32 t, $1, {-start};")
        elif o == 0:
            body.append(f"mov.b32 t, ${w + 1};")
        elif start + 16 + bits <= 32 * (w + 1) or w + 1 == words:
            body.append(f"shr.u32 t, ${w + 1}, {o};")
        else:  # the window spans two words: (next:this) >> o
            body.append(f"shf.r.clamp.b32 t, ${w + 1}, ${w + 2}, {o};")
        body.append(f"lop3.b32 q, t, {mask:#010x}, {magic:#010x}, 0xEA;")  # (t & mask) | magic
        body.append(f"fma.rn.bf16x2 q, q, mul, {zeros};")  # code − zero in both halves: exact
        body.append(f"fma.rn.bf16x2 a, q, ${x0 + idx}, {'nz' if idx % n == 0 else 'a'};")
        if idx % n == n - 1 or idx == len(plan) - 1:  # widen both halves (exact) and add to the float32 sum
            body += ["shl.b32 lo, a, 16;", "and.b32 hi, a, 0xFFFF0000;"]
            if idx < n:
                body.append("add.f32 s, lo, hi;")
            else:
                body += ["add.f32 s, s, lo;", "add.f32 s, s, hi;"]
    body.append("mov.b32 $0, s;")
    return "{\n" + "\n".join(body) + "\n}"


def pair_constraints(bits: int) -> str:
    """The inline-asm constraints of :func:`pair_asm`: one float32 out; the words, the zeros, the x pairs."""
    return "=r" + ",r" * (WORDS[bits] + 1 + len(pair_plan(bits)))


# ------------------------------------------------------------------ the dot kernel's runs of 8 codes

RUN_BITS = (2, 4)  # widths whose run of 8 codes lies in one 32-bit register (4 bits: a word; 2 bits: half of one)
RUN_FLOATS = {"bfloat16": (0x4300, 0x3F80), "float16": (0x6400, 0x3C00)}  # bits of 2**e (ulp 1), of 1.0


def run_asm(bits: int, dtype: str) -> str:
    """PTX that turns a run of 8 codes (``$4``: the run at bit 0 of a 32-bit register, code ``j`` at bit
    ``bits · j``; at 2 bits the upper half is zero) into ``code − zero`` for codes 0 … 7 in ``dtype``
    (``"bfloat16"`` or ``"float16"``), two per output register (``$0 … $3``: code ``2i`` in the low
    half, ``2i + 1`` in the high half, as Triton packs 16-bit elements). ``$12`` holds ``−(2**e + zero)``
    in both halves (:func:`run_zero`); ``$5 … $11`` and ``$13 … $19`` are the copies that Triton's
    packing of 8 elements passes, not read.

    Per pair of codes: their bits are brought to bit 0 and bit 16 of one register (4 bits: one ``prmt``
    of byte ``i`` of the run and of the run shifted right by 4; 2 bits: one shift of the run or-ed with
    itself shifted left by 14), one ``lop3`` keeps them under the exponent of ``2**e`` whose ulp is 1
    (``2**e + code`` in each half, exactly), one packed FMA adds ``−(2**e + zero)``: ``code − zero``,
    exact, with no integer-to-float conversion. 13 instructions for 8 codes."""
    magic, one = RUN_FLOATS[dtype]
    op = {"bfloat16": "fma.rn.bf16x2", "float16": "fma.rn.f16x2"}[dtype]
    if bits not in RUN_BITS:
        raise ValueError(f"runs of 8 codes in one register take {RUN_BITS} bits, not {bits}")
    maxq = (1 << bits) - 1
    body = [".reg .b32 t, q, u, m;", f"mov.b32 m, {(one << 16) | one:#010x};"]
    if bits == 4:  # byte i of the run: codes 2i (bits 0–3) and 2i + 1 (bits 4–7)
        body.append("shr.u32 u, $4, 4;")
    else:  # codes 2i and 2i + 1 at bits 4i and 4i + 2: with the run << 14 or-ed in, at 4i and 4i + 16
        body += ["shl.b32 u, $4, 14;", "or.b32 u, u, $4;"]
    for i in range(4):
        if bits == 4:
            sel = i | i << 4 | (4 + i) << 8 | (4 + i) << 12  # result bytes 0, 1: byte i of the run; 2, 3: of u
            body.append(f"prmt.b32 t, $4, u, {sel:#06x};")
        else:
            body.append(f"shr.u32 t, u, {4 * i};" if i else "mov.b32 t, u;")
        body.append(f"lop3.b32 q, t, {(maxq << 16) | maxq:#010x}, {magic * 0x10001:#010x}, 0xEA;")  # (t & mask) | magic
        body.append(f"{op} ${i}, q, m, $12;")
    return "{\n" + "\n".join(body) + "\n}"


def run_zero(dtype: str) -> int:
    """The bits of ``−2**e`` in ``dtype``: or-ed with a zero and repeated in both halves, the ``$12`` of
    :func:`run_asm`."""
    return RUN_FLOATS[dtype][0] | 0x8000


RUN_CONSTRAINTS = "=r,=r,=r,=r," + ",".join(["r"] * 16)  # 4 registers out (8 16-bit codes); 8 runs, 8 zeros in
