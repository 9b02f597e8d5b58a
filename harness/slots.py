"""A pool of device slots shared by the concurrent jobs of a sweep on one machine.

Slot *i* is the file ``<dir>/slot-<i>.lock`` held with an exclusive ``flock``: a job owns exactly
one slot for its whole run, no two jobs own the same one, and a job that dies (even by SIGKILL)
releases its slot because the kernel drops the lock with the process. With more jobs than slots,
the others wait for a slot to free up.
"""
from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Slot:
    index: int
    fd: int
    path: Path

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing drops the flock
            self.fd = -1

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def acquire(directory: str | Path, count: int, poll_s: float = 0.2, timeout_s: float | None = None,
            index: int | None = None) -> Slot:
    """Take a free slot among ``count`` (waiting while all are taken); the lowest free index wins.
    With ``index``, wait for that slot only (a worker pinned to one GPU)."""
    if count < 1:
        raise ValueError(f"a slot pool needs at least one slot, got {count}")
    if index is not None and not 0 <= index < count:
        raise ValueError(f"slot {index} is not in a pool of {count}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        for i in range(count) if index is None else (index,):
            path = directory / f"slot-{i}.lock"
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())  # who holds it, for people looking
            return Slot(i, fd, path)
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"no free slot among {count} in {directory} after {timeout_s} s")
        time.sleep(poll_s)


def slot_count(count: int | None = None) -> int:
    """Slots of the pool: ``count`` when given, else one per visible GPU (at least one)."""
    return int(count) if count else max(device_count(), 1)


def device_count() -> int:
    """The number of visible CUDA devices (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def occupancy(records: Iterable[dict]) -> dict:
    """How a sweep used the devices, read from its records.

    Per GPU (by UUID; by slot where jobs ran without one, as on a CPU): the jobs and busy seconds.
    Also every pair of jobs that overlapped in time on one GPU, the span from the first start to the
    last finish, and the sum of the jobs' own times. Records without a slot (runs outside a pooled
    sweep) are left out."""
    from datetime import datetime

    jobs = []
    for r in records:
        slot = r.get("slot")
        if not slot or not r.get("started_at") or not r.get("finished_at"):
            continue
        start = datetime.fromisoformat(r["started_at"]).timestamp()
        end = datetime.fromisoformat(r["finished_at"]).timestamp()
        jobs.append((slot.get("gpu_uuid") or f"slot-{slot['index']}", start, end, r.get("run_id", "?"), slot))

    def device(slot: dict) -> str:  # a pinned worker's cuda:0 is the GPU its CUDA_VISIBLE_DEVICES names
        seen = slot.get("visible_devices")
        return f"{slot['device']} of CUDA_VISIBLE_DEVICES={seen}" if seen else slot["device"]

    gpus: dict[str, dict] = {}
    overlaps = []
    for key in sorted({j[0] for j in jobs}):
        mine = sorted((j for j in jobs if j[0] == key), key=lambda j: j[1])
        gpus[key] = {"device": sorted({device(j[4]) for j in mine}), "slots": sorted({j[4]["index"] for j in mine}),
                     "jobs": len(mine), "busy_s": sum(j[2] - j[1] for j in mine)}
        for i, a in enumerate(mine):
            overlaps += [(a[3], b[3]) for b in mine[i + 1:] if b[1] < a[2]]
    return {"gpus": gpus, "overlaps": overlaps, "jobs": len(jobs),
            "span_s": (max(j[2] for j in jobs) - min(j[1] for j in jobs)) if jobs else 0.0,
            "job_s": sum(j[2] - j[1] for j in jobs)}
