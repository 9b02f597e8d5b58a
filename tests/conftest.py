"""Shared test setup: offline hub, the local data folder, tiny models, GPU marker handling."""
from __future__ import annotations

import os
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
