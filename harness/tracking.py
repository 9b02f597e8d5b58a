"""W&B tracking: one W&B run per harness run (``logger=wandb``, the default; ``logger=none`` is off).

The W&B run holds the resolved config, every metric (and the timings, memory and footprint) in its
summary and the per-module diagnostics as a ``wandb.Table``; its group is the study (or sweep)
name, its tags name the model, the method and the bit width. Every file W&B writes — the run
itself, its cache, config, staging and artifact folders — lives under the harness run's output
directory (``<run_dir>/wandb/``): nothing goes to the home directory. ``wandb`` is imported only
when a run starts.

Modes (``logger.mode``): ``auto`` is online when an API key is configured (``WANDB_API_KEY`` or a
netrc entry for the W&B host) and offline otherwise; ``online``, ``offline`` and ``disabled`` force
one. ``WANDB_MODE`` in the environment decides ``auto`` when set.
"""
from __future__ import annotations

import netrc
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from harness.errors import UserError

MODES = ("auto", "online", "offline", "disabled")
DEFAULT_HOST = "https://api.wandb.ai"
# W&B's folders, each under <run_dir>/wandb/ ("" = the W&B dir itself, which holds the runs)
WANDB_FOLDERS = {"WANDB_DIR": "", "WANDB_CACHE_DIR": "cache", "WANDB_CONFIG_DIR": "config",
                 "WANDB_DATA_DIR": "data", "WANDB_ARTIFACT_DIR": "artifacts"}


class Tracker:
    """What the CLI talks to. This base class tracks nothing (``logger=none``)."""

    def log_record(self, record: dict[str, Any]) -> None:
        """Send a finished run's record (metrics, diagnostics) to the tracker."""

    def finish(self, ok: bool) -> None:
        """Close the tracked run; ``ok=False`` marks it failed."""


def start(cfg: Any, run_dir: str | Path, sweep_dir: str | Path | None = None) -> Tracker:
    """Open the tracker that ``cfg.logger`` asks for. ``sweep_dir`` is the multirun's directory
    (its name groups the runs of a sweep that has no study name)."""
    name = cfg.logger.name
    if name == "none":
        return Tracker()
    if name != "wandb":
        raise UserError("logger.name", f"unknown logger {name!r}", "use logger=wandb or logger=none")
    return WandbTracker.open(cfg, Path(run_dir), sweep_dir)


def resolve_mode(mode: str, env: Mapping[str, str] | None = None) -> str:
    """The W&B mode to use: ``mode`` unless it is ``auto``; then ``WANDB_MODE`` when set, else
    online when an API key is configured, offline otherwise."""
    env = os.environ if env is None else env
    if mode not in MODES:
        raise UserError("logger.mode", f"unknown mode {mode!r}", f"use one of {', '.join(MODES)}")
    if mode != "auto":
        return mode
    from_env = {"dryrun": "offline", "run": "online"}.get(env.get("WANDB_MODE", ""), env.get("WANDB_MODE", ""))
    if from_env in ("online", "offline", "disabled"):
        return from_env
    return "online" if api_key_configured(env) else "offline"


def api_key_configured(env: Mapping[str, str] | None = None) -> bool:
    """Whether W&B would find credentials: ``WANDB_API_KEY`` (or an identity token file), or an
    entry for the W&B host (``WANDB_BASE_URL``, default api.wandb.ai) in the netrc file."""
    env = os.environ if env is None else env
    if env.get("WANDB_API_KEY") or env.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(env.get("WANDB_BASE_URL") or DEFAULT_HOST).netloc
    path = env.get("NETRC") or os.path.join(env.get("HOME") or os.path.expanduser("~"), ".netrc")
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def run_group(cfg: Any, sweep_dir: str | Path | None = None) -> str | None:
    """The W&B group: ``logger.group``, else the study name, else ``sweep-<time>`` in a sweep."""
    if cfg.logger.get("group"):
        return str(cfg.logger.group)
    if cfg.get("study"):
        return str(cfg.study)
    return f"sweep-{Path(sweep_dir).name}" if sweep_dir else None


def run_tags(cfg: Any) -> list[str]:
    """``model:<name>``, ``method:<method>``, ``bits:<n>`` (16 for the baseline) and ``logger.tags``."""
    method = cfg.quantizer.method
    bits = 16 if method == "fp16" else cfg.quantizer.bits
    return [f"model:{cfg.model.name}", f"method:{method}", f"bits:{bits}", *map(str, cfg.logger.get("tags") or [])]


