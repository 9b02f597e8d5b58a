"""The GPTQ packed format (quantizers/pack.py) and the QuantLinear module (quantizers/qlinear.py).

The bit layout is pinned three ways: hand-computed words, an independent re-implementation of
AutoGPTQ's packing loops (``qlinear_cuda_old.QuantLinear.pack``: ``|= v << bits·j`` for 2/4/8 bits,
the 10 | 1 | 10 | 1 | 10 scheme for 3 bits) and of its torch unpacking (shift, ``& maxq``, ``+ 1``).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from quantizers.base import QuantResult
from quantizers.pack import (
    check_packable,
    dequantize_packed,
    pack,
    pack_rows,
    packed_nbytes,
    unpack,
    unpack_result,
    unpack_rows,
    v1_wrapped_zeros,
)
from quantizers.qlinear import QuantLinear, kernel_paths

BITS = [2, 3, 4, 8]


def _i32(x: int) -> int:
    """The int32 with the bit pattern of the unsigned 32-bit ``x``."""
    return x - (1 << 32) if x >= 1 << 31 else x


def random_result(bits: int, in_f: int, out_f: int, group_size: int | None, seed: int,
                  permuted: bool = False) -> QuantResult:
    """Random codes/zeros/scales with both ends of the code and zero ranges present."""
    g = torch.Generator().manual_seed(seed)
    maxq = 2**bits - 1
    G = 1 if group_size is None else -(-in_f // group_size)
    codes = torch.randint(0, maxq + 1, (out_f, in_f), generator=g, dtype=torch.int32)
    codes[0, 0], codes[-1, -1] = 0, maxq
    zeros = torch.randint(0, maxq + 1, (out_f, G), generator=g, dtype=torch.int32)
    zeros[0, 0], zeros[-1, -1] = 0, maxq  # 0 wraps to maxq in v1; maxq is the largest stored value
    scales = torch.rand(out_f, G, generator=g) * 0.1 + 1e-3
    if group_size is None:
        g_idx = torch.zeros(in_f, dtype=torch.int32)
    else:
        g_idx = (torch.arange(in_f) // group_size).to(torch.int32)
        if permuted:  # desc_act without static groups: groups are runs of the processing order
            perm = torch.randperm(in_f, generator=g)
            g_idx = g_idx[torch.argsort(perm)]
    return QuantResult(codes=codes.to(torch.uint8), scales=scales, zeros=zeros, g_idx=g_idx, bits=bits)


# --- an independent AutoGPTQ-style packer / reader (numpy uint32, written from the loops) -------------------


def autogptq_pack_rows(v: np.ndarray, bits: int) -> np.ndarray:
    """(n, m) uint32 → (n·bits/32, m) uint32, AutoGPTQ's row loop."""
    v = v.astype(np.uint32)
    out = np.zeros((v.shape[0] // 32 * bits, v.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < out.shape[0]:
        if bits in (2, 4, 8):
            for j in range(32 // bits):
                out[row] |= v[i + j] << np.uint32(bits * j)
            i += 32 // bits
            row += 1
        else:  # 3 bits: 10 values, 2 bits of the 11th | its last bit, 10 values, 1 bit of the 22nd | ...
            for j in range(10):
                out[row] |= v[i + j] << np.uint32(3 * j)
            i += 10
            out[row] |= v[i] << np.uint32(30)
            row += 1
            out[row] |= (v[i] >> np.uint32(2)) & np.uint32(1)
            i += 1
            for j in range(10):
                out[row] |= v[i + j] << np.uint32(3 * j + 1)
            i += 10
            out[row] |= v[i] << np.uint32(31)
            row += 1
            out[row] |= (v[i] >> np.uint32(1)) & np.uint32(3)
            i += 1
            for j in range(10):
                out[row] |= v[i + j] << np.uint32(3 * j + 2)
            i += 10
            row += 1
    return out


def serving_reader_zeros(qzeros: torch.Tensor, bits: int, out_f: int) -> torch.Tensor:
    """Zeros as the serving kernels read v1: ``((word >> shift) & maxq) + 1`` (no final mask)."""
    return unpack_rows(qzeros.t(), bits, out_f).t() + 1  # unpack_rows masks each value to [0, maxq]


# --- hand-computed words -------------------------------------------------------------------------------------


def test_eight_4bit_codes_fill_one_word_low_nibble_first():
    col = torch.arange(1, 9).reshape(8, 1)  # codes 1..8 of input columns 0..7 of one output
    assert pack_rows(col, 4).item() == _i32(0x87654321)  # int32 storage of the same bits
    r = QuantResult(codes=torch.zeros(8, 8, dtype=torch.uint8), scales=torch.ones(8, 1),
                    zeros=torch.full((8, 1), 8, dtype=torch.int32), g_idx=torch.zeros(8, dtype=torch.int32), bits=4)
    r.codes[3] = torch.arange(8, 0, -1, dtype=torch.uint8)  # output 3: codes 8..1
    t = pack(r)
    assert t["qweight"].shape == (1, 8) and t["qweight"].dtype == torch.int32
    assert t["qweight"][0, 3].item() == 0x12345678 and t["qweight"][0, 0].item() == 0
    # symmetric 4-bit zero 8 is stored as 7 in every nibble: the familiar 0x77777777 of sym checkpoints
    assert t["qzeros"].shape == (1, 1) and t["qzeros"].item() == 0x77777777
    top = torch.zeros(8, 1, dtype=torch.int64)
    top[7] = 15  # the sign bit of the int32
    assert pack_rows(top, 4).item() == _i32(0xF0000000)


def test_3bit_values_10_and_21_straddle_words():
    v = torch.zeros(32, 1, dtype=torch.int64)
    v[10] = 0b111  # bits 30, 31 of word 0 and bit 0 of word 1
    assert [w & 0xFFFFFFFF for w in pack_rows(v, 3).flatten().tolist()] == [0xC0000000, 0x1, 0x0]
    v[10], v[21] = 0b100, 0b111  # only the high bit of value 10 → word 1 bit 0; value 21 → w1 bit 31, w2 bits 0–1
    assert [w & 0xFFFFFFFF for w in pack_rows(v, 3).flatten().tolist()] == [0x0, 0x80000001, 0x3]
    v = torch.zeros(32, 1, dtype=torch.int64)
    v[0], v[11], v[22], v[31] = 5, 6, 3, 7  # first value of each word, and the last one
    assert [w & 0xFFFFFFFF for w in pack_rows(v, 3).flatten().tolist()] == [0x5, 6 << 1, (3 << 2) | (7 << 29)]


def test_2bit_and_8bit_words():
    assert pack_rows(torch.tensor([[1], [2], [3]] + [[0]] * 13), 2).item() == 0b111001
    assert pack_rows(torch.tensor([[0x12], [0x34], [0x56], [0xF8]]), 8).item() == _i32(0xF8563412)


# --- round trips and the AutoGPTQ reference --------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
def test_pack_rows_matches_autogptq_loops(bits):
    for seed in range(3):
        g = torch.Generator().manual_seed(100 * bits + seed)
        v = torch.randint(0, 2**bits, (96, 7), generator=g)
        ref = autogptq_pack_rows(v.numpy(), bits).astype(np.int64)
        ours = pack_rows(v, bits).to(torch.int64).numpy() & 0xFFFFFFFF
        np.testing.assert_array_equal(ours, ref)
        assert torch.equal(unpack_rows(pack_rows(v, bits), bits, 96), v)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape,group_size,permuted", [
    ((64, 32), None, False),  # per-channel
    ((96, 64), 32, False),  # groups
    ((160, 32), 64, False),  # ragged last group (160 = 2·64 + 32)
    ((128, 96), 32, True),  # desc_act: permuted g_idx
])
def test_pack_unpack_is_exact(bits, shape, group_size, permuted):
    in_f, out_f = shape
    for seed in range(2):
        r = random_result(bits, in_f, out_f, group_size, seed=1000 * bits + seed, permuted=permuted)
        t = pack(r)
        G = r.n_groups
        assert t["qweight"].shape == (in_f * bits // 32, out_f) and t["qweight"].dtype == torch.int32
        assert t["qzeros"].shape == (G, out_f * bits // 32) and t["qzeros"].dtype == torch.int32
        assert t["scales"].shape == (G, out_f) and t["scales"].dtype == torch.float16
        assert t["g_idx"].shape == (in_f,) and t["g_idx"].dtype == torch.int32
        codes, zeros, scales, g_idx = unpack(t, bits, in_f, out_f)
        assert codes.dtype == torch.uint8 and torch.equal(codes, r.codes)
        assert torch.equal(zeros, r.zeros)  # zero = 0 included: (stored + 1) & maxq
        assert torch.equal(g_idx, r.g_idx)
        assert torch.equal(scales, r.scales.half().float())
        # qweight is AutoGPTQ's packing of the (in, out) codes; qzeros of zero − 1 for zeros ≥ 1
        ref_q = autogptq_pack_rows(r.codes.t().numpy(), bits).astype(np.int64)
        np.testing.assert_array_equal(t["qweight"].to(torch.int64).numpy() & 0xFFFFFFFF, ref_q)
        served = serving_reader_zeros(t["qzeros"], bits, out_f).t()  # (out, G)
        ok = r.zeros > 0
        assert torch.equal(served[ok], r.zeros[ok].long())
        assert bool((served[~ok] == 2**bits).all())  # v1's known wrap: a zero of 0 reads as 2**bits there
        assert v1_wrapped_zeros(r.zeros) == int((~ok).sum()) >= 1
        # v2 stores the zero itself
        t2 = pack(r, "gptq_v2")
        assert torch.equal(unpack(t2, bits, in_f, out_f, "gptq_v2")[1], r.zeros)
        assert torch.equal(t2["qweight"], t["qweight"])


@pytest.mark.parametrize("bits", BITS)
def test_dequantize_packed_is_the_results_grid_with_float16_scales(bits):
    r = random_result(bits, 64, 64, 32, seed=7 + bits, permuted=True)
    t = pack(r)
    r16 = QuantResult(r.codes, r.scales.half().float(), r.zeros, r.g_idx, bits)
    assert torch.equal(dequantize_packed(t, bits, 64, 64), r16.dequantize())
    assert torch.equal(unpack_result(t, bits, 64, 64).dequantize(), r16.dequantize())
    assert dequantize_packed(t, bits, 64, 64, torch.float16).dtype == torch.float16


def test_shapes_the_format_cannot_hold_are_refused():
    check_packable(4, 576, 1536)  # SmolLM2
    check_packable(3, 576, 1536)
    for bits, in_f, out_f in [(5, 64, 64), (3, 48, 64), (4, 12, 64), (2, 24, 64), (8, 6, 64), (4, 64, 36)]:
        with pytest.raises(ValueError, match="bits|divisible"):
            check_packable(bits, in_f, out_f)
    with pytest.raises(ValueError, match="in_features=48 .* multiple of 32"):
        pack(random_result(3, 48, 32, None, seed=0))
    bad = random_result(4, 32, 32, None, seed=0)
    bad.codes[0, 0] = 16
    with pytest.raises(ValueError, match="codes must lie in"):
        pack(bad)
    bad = random_result(4, 32, 32, None, seed=0)
    bad.scales[0, 0] = 1e6  # inf in float16
    with pytest.raises(ValueError, match="float16"):
        pack(bad)
    with pytest.raises(ValueError, match="qweight has shape"):
        unpack(pack(random_result(4, 32, 32, None, seed=0)), 4, 64, 32)


def test_packed_nbytes_by_hand():
    # 4 bits, in 576, out 1536, groups of 128 → 5 groups (the last ragged)
    want = 576 * 1536 // 2 + 5 * (1536 * 4 // 32) * 4 + 5 * 1536 * 2 + 576 * 4
    assert packed_nbytes(4, 576, 1536, 5) == want == 442368 + 3840 + 15360 + 2304


# --- QuantLinear -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size,permuted", [(None, False), (32, False), (32, True)])
def test_quantlinear_forward_is_x_times_dequantized_weight(bits, group_size, permuted):
    in_f, out_f = 96, 64
    r = random_result(bits, in_f, out_f, group_size, seed=bits * 10 + (group_size or 0) + permuted, permuted=permuted)
    bias = torch.randn(out_f)
    x = torch.randn(2, 5, in_f)
    W = dequantize_packed(pack(r), bits, in_f, out_f)  # (out, in) float32
    for cache in (True, False):
        m = QuantLinear.from_result(r, bias, torch.float32, group_size=group_size, cache_weight=cache)
        assert m.backend == "torch"
        assert m.path == ("torch-dequant-cached" if cache else "torch-dequant")
        y = m(x)
        assert y.shape == (2, 5, out_f)
        torch.testing.assert_close(y, x @ W.T + bias, rtol=1e-5, atol=1e-5)
        assert (m._weight is not None) == cache
        assert torch.equal(m.dequantize(), W)
    m = QuantLinear.from_result(r, None, torch.float32)
    torch.testing.assert_close(m(x), x @ W.T, rtol=1e-5, atol=1e-5)


def test_quantlinear_buffers_state_dict_and_bytes():
    r = random_result(4, 64, 32, 32, seed=3)
    m = QuantLinear.from_result(r, torch.zeros(32), torch.float16)
    sd = m.state_dict()
    assert sorted(sd) == ["bias", "g_idx", "qweight", "qzeros", "scales"]
    assert sd["bias"].dtype == torch.float16
    # qweight 64·4/32 × 32 int32 + qzeros 2 × 4 int32 + scales 2 × 32 fp16 + g_idx 64 int32
    assert m.weight_bytes() == 8 * 32 * 4 + 2 * 4 * 4 + 2 * 32 * 2 + 64 * 4 == packed_nbytes(4, 64, 32, 2)
    # loading new tensors drops the cached weight
    x = torch.randn(3, 64, dtype=torch.float16)
    m(x)
    assert m._weight is not None
    other = QuantLinear.from_result(random_result(4, 64, 32, 32, seed=4), torch.zeros(32), torch.float16)
    m.load_state_dict(other.state_dict())
    assert m._weight is None
    assert torch.equal(m(x), other(x))
    assert kernel_paths(torch.nn.Sequential(m, other)) == {"torch-dequant-cached": 2}


def test_quantlinear_unknown_backend_is_refused():
    m = QuantLinear.from_result(random_result(4, 32, 32, None, seed=0), None, torch.float32)
    with pytest.raises(ValueError, match="unknown QuantLinear backend 'tritn'"):
        m.backend = "tritn"
    with pytest.raises(ValueError, match="bits"):
        QuantLinear(5, 64, 64, 1, bias=False)
