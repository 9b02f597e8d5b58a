"""One harness run: validate → load → calibrate → quantize → evaluate → record.

:func:`validate` checks everything that can be checked before a model loads; :func:`execute`
does the work and returns the record (the CLI stores and prints it; the only file it writes is the
checkpoint that ``export=gptq`` asks for). ``pack=true`` (implied by ``export=gptq``) evaluates the
packed model (:class:`~quantizers.qlinear.QuantLinear`, run by the ``kernel`` backend) instead of
the fake-quantized one; ``eval.latency=true`` adds its speed (:mod:`harness.latency`)."""
from __future__ import annotations

import random
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

import quantizers
from harness import data, latency, zeroshot
from harness.adapters import adapter_for
from harness.errors import UserError
from harness.export import footprint, footprint_of_shapes, is_gptq_checkpoint, replace_linears, save_gptq_checkpoint
from harness.kernels import resolve_kernel, set_kernel, validate_kernel
from harness.models import load_model, resolve_dtype, resolve_path
from harness.perplexity import perplexity
from harness.pipeline import quantize_model
from harness.record import config_hash, environment, new_record, peak_memory, protocol_label, relevant_config
from harness.schema import FP16, method_config, method_fields, unused_fields
from quantizers import QuantConfigError
from quantizers.pack import SUPPORTED_BITS
from quantizers.registry import RegistryError


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise UserError("device", f"unknown device {spec!r}", "use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device", "CUDA was asked for but no GPU is visible", "use device=auto or device=cpu")
    return dev


def resolve_model_dtype(name: str, device: torch.device) -> str:
    """``auto`` = float16 on a GPU, float32 on the CPU (half-precision CPU matmuls are slow)."""
    if name == "auto":
        return "float16" if device.type == "cuda" else "float32"
    resolve_dtype(name)
    return name


def validate(cfg: DictConfig) -> Any:
    """Check the config before anything loads; return the quantizer's validated config (or None
    for fp16). Raises :class:`UserError` naming the key."""
    q = cfg.quantizer
    if q.method != FP16:
        try:
            quantizers.get(q.method)
        except RegistryError as exc:
            raise UserError("quantizer.method", str(exc), "pick one of the quantizer configs (quantizer=...)") from None
    unused = unused_fields(q)
    if unused:
        names = ", ".join(f"{k}={v}" for k, v in unused.items())
        raise UserError(f"quantizer.{next(iter(unused))}", f"method {q.method!r} does not use {names}",
                        "remove the override or choose a method that has it")
    for ds in cfg.eval.datasets:
        if ds not in data.EVAL_DATASETS:
            raise UserError("eval.datasets", f"unknown dataset {ds!r}", f"use some of {', '.join(data.EVAL_DATASETS)}")
    if cfg.calib.dataset not in data.CALIB_DATASETS:
        raise UserError("calib.dataset", f"unknown dataset {cfg.calib.dataset!r}",
                        f"use one of {', '.join(data.CALIB_DATASETS)}")
    for key, value in (("calib.nsamples", cfg.calib.nsamples), ("calib.seqlen", cfg.calib.seqlen),
                       ("eval.seqlen", cfg.eval.seqlen), ("eval.batch_size", cfg.eval.batch_size),
                       ("calib.batch_size", cfg.calib.batch_size)):
        if value < 1:
            raise UserError(key, f"{value} is not positive", "use a positive integer")
    if cfg.eval.max_windows is not None and cfg.eval.max_windows < 1:
        raise UserError("eval.max_windows", f"{cfg.eval.max_windows} is not positive",
                        "use null (all) or a positive count")
    validate_latency(cfg.eval)
    # lm-eval task names, checked now: offline against the local tasks (no lm-eval import), online
    # against lm-eval's registry.
    zeroshot.validate(list(cfg.eval.tasks), cfg.eval.num_fewshot, cfg.eval.limit)
    if cfg.export not in ("none", "gptq"):
        raise UserError("export", f"unknown export {cfg.export!r}", "use none or gptq")
    if cfg.export == "gptq" and q.method == FP16:
        raise UserError("export", "export=gptq needs a quantizer", "set quantizer=gptq|rtn|obq or export=none")
    if cfg.export == "gptq" and q.bits not in SUPPORTED_BITS:
        raise UserError("quantizer.bits", f"the GPTQ format has no {q.bits}-bit layout",
                        "use bits 2, 3, 4 or 8, or export=none")
    if cfg.pack and q.method != FP16:  # fp16 has nothing to pack: it runs dense (a sweep's baseline)
        if "bits" not in method_fields(q.method):
            raise UserError("pack", f"method {q.method!r} has no bit width the packed format could hold",
                            "use pack=false")
        if q.bits not in SUPPORTED_BITS:
            raise UserError("pack", f"the packed (GPTQ) format has no {q.bits}-bit layout",
                            f"use quantizer.bits in {', '.join(map(str, SUPPORTED_BITS))}, or pack=false")
    validate_kernel(cfg.kernel)
    if q.method != FP16 and cfg.model.path != "tiny" and is_gptq_checkpoint(resolve_path(cfg.model.path)):
        raise UserError("quantizer.method", "model.path is a GPTQ checkpoint (already quantized)",
                        "use quantizer=fp16 to evaluate it")
    if q.method == FP16:
        return None
    try:
        return method_config(q).validate()
    except QuantConfigError as exc:
        raise UserError(f"quantizer.{exc.key}", exc.message, exc.fix) from None