def run_name(cfg: Any) -> str:
    """A short readable name: ``tiny-llama rtn w4 g128`` (``fp16`` for the baseline)."""
    q = cfg.quantizer
    if q.method == "fp16":
        return f"{cfg.model.name} fp16"
    group = "" if q.group_size in (None, -1) else f" g{q.group_size}"
    act = " act-order" if q.get("desc_act") else ""
    return f"{cfg.model.name} {q.method} w{q.bits}{group}{act}"


class WandbTracker(Tracker):
    """One W&B run, its files under ``<run_dir>/wandb/``."""

    def __init__(self, run: Any, saved_env: dict[str, str | None]) -> None:
        self.run = run
        self._saved_env = saved_env

    @classmethod
    def open(cls, cfg: Any, run_dir: Path, sweep_dir: str | Path | None = None) -> WandbTracker:
        """Start the W&B run of ``cfg``; prints one line saying where it goes."""
        from omegaconf import OmegaConf

        mode = resolve_mode(cfg.logger.mode)
        try:
            import wandb
        except ImportError:
            raise UserError("logger", "wandb is not installed", "pip install wandb, or run with logger=none") from None
        saved = _point_wandb_at(run_dir / "wandb") if mode != "disabled" else {}
        settings = wandb.Settings(console="off", silent=True, x_disable_stats=not cfg.logger.system_metrics,
                                  save_code=False)
        try:
            run = wandb.init(project=cfg.logger.project, entity=cfg.logger.entity, dir=str(run_dir), mode=mode,
                             group=run_group(cfg, sweep_dir), tags=run_tags(cfg), name=run_name(cfg),
                             config=OmegaConf.to_container(cfg, resolve=True), settings=settings)
        except (wandb.Error, OSError, TimeoutError) as exc:
            _restore_env(saved)
            raise UserError("logger.mode", f"W&B could not start a {mode} run: {str(exc).splitlines()[0]}",
                            "use logger.mode=offline (and `wandb sync` later) or logger=none") from None
        if mode == "offline":
            print(f"W&B offline: sync later with `wandb sync {run.settings.sync_dir}`", file=sys.stderr)
        elif mode == "online":
            print(f"W&B run: {run.url}", file=sys.stderr)
        return cls(run, saved)

    def log_record(self, record: dict[str, Any]) -> None:
        """Summary: every metric, ``timings/*``, ``memory/*``, the footprint and the module means;
        the per-module diagnostics as the ``module_diagnostics`` table."""
        import wandb

        from harness.results import footprint, module_summary

        self.run.config.update({"harness": {"run_id": record.get("run_id"), "config_hash": record.get("config_hash"),
                                            "protocol": record.get("protocol")}}, allow_val_change=True)
        summary: dict[str, Any] = {"status": record.get("status"), "config_hash": record.get("config_hash")}
        summary.update(record.get("metrics") or {})
        summary.update({f"timings/{k}": v for k, v in (record.get("timings") or {}).items()})
        summary.update({f"memory/{k}": v for k, v in (record.get("memory") or {}).items()})
        summary.update({k: v for k, v in footprint(record).items() if v is not None})
        summary.update(module_summary(record.get("modules") or []))
        self.run.summary.update(summary)
        modules = record.get("modules") or []
        if modules:
            columns = list(dict.fromkeys(k for m in modules for k in m))
            rows = [[_cell(m.get(c)) for c in columns] for m in modules]
            self.run.log({"module_diagnostics": wandb.Table(columns=columns, data=rows)})

    def finish(self, ok: bool) -> None:
        """Finish the W&B run (exit code 1 marks it failed), stop W&B's service and put the
        environment back, so the next job of a sweep starts clean under its own directory."""
        import wandb

        try:
            self.run.finish(exit_code=0 if ok else 1)
            wandb.teardown()
        except (wandb.Error, OSError) as exc:  # the harness result is stored already: say so, go on
            print(f"W&B: could not finish the run cleanly ({str(exc).splitlines()[0]})", file=sys.stderr)
        finally:
            _restore_env(self._saved_env)


def _cell(value: Any) -> Any:
    return "x".join(map(str, value)) if isinstance(value, (list, tuple)) else value


def _point_wandb_at(root: Path) -> dict[str, str | None]:
    """Set W&B's folder variables to folders under ``root``; returns the previous values."""
    saved = {}
    for var, sub in WANDB_FOLDERS.items():
        path = root.parent if var == "WANDB_DIR" else root / sub
        path.mkdir(parents=True, exist_ok=True)
        saved[var] = os.environ.get(var)
        os.environ[var] = str(path)
    return saved


def _restore_env(saved: dict[str, str | None]) -> None:
    for var, value in saved.items():
        if value is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = value
