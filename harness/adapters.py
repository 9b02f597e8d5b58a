"""Model knowledge as data: where the decoder layers are and how their linears are grouped.

``sequential`` lists the true-sequential groups of one decoder layer in order (q/k/v → o →
up/gate → down for LLaMA): within a layer each group is quantized on inputs recomputed after the
previous group. ``transposed`` marks GPT-2's Conv1D, which stores weights as (in, out).
A model type without an entry gets the generic fallback: the first ModuleList of blocks found,
and all of a layer's linears in one group.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from harness.errors import UserError


@dataclass(frozen=True)
class Adapter:
    model_type: str
    layers: str  # dotted path of the ModuleList of decoder layers
    sequential: tuple[tuple[str, ...], ...] | None  # None: every linear of a layer, one group
    transposed: bool = False


_LLAMA_LIKE = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.up_proj", "mlp.gate_proj"),
    ("mlp.down_proj",),
)

ADAPTERS: dict[str, Adapter] = {
    a.model_type: a
    for a in (
        Adapter("llama", "model.layers", _LLAMA_LIKE),
        Adapter("mistral", "model.layers", _LLAMA_LIKE),
        Adapter("qwen2", "model.layers", _LLAMA_LIKE),
        Adapter(
            "opt",
            "model.decoder.layers",
            (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",), ("fc1",), ("fc2",)),
        ),
        Adapter("gpt2", "transformer.h", (("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
                transposed=True),
        Adapter(
            "gpt_neox",
            "gpt_neox.layers",
            (("attention.query_key_value",), ("attention.dense",), ("mlp.dense_h_to_4h",), ("mlp.dense_4h_to_h",)),
        ),
    )
}


def is_quantizable(module: nn.Module) -> bool:
    """A linear map with a 2-D weight: nn.Linear or GPT-2's Conv1D."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of ``model.config.model_type``, or a generic one found by inspecting the model."""
    model_type = getattr(model.config, "model_type", "")
    if model_type in ADAPTERS:
        return ADAPTERS[model_type]
    layers = _find_layer_list(model)
    if layers is None:
        raise UserError(
            "model.path",
            f"model type {model_type!r} has no adapter and no list of decoder layers was found in it",
            f"add an Adapter for {model_type!r} to harness/adapters.py (known: {', '.join(sorted(ADAPTERS))})",
        )
    from transformers.pytorch_utils import Conv1D

    transposed = any(isinstance(m, Conv1D) for m in model.modules())
    return Adapter(model_type, layers, None, transposed=transposed)


def _find_layer_list(model: nn.Module) -> str | None:
    # The longest ModuleList of identical blocks that contain linears is the decoder stack.
    best, best_len = None, 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > best_len and len({type(m) for m in mod}) == 1:
            if any(is_quantizable(m) for m in mod[0].modules()):
                best, best_len = name, len(mod)
    return best


def decoder_layers(model: nn.Module, adapter: Adapter) -> nn.ModuleList:
    return model.get_submodule(adapter.layers)


def linear_groups(layer: nn.Module, adapter: Adapter, true_sequential: bool) -> list[list[str]]:
    """The groups of linear names of one decoder layer, in quantization order.

    Without ``true_sequential`` every linear is in one group, whose inputs all come from one
    forward pass of the layer (the paper code's default for OPT). Linears the adapter does not
    list (e.g. a model variant with extra projections) are appended as a last group.
    """
    present = [name for name, m in layer.named_modules() if is_quantizable(m)]
    groups = [list(g) for g in adapter.sequential] if adapter.sequential else [present]
    listed = {n for g in groups for n in g}
    missing = [n for g in groups for n in g if n not in present]
    if missing:
        raise UserError("model.path", f"adapter {adapter.model_type!r} names linears the model lacks: {missing}",
                        "fix the adapter in harness/adapters.py")
    extra = [n for n in present if n not in listed]
    if extra:
        groups.append(extra)
    if not true_sequential:
        groups = [[n for g in groups for n in g]]
    return groups


def weight_matrix(module: nn.Module, adapter: Adapter) -> torch.Tensor:
    """The (out, in) weight of a linear, whatever its storage layout."""
    w = module.weight.data
    return w.t() if adapter.transposed else w


def set_weight_matrix(module: nn.Module, adapter: Adapter, W: torch.Tensor) -> None:
    """Write an (out, in) weight back in the module's own layout and dtype."""
    W = W.to(module.weight.dtype)
    module.weight.data.copy_(W.t() if adapter.transposed else W)