def validate_latency(e: DictConfig) -> None:
    """The ``eval.latency*`` fields: positive sizes, at least one decode batch size."""
    if not e.latency:
        return
    for key in ("latency_prefill", "latency_prompt", "latency_decode_tokens", "latency_repeats"):
        if e[key] < 1:
            raise UserError(f"eval.{key}", f"{e[key]} is not positive", "use a positive integer")
    if e.latency_warmup < 0:
        raise UserError("eval.latency_warmup", f"{e.latency_warmup} is negative", "use 0 or more")
    if not e.latency_batch_sizes or any(b < 1 for b in e.latency_batch_sizes):
        raise UserError("eval.latency_batch_sizes", f"{list(e.latency_batch_sizes)} is not a list of positive sizes",
                        "use e.g. eval.latency_batch_sizes=[1,16]")


def check_latency_fits(e: DictConfig, model: torch.nn.Module) -> None:
    """Refuse latency lengths beyond the model's context (known only once the model is loaded)."""
    if not e.latency:
        return
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit is None:
        return
    if e.latency_prefill > limit:
        raise UserError("eval.latency_prefill", f"{e.latency_prefill} tokens exceed the model's context of {limit}",
                        f"use eval.latency_prefill={limit} or less")
    if e.latency_prompt + e.latency_decode_tokens > limit:
        raise UserError("eval.latency_decode_tokens",
                        f"a prompt of {e.latency_prompt} + {e.latency_decode_tokens} decode steps exceed the model's "
                        f"context of {limit}", "shorten eval.latency_prompt or eval.latency_decode_tokens")


def apply_runtime(cfg: DictConfig) -> None:
    """Seeds, TF32 and determinism are config fields applied here, never at import."""
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    torch.backends.cuda.matmul.allow_tf32 = bool(cfg.tf32)
    torch.backends.cudnn.allow_tf32 = bool(cfg.tf32)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def linear_shapes(model: torch.nn.Module, adapter: Any) -> list[tuple[int, int]]:
    """(out, in) of every linear the pipeline quantizes."""
    from harness.adapters import decoder_layers, is_quantizable, weight_matrix

    return [tuple(weight_matrix(m, adapter).shape) for layer in decoder_layers(model, adapter)
            for m in layer.modules() if is_quantizable(m)]


def check_cost(method: Any, qcfg: Any, shapes: list[tuple[int, int]], device: torch.device,
               max_minutes: float | None) -> dict[str, Any] | None:
    """Predict the quantizer's time and memory (methods with an ``estimate``) and refuse a run
    predicted to exceed ``max_minutes``. Returns the estimate for the record."""
    if method.estimate is None:
        return None
    dtype_bytes = 8 if getattr(qcfg, "float64", False) else 4
    est = method.estimate(shapes, "cuda" if device.type == "cuda" else "cpu", dtype_bytes=dtype_bytes)
    est = {"minutes": est["seconds"] / 60, **est}
    if max_minutes is not None and est["minutes"] > max_minutes:
        raise UserError("quantizer.max_minutes",
                        f"{method.name} is estimated at {est['minutes']:.0f} min on {device.type} "
                        f"({est['flops']:.2e} FLOP, {est['peak_bytes_per_row'] / 2**20:.1f} MiB per row in flight), "
                        f"above the limit of {max_minutes:g} min",
                        f"raise it (quantizer.max_minutes={est['minutes'] * 1.5:.0f}) or use a GPU / smaller model")
    return est


