"""Parallel sweeps on one machine: one long-lived worker process per GPU, pinned to that GPU.

``hydra/launcher=gpus`` runs a multirun's jobs in ``workers`` processes (one per visible GPU by
default; ``slots.count`` sets it). Worker *i* starts with ``CUDA_VISIBLE_DEVICES`` naming the *i*-th
visible GPU, so everything it runs lands on that GPU and no other, and it serves job after job,
paying for its imports and its CUDA context once. It also holds slot *i* of the sweep's slot pool
(:mod:`harness.slots`) during each job, so two sweeps sharing a results directory take turns on a GPU.

Why not Hydra's joblib launcher: its loky workers are restarted whenever a worker's memory grew by
300 MB after its first job, which loading the CUDA libraries of a later job always does, and a worker
moved from slot to slot builds a CUDA context on every GPU it visits. On four H200s the default grid
ran at 1.52× the speed of one GPU that way, each job paying about 10 s of start-up again.

Jobs start costliest first (:func:`longest_first`, by quantizer: OBQ, then GPTQ, RTN, fp16), so that
the sweep does not end with one GPU finishing a long job while the others idle; results still come
back in Hydra's order.

A worker that dies mid-job (killed, out of memory) fails that job only: a fresh worker takes its GPU,
the other jobs go on, and the sweep ends with an error naming the job; rerunning the sweep runs what
is missing (recorded runs are skipped).

Hydra loads launchers only from the ``hydra_plugins`` namespace, so the launcher class sits in
``harness/plugins/hydra_plugins/harness_gpus.py``; :func:`register` puts that folder on the path (the
CLI calls it, never an import).
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import sys
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PLUGIN_DIR = Path(__file__).with_name("plugins")
SLOT_ENV = "HARNESS_SLOT"  # set in a pinned worker: the slot (and GPU) it serves


# A job's relative cost by its quantizer (the ``quantizer=`` override; a prefix matches variants such as
# ``gptq_gptqmodel``), from single-job times on an H200 with the embedded model: fp16 evaluates only (about
# 1.6 s), RTN 2.1 s, GPTQ 3.8 s (medians of the default grid), OBQ about 180 s; on larger models GPTQ and
# OBQ grow faster than RTN. Jobs that do not name a quantizer keep their order.
JOB_COST = {"obq": 100.0, "gptq": 2.4, "rtn": 1.3, "fp16": 1.0}
DEFAULT_COST = 2.0


def job_cost(overrides: Sequence[str]) -> float:
    """The relative cost of a job from its overrides (``JOB_COST`` by quantizer, ``DEFAULT_COST`` otherwise)."""
    for item in overrides:
        key, _, value = item.partition("=")
        if key.lstrip("+~") == "quantizer":
            return next((cost for name, cost in JOB_COST.items() if value.startswith(name)), DEFAULT_COST)
    return DEFAULT_COST


def longest_first(job_overrides: Sequence[Sequence[str]]) -> list[int]:
    """Job indices in the order to start them: costliest first (longest-processing-time-first, which
    bounds how long one worker can run on alone at the end), Hydra's order among equals."""
    return sorted(range(len(job_overrides)), key=lambda i: -job_cost(job_overrides[i]))


class WorkerDied(RuntimeError):
    """A sweep job whose worker process died (killed, out of memory) before the job returned."""


