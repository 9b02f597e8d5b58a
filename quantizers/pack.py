"""The GPTQ packed format: how a :class:`QuantResult` is stored in a checkpoint that AutoGPTQ,
GPTQModel, transformers (optimum + gptqmodel) and vLLM load.

Tensors of one linear with ``in`` inputs, ``out`` outputs and ``G`` groups::

    qweight  int32   (in · bits / 32, out)   codes packed along the input dimension
    qzeros   int32   (G, out · bits / 32)    zero points packed along the output dimension
    scales   float16 (G, out)
    g_idx    int32   (in,)                   group of every input column

Bit layout (AutoGPTQ ``qlinear_cuda_old.QuantLinear.pack`` / GPTQModel ``pack_block``): along the
packed dimension the values form one little-endian bit stream — value ``k`` occupies bits
``[k·bits, (k+1)·bits)`` of the concatenated 32-bit words, word ``w`` holding stream bits
``[32w, 32w + 32)``. For 2/4/8 bits that is ``32 / bits`` whole values per word, value ``j`` of a
word at bit ``bits·j``; for 3 bits, 32 values fill 3 words and values 10 and 21 straddle a word
boundary (value 10: bits 30–31 of word 0 + bit 0 of word 1; value 21: bit 31 of word 1 + bits 0–1
of word 2), exactly AutoGPTQ's ``10 | 1 | 10 | 1 | 10`` scheme.

Zero points ("v1", ``checkpoint_format: gptq``) are stored as ``zero − 1``. A zero of 0 would be
−1; AutoGPTQ packs it unmasked (``np.uint32(-1) << shift`` also sets the bits of every later value
in the word) and GPTQModel's v2→v1 conversion subtracts ``0x11111111`` (borrowing from the
neighbour). Here the stored value is masked, ``(zero − 1) & maxq``, so no neighbour is touched, and
:func:`unpack` reads ``(stored + 1) & maxq``: exact for every zero in ``[0, maxq]``. The readers of
serving stacks compute ``(stored & maxq) + 1`` without the final mask, so they see a zero of 0 as
``2**bits`` — the known limitation of v1 with ``sym=False`` (symmetric zeros are ``2**(bits−1)``,
never 0). :func:`v1_wrapped_zeros` counts the groups affected; ``checkpoint_format: gptq_v2``
stores zeros as they are.

Shape requirements: ``bits`` in {2, 3, 4, 8} (the format has no 5–7 bit layout); ``in · bits`` and
``out · bits`` divisible by 32 (2 bits: 16 | in; 3 bits: 32 | in; 4 bits: 8 | in; 8 bits: 4 | in;
the same for out). Most serving kernels further want ``in`` and ``out`` divisible by 32 (GPTQModel's
``pack_block``, AutoGPTQ's triton kernel) and, with groups, ``group_size`` dividing ``in``; SmolLM2's
576 and 1536 satisfy all of these.
"""
from __future__ import annotations

import math

import torch

from quantizers.base import QuantResult

SUPPORTED_BITS = (2, 3, 4, 8)
FORMATS = ("gptq", "gptq_v2")  # v1 stores zero − 1, v2 the zero itself
WORD_BITS = 32
_MASK32 = (1 << 32) - 1


