"""Typed schemas of every config group, registered in Hydra's ConfigStore.

A typo (``quantizer.bitz=4``) or a wrong type (``quantizer.bits=four``) fails at composition,
before any model loads. The ``quantizer`` node is the union of the fields of every registered
method (``quantizers.QUANTIZERS``) plus the pipeline's own knobs, so that one sweep can cross
methods and settings; a field that a method does not use must stay at its default (a single
run says so and stops, a sweep skips that combination: :func:`unused_fields`).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

import quantizers

FP16 = "fp16"  # the unquantized baseline: no quantizer runs


@dataclass
class ModelConfig:
    """Which model. ``path``: a hub id, a local directory, a ``.gguf`` file, ``pkg://<package>/<file>``
    (a file shipped inside an installed package), or ``tiny`` with ``arch`` (a random model)."""

    name: str = MISSING
    path: str = MISSING
    dtype: str = "auto"  # auto (float16 on a GPU, float32 on the CPU) | float16 | bfloat16 | float32
    revision: str | None = None
    tokenizer: str | None = None  # default: the model's own; ``data:<dir>`` = $HARNESS_DATA/<dir>
    trust_remote_code: bool = False
    weights_prequantized: str | None = None  # e.g. q4_1 when the checkpoint was already quantized
    arch: dict[str, Any] = field(default_factory=dict)  # for path=tiny: transformers config fields
    seed: int = 0  # for path=tiny: weight initialisation


@dataclass
class CalibConfig:
    dataset: str = "c4"  # c4 | wikitext2 | random
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    sampler: str = "auto"  # auto | document (paper code) | concat
    batch_size: int = 8  # rows per layer forward in the pipeline; speed only
    offload: bool = False  # keep calibration activations in CPU memory (GPUs smaller than them); speed only


@dataclass
class EvalConfig:
    datasets: list[str] = field(default_factory=lambda: ["wikitext2"])
    seqlen: int = 2048
    max_windows: int | None = None  # null = every window (the paper protocol)
    batch_size: int = 8  # shared: perplexity windows per forward, and lm-eval's HFLM batch size for eval.tasks
    tasks: list[str] = field(default_factory=list)  # lm-eval tasks (harness/zeroshot.py); [] = none
    num_fewshot: int | None = None  # null = each task's default (0 for the six of eval=lm_eval)
    limit: float | None = None  # null = every item; < 1 a fraction, >= 1 a count per task (lm-eval's --limit)
    # Speed of the model as evaluated (harness/latency.py): prefill tokens/s at batch 1 and decode ms/token
    # with a KV cache at each batch size, medians over repeats after warm-up. Speed only: not in the hash.
    latency: bool = False
    latency_prefill: int = 2048  # prompt tokens of the prefill measurement (batch 1)
    latency_prompt: int = 128  # prompt tokens before the decode steps
    latency_decode_tokens: int = 128  # decode steps, one token per sequence each
    latency_batch_sizes: list[int] = field(default_factory=lambda: [1, 16])  # decode batch sizes
    latency_repeats: int = 5  # timed repeats of each measurement (the median is reported)
    latency_warmup: int = 1  # untimed repeats first (allocator, kernel compilation and autotuning)


@dataclass
class LoggerConfig:
    """Run tracking. ``name``: ``wandb`` (the default) or ``none``; the rest are W&B's knobs."""

    name: str = "none"
    mode: str = "auto"  # auto (online iff an API key is configured) | online | offline | disabled
    project: str = "quant-harness"
    entity: str | None = None  # W&B user or team; null = the key's default entity
    group: str | None = None  # null = the study name (or the sweep's, in a sweep without one)
    tags: list[str] = field(default_factory=list)  # added to model:<name>, method:<m>, bits:<n>
    system_metrics: bool = False  # W&B's CPU/GPU sampling; off so it cannot disturb timings


@dataclass
class PipelineFields:
    """Knobs of the layer-by-layer pipeline that live under ``quantizer`` by community habit."""

    true_sequential: bool = True
    max_minutes: Optional[float] = 60.0  # refuse a run whose predicted quantization time exceeds this


