"""W&B tracking through the real CLI, offline, read back with W&B's own reader (`wandb leet inspect`)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import results, tracking
from harness.errors import UserError
from tests.conftest import compose, requires_data

pytestmark = requires_data
QUICK = ["model=tiny-llama", "eval.seqlen=128", "eval.max_windows=2"]


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a user with no W&B setup at all: no WANDB_* variables, an empty home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "NETRC"}
    env.update(HOME=str(home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **extra)
    return env


def harness(tmp: Path, env: dict[str, str], *overrides: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "harness", f"results_dir={tmp / 'results'}", *overrides]
    return subprocess.run(args, cwd=tmp, env=env, capture_output=True, text=True, timeout=300)


def inspect(run_dir: str | Path, tmp: Path, summary: bool = True) -> dict | list[dict]:
    """W&B's reader of a run's transaction log: the summary object, or every record."""
    [sync_dir] = list((Path(run_dir) / "wandb").glob("offline-run-*"))
    args = [sys.executable, "-m", "wandb", "leet", "inspect", "--json", *(["--summary"] if summary else []),
            str(sync_dir)]
    proc = subprocess.run(args, env=clean_env(tmp), capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout) if summary else [json.loads(line) for line in proc.stdout.splitlines()]


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One RTN run of the regression study's setting with the default logger (wandb, mode auto) for
    a user with no API key and an empty home directory."""
    tmp = tmp_path_factory.mktemp("tracked")
    home = tmp / "home"
    home.mkdir()
    env = clean_env(home, HARNESS_CACHE=str(tmp / "cache"))
    proc = harness(tmp, env, "study=regression", "hydra.mode=RUN", "quantizer=rtn", "quantizer.bits=3",
                   "quantizer.group_size=32", "logger.tags=[ci]", *QUICK)
    assert proc.returncode == 0, proc.stderr
    [record] = list(results.iter_records(tmp / "results"))
    return {"tmp": tmp, "home": home, "proc": proc, "record": record}


def test_run_is_read_back_with_config_metrics_and_module_table(tracked):
    rec, tmp = tracked["record"], tracked["tmp"]
    run = inspect(rec["run_dir"], tmp)
    assert run["state"] == "finished" and run["project"] == "quant-harness"
    assert run["config"]["quantizer"]["bits"] == 3 and run["config"]["quantizer"]["group_size"] == 32
    assert run["config"]["harness"]["config_hash"] == rec["config_hash"]
    summary = run["summary"]
    for key, value in rec["metrics"].items():
        assert summary[key] == pytest.approx(value), key
    assert summary["timings/total_s"] == pytest.approx(rec["timings"]["total_s"])
    assert summary["bits_per_weight"] == pytest.approx(results.footprint(rec)["bits_per_weight"])
    table = summary["module_diagnostics"]
    assert table["_type"] == "table-file" and table["nrows"] == len(rec["modules"]) == 14
    stored = json.loads((Path(rec["run_dir"]) / "wandb").glob("offline-run-*/files/" + table["path"]).__next__()
                        .read_text())
    col = stored["columns"].index("weight_rel_err")
    assert [r[col] for r in stored["data"]] == pytest.approx([m["weight_rel_err"] for m in rec["modules"]])


def test_group_is_the_study_and_tags_name_model_method_bits(tracked):
    records = inspect(tracked["record"]["run_dir"], tracked["tmp"], summary=False)
    [start] = [r["run"] for r in records if r["type"] == "run"]
    assert start["run_group"] == "regression"
    assert set(start["tags"]) == {"model:tiny-llama", "method:rtn", "bits:3", "ci"}
    assert start["display_name"] == "tiny-llama rtn w3 g32"


def test_auto_without_a_key_goes_offline_with_one_sync_line(tracked):
    lines = [ln for ln in tracked["proc"].stderr.splitlines() if ln.startswith("W&B")]
    assert len(lines) == 1 and lines[0].startswith("W&B offline: sync later with `wandb sync ")
    sync_dir = Path(lines[0].split("`wandb sync ", 1)[1].rstrip("`"))
    assert sync_dir.is_dir() and sync_dir.parent == Path(tracked["record"]["run_dir"]) / "wandb"


def test_every_wandb_file_stays_under_the_run_dir(tracked):
    tmp, run_dir = tracked["tmp"], Path(tracked["record"]["run_dir"])
    assert list(tracked["home"].iterdir()) == []  # nothing in $HOME: no ~/.cache/wandb, ~/.config/wandb, ~/.netrc
    assert not (tmp / "wandb").exists() and not (tmp / "artifacts").exists()
    assert {p.name for p in (run_dir / "wandb").iterdir()} >= {"cache", "config", "data", "artifacts"}


def test_failed_run_is_marked_failed(tmp_path):
    empty = tmp_path / "no-data"
    empty.mkdir()
    env = clean_env(tmp_path / "home", HARNESS_DATA=str(empty), HARNESS_CACHE=str(tmp_path / "cache"))
    (tmp_path / "home").mkdir()
    proc = harness(tmp_path, env, "logger.mode=offline", *QUICK)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    [run_dir] = list((tmp_path / "results" / "runs").iterdir())
    run = inspect(run_dir, tmp_path)
    assert run["state"] == "failed" and run["exit_code"] == 1


def test_logger_none_writes_no_wandb_files(tmp_path):
    empty = tmp_path / "no-data"
    empty.mkdir()
    proc = harness(tmp_path, clean_env(tmp_path, HARNESS_DATA=str(empty)), "logger=none", *QUICK)
    assert proc.returncode == 2 and "W&B" not in proc.stderr
    [run_dir] = list((tmp_path / "results" / "runs").iterdir())
    assert not (run_dir / "wandb").exists()


def test_mode_resolution(tmp_path):
    netrc = tmp_path / ".netrc"
    assert tracking.resolve_mode("disabled", {"WANDB_API_KEY": "k" * 40}) == "disabled"
    assert tracking.resolve_mode("auto", {"WANDB_API_KEY": "k" * 40}) == "online"
    assert tracking.resolve_mode("auto", {"HOME": str(tmp_path)}) == "offline"
    assert tracking.resolve_mode("auto", {"HOME": str(tmp_path), "WANDB_MODE": "disabled"}) == "disabled"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    assert tracking.resolve_mode("auto", {"HOME": str(tmp_path)}) == "online"
    other_host = {"HOME": str(tmp_path), "WANDB_BASE_URL": "https://wandb.example"}
    assert tracking.resolve_mode("auto", other_host) == "offline"
    with pytest.raises(UserError, match="logger.mode"):
        tracking.resolve_mode("sometimes", {})


def test_group_tags_and_name_from_config():
    cfg = compose("model=tiny-llama", "quantizer=rtn", "quantizer.bits=3", "logger.tags=[x]")
    assert tracking.run_group(cfg) is None
    assert tracking.run_group(cfg, "/r/sweeps/adhoc/20260101-000000") == "sweep-20260101-000000"
    assert tracking.run_tags(cfg) == ["model:tiny-llama", "method:rtn", "bits:3", "x"]
    assert tracking.run_name(cfg) == "tiny-llama rtn w3"
    study = compose("study=regression")
    assert tracking.run_group(study) == "regression" and tracking.run_tags(study)[1:3] == ["method:fp16", "bits:16"]
    assert compose().logger.name == "wandb" and compose().logger.mode == "auto"
