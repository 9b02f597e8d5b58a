"""Hydra launcher plugin ``hydra/launcher=gpus``: one pinned worker process per GPU (see harness.launcher).

Hydra takes launchers only from the ``hydra_plugins`` namespace; the work is in :mod:`harness.launcher`."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hydra.plugins.launcher import Launcher


class GpuPoolLauncher(Launcher):
    def __init__(self, workers: int = 1) -> None:
        self.workers = workers
        self.config: Any = None
        self.task_function: Any = None
        self.hydra_context: Any = None

    def setup(self, *, hydra_context: Any, task_function: Any, config: Any) -> None:
        self.config, self.task_function, self.hydra_context = config, task_function, hydra_context

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[Any]:
        from harness.launcher import launch

        return launch(self, job_overrides, initial_job_idx)
