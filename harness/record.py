"""Run identity and the run record: the config hash, provenance, environment and measurements."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from harness.results import SCHEMA_VERSION
from harness.schema import FP16, method_fields
from harness.zeroshot import reported_names

PAPER_CALIB = (128, 2048)
PAPER_EVAL_SEQLEN = 2048


def relevant_config(cfg: Any, dtype: str) -> dict[str, Any]:
    """The part of the resolved config that can change a result; its hash identifies the run.

    Labels, output paths, the device, batch sizes, loggers and speed knobs (``kernel``, the
    ``eval.latency*`` fields) are left out; calibration is left out for methods that use none;
    quantizer fields a method does not read are left out.
    """
    q = cfg.quantizer
    quant: dict[str, Any] = {"method": q.method}
    for name in sorted(method_fields(q.method)):
        value = q[name]
        quant[name] = None if (name == "group_size" and value == -1) else value
    m = cfg.model
    model = {"path": m.path, "dtype": dtype, "revision": m.revision, "tokenizer": m.tokenizer}
    if m.path == "tiny":
        model.update(arch=dict(m.arch), seed=m.seed)
    out: dict[str, Any] = {
        "model": model,
        "quantizer": quant,
        "eval": {"datasets": list(cfg.eval.datasets), "seqlen": cfg.eval.seqlen, "max_windows": cfg.eval.max_windows},
    }
    e = cfg.eval
    if e.get("tasks"):  # lm-eval tasks under the names the run reports (offline, piqa runs as piqa_local)
        out["eval"].update(tasks=reported_names(e.tasks), num_fewshot=e.num_fewshot, limit=e.limit)
    if cfg.get("export", "none") != "none":  # the packed model (float16 scales) evaluates a hair differently
        out["export"] = cfg.export
    elif cfg.get("pack", False) and q.method != FP16:  # the packed model, no checkpoint; fp16 stays dense
        out["pack"] = True
    if uses_calibration(q.method):
        c = cfg.calib
        out["calib"] = {"dataset": c.dataset, "nsamples": c.nsamples, "seqlen": c.seqlen, "seed": c.seed,
                        "sampler": c.sampler}
    return out


def uses_calibration(method: str) -> bool:
    return method != FP16 and "true_sequential" in method_fields(method)


def config_hash(relevant: dict[str, Any]) -> str:
    blob = json.dumps(relevant, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def protocol_label(cfg: Any) -> dict[str, Any]:
    """``paper`` when calibration and evaluation follow the GPTQ paper, else ``reduced`` with details."""
    e, c = cfg.eval, cfg.calib
    calib_ok = (not uses_calibration(cfg.quantizer.method)) or (c.nsamples, c.seqlen) == PAPER_CALIB
    eval_ok = e.seqlen == PAPER_EVAL_SEQLEN and e.max_windows is None
    label = "paper" if calib_ok and eval_ok else "reduced"
    windows = "all windows" if e.max_windows is None else f"first {e.max_windows} windows"
    return {
        "label": label,
        "calib": f"{c.nsamples}×{c.seqlen} {c.dataset}" if uses_calibration(cfg.quantizer.method) else "none",
        "eval": f"{windows} of {e.seqlen}",
    }


def environment() -> dict[str, Any]:
    """Git commit, package versions and hardware, for tracing a record back to what made it."""
    root = Path(__file__).resolve().parents[1]
    versions = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "hydra-core", "omegaconf", "quant-harness", "triton", "wandb", "lm_eval"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    hw: dict[str, Any] = {"machine": platform.machine(), "cpu": _cpu_name(), "cores": os.cpu_count()}
    if torch.cuda.is_available():
        hw.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(), cuda=torch.version.cuda)
    return {"git": _git(root), "versions": versions, "hardware": hw, "hostname": platform.node(),
            "argv": sys.argv[1:]}


def peak_memory(device: torch.device) -> dict[str, int]:
    mem = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.type == "cuda":
        mem["gpu_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return mem


def new_record(**fields: Any) -> dict[str, Any]:
    return {"schema_version": SCHEMA_VERSION, **fields}


def _git(root: Path) -> dict[str, Any]:
    def run(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = run("rev-parse", "HEAD")
    status = run("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
