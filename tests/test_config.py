"""Every config option composes, and the public keys exist with their names."""
from __future__ import annotations

import pytest

from tests.conftest import ROOT, compose

GROUPS = ["model", "calib", "quantizer", "eval", "logger", "experiment"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes(group, option):
    extra = ["model.path=facebook/opt-125m"] if (group, option) == ("model", "hf") else []
    cfg = compose(f"{group}={option}", *extra)
    assert cfg.model.path and cfg.quantizer.method


@pytest.mark.parametrize("study", sorted(p.stem for p in (ROOT / "sweeps" / "study").glob("*.yaml")))
def test_every_study_composes(study):
    cfg = compose(f"study={study}")
    assert cfg.study == study


def test_public_keys():
    cfg = compose()
    for key in ("model.path", "model.dtype", "calib.dataset", "calib.nsamples", "calib.seqlen", "calib.seed",
                "quantizer.bits", "quantizer.group_size", "quantizer.sym", "eval.datasets", "eval.seqlen",
                "eval.max_windows", "results_dir", "device"):
        node, _, leaf = key.rpartition(".")
        from omegaconf import OmegaConf

        parent = OmegaConf.select(cfg, node) if node else cfg
        assert leaf in parent, key


def test_paper_defaults():
    cfg = compose()
    assert (cfg.calib.dataset, cfg.calib.nsamples, cfg.calib.seqlen, cfg.calib.seed) == ("c4", 128, 2048, 0)
    assert (cfg.eval.seqlen, cfg.eval.max_windows) == (2048, None)


@pytest.mark.parametrize("launcher", sorted(p.stem for p in (ROOT / "conf" / "hydra" / "launcher").glob("*.yaml")))
def test_every_launcher_composes(launcher):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from harness.cli import CONF_DIR
    from harness.schema import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose("config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    target = cfg.hydra.launcher._target_
    assert {"gpus": "GpuPool", "slurm": "Slurm", "local": "Local"}[launcher] in target
    if launcher == "gpus":  # one job per GPU; at least one without a GPU
        assert cfg.hydra.launcher.workers >= 1
