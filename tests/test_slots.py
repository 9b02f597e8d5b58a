"""The device slot pool with a simulated device count: exclusivity, dead holders, more jobs than slots."""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import pytest

from harness import slots
from tests.conftest import slot_record


def _job(directory: str, count: int, hold_s: float, log: str) -> None:
    with slots.acquire(directory, count, poll_s=0.01) as slot:
        start = time.monotonic()
        time.sleep(hold_s)
        with open(log, "a") as f:  # one short line per job: appends do not interleave
            f.write(f"{slot.index} {start:.6f} {time.monotonic():.6f} {os.getpid()}\n")


def _intervals(log) -> list[tuple[int, float, float]]:
    return [(int(a), float(b), float(c)) for a, b, c, _ in (ln.split() for ln in open(log))]


def test_concurrent_jobs_never_share_a_slot(tmp_path):
    log = str(tmp_path / "log")
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_job, args=(str(tmp_path / "pool"), 3, 0.3, log)) for _ in range(7)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    runs = _intervals(log)
    assert len(runs) == 7 and {i for i, _, _ in runs} <= {0, 1, 2}
    for i in range(3):  # on each slot, the jobs ran one after another
        spans = sorted((s, e) for j, s, e in runs if j == i)
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:], strict=False))
    # more jobs than slots: at most 3 at any moment, and the pool was actually used in parallel
    events = sorted([(s, 1) for _, s, _ in runs] + [(e, -1) for _, _, e in runs])
    level = peak = 0
    for _, d in events:
        level += d
        peak = max(peak, level)
    assert peak == 3


def test_a_job_killed_while_holding_a_slot_frees_it(tmp_path):
    ctx = mp.get_context("fork")
    holder = ctx.Process(target=_job, args=(str(tmp_path / "pool"), 1, 60, str(tmp_path / "log")))
    holder.start()
    time.sleep(0.5)
    with pytest.raises(TimeoutError):
        slots.acquire(tmp_path / "pool", 1, poll_s=0.01, timeout_s=0.3)
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(10)
    with slots.acquire(tmp_path / "pool", 1, poll_s=0.01, timeout_s=5) as slot:
        assert slot.index == 0


def test_release_then_reacquire_and_bad_count(tmp_path):
    a = slots.acquire(tmp_path, 2)
    b = slots.acquire(tmp_path, 2)
    assert {a.index, b.index} == {0, 1}
    a.release()
    c = slots.acquire(tmp_path, 2, timeout_s=1)
    assert c.index == a.index
    b.release()
    c.release()
    with pytest.raises(ValueError):
        slots.acquire(tmp_path, 0)


def test_occupancy_counts_jobs_per_gpu_and_finds_overlaps():
    recs = [slot_record("a1", 0, 10, "A", "cuda:0", 0), slot_record("a2", 10, 15, "A", "cuda:0", 0),
            slot_record("b1", 1, 7, "B", "cuda:1", 1), slot_record("b2", 8, 12, "B", "cuda:1", 1),
            {"run_id": "solo", "started_at": "2027-01-01T00:00:00+00:00", "finished_at": "2027-01-01T00:01:00+00:00"}]
    occ = slots.occupancy(recs)
    assert occ["jobs"] == 4 and occ["overlaps"] == []
    assert occ["gpus"]["A"] == {"device": ["cuda:0"], "slots": [0], "jobs": 2, "busy_s": pytest.approx(15)}
    assert occ["gpus"]["B"]["busy_s"] == pytest.approx(10)
    assert occ["span_s"] == pytest.approx(15) and occ["job_s"] == pytest.approx(25)
    recs.append(slot_record("b3", 11, 13, "B", "cuda:1", 1))  # starts before b2 ends: the same GPU twice at once
    assert slots.occupancy(recs)["overlaps"] == [("b2", "b3")]


def test_occupancy_names_a_pinned_workers_gpu_by_its_visible_devices():
    rec = slot_record("p1", 0, 5, "C", "cuda:0", 2)
    rec["slot"]["visible_devices"] = "2"
    assert slots.occupancy([rec])["gpus"]["C"]["device"] == ["cuda:0 of CUDA_VISIBLE_DEVICES=2"]
