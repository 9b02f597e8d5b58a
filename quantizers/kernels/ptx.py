"""Inline PTX of the GEMV's bfloat16-pair path, as plain strings (no Triton here, so that the CPU tests
can read and check the assembly without a GPU).

:func:`pair_asm` is one packed word of 2- or 4-bit codes against bfloat16 ``x``: ``Σ x (code − zero)``
as float32. Codes ``i`` and ``i + 16/bits`` of the word share one 32-bit register as a pair of
bfloat16 numbers: one shift and one and-or (``lop3``) put them at the bottom of each 16-bit half under
the bits of 128, so the pair reads ``(128 + code_i, 128 + code_j)`` exactly (a code fits bfloat16's 7
mantissa bits: 2 and 4 bits do, 8 bits do not; 3-bit codes straddle words). One packed FMA ``× 1 +
(−(128 + zero))`` leaves ``code − zero`` exactly; one packed FMA multiplies by the matching pair of
``x`` and accumulates (each step rounds to bfloat16: ``16/bits`` products per half). The two halves
are widened to float32 (exact) and added. Operands: ``$0`` the float32 sum; ``$1`` the word; ``$2``
``−(128 + zero)`` in both halves; ``$3 …`` the pairs ``(x_i, x_{i + 16/bits})``, ``x_i`` in the low half.
"""
from __future__ import annotations

PAIR_BITS = (2, 4)  # widths with a pair path
BF16_128 = 0x4300  # bfloat16 bits of 128.0: ulp 1, so (BF16_128 | code) reads 128 + code
BF16_NEG_128 = 0xC300  # −128.0: (BF16_NEG_128 | zero) reads −(128 + zero)


def pair_asm(bits: int) -> str:
    """The PTX block for one word of ``bits``-bit codes (see the module docstring)."""
    if bits not in PAIR_BITS:
        raise ValueError(f"pair_asm takes {PAIR_BITS} bits, not {bits}")
    pairs = 16 // bits
    mask = ((1 << bits) - 1) * 0x10001
    magic = BF16_128 * 0x10001
    body = [".reg .b32 t, q, a, lo, hi, one, nz;",
            "mov.b32 one, 0x3F803F80;",  # (1.0, 1.0)
            "mov.b32 nz, 0x80008000;"]  # (−0.0, −0.0): x · v + (−0) = x · v, sign kept
    for i in range(pairs):
        if i:
            body.append(f"shr.u32 t, $1, {bits * i};")
        body.append(f"lop3.b32 q, {'t' if i else '$1'}, {mask:#010x}, {magic:#010x}, 0xEA;")  # (a & b) | c
        body.append("fma.rn.bf16x2 q, q, one, $2;")  # (128 + code) − (128 + zero): exact
        body.append(f"fma.rn.bf16x2 a, q, ${3 + i}, {'a' if i else 'nz'};")
    body += ["shl.b32 lo, a, 16;", "and.b32 hi, a, 0xFFFF0000;", "add.f32 $0, lo, hi;"]
    return "{\n" + "\n".join(body) + "\n}"


def pair_constraints(bits: int) -> str:
    """The inline-asm constraints of :func:`pair_asm`: one float32 out; word, zeros, ``16/bits`` x pairs."""
    return "=r" + ",r" * (2 + 16 // bits)
