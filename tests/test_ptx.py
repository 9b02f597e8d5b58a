"""The kernels' inline PTX (``quantizers/kernels/ptx.py``) run on the CPU by a small interpreter of the few
instructions it uses, against ``Σ x (code − zero)`` computed in float64: the bit tricks (which code lands
in which half, the exponent of 128, the zero's sign) are checked without a GPU. The GPU tests run the
same text compiled."""
from __future__ import annotations

import re

import numpy as np
import pytest

from quantizers.kernels.ptx import (
    PAIR_BITS,
    RUN_BITS,
    RUN_CONSTRAINTS,
    WORDS,
    pair_asm,
    pair_constraints,
    pair_plan,
    run_asm,
    run_zero,
    zero_pair,
)

M32 = np.uint64(0xFFFFFFFF)


def bf16_round(v: np.ndarray) -> np.ndarray:
    """float64 → nearest bfloat16 (ties to even), as float64."""
    m, e = np.frexp(v)  # v = m · 2**e, 0.5 ≤ |m| < 1
    return np.ldexp(np.rint(m * 256.0), e - 8)  # 8 significant bits; np.rint: ties to even


def bf16_bits(v: np.ndarray) -> np.ndarray:
    return (v.astype(np.float32).view(np.uint32) >> 16).astype(np.uint64)


