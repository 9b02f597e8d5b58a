"""``python -m harness [overrides]``: compose the config, run, store the record, print a table.

User errors (a bad override, an impossible setting, a missing file) end in one line naming the
key and the fix, exit status 2, no traceback. Programming errors keep their traceback.
"""
from __future__ import annotations

import difflib
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
SWEEPS_DIR = ROOT / "sweeps"
EXIT_USER_ERROR = 2


def main(argv: list[str] | None = None) -> None:
    """Entry point: runs the Hydra app and turns user errors into one line and exit status 2."""
    import hydra
    from omegaconf.errors import OmegaConfBaseException

    from harness import launcher
    from harness.errors import UserError
    from harness.schema import register_configs

    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a.startswith(("hydra.searchpath", "+hydra.searchpath")) for a in argv):
        # declared studies (study=<name>) live in sweeps/; the override joins the user's overrides
        argv.insert(_first_override(argv), f"hydra.searchpath=[file://{SWEEPS_DIR}]")
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # let config errors reach us instead of Hydra's printer
    register_configs()
    launcher.register()  # hydra/launcher=gpus
    app = hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(_task)
    sys.argv = [sys.argv[0], *argv]
    try:
        app()
    except UserError as exc:
        _die(exc.line())
    except launcher.WorkerDied as exc:  # the other jobs ran and are recorded; a rerun does the rest
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except (hydra.errors.HydraException, OmegaConfBaseException) as exc:
        _die(describe_config_error(exc))


_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn", "--config-dir",
                "-cd", "--experimental-rerun", "--info", "-i", "--hydra-help"}


def _first_override(argv: list[str]) -> int:
    """Index of the first override (a positional argument) in Hydra's command line, or the end.

    Overrides must stay contiguous for Hydra's argument parser (``-m a=1 b=2``, ``a=1 --cfg job``)."""
    for i, arg in enumerate(argv):
        if not arg.startswith("-") and not (i > 0 and argv[i - 1] in _VALUE_FLAGS):
            return i
    return len(argv)


