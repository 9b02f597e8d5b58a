"""Sweeps through the real CLI and launchers: parallel jobs on a slot pool, submitit's local
executor, failed jobs, and a sweep killed with SIGKILL then resumed without duplicates."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import results, slots
from tests.conftest import requires_data

pytestmark = [requires_data, pytest.mark.slow]
QUICK = ["model=tiny-llama", "logger=none", "eval.seqlen=128", "eval.max_windows=2", "calib.nsamples=2",
         "calib.seqlen=32"]


def sweep_cmd(tmp_path: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "harness", "-m", f"results_dir={tmp_path / 'results'}", *QUICK, *overrides]


def run(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HARNESS_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run(sweep_cmd(tmp_path, *overrides), cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_parallel_jobs_each_own_a_slot_and_never_overlap(tmp_path):
    run(tmp_path, "hydra/launcher=gpus", "slots.count=2", "quantizer=rtn", "quantizer.bits=2,3,4,8")
    recs = list(results.iter_records(tmp_path / "results"))
    assert len(recs) == 4 and {r["slot"]["index"] for r in recs} == {0, 1}
    assert len({r["slot"]["pid"] for r in recs}) == 2  # two worker processes, jobs spread over them
    by_pid = {r["slot"]["pid"]: set() for r in recs}
    for r in recs:
        by_pid[r["slot"]["pid"]].add(r["slot"]["index"])
    assert sorted(map(sorted, by_pid.values())) == [[0], [1]]  # a worker keeps its slot
    for i in (0, 1):
        spans = sorted((r["started_at"], r["finished_at"]) for r in recs if r["slot"]["index"] == i)
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:], strict=False))
    occ = slots.occupancy(recs)
    assert occ["overlaps"] == [] and sorted(occ["gpus"]) == ["slot-0", "slot-1"] and occ["jobs"] == 4


def test_submitit_local_executor_runs_the_sweep(tmp_path):
    run(tmp_path, "hydra/launcher=local", "quantizer=rtn", "quantizer.bits=3,4")
    recs = list(results.iter_records(tmp_path / "results"))
    assert sorted(r["relevant"]["quantizer"]["bits"] for r in recs) == [3, 4]
    assert all(r["status"] == "ok" for r in recs)
    assert list((tmp_path / "results" / "sweeps").rglob("*_submitted.pkl")), "submitit's own job files"


def test_a_failing_job_is_recorded_and_the_sweep_goes_on(tmp_path):
    proc = run(tmp_path, "quantizer=rtn", "quantizer.bits=4,9,3")
    recs = list(results.iter_records(tmp_path / "results"))
    assert [r["status"] for r in recs] == ["ok", "failed", "ok"]
    assert "bits" in recs[1]["error"] and "error: quantizer.bits" in proc.stderr


def test_sigkill_mid_sweep_loses_nothing_and_a_rerun_completes_it(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HARNESS_CACHE=str(tmp_path / "cache"))
    args = ["quantizer=rtn,gptq", "quantizer.bits=2,3,4,8"]
    proc = subprocess.Popen(sweep_cmd(tmp_path, *args), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    store = results.store_path(tmp_path / "results")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # kill once some, not all, jobs are recorded
        if store.exists() and len(store.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = [json.loads(line) for line in store.read_text().splitlines()]  # every line whole
    assert 3 <= len(before) < 8
    run(tmp_path, *args)
    after = list(results.iter_records(tmp_path / "results"))
    hashes = [r["config_hash"] for r in after]
    assert len(after) == 8 and len(set(hashes)) == 8  # completed, no duplicate rows
    assert [r["run_id"] for r in after[: len(before)]] == [r["run_id"] for r in before]


def test_a_worker_killed_mid_job_fails_that_job_only_and_a_rerun_completes_the_sweep(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HARNESS_CACHE=str(tmp_path / "cache"))
    args = ["hydra/launcher=gpus", "slots.count=1", "quantizer=rtn", "quantizer.bits=3,4"]
    proc = subprocess.Popen(sweep_cmd(tmp_path, *args), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    lock = tmp_path / "results" / ".slots" / "slot-0.lock"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # the first job holds slot 0: its holder is the worker
        holder = lock.read_text().strip() if lock.exists() else ""
        if holder:
            break
        time.sleep(0.02)
    worker = int(holder)
    assert worker != proc.pid
    os.kill(worker, signal.SIGKILL)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, err[-2000:]
    assert "error: the worker running job #0" in err and "quantizer.bits=3" in err and "Traceback" not in err
    recs = list(results.iter_records(tmp_path / "results"))
    assert [r["relevant"]["quantizer"]["bits"] for r in recs] == [4]  # the other job ran, on a fresh worker
    assert recs[0]["slot"]["pid"] != worker
    run(tmp_path, *args)
    assert sorted(r["relevant"]["quantizer"]["bits"] for r in results.iter_records(tmp_path / "results")) == [3, 4]