def halves(r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A register of two bfloat16 as their float64 values (low half, high half)."""
    as_f32 = lambda h: (h.astype(np.uint32) << 16).view(np.float32).astype(np.float64)  # noqa: E731
    return as_f32(r & np.uint64(0xFFFF)), as_f32(r >> np.uint64(16))


def f16_halves(r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A register of two float16 as their float64 values (low half, high half)."""
    as_f16 = lambda h: h.astype(np.uint16).view(np.float16).astype(np.float64)  # noqa: E731
    return as_f16(r & np.uint64(0xFFFF)), as_f16(r >> np.uint64(16))


def f16_bits(v: np.ndarray) -> np.ndarray:
    """float64 → nearest float16 (numpy rounds to nearest even), as its bits."""
    return v.astype(np.float16).view(np.uint16).astype(np.uint64)


def run_ptx(asm: str, constraints: str, inputs: list[np.ndarray]) -> np.ndarray:
    """Interpret ``asm`` over arrays of 32-bit registers (as uint64): ``$1 …`` the inputs; returns ``$0``
    as float32."""
    return run_regs(asm, constraints, inputs)[0].astype(np.uint32).view(np.float32)


def run_regs(asm: str, constraints: str, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """Interpret ``asm`` over arrays of 32-bit registers (as uint64): the inputs follow the outputs
    (``$n_out …``); returns the output registers ``$0 …``."""
    n_out = constraints.count("=")
    regs: dict[str, np.ndarray] = {f"${n_out + i}": v.astype(np.uint64) for i, v in enumerate(inputs)}

    def val(tok: str) -> np.ndarray:
        tok = tok.strip()
        return np.full_like(inputs[0], int(tok, 0), dtype=np.uint64) if tok[0].isdigit() else regs[tok]

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if line in ("{", "}") or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        d, *a = [t.strip() for t in rest.split(",")]
        if op == "mov.b32":
            r = val(a[0])
        elif op == "shr.u32":
            r = val(a[0]) >> np.uint64(int(a[1]))
        elif op == "shf.r.clamp.b32":  # (a[1]:a[0]) >> n, n ≤ 32
            r = ((val(a[0]) | (val(a[1]) << np.uint64(32))) >> np.uint64(min(int(a[2]), 32))) & M32
        elif op == "shl.b32":
            r = (val(a[0]) << np.uint64(int(a[1]))) & M32
        elif op == "and.b32":
            r = val(a[0]) & val(a[1])
        elif op == "or.b32":
            r = val(a[0]) | val(a[1])
        elif op == "lop3.b32":
            x, y, z, lut = val(a[0]), val(a[1]), val(a[2]), int(a[3], 0)
            r = np.zeros_like(x)
            for i in range(8):  # lut bit i: the result for (x, y, z) bits (i >> 2 & 1, i >> 1 & 1, i & 1)
                if lut >> i & 1:
                    r |= (x if i & 4 else ~x & M32) & (y if i & 2 else ~y & M32) & (z if i & 1 else ~z & M32)
        elif op == "prmt.b32":  # default mode: result byte i is byte (selector nibble i & 7) of b:a
            src, sel = val(a[0]) | (val(a[1]) << np.uint64(32)), int(a[2], 0)
            r = np.zeros_like(src)
            for i in range(4):
                r |= ((src >> np.uint64(8 * (sel >> 4 * i & 7))) & np.uint64(0xFF)) << np.uint64(8 * i)
        elif op == "fma.rn.bf16x2":
            (xl, xh), (yl, yh), (zl, zh) = halves(val(a[0])), halves(val(a[1])), halves(val(a[2]))
            r = bf16_bits(bf16_round(xl * yl + zl)) | (bf16_bits(bf16_round(xh * yh + zh)) << np.uint64(16))
        elif op == "fma.rn.f16x2":
            (xl, xh), (yl, yh), (zl, zh) = f16_halves(val(a[0])), f16_halves(val(a[1])), f16_halves(val(a[2]))
            r = f16_bits(xl * yl + zl) | (f16_bits(xh * yh + zh) << np.uint64(16))
        elif op == "add.f32":
            f = lambda v: v.astype(np.uint32).view(np.float32)  # noqa: E731
            r = (f(val(a[0])) + f(val(a[1]))).view(np.uint32).astype(np.uint64)
        else:
            raise AssertionError(f"the interpreter lacks {op!r}: teach it before trusting the test")
        regs[d] = r
    return [regs[f"${i}"] for i in range(n_out)]


def pair_inputs(bits: int, n: int, rng: np.random.Generator, integer_x: bool):
    """Random blocks (codes packed as GPTQ does: code j at bit bits·j of the block's words), zeros and x
    (bfloat16 values), and the operands the PTX takes."""
    per = WORDS[bits] * 32 // bits
    codes = rng.integers(0, 1 << bits, size=(n, per))
    stream = [0] * n
    for row in range(n):  # one Python int per block: the codes at bits·j, straddling words at 3 bits
        stream[row] = sum(int(c) << (bits * j) for j, c in enumerate(codes[row]))
    words = [np.array([(v >> (32 * w)) & 0xFFFFFFFF for v in stream], dtype=np.uint64) for w in range(WORDS[bits])]
    zeros = rng.integers(0, 1 << bits, size=n).astype(np.uint64)
    if integer_x:
        x = rng.integers(-2, 3, size=(n, per)).astype(np.float64)
    else:
        x = bf16_round(rng.standard_normal((n, per)))
    base, shift, high = zero_pair(bits)
    zz = (np.uint64(base) | (zeros << np.uint64(shift))) | ((np.uint64(high) | zeros) << np.uint64(16))
    xp = [bf16_bits(x[:, lo]) | (bf16_bits(x[:, hi]) << np.uint64(16)) for lo, hi in pair_plan(bits)]
    return codes, zeros.astype(np.int64), x, [*words, zz, *xp]


@pytest.mark.parametrize("bits", PAIR_BITS)
def test_pair_plan_covers_every_code_once(bits):
    plan = pair_plan(bits)
    assert sorted(j for pair in plan for j in pair) == list(range(WORDS[bits] * 32 // bits))


@pytest.mark.parametrize("bits", PAIR_BITS)
def test_pair_asm_sums_exactly_on_small_integers(bits):
    """x in {−2 … 2}: every product and partial sum is a small integer, exact in bfloat16, so the PTX must
    give Σ x (code − zero) exactly; a code in the wrong half, a wrong exponent or zero would not."""
    rng = np.random.default_rng(bits)
    codes, zeros, x, ops = pair_inputs(bits, 4096, rng, integer_x=True)
    got = run_ptx(pair_asm(bits), pair_constraints(bits), ops)
    want = (x * (codes - zeros[:, None])).sum(axis=1)
    np.testing.assert_array_equal(got, want)
    assert np.abs(want).max() > 0


@pytest.mark.parametrize("bits", PAIR_BITS)
def test_pair_asm_rounds_like_bfloat16_on_random_x(bits):
    """Random normal x: the sum matches float64 to bfloat16 rounding (a few products per half, each
    rounded once), and the per-word error is what the GPU tests' tolerance allows for."""
    rng = np.random.default_rng(10 + bits)
    codes, zeros, x, ops = pair_inputs(bits, 8192, rng, integer_x=False)
    got = run_ptx(pair_asm(bits), pair_constraints(bits), ops).astype(np.float64)
    want = (x * (codes - zeros[:, None])).sum(axis=1)
    scale = np.abs(x * (codes - zeros[:, None])).sum(axis=1) + 1e-30
    err = np.abs(got - want) / scale
    assert err.max() < 8 * 2.0**-8 and np.median(err) < 2.0**-8


def test_pair_asm_takes_only_widths_that_fit_bfloat16():
    with pytest.raises(ValueError, match="bits"):
        pair_asm(8)
    for bits in PAIR_BITS:  # every operand the constraints declare is read, and no other
        used = {int(v) for v in re.findall(r"\$(\d+)", pair_asm(bits))}
        assert used == set(range(pair_constraints(bits).count(",") + 1))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("bits", RUN_BITS)
def test_run_asm_gives_code_minus_zero_in_order(bits, dtype):
    """The dot kernel's run of 8 codes: every output half is ``code − zero`` of the code at its place
    (codes 2i low, 2i + 1 high in register i), exactly, for every code and zero; the operands Triton's
    packing passes as copies are ignored (fed different values here, they must not change the result)."""
    rng = np.random.default_rng(100 + bits)
    n = 4096
    codes = rng.integers(0, 1 << bits, size=(n, 8))
    codes[: 1 << bits, :] = np.arange(1 << bits)[:, None]  # every code, against every zero below
    zeros = rng.integers(0, 1 << bits, size=n)
    zeros[: 1 << bits] = (np.arange(1 << bits) * 5) % (1 << bits)
    run = sum(codes[:, j].astype(np.uint64) << np.uint64(bits * j) for j in range(8))
    if bits == 2:  # the run is a 16-bit half: the register's upper half is zero
        assert int(run.max()) < 1 << 16
    nz = (np.uint64(run_zero(dtype)) | zeros.astype(np.uint64)) * np.uint64(0x10001)
    noise = [rng.integers(0, 1 << 32, size=n).astype(np.uint64) for _ in range(14)]
    out = run_regs(run_asm(bits, dtype), RUN_CONSTRAINTS, [run, *noise[:7], nz, *noise[7:]])
    to_float = halves if dtype == "bfloat16" else f16_halves
    got = np.stack([h for r in out for h in to_float(r)], axis=1)  # (n, 8): code 2i, 2i + 1 of register i
    np.testing.assert_array_equal(got, codes - zeros[:, None])


def test_run_asm_reads_only_the_run_and_zero():
    with pytest.raises(ValueError, match="bits"):
        run_asm(3, "bfloat16")
    for bits in RUN_BITS:
        for dtype in ("bfloat16", "float16"):
            used = {int(v) for v in re.findall(r"\$(\d+)", run_asm(bits, dtype))}
            assert used == {0, 1, 2, 3, 4, 12}
            assert RUN_CONSTRAINTS.count("=") == 4 and RUN_CONSTRAINTS.count(",") + 1 == 4 + 16