def register() -> None:
    """Make ``hydra/launcher=gpus`` loadable: Hydra scans the ``hydra_plugins`` namespace for launchers."""
    if str(PLUGIN_DIR) not in sys.path:
        sys.path.append(str(PLUGIN_DIR))


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` entries (its own list, else 0…n-1)."""
    from harness.slots import device_count

    n = device_count()
    listed = [s.strip() for s in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if s.strip()]
    return (listed or [str(i) for i in range(n)])[:n]


def worker_env(index: int, gpus: Sequence[str], workers: int = 1) -> dict[str, str]:
    """Environment of worker ``index`` of ``workers``: its slot, and the one GPU it sees (workers share
    GPUs round-robin when there are more workers than GPUs; without a GPU, only the slot). Each worker
    also gets its share of the CPU cores for torch's threads, as joblib and torchrun do, unless
    ``OMP_NUM_THREADS`` is set already: otherwise every worker starts one thread per core."""
    env = {SLOT_ENV: str(index)}
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]
    if "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // max(1, workers)))
    return env


def pinned_slot() -> int | None:
    """The slot of this process when it is a pinned worker, else None."""
    value = os.environ.get(SLOT_ENV)
    return int(value) if value else None


def _pin(env: dict[str, str]) -> None:  # a worker's initializer: before anything touches CUDA
    os.environ.update(env)


def _leave() -> None:
    """A worker's last task, once every job is done: exit without the interpreter's teardown, which with
    CUDA contexts, compiled kernels and library atexit hooks takes seconds per worker. Every job's
    record, logs and W&B files are written by then."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    logging.shutdown()
    os._exit(0)


def dispatch(tasks: Sequence[Any], workers: int, fn: Callable[[Any], Any],
             env: Callable[[int], dict[str, str]], order: Sequence[int] | None = None) -> list[tuple[bool, Any]]:
    """Run ``fn(task)`` for every task on ``workers`` long-lived processes, a task to a free worker, in
    the order ``order`` (task indices; default: as given).

    Worker *w* is started with the environment ``env(w)`` and keeps it for its life. Returns, in task
    order, ``(True, result)`` or ``(False, exception)``: an exception raised by ``fn``, or
    :class:`BrokenProcessPool` when the worker died, in which case a fresh worker replaces it."""
    workers = max(1, min(workers, len(tasks)))
    ctx = mp.get_context("spawn")  # a fresh interpreter: no CUDA state inherited from the launcher

    def start(w: int) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(1, mp_context=ctx, initializer=_pin, initargs=(env(w),))

    queue = deque(range(len(tasks)) if order is None else order)
    if sorted(queue) != list(range(len(tasks))):  # checked before any worker exists
        raise ValueError("order must list every task index once")
    pools = [start(w) for w in range(workers)]
    running: dict[Future, tuple[int, int]] = {}  # future -> (worker, task)
    out: list[tuple[bool, Any]] = [(False, None)] * len(tasks)
    clean = False
    try:
        while queue or running:
            busy = {w for w, _ in running.values()}
            for w in range(workers):
                if w not in busy and queue:
                    j = queue.popleft()
                    running[pools[w].submit(fn, tasks[j])] = (w, j)
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                w, j = running.pop(fut)
                try:
                    out[j] = (True, fut.result())
                except BrokenProcessPool as exc:
                    out[j] = (False, exc)
                    pools[w].shutdown(wait=False, cancel_futures=True)
                    pools[w] = start(w)
                except Exception as exc:  # raised by fn itself
                    out[j] = (False, exc)
        clean = True
    finally:
        for pool in pools:  # all workers leave at once, then are waited for
            if clean:
                pool.submit(_leave)  # its future ends in BrokenProcessPool: the worker is gone, as asked
            else:
                pool.shutdown(wait=False, cancel_futures=True)
        if clean:
            for pool in pools:
                pool.shutdown(wait=True)
    return out


def execute_job(blob: bytes) -> bytes:
    """One Hydra job inside a worker (as Hydra's own parallel launchers do it). The job and its
    JobReturn travel as cloudpickle blobs: the quantizer schema is a class built at run time, which
    plain pickle cannot send."""
    import pickle

    import cloudpickle
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.singleton import Singleton
    from hydra.core.utils import run_job, setup_globals
    from omegaconf import open_dict

    idx, overrides, hydra_context, config, task_function, singleton_state = pickle.loads(blob)
    setup_globals()
    Singleton.set_state(singleton_state)
    sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
    with open_dict(sweep_config):
        sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{idx}"
        sweep_config.hydra.job.num = idx
    HydraConfig.instance().set_config(sweep_config)
    ret = run_job(hydra_context=hydra_context, config=sweep_config, task_function=task_function,
                  job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
    return cloudpickle.dumps(ret)


def launch(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[Any]:
    """Hydra's ``Launcher.launch`` for the GPU pool: one JobReturn per job, in order."""
    import pickle

    import cloudpickle
    from hydra.core.singleton import Singleton
    from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals

    setup_globals()
    config = launcher.config
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    Path(str(config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
    gpus = visible_gpus()
    workers = max(1, min(int(launcher.workers), len(job_overrides)))
    log.info(f"GPU pool: {workers} worker(s) on {', '.join(gpus[:workers]) or 'no GPU'}, {len(job_overrides)} jobs")
    state = Singleton.get_state()
    jobs = [cloudpickle.dumps((initial_job_idx + i, list(o), launcher.hydra_context, config,
                               launcher.task_function, state)) for i, o in enumerate(job_overrides)]
    results = dispatch(jobs, workers, execute_job, lambda w: worker_env(w, gpus, workers),
                       order=longest_first(job_overrides))
    returns = []
    for idx, ((ok, value), overrides) in enumerate(zip(results, job_overrides, strict=True), initial_job_idx):
        if ok:
            returns.append(pickle.loads(value))
            continue
        what = " ".join(filter_overrides(overrides))
        if isinstance(value, BrokenProcessPool):
            value = WorkerDied(f"the worker running job #{idx} ({what}) died; rerun the sweep to run "
                                 "what is missing (recorded runs are skipped)")
        returns.append(JobReturn(overrides=list(overrides), status=JobStatus.FAILED, _return_value=value,
                                 task_name=str(config.hydra.job.name)))
    return returns