def _die(line: str) -> None:
    print(f"error: {line}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def describe_config_error(exc: BaseException) -> str:
    """One line for a Hydra/OmegaConf composition error: the key at fault and how to fix it."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

    cause = exc
    while cause.__cause__ is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__
    if isinstance(exc, MissingConfigException) or "Could not find" in str(exc):
        return _missing_option(exc)
    if isinstance(cause, OmegaConfBaseException):
        key = getattr(cause, "full_key", None) or "config"
        msg = str(getattr(cause, "msg", cause)).splitlines()[0]
        if isinstance(cause, ConfigKeyError) or " not in " in msg:
            options = _keys_near(cause)
            hint = f"did you mean {options}? " if options else ""
            return f"{key}: no such key — {hint}`python -m harness --cfg job` lists the valid keys"
        if isinstance(cause, ValidationError):
            return f"{key}: {msg} — give a value of the right type (`python -m harness --cfg job` shows the types)"
        return f"{key}: {msg}"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"overrides: {first} — see `python -m harness --help`"


def _keys_near(cause: Any) -> str:
    parent = getattr(cause, "parent_node", None) or getattr(cause, "object_type", None)
    key = getattr(cause, "key", None)
    try:
        keys = [str(k) for k in parent.keys()] if parent is not None and hasattr(parent, "keys") else []
    except Exception:  # noqa: BLE001 — best effort for a hint only
        keys = []
    if not keys and getattr(cause, "object_type", None) is not None:
        import dataclasses

        if dataclasses.is_dataclass(cause.object_type):
            keys = [f.name for f in dataclasses.fields(cause.object_type)]
    close = difflib.get_close_matches(str(key), keys, n=3, cutoff=0.5)
    return ", ".join(repr(c) for c in close)


def _missing_option(exc: BaseException) -> str:
    text = str(exc)
    options = [o for o in (getattr(exc, "options", None) or []) if o != "schema"]
    group = ""
    for line in text.splitlines():
        if "Could not find '" in line:
            missing = line.split("Could not find '", 1)[1].split("'", 1)[0]
            group, _, name = missing.rpartition("/")
            close = difflib.get_close_matches(name, list(options), n=3, cutoff=0.4)
            hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
            avail = f"available: {', '.join(options)}" if options else "check the name"
            return f"{group or 'config'}: no config named {name!r} — {hint}{avail}"
    return f"config: {text.splitlines()[0]}"


def recorded_hash(cfg: Any) -> str | None:
    """The config hash of ``cfg`` if a successful run of it is already in the results store."""
    from harness import results
    from harness.errors import UserError
    from harness.record import config_hash, relevant_config
    from harness.run import resolve_device, resolve_model_dtype

    try:
        dtype = resolve_model_dtype(cfg.model.dtype, resolve_device(cfg.device))
    except UserError:
        return None  # the run itself will report it
    h = config_hash(relevant_config(cfg, dtype))
    ok = any(r.get("config_hash") == h and r.get("status") == "ok" and covers(r, cfg)
             for r in results.iter_records(cfg.results_dir))
    return h if ok else None


def covers(record: dict[str, Any], cfg: Any) -> bool:
    """Whether a recorded run of the same config hash also measured what ``cfg`` asks for beyond it:
    speed (``eval.latency``, not in the hash) with the same ``kernel`` choice. So adding
    ``eval.latency=true`` or sweeping ``kernel=`` over a finished study runs what is missing."""
    if not cfg.eval.get("latency", False):
        return True
    metrics = record.get("metrics") or {}
    if not any(k.startswith("latency/") for k in metrics):
        return False
    return (record.get("config") or {}).get("kernel", "auto") == cfg.get("kernel", "auto")


def _task(cfg: Any) -> float | None:
    """The Hydra task: one run (or one job of a multirun)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from harness import results, tracking
    from harness.errors import UserError
    from harness.pipeline import QuantizationError
    from harness.run import execute, failure_record, validate
    from harness.schema import unused_fields
    from harness.tables import run_table

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    run_dir = hc.runtime.output_dir
    if multirun and unused_fields(cfg.quantizer):
        # A sweep crosses every method with every setting; combinations a method cannot use are
        # skipped by this rule rather than listed by hand.
        unused = ", ".join(f"{k}={v}" for k, v in unused_fields(cfg.quantizer).items())
        print(f"[skip] {cfg.quantizer.method} does not use {unused}", file=sys.stderr)
        return None
    if multirun and not cfg.force:
        done = recorded_hash(cfg)
        if done is not None:
            print(f"[done] {cfg.quantizer.method} {done} is already in {cfg.results_dir} (force=true reruns it)",
                  file=sys.stderr)
            reused = Path(hc.sweep.dir) / "reused.txt"  # the study's table shows the recorded run
            reused.parent.mkdir(parents=True, exist_ok=True)
            with open(reused, "a") as f:
                f.write(done + "\n")
            return None
    slot = _take_slot(cfg, hc) if multirun else None
    # One W&B run per harness run (logger=wandb): opened before anything can fail, closed in any case.
    tracker = tracking.start(cfg, run_dir, sweep_dir=hc.sweep.dir if multirun else None)
    ok = False
    try:
        try:
            qcfg = validate(cfg)
            record = execute(cfg, qcfg, run_dir=run_dir, progress=sys.stderr.isatty(),
                             log=lambda line: print(line, file=sys.stderr))
        except UserError as exc:
            if not multirun:
                _die(exc.line())  # exits here, before Hydra logs the exception
            results.append(cfg.results_dir, failure_record(cfg, exc, run_dir))
            print(f"error: {exc.line()}", file=sys.stderr)
            return None
        except Exception as exc:  # recorded, then: a sweep goes on, a single run keeps its traceback
            results.append(cfg.results_dir, failure_record(cfg, exc, run_dir))
            if not multirun and isinstance(exc, QuantizationError):  # bad data, not a bug: one line, exit 1
                print(f"error: {exc}", file=sys.stderr)
                sys.exit(1)
            if not multirun:
                raise
            print(f"[failed] {type(exc).__name__}: {exc}", file=sys.stderr)
            return None
        if slot is not None:
            record["slot"] = slot_info(slot, record["device"])
        results.write_json_atomic(Path(run_dir) / "record.json", record)
        results.append(cfg.results_dir, record)
        tracker.log_record(record)
        if cfg.print_table:
            print(run_table([record]))
        ppl = [v for k, v in record["metrics"].items() if k.endswith("/ppl")]
        ok = True
        return ppl[0] if ppl else None
    finally:
        tracker.finish(ok)
        if slot is not None:
            slot.release()


def _take_slot(cfg: Any, hc: Any) -> Any:
    """In a sweep on one machine, hold one slot of the device pool for the whole job and pin the job
    to that slot's GPU. A worker of ``hydra/launcher=gpus`` already sees only its own GPU and takes its
    own slot; under other launchers the job takes the lowest free slot and runs on ``cuda:<slot>``.
    On SLURM the scheduler hands out GPUs, so no pool is used there."""
    from omegaconf import open_dict

    from harness import slots
    from harness.launcher import pinned_slot

    if str(hc.launcher.get("_target_", "")).endswith("SlurmLauncher"):
        return None
    pinned = pinned_slot()
    if pinned is not None:  # this worker's own slot, whatever the pool's size
        slot = slots.acquire(Path(cfg.slots.dir), pinned + 1, index=pinned)
    else:
        slot = slots.acquire(Path(cfg.slots.dir), slots.slot_count(cfg.slots.count))
    if cfg.device in ("auto", "cuda") and slots.device_count() > 0:
        with open_dict(cfg):
            cfg.device = "cuda:0" if pinned is not None else f"cuda:{slot.index}"
    return slot


def slot_info(slot: Any, device: str) -> dict[str, Any]:
    """Which slot and which physical GPU a job used (for checking that no two jobs shared one)."""
    info: dict[str, Any] = {"index": slot.index, "pid": os.getpid(), "device": device,
                            "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    if device.startswith("cuda"):
        import torch

        info["gpu_uuid"] = str(torch.cuda.get_device_properties(torch.device(device)).uuid)
    return info
