"""GPTQ checkpoints: swap quantized linears for :class:`QuantLinear`, write the directory serving
stacks load (``model.safetensors`` + ``config.json`` with ``quantization_config`` +
``quantize_config.json`` + the tokenizer), read such a directory back, and measure weight memory.

Tensor names are the module's: ``<module>.qweight / .qzeros / .scales / .g_idx / .bias``
(transformers + optimum/gptqmodel, AutoGPTQ, GPTQModel and vLLM all use them). GPT-2's Conv1D
stores its weight as (in, out); a :class:`QuantResult` is always (out, in), and the packed layout
is the same for both (AutoGPTQ transposes Conv1D before packing), so a Conv1D becomes a
QuantLinear like any nn.Linear.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.adapters import Adapter, is_quantizable, weight_matrix
from quantizers import QuantResult
from quantizers.pack import pack, v1_wrapped_zeros
from quantizers.qlinear import QuantLinear

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_PACKED = ("qweight", "qzeros", "scales", "g_idx")


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _in_out(module: nn.Module, transposed: bool) -> tuple[int, int]:
    rows, cols = module.weight.shape
    return (rows, cols) if transposed else (cols, rows)


def replace_linears(model: nn.Module, adapter: Adapter, results: dict[str, QuantResult],
                    group_size: int | None = None, **kwargs: Any) -> list[str]:
    """Replace every module named in ``results`` (full names) by a :class:`QuantLinear` packed from
    its result, keeping its bias, dtype and device; returns the names replaced. ``kwargs`` go to
    QuantLinear (``backend``, ``cache_weight``, ``checkpoint_format``)."""
    done = []
    for name, res in results.items():
        mod = model.get_submodule(name)
        if isinstance(mod, QuantLinear):
            continue
        if not is_quantizable(mod):
            raise ValueError(f"{name} is a {type(mod).__name__}, not a linear layer")
        shape = tuple(weight_matrix(mod, adapter).shape)
        if shape != tuple(res.codes.shape):
            raise ValueError(f"{name}: weight is {shape} (out, in) but its QuantResult is {tuple(res.codes.shape)}")
        q = QuantLinear.from_result(res, mod.bias, mod.weight.dtype, group_size=group_size, **kwargs)
        _set_submodule(model, name, q.to(mod.weight.device))
        done.append(name)
    return done


def quantization_config(qcfg: Any, bits: int, true_sequential: bool | None = None,
                        meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``quantization_config`` block (also ``quantize_config.json``) for a quantizer config
    (GPTQ's, RTN's, ... or a dict); fields a method lacks get the GPTQ defaults."""
    def get(key: str, default: Any) -> Any:
        return qcfg.get(key, default) if isinstance(qcfg, dict) else getattr(qcfg, key, default)

    gs = get("group_size", None)
    return {
        "quant_method": "gptq",
        "bits": int(bits),
        "group_size": -1 if gs in (None, -1) else int(gs),
        "desc_act": bool(get("desc_act", False)),
        "sym": bool(get("sym", False)),
        "damp_percent": float(get("damp_percent", 0.01)),
        "static_groups": bool(get("static_groups", False)),
        "true_sequential": bool(get("true_sequential", True) if true_sequential is None else true_sequential),
        "checkpoint_format": "gptq",
        "pack_dtype": "int32",
        "lm_head": False,
        "meta": {"quantizer": ["quant-harness"], **(meta or {})},
    }


def _storage_key(t: torch.Tensor) -> tuple[int, int, tuple[int, ...]]:
    return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)


