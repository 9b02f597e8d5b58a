"""Hydra callbacks: at the end of a multirun, print the study's table and write it beside the runs."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback


class StudyTable(Callback):
    """Prints the table of every run recorded under this sweep's directory and writes ``table.md``."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        from harness import results
        from harness.tables import run_table

        sweep_dir = str(Path(config.hydra.sweep.dir).resolve())
        reused_file = Path(sweep_dir) / "reused.txt"
        reused = set(reused_file.read_text().split()) if reused_file.exists() else set()
        latest: dict[str, dict] = {}  # runs recorded before this sweep that it reused, latest each
        recs = []
        for r in results.iter_records(config.results_dir):
            if r.get("run_dir") and str(Path(r["run_dir"]).resolve()).startswith(sweep_dir):
                recs.append(r)
            elif r.get("config_hash") in reused and r.get("status") == "ok":
                latest[r["config_hash"]] = r
        recs = list(latest.values()) + recs
        if not recs:
            return
        table = run_table(recs)
        Path(sweep_dir).mkdir(parents=True, exist_ok=True)
        (Path(sweep_dir) / "table.md").write_text(table + "\n")
        print(table)