def quantizer_node() -> type:
    """Build the ``quantizer`` schema: ``method`` + the union of all methods' config fields."""
    quantizers.get("rtn")  # loads the built-in methods
    seen: dict[str, tuple[Any, Any]] = {}  # name → (type, default)
    classes = [quantizers.QUANTIZERS.get(n).config_cls for n in quantizers.QUANTIZERS.names()] + [PipelineFields]
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            entry = (_hydra_type(hints[f.name]), f.default)
            if seen.get(f.name, entry) != entry:
                raise TypeError(f"quantizer field {f.name!r} differs between methods ({seen[f.name]} vs {entry})")
            seen[f.name] = entry
    spec = [("method", str, field(default=FP16))]
    spec += [(name, t, field(default=default)) for name, (t, default) in seen.items()]
    return dataclasses.make_dataclass("QuantizerConfig", spec)


def _hydra_type(t: Any) -> Any:
    """``X | None`` → ``Optional[X]``, the spelling OmegaConf's schemas understand."""
    args = typing.get_args(t)
    if typing.get_origin(t) in (typing.Union, types.UnionType) and type(None) in args and len(args) == 2:
        return Optional[next(a for a in args if a is not type(None))]
    return t


def method_fields(method: str) -> set[str]:
    """The quantizer fields that ``method`` reads (``fp16`` reads none)."""
    if method == FP16:
        return set()
    m = quantizers.get(method)
    names = {f.name for f in dataclasses.fields(m.config_cls)}
    if m.needs_hessian:
        names.add("true_sequential")
    if m.estimate is not None:
        names.add("max_minutes")
    return names


def unused_fields(qcfg: Any) -> dict[str, Any]:
    """Fields set away from their default that ``qcfg.method`` does not use (``-1`` counts as null)."""
    node = quantizer_node()
    used = method_fields(qcfg.method)
    out = {}
    for f in dataclasses.fields(node):
        if f.name == "method" or f.name in used:
            continue
        value = qcfg[f.name]
        if f.name == "group_size" and value == -1:
            value = None
        if value != f.default:
            out[f.name] = value
    return out


def method_config(qcfg: Any) -> Any:
    """The algorithm's own config dataclass filled from the ``quantizer`` node (not validated yet)."""
    cls = quantizers.get(qcfg.method).config_cls
    return cls(**{f.name: qcfg[f.name] for f in dataclasses.fields(cls)})


@dataclass
class SlotsConfig:
    """The device slot pool of a parallel sweep: ``count`` null = one slot per visible GPU."""

    count: Optional[int] = None
    dir: str = "${results_dir}/.slots"


@dataclass
class RunConfig:
    model: ModelConfig = MISSING
    calib: CalibConfig = MISSING
    quantizer: Any = MISSING
    eval: EvalConfig = MISSING
    logger: LoggerConfig = MISSING
    results_dir: str = "results"
    cache_dir: str = "${oc.env:HARNESS_CACHE,.cache}"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    study: str | None = None  # group name shared by the runs of one study
    tf32: bool = False
    deterministic: bool = False
    print_table: bool = True
    slots: SlotsConfig = field(default_factory=SlotsConfig)
    export: str = "none"  # none | gptq: write <run dir>/checkpoint/ (GPTQ layout) and evaluate the packed model
    pack: bool = False  # evaluate the packed model (QuantLinear, float16 scales) without writing a checkpoint
    kernel: str = "auto"  # QuantLinear backend of packed linears: auto (triton on a GPU if available, else torch)
    force: bool = False  # in a sweep, rerun configurations already recorded in the results store


def register_configs() -> None:
    """Store the schemas in Hydra's ConfigStore (called by the CLI, never at import)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from harness.slots import slot_count

    if not OmegaConf.has_resolver("harness_slots"):  # n_jobs of the parallel launcher
        OmegaConf.register_new_resolver("harness_slots", slot_count)
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    cs.store(group="model", name="schema", node=ModelConfig)
    cs.store(group="calib", name="schema", node=CalibConfig)
    cs.store(group="quantizer", name="schema", node=quantizer_node())
    cs.store(group="eval", name="schema", node=EvalConfig)
    cs.store(group="logger", name="schema", node=LoggerConfig)