def execute(cfg: DictConfig, qcfg: Any, run_dir: str | None = None, progress: bool = True,
            log: Any = None) -> dict[str, Any]:
    """Do the run described by ``cfg`` and return its record. ``log(line)`` receives notes meant
    for the user before long steps (the CLI prints them)."""
    started = datetime.now(UTC).isoformat()
    t_all = time.perf_counter()
    device = resolve_device(cfg.device)
    dtype = resolve_model_dtype(cfg.model.dtype, device)
    apply_runtime(cfg)
    if device.type == "cuda":
        # An explicit index (cuda:N, as a sweep's slot pins it) does not initialise CUDA lazily the way
        # plain "cuda" does, and the allocator's statistics refuse an uninitialised device.
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats(device)
    relevant = relevant_config(cfg, dtype)
    timings: dict[str, float] = {}
    cache_dir = cfg.cache_dir

    t0 = time.perf_counter()
    mcfg = OmegaConf.merge(cfg.model, {"dtype": dtype})
    loaded = load_model(mcfg, cache_dir)
    model, tok = loaded.model, loaded.tokenizer
    adapter = adapter_for(model)
    timings["load_s"] = time.perf_counter() - t0
    check_latency_fits(cfg.eval, model)
    packing = bool(cfg.pack) or cfg.export == "gptq"  # export=gptq evaluates what it wrote: packed

    provenance: dict[str, Any] = {"eval": {}}
    modules: list[dict[str, Any]] = []
    if cfg.quantizer.method != FP16:
        method = quantizers.get(cfg.quantizer.method)
        estimate = check_cost(method, qcfg, linear_shapes(model, adapter), device,
                              cfg.quantizer.get("max_minutes"))
        if estimate is not None:
            provenance["estimate"] = estimate
            if log is not None:
                log(f"{method.name}: estimated {estimate['minutes']:.1f} min of quantization on {device.type} "
                    f"({estimate['flops']:.2e} FLOP); limit quantizer.max_minutes={cfg.quantizer.max_minutes}")
        if packing:  # a shape the format cannot hold fails now, not after the solver
            from quantizers.pack import check_packable

            key, off = ("export", "none") if cfg.export == "gptq" else ("pack", "false")
            for o, i in linear_shapes(model, adapter):
                try:
                    check_packable(qcfg.bits, i, o)
                except ValueError as exc:
                    raise UserError(key, str(exc), f"use {key}={off} or other bits") from None
        calib = None
        t0 = time.perf_counter()
        if method.needs_hessian:
            c = cfg.calib
            calib, provenance["calib"] = data.calibration_tokens(tok, c.dataset, c.nsamples, c.seqlen, c.seed,
                                                                 cache_dir, sampler=c.sampler)
        timings["calibration_data_s"] = time.perf_counter() - t0
        out = quantize_model(model, adapter, method, qcfg, calib, device,
                             true_sequential=cfg.quantizer.true_sequential, progress=progress,
                             batch=cfg.calib.batch_size, offload=cfg.calib.offload, keep_results=packing)
        modules = out.modules
        raised = [m for m in modules if m.get("damp_retries")]
        if raised and log is not None:  # never silent: the record keeps damp_percent_used per module
            worst = max(raised, key=lambda m: m["damp_percent_used"])
            log(f"warning: Cholesky failed at damp_percent={qcfg.damp_percent} for {len(raised)} module(s); "
                f"damping was raised (up to {worst['damp_percent_used']:.3g} for {worst['module']})")
        timings.update({"quantize_s": out.timings["total_s"], "forward_hessian_s": out.timings["forward_hessian_s"],
                        "solver_s": out.timings["solver_s"]})
        if packing:
            t1 = time.perf_counter()
            if cfg.export == "gptq" and run_dir is not None:
                info = save_gptq_checkpoint(model, tok, out.results, qcfg, Path(run_dir) / "checkpoint",
                                            true_sequential=cfg.quantizer.true_sequential,
                                            meta={"method": cfg.quantizer.method, "config_hash": config_hash(relevant)})
                provenance["export"] = {k: info[k] for k in ("path", "bytes", "tensors", "v1_wrapped_zeros")}
            replace_linears(model, adapter, out.results, group_size=qcfg.group_size)  # evaluate what is stored
            out.results.clear()
            timings["export_s" if cfg.export == "gptq" else "pack_s"] = time.perf_counter() - t1

    from quantizers.qlinear import QuantLinear, kernel_paths

    packed = any(isinstance(m, QuantLinear) for m in model.modules())
    kernel = resolve_kernel(cfg.kernel, device)
    if packed:
        set_kernel(model, kernel)
    elif cfg.kernel != "auto" and log is not None:
        log(f"note: kernel={cfg.kernel} has no effect: the model has no packed linears (pack=true packs them)")
    provenance["kernel"] = kernel if packed else None
    if packed:
        weights = footprint(model)  # a packed run, or a loaded GPTQ checkpoint
    else:
        fp = cfg.quantizer.method == FP16
        weights = footprint_of_shapes(linear_shapes(model, adapter), None if fp else qcfg.bits,
                                      None if fp else qcfg.group_size)
    provenance["kernel_paths"] = kernel_paths(model)

    t0 = time.perf_counter()
    metrics: dict[str, Any] = {}
    gpu_peak_before_eval = 0
    if device.type == "cuda":  # the evaluation's own peak: weights as stored + activations (+ KV cache)
        torch.cuda.synchronize(device)
        gpu_peak_before_eval = int(torch.cuda.max_memory_allocated(device))
        torch.cuda.reset_peak_memory_stats(device)
    model.to(device)
    for ds in cfg.eval.datasets:
        tokens, provenance["eval"][ds] = data.eval_tokens(tok, ds, cfg.eval.seqlen, cache_dir)
        res = perplexity(model, tokens, cfg.eval.seqlen, cfg.eval.max_windows, cfg.eval.batch_size, device, progress)
        metrics.update({f"{ds}/ppl": res["ppl"], f"{ds}/nll": res["nll"], f"{ds}/windows": res["windows"],
                        f"{ds}/tokens": res["tokens"]})
    if cfg.eval.tasks:  # lm-eval on the model in memory; its keys are <task>/<metric>, never <dataset>/ppl
        t1 = time.perf_counter()
        zs_metrics, provenance["zeroshot"] = zeroshot.evaluate(
            model, tok, list(cfg.eval.tasks), num_fewshot=cfg.eval.num_fewshot, limit=cfg.eval.limit,
            batch_size=cfg.eval.batch_size, work_dir=Path(run_dir) / "lm_eval" if run_dir else None)
        metrics.update(zs_metrics)
        timings["zeroshot_s"] = time.perf_counter() - t1
    if cfg.eval.latency:
        t1 = time.perf_counter()
        e = cfg.eval
        metrics.update(latency.measure(model, device, prefill_tokens=e.latency_prefill, prompt=e.latency_prompt,
                                       decode_tokens=e.latency_decode_tokens, batch_sizes=list(e.latency_batch_sizes),
                                       repeats=e.latency_repeats, warmup=e.latency_warmup, seed=cfg.seed))
        metrics["latency/kernel"] = provenance["kernel"] or latency.DENSE
        timings["latency_s"] = time.perf_counter() - t1
    timings["evaluate_s"] = time.perf_counter() - t0
    memory: dict[str, Any] = {**peak_memory(device), "eval_peak_bytes": None}  # None: no GPU to measure on
    if device.type == "cuda":
        memory["eval_peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
        memory["gpu_max_allocated_bytes"] = max(gpu_peak_before_eval, memory["eval_peak_bytes"])  # the whole run
    timings["total_s"] = time.perf_counter() - t_all

    return new_record(
        run_id=uuid.uuid4().hex,
        status="ok",
        study=cfg.study,
        config_hash=config_hash(relevant),
        relevant=relevant,
        config=OmegaConf.to_container(cfg, resolve=True),
        protocol=protocol_label(cfg),
        model={"name": cfg.model.name, "type": getattr(model.config, "model_type", None), "dtype": dtype,
               "n_params": sum(p.numel() for p in model.parameters()) + (weights["quantized_weights"] if packed else 0),
               "weights_prequantized": cfg.model.weights_prequantized, **loaded.info},
        device=str(device),
        data=provenance,
        metrics=metrics,
        timings=timings,
        memory={**memory, "weight_bytes": weights["weight_bytes_quantized"],
                "weight_bytes_fp16": weights["weight_bytes_fp16_equivalent"],
                "bits_per_weight": weights["bits_per_weight"]},
        modules=modules,
        env=environment(),
        run_dir=run_dir,
        started_at=started,
        finished_at=datetime.now(UTC).isoformat(),
    )


def failure_record(cfg: DictConfig, error: BaseException, run_dir: str | None) -> dict[str, Any]:
    """The record of a run that failed: enough to see what was tried and why it stopped."""
    try:
        dtype = resolve_model_dtype(cfg.model.dtype, resolve_device(cfg.device))
    except UserError:
        dtype = cfg.model.dtype
    relevant = relevant_config(cfg, dtype)
    return new_record(run_id=uuid.uuid4().hex, status="failed", study=cfg.study, config_hash=config_hash(relevant),
                      relevant=relevant, config=OmegaConf.to_container(cfg, resolve=True),
                      protocol=protocol_label(cfg), model={"name": cfg.model.name}, metrics={},
                      error=f"{type(error).__name__}: {error}", env=environment(), run_dir=run_dir,
                      finished_at=datetime.now(UTC).isoformat())
