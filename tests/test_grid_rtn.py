"""The uniform grid and RTN against hand-computed cases and a brute-force clipping search."""
from __future__ import annotations

import pytest
import torch

from quantizers import QuantConfigError
from quantizers.grid import codes_of, fake_quantize, find_params
from quantizers.rtn import RTNConfig, quantize


def test_asym_two_bit_hand_computed():
    x = torch.tensor([[-1.0, 0.0, 0.5, 1.0]])
    scale, zero = find_params(x, bits=2, sym=False)
    assert scale.item() == pytest.approx(2 / 3)
    assert zero.item() == 2  # round(1.5) = 2 (half to even)
    assert codes_of(x, scale[:, None], zero[:, None], 3).tolist() == [[0, 2, 3, 3]]
    assert fake_quantize(x, scale[:, None], zero[:, None], 3)[0].tolist() == pytest.approx([-4 / 3, 0, 2 / 3, 2 / 3])


def test_sym_and_asym_differ_as_the_reference():
    x = torch.tensor([[-0.5, 2.0]])
    s, z = find_params(x, bits=2, sym=False)
    assert (s.item(), z.item()) == (pytest.approx(2.5 / 3), 1.0)  # zero = round(0.6)
    s, z = find_params(x, bits=2, sym=True)
    assert (s.item(), z.item()) == (pytest.approx(4 / 3), 2.0)  # range [-2, 2], zero = (maxq+1)/2
    assert codes_of(x, s[:, None], z[:, None], 3).tolist() == [[2, 3]]  # 1.5 rounds to 2, +2 clamps to 3


def test_all_zero_row_gets_unit_range_and_positive_row_quirk():
    s, z = find_params(torch.zeros(1, 5), bits=2, sym=False)
    assert (s.item(), z.item()) == (pytest.approx(2 / 3), 2.0)
    # reference quirk: a symmetric grid of an all-positive row keeps xmin = 0
    s, z = find_params(torch.tensor([[1.0, 2.0]]), bits=4, sym=True)
    assert (s.item(), z.item()) == (pytest.approx(2 / 15), 8.0)


def test_range_always_contains_zero():
    x = torch.tensor([[3.0, 4.0, 5.0]])
    s, z = find_params(x, bits=3, sym=False)
    assert z.item() == 0 and s.item() == pytest.approx(5 / 7)
    x = torch.tensor([[-5.0, -3.0]])
    s, z = find_params(x, bits=3, sym=False)
    assert z.item() == 7 and s.item() == pytest.approx(5 / 7)


def _brute_force_mse(x, bits, sym, grid=100, maxshrink=0.8, norm=2.4):
    maxq = 2**bits - 1
    best = []
    for row in x:
        r = row[None]
        s0, z0 = find_params(r, bits, sym)
        lo, hi = min(row.min().item(), 0.0), max(row.max().item(), 0.0)
        if sym:
            hi = max(abs(lo), hi)
            lo = -hi if lo < 0 else lo
        cands = []
        for i in range(int(maxshrink * grid)):
            p = 1 - i / grid
            scale = torch.tensor((p * hi - p * lo) / maxq)
            zero = z0[0] if sym else torch.round(-p * lo / scale)
            err = (fake_quantize(row, scale, zero, maxq) - row).abs().pow(norm).sum().item()
            cands.append((err, i, scale.item(), zero.item()))
        best.append(min(cands, key=lambda c: (c[0], c[1])))  # first minimum wins, as a strict < keeps it
    return best


@pytest.mark.parametrize("sym", [False, True])
def test_mse_search_matches_brute_force(sym):
    g = torch.Generator().manual_seed(11 + sym)
    x = torch.randn(6, 40, generator=g)
    x[:, 3] *= 8  # outliers make clipping worthwhile
    s, z = find_params(x, bits=3, sym=sym, mse=True)
    for row, (_, _, scale, zero) in enumerate(_brute_force_mse(x, 3, sym)):
        assert s[row].item() == pytest.approx(scale, rel=1e-5)
        assert z[row].item() == zero
    s0, z0 = find_params(x, bits=3, sym=sym)
    err = lambda s_, z_: (fake_quantize(x, s_[:, None], z_[:, None], 7) - x).abs().pow(2.4).sum(1)
    assert (err(s, z) <= err(s0, z0) + 1e-6).all()


def test_rtn_groups_with_ragged_last_group():
    g = torch.Generator().manual_seed(5)
    W = torch.randn(3, 10, generator=g)
    res = quantize(W, None, RTNConfig(bits=4, group_size=4))
    assert res.scales.shape == (3, 3) and res.g_idx.tolist() == [0] * 4 + [1] * 4 + [2] * 2
    for gi, cols in enumerate([slice(0, 4), slice(4, 8), slice(8, 10)]):
        s, z = find_params(W[:, cols], 4, False)
        torch.testing.assert_close(res.scales[:, gi], s)
        assert res.zeros[:, gi].tolist() == z.int().tolist()
        torch.testing.assert_close(res.dequantize()[:, cols], fake_quantize(W[:, cols], s[:, None], z[:, None], 15))
    assert res.codes.min() >= 0 and res.codes.max() <= 15


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rtn_is_nearest_grid_point(bits):
    g = torch.Generator().manual_seed(100 + bits)
    W = torch.randn(8, 32, generator=g)
    res = quantize(W, None, RTNConfig(bits=bits))
    Q = res.dequantize()
    # every weight inside the grid's range is within half a step of its rounded value
    step = res.scales[:, :1]
    lo = step * (0 - res.zeros[:, :1])
    hi = step * (2**bits - 1 - res.zeros[:, :1])
    inside = (W >= lo) & (W <= hi)
    assert ((W - Q).abs() <= step / 2 + 1e-6)[inside].all()
    assert res.codes.max() <= 2**bits - 1


def test_rtn_per_channel_aliases():
    cfg = RTNConfig(bits=4, group_size=-1).validate()
    assert cfg.group_size is None


@pytest.mark.parametrize("kwargs,key", [({"bits": 1}, "bits"), ({"bits": 9}, "bits"), ({"group_size": 0}, "group_size"),
                                        ({"group_size": -2}, "group_size"), ({"group_size": True}, "group_size"),
                                        ({"mse_grid": 0}, "mse_grid"), ({"mse_maxshrink": 1.0}, "mse_maxshrink"),
                                        ({"mse_norm": -1.0}, "mse_norm")])
def test_rtn_config_errors_name_the_key(kwargs, key):
    with pytest.raises(QuantConfigError) as info:
        RTNConfig(**kwargs).validate()
    assert info.value.key == key
