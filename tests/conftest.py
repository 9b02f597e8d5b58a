"""Shared test setup: offline hub, the local data folder, tiny models, GPU marker handling."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

ROOT = Path(__file__).resolve().parents[1]
DATA = os.environ.get("HARNESS_DATA")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


requires_data = pytest.mark.skipif(not DATA, reason="HARNESS_DATA is not set (point it at shared/data)")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA:
        pytest.skip("HARNESS_DATA is not set")
    return Path(DATA)


@pytest.fixture(scope="session")
def gpt2_tokenizer(data_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(data_dir / "tokenizers" / "gpt2"))


def compose(*overrides: str):
    """Compose the real config (the CLI's) with overrides, without running anything."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from harness.cli import CONF_DIR, SWEEPS_DIR
    from harness.schema import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=[f"hydra.searchpath=[file://{SWEEPS_DIR}]", *overrides],
                             return_hydra_config=False)


def tiny_model(name: str):
    """Load one of the tiny random models of conf/model/ (needs HARNESS_DATA for the tokenizer)."""
    from harness.models import load_model

    cfg = compose(f"model={name}")
    return load_model(cfg.model, cache_dir=None)


def run_child(module: str, entry: str, out: Path, interpret: bool, timeout: int) -> dict:
    """Call ``tests.<module>.<entry>(out)`` in a fresh Python process and load what it saved to ``out``.

    Triton reads ``TRITON_INTERPRET`` when it is first imported, so the interpreter (CPU) and the
    compiled kernels (GPU) each need a process of their own, apart from the test session's."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    code = f"import sys; from tests.{module} import {entry}; {entry}(sys.argv[1])"
    proc = subprocess.run([sys.executable, "-c", code, str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{entry} failed in its child process:\n{proc.stderr[-4000:]}")
    return torch.load(out, weights_only=False)


def slot_record(run_id: str, start: float, end: float, uuid: str = "GPU-a", device: str = "cuda:0",
                index: int = 0) -> dict:
    """A run record of a pooled sweep as far as the slot checks read it: ``start`` and ``end`` in
    seconds on an arbitrary clock, the slot on GPU ``uuid``."""
    from datetime import UTC, datetime

    def iso(t: float) -> str:
        return datetime.fromtimestamp(1.8e9 + t, UTC).isoformat()

    return {"run_id": run_id, "started_at": iso(start), "finished_at": iso(end),
            "slot": {"index": index, "pid": 1, "device": device, "gpu_uuid": uuid}}