def check_packable(bits: int, in_features: int, out_features: int) -> None:
    """Raise ``ValueError`` unless an ``(out, in)`` weight of ``bits`` fits the GPTQ packed layout."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"the GPTQ packed format has layouts for bits {SUPPORTED_BITS} only, not {bits}")
    for name, n in (("in_features", in_features), ("out_features", out_features)):
        if n <= 0 or (n * bits) % WORD_BITS:
            need = WORD_BITS // math.gcd(WORD_BITS, bits)
            raise ValueError(f"{name}={n} cannot be packed at {bits} bits: {name}·bits must be divisible by 32 "
                             f"({name} a multiple of {need})")


def packed_shapes(bits: int, in_features: int, out_features: int, n_groups: int) -> dict[str, tuple[int, ...]]:
    """Shapes of ``qweight``, ``qzeros``, ``scales``, ``g_idx`` for one linear."""
    return {
        "qweight": (in_features * bits // WORD_BITS, out_features),
        "qzeros": (n_groups, out_features * bits // WORD_BITS),
        "scales": (n_groups, out_features),
        "g_idx": (in_features,),
    }


def packed_nbytes(bits: int, in_features: int, out_features: int, n_groups: int) -> int:
    """Bytes of the packed tensors (qweight, qzeros int32; scales float16; g_idx int32), bias excluded."""
    s = packed_shapes(bits, in_features, out_features, n_groups)
    return 4 * math.prod(s["qweight"]) + 4 * math.prod(s["qzeros"]) + 2 * math.prod(s["scales"]) + 4 * in_features


def _block(bits: int) -> tuple[int, int]:
    """(values, words) of the smallest whole block: (16, 1), (32, 3), (8, 1), (4, 1) for 2, 3, 4, 8 bits."""
    g = math.gcd(WORD_BITS, bits)
    return WORD_BITS // g, bits // g


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``values`` (n, m), integers in ``[0, 2**bits)``, along dim 0 → int32 (n · bits / 32, m)."""
    n, m = values.shape
    per, words = _block(bits)
    if n % per:
        raise ValueError(f"{n} values cannot be packed at {bits} bits (need a multiple of {per})")
    v = values.to(torch.int64).reshape(n // per, per, m)
    out = torch.zeros(n // per, words, m, dtype=torch.int64, device=values.device)
    for k in range(per):
        w, s = divmod(k * bits, WORD_BITS)
        out[:, w] |= (v[:, k] << s) & _MASK32
        if s + bits > WORD_BITS:  # straddles into the next word (3 bits: values 10 and 21)
            out[:, w + 1] |= v[:, k] >> (WORD_BITS - s)
    out = out.reshape(-1, m)
    return torch.where(out >= 1 << 31, out - (1 << 32), out).to(torch.int32)  # same bits, signed


def unpack_rows(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: int32 (n · bits / 32, m) → int64 (n, m) in ``[0, 2**bits)``."""
    per, words = _block(bits)
    m = packed.shape[1]
    if n % per or packed.shape[0] != n // per * words:
        raise ValueError(f"packed rows {packed.shape[0]} do not hold {n} values of {bits} bits")
    w64 = (packed.to(torch.int64) & _MASK32).reshape(n // per, words, m)
    maxq = (1 << bits) - 1
    out = torch.empty(n // per, per, m, dtype=torch.int64, device=packed.device)
    for k in range(per):
        w, s = divmod(k * bits, WORD_BITS)
        val = w64[:, w] >> s
        if s + bits > WORD_BITS:
            val = val | (w64[:, w + 1] << (WORD_BITS - s))
        out[:, k] = val & maxq
    return out.reshape(n, m)


def pack(result: QuantResult, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """``result`` (codes (out, in), scales / zeros (out, G), g_idx (in,)) → the GPTQ tensors on the CPU.

    Returns ``qweight`` int32 (in·bits/32, out), ``qzeros`` int32 (G, out·bits/32) holding
    ``(zero − 1) & maxq`` (v1) or the zero (v2), ``scales`` float16 (G, out), ``g_idx`` int32 (in,).
    Raises ``ValueError`` on a shape the format cannot hold, codes or zeros outside ``[0, maxq]``,
    or scales that are not finite in float16.
    """
    if checkpoint_format not in FORMATS:
        raise ValueError(f"unknown checkpoint_format {checkpoint_format!r} (use one of {FORMATS})")
    bits = result.bits
    out_f, in_f = result.codes.shape
    check_packable(bits, in_f, out_f)
    G = result.n_groups
    if result.scales.shape != (out_f, G) or result.zeros.shape != (out_f, G) or result.g_idx.shape != (in_f,):
        raise ValueError(f"inconsistent QuantResult: codes {tuple(result.codes.shape)}, scales "
                         f"{tuple(result.scales.shape)}, zeros {tuple(result.zeros.shape)}, g_idx "
                         f"{tuple(result.g_idx.shape)}")
    maxq = (1 << bits) - 1
    codes = result.codes.detach().cpu().to(torch.int64)
    zeros = result.zeros.detach().cpu()
    if zeros.is_floating_point():
        if not bool((zeros == zeros.round()).all()):
            raise ValueError("zeros must be integral")
        zeros = zeros.round()
    zeros = zeros.to(torch.int64)
    g_idx = result.g_idx.detach().cpu().to(torch.int64)
    for name, t in (("codes", codes), ("zeros", zeros)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) > maxq):
            raise ValueError(f"{name} must lie in [0, {maxq}] for {bits} bits (found {int(t.min())}..{int(t.max())})")
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= G):
        raise ValueError(f"g_idx must lie in [0, {G}) (found {int(g_idx.min())}..{int(g_idx.max())})")
    scales = result.scales.detach().cpu().to(torch.float16)
    if not bool(torch.isfinite(scales).all()):
        raise ValueError("scales are not finite in float16 (|scale| > 65504 or NaN)")
    stored = (zeros - 1) & maxq if checkpoint_format == "gptq" else zeros
    return {
        "qweight": pack_rows(codes.t(), bits),  # (in, out) → packed along in
        "qzeros": _pack_cols(stored.t(), bits),  # (G, out) → packed along out
        "scales": scales.t().contiguous(),
        "g_idx": g_idx.to(torch.int32),
    }


def _pack_cols(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``values`` (G, out) along dim 1 → int32 (G, out · bits / 32)."""
    return pack_rows(values.t(), bits).t().contiguous()


def unpack(tensors: dict[str, torch.Tensor], bits: int, in_features: int, out_features: int,
           checkpoint_format: str = "gptq") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact inverse of :func:`pack` → ``codes`` uint8 (out, in), ``zeros`` int32 (out, G),
    ``scales`` float32 (out, G) (the stored float16 values, widened), ``g_idx`` int32 (in,)."""
    if checkpoint_format not in FORMATS:
        raise ValueError(f"unknown checkpoint_format {checkpoint_format!r} (use one of {FORMATS})")
    check_packable(bits, in_features, out_features)
    qweight, qzeros, scales, g_idx = (tensors[k] for k in ("qweight", "qzeros", "scales", "g_idx"))
    G = scales.shape[0]
    want = packed_shapes(bits, in_features, out_features, G)
    for name, t in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales), ("g_idx", g_idx)):
        if tuple(t.shape) != want[name]:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {want[name]} for "
                             f"{bits} bits, in={in_features}, out={out_features}, {G} groups")
    maxq = (1 << bits) - 1
    codes = unpack_rows(qweight, bits, in_features).t().to(torch.uint8)  # (out, in)
    stored = unpack_rows(qzeros.t(), bits, out_features)  # (out, G)
    zeros = (stored + 1) & maxq if checkpoint_format == "gptq" else stored
    return codes.contiguous(), zeros.to(torch.int32), scales.t().float().contiguous(), g_idx.to(torch.int32)


def unpack_result(tensors: dict[str, torch.Tensor], bits: int, in_features: int, out_features: int,
                  checkpoint_format: str = "gptq") -> QuantResult:
    """:func:`unpack` as a :class:`QuantResult`."""
    codes, zeros, scales, g_idx = unpack(tensors, bits, in_features, out_features, checkpoint_format)
    return QuantResult(codes=codes, scales=scales, zeros=zeros, g_idx=g_idx, bits=bits)


def dequantize_packed(tensors: dict[str, torch.Tensor], bits: int, in_features: int, out_features: int,
                      dtype: torch.dtype = torch.float32, checkpoint_format: str = "gptq") -> torch.Tensor:
    """(out, in) weight ``scale[g] · (code − zero[g])``, ``g = g_idx[col]``, computed in float32 as
    :meth:`QuantResult.dequantize` does, then cast to ``dtype``."""
    return unpack_result(tensors, bits, in_features, out_features, checkpoint_format).dequantize().to(dtype)


def v1_wrapped_zeros(zeros: torch.Tensor) -> int:
    """Groups whose zero is 0: stored as ``maxq`` in v1, read back as ``2**bits`` by serving kernels
    (this module's :func:`unpack` reads them exactly)."""
    return int((zeros == 0).sum())