def _dedup_tied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop later keys that share storage with an earlier one (tied lm_head ↔ embeddings)."""
    seen, out = set(), {}
    for k, t in state.items():
        key = _storage_key(t)
        if key in seen:
            continue
        seen.add(key)
        out[k] = t
    return out


def checkpoint_state(model: nn.Module, results: dict[str, QuantResult]) -> tuple[dict[str, torch.Tensor], int]:
    """The checkpoint's tensors: the model's own, with each module of ``results`` as packed
    tensors (+ its bias) instead of its weight; tied duplicates dropped. Also returns the number
    of groups whose zero is 0 (see :func:`quantizers.pack.v1_wrapped_zeros`)."""
    prefixes = tuple(f"{n}." for n in results)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)}
    wrapped = 0
    for name, res in results.items():
        mod = model.get_submodule(name)
        for k, t in pack(res).items():
            state[f"{name}.{k}"] = t
        if getattr(mod, "bias", None) is not None:
            state[f"{name}.bias"] = mod.bias.detach()
        wrapped += v1_wrapped_zeros(res.zeros)
    state = _dedup_tied(state)
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}, wrapped


def save_gptq_checkpoint(model: nn.Module, tokenizer: Any, results: dict[str, QuantResult], qcfg: Any,
                         path: str | Path, true_sequential: bool | None = None,
                         meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``path``/{model.safetensors, config.json, quantize_config.json, tokenizer files}.

    ``model`` may hold the fake-quantized linears or QuantLinear modules already; ``results``
    (full module name → QuantResult) is the source of the packed tensors either way. Non-quantized
    tensors keep the model's dtype. ``meta`` (e.g. run id, config hash) goes into
    ``quantization_config.meta``. Returns a summary: files, tensors, bytes, ``v1_wrapped_zeros``.
    Raises ``ValueError`` for shapes/bit widths the format cannot hold or mixed bit widths.
    """
    from safetensors.torch import save_file

    if not results:
        raise ValueError("no quantized modules to export (results is empty: run quantize_model with keep_results=True)")
    bits = {r.bits for r in results.values()}
    if len(bits) != 1:
        raise ValueError(f"one bit width per checkpoint, found {sorted(bits)}")
    qc = quantization_config(qcfg, bits.pop(), true_sequential, meta)
    cfg_bits = qcfg.get("bits") if isinstance(qcfg, dict) else getattr(qcfg, "bits", None)
    if cfg_bits is not None and cfg_bits != qc["bits"]:
        raise ValueError(f"the quantizer config says bits={cfg_bits} but the results have {qc['bits']} bits")
    if not qc["desc_act"]:  # loaders then assume g_idx[i] = i // group_size and may ignore g_idx
        for name, r in results.items():
            gs = r.codes.shape[1] if qc["group_size"] == -1 else qc["group_size"]
            trivial = torch.arange(r.codes.shape[1]) // gs
            if not torch.equal(r.g_idx.cpu().long(), trivial):
                raise ValueError(f"{name}: g_idx is permuted but desc_act is false; set desc_act=true")
    state, wrapped = checkpoint_state(model, results)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = qc
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out / "quantize_config.json").write_text(json.dumps(qc, indent=2, sort_keys=True) + "\n")
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return {"path": str(out), "tensors": len(state), "modules": len(results),
            "bytes": (out / WEIGHTS_FILE).stat().st_size, "v1_wrapped_zeros": wrapped, "quantization_config": qc}


def read_quantization_config(path: str | Path) -> dict[str, Any] | None:
    """``quantization_config`` of ``path``/config.json (or quantize_config.json), or None."""
    p = Path(path)
    for name in ("config.json", "quantize_config.json"):
        f = p / name
        if f.is_file():
            try:
                d = json.loads(f.read_text())
            except (OSError, ValueError):
                return None
            qc = d.get("quantization_config") if name == "config.json" else d
            if qc:
                return qc
    return None


def is_gptq_checkpoint(path: str | Path) -> bool:
    """A local directory whose config.json has ``quantization_config.quant_method == "gptq"``."""
    p = Path(path)
    if not (p / "config.json").is_file():
        return False
    qc = read_quantization_config(p)
    return bool(qc) and str(qc.get("quant_method", "")).lower() == "gptq"


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if (path / WEIGHTS_FILE).is_file():
        return load_file(str(path / WEIGHTS_FILE))
    if (path / INDEX_FILE).is_file():
        shards = sorted(set(json.loads((path / INDEX_FILE).read_text())["weight_map"].values()))
        out: dict[str, torch.Tensor] = {}
        for s in shards:
            out.update(load_file(str(path / s)))
        return out
    raise FileNotFoundError(f"{path} has neither {WEIGHTS_FILE} nor {INDEX_FILE}")


