"""The GPU pool launcher's mechanics on the CPU: pinned long-lived workers, a worker that dies mid-job,
errors raised by a job, and which GPU each worker is given."""
from __future__ import annotations

import os
import time
from concurrent.futures.process import BrokenProcessPool

import pytest

from harness import launcher


def _work(task):
    """A job: report who ran it; "die" kills the worker, "raise" fails the job."""
    if task == "die":
        os._exit(3)
    if task == "raise":
        raise ValueError("bad job")
    time.sleep(0.05)
    return os.getpid(), os.environ.get(launcher.SLOT_ENV), os.environ.get("CUDA_VISIBLE_DEVICES"), task


def _stamp(task):
    """A job that says when it started."""
    return task, time.monotonic()


def test_tasks_start_in_the_given_order_and_come_back_in_task_order():
    order = [3, 0, 4, 1, 2]
    out = launcher.dispatch(list("abcde"), 1, _stamp, lambda w: launcher.worker_env(w, []), order=order)
    assert [v[0] for _, v in out] == list("abcde")  # results in task order
    started = sorted(range(5), key=lambda i: out[i][1][1])
    assert started == order  # one worker: run exactly in the order given
    with pytest.raises(ValueError, match="every task index once"):
        launcher.dispatch([1, 2], 1, _stamp, lambda w: launcher.worker_env(w, []), order=[0, 0])


def test_costliest_jobs_start_first_and_equals_keep_hydras_order():
    jobs = [["quantizer=fp16", "quantizer.bits=4"], ["quantizer=rtn", "quantizer.bits=4"],
            ["quantizer=gptq", "quantizer.bits=4"], ["+quantizer=obq"], ["quantizer=gptq_gptqmodel"],
            ["quantizer.bits=3"], ["quantizer=gptq", "quantizer.bits=3"], ["quantizer=mystery"]]
    assert launcher.longest_first(jobs) == [3, 2, 4, 6, 5, 7, 1, 0]
    assert launcher.longest_first([["quantizer.bits=4"], ["quantizer.bits=3"]]) == [0, 1]  # nothing to go by
    assert launcher.longest_first([]) == []


def test_workers_are_long_lived_and_keep_their_slot_and_gpu():
    tasks = list(range(12))
    out = launcher.dispatch(tasks, 3, _work, lambda w: launcher.worker_env(w, ["5", "7", "2"], 3))
    assert all(ok for ok, _ in out)
    assert [v[3] for _, v in out] == tasks  # results in task order
    by_pid: dict[int, set] = {}
    for _, (pid, slot, gpu, _) in out:
        by_pid.setdefault(pid, set()).add((slot, gpu))
    assert len(by_pid) == 3  # three workers, each served several jobs
    assert all(len(v) == 1 for v in by_pid.values())  # a worker never changes slot or GPU
    assert sorted(next(iter(v)) for v in by_pid.values()) == [("0", "5"), ("1", "7"), ("2", "2")]
    assert os.getpid() not in by_pid


def test_a_dead_worker_fails_its_job_only_and_is_replaced():
    tasks = [0, 1, "die", 3, 4, 5, "raise", 7]
    out = launcher.dispatch(tasks, 2, _work, lambda w: launcher.worker_env(w, []))
    assert [ok for ok, _ in out] == [True, True, False, True, True, True, False, True]
    assert isinstance(out[2][1], BrokenProcessPool)
    assert isinstance(out[6][1], ValueError) and str(out[6][1]) == "bad job"
    pids = {v[0] for ok, v in out if ok}
    assert len(pids) == 3  # the dead worker's slot got a fresh process
    assert {v[1] for ok, v in out if ok} == {"0", "1"} and all(v[2] is None for ok, v in out if ok)


def test_more_workers_than_tasks_starts_only_what_is_needed():
    out = launcher.dispatch([1, 2], 8, _work, lambda w: launcher.worker_env(w, []))
    assert [v[3] for _, v in out] == [1, 2] and {v[1] for _, v in out} <= {"0", "1"}


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.setattr("harness.slots.device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3, 5")
    assert launcher.visible_gpus() == ["3", "5"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert launcher.visible_gpus() == ["0", "1"]
    monkeypatch.setattr("harness.slots.device_count", lambda: 0)
    assert launcher.visible_gpus() == []


def test_worker_env_shares_gpus_round_robin_and_names_the_slot(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert launcher.worker_env(0, ["4", "6"]) == {launcher.SLOT_ENV: "0", "CUDA_VISIBLE_DEVICES": "4"}
    assert launcher.worker_env(3, ["4", "6"]) == {launcher.SLOT_ENV: "3", "CUDA_VISIBLE_DEVICES": "6"}
    assert launcher.worker_env(1, []) == {launcher.SLOT_ENV: "1"}


def test_workers_share_the_cores_unless_told(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert launcher.worker_env(0, ["0"], workers=4)["OMP_NUM_THREADS"] == "16"
    assert launcher.worker_env(0, [], workers=128)["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert "OMP_NUM_THREADS" not in launcher.worker_env(0, ["0"], workers=4)  # the user's setting stands


def test_pinned_slot_reads_the_worker_environment(monkeypatch):
    monkeypatch.delenv(launcher.SLOT_ENV, raising=False)
    assert launcher.pinned_slot() is None
    monkeypatch.setenv(launcher.SLOT_ENV, "2")
    assert launcher.pinned_slot() == 2


def test_a_pinned_slot_waits_for_that_slot_only(tmp_path):
    from harness import slots

    with slots.acquire(tmp_path, 3, index=1) as held:
        assert held.index == 1
        with pytest.raises(TimeoutError):  # slots 0 and 2 are free, but this worker's is not
            slots.acquire(tmp_path, 3, index=1, poll_s=0.01, timeout_s=0.2)
        assert slots.acquire(tmp_path, 3, index=2).index == 2
    with pytest.raises(ValueError, match="slot 3"):
        slots.acquire(tmp_path, 3, index=3)