def load_gptq_checkpoint(path: str | Path, dtype: torch.dtype, **kwargs: Any) -> tuple[nn.Module, Any]:
    """Build the model of ``path``/config.json (``from_config``: no GPTQ backend needed), put a
    :class:`QuantLinear` wherever the checkpoint has ``<module>.qweight``, load every tensor, and
    return ``(model, tokenizer)`` on the CPU in eval mode. ``kwargs`` go to QuantLinear
    (``backend``, ``cache_weight``). Raises ``ValueError`` for a checkpoint this cannot read
    exactly (unknown format, ``lm_head`` quantized, missing or unexpected tensors)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.pytorch_utils import Conv1D

    p = Path(path)
    qc = read_quantization_config(p)
    if not qc or str(qc.get("quant_method", "")).lower() != "gptq":
        raise ValueError(f"{p} is not a GPTQ checkpoint (config.json lacks quantization_config.quant_method=gptq)")
    fmt = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise ValueError(f"{p}: checkpoint_format {fmt!r} is not the GPTQ layout (gptq or gptq_v2)")
    bits = int(qc["bits"])
    gs = qc.get("group_size", -1)
    config = AutoConfig.from_pretrained(str(p))
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # built as a plain model; the quantized modules are swapped in below
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tensors = _load_tensors(p)
    names = sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))
    for name in names:
        mod = model.get_submodule(name)
        if not is_quantizable(mod):
            raise ValueError(f"{p}: {name} holds qweight but is a {type(mod).__name__} in the model")
        in_f, out_f = _in_out(mod, isinstance(mod, Conv1D))
        q = QuantLinear(bits, in_f, out_f, int(tensors[f"{name}.scales"].shape[0]), f"{name}.bias" in tensors,
                        dtype=dtype, group_size=None if gs in (None, -1) else int(gs), checkpoint_format=fmt,
                        **kwargs)
        _set_submodule(model, name, q)
    own = model.state_dict()
    unexpected = sorted(set(tensors) - set(own))
    if unexpected:
        raise ValueError(f"{p}: tensors the model has no place for: {unexpected[:5]}")
    loaded_storage = {(own[k].untyped_storage().data_ptr(), own[k].storage_offset()) for k in tensors}
    missing = [k for k in own if k not in tensors
               and (own[k].untyped_storage().data_ptr(), own[k].storage_offset()) not in loaded_storage]
    if missing:  # a key absent from the file is fine only if it is tied to one that is present
        raise ValueError(f"{p}: the checkpoint lacks {missing[:5]}")
    model.load_state_dict(tensors, strict=False)
    tokenizer = AutoTokenizer.from_pretrained(str(p)) if (p / "tokenizer_config.json").is_file() else None
    return model.eval(), tokenizer


def footprint(model: nn.Module) -> dict[str, float]:
    """Weight memory of the quantized linears of ``model`` (its :class:`QuantLinear` modules).

    ``weight_bytes_quantized``: qweight + qzeros + scales + g_idx as stored; ``weight_bytes_fp16_equivalent``:
    2 bytes per weight of the same modules; ``bits_per_weight``: 8 · quantized bytes / weights, so it
    includes the scale, zero and g_idx overhead; ``other_bytes``: everything else the model stores
    (embeddings, norms, lm_head, biases), tied tensors counted once.
    """
    q_bytes = n_weights = n_mod = 0
    packed = set()  # storages of the packed buffers
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            n_mod += 1
            q_bytes += mod.weight_bytes()
            n_weights += mod.in_features * mod.out_features
            packed.update(_storage_key(t) for t in mod.packed().values())
    seen, other = set(packed), 0
    for t in model.state_dict().values():  # persistent tensors only, as a checkpoint holds them
        key = _storage_key(t)
        if key not in seen:
            seen.add(key)
            other += t.numel() * t.element_size()
    return {
        "weight_bytes_quantized": q_bytes,
        "weight_bytes_fp16_equivalent": 2 * n_weights,
        "bits_per_weight": 8 * q_bytes / n_weights if n_weights else 16.0,
        "quantized_modules": n_mod,
        "quantized_weights": n_weights,
        "other_bytes": other,
    }


def footprint_of_shapes(shapes: list[tuple[int, int]], bits: int | None,
                        group_size: int | None = None) -> dict[str, float]:
    """:func:`footprint`'s numbers from the (out, in) shapes of the quantized linears alone, for a
    run that did not pack (``bits=None``: the unquantized baseline, 2 bytes a weight). Bit widths
    the GPTQ format has no layout for (5–7) get the same formula: whole int32 words per column."""
    n_weights = sum(o * i for o, i in shapes)
    if bits is None:
        q_bytes = 2 * n_weights
    else:
        q_bytes = 0
        for out_f, in_f in shapes:
            G = 1 if group_size in (None, -1) else -(-in_f // group_size)
            q_bytes += (4 * -(-in_f * bits // 32) * out_f + 4 * G * -(-out_f * bits // 32) + 2 * G * out_f
                        + 4 * in_f)
    return {
        "weight_bytes_quantized": q_bytes,
        "weight_bytes_fp16_equivalent": 2 * n_weights,
        "bits_per_weight": 8 * q_bytes / n_weights if n_weights else 16.0,
        "quantized_modules": len(shapes),
        "quantized_weights": n_weights,
    }
