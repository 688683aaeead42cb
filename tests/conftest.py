"""Shared fixtures: one tiny backbone + shape pairs + memory per test session, built offline in seconds."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message=".*torchvision.*")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """clip/, train.csv, val.csv, memory/ (exact backend) for the tiny shapes setup."""
    from reco_lightning.apps.tiny import prepare_tiny

    return prepare_tiny(tmp_path_factory.mktemp("tiny"), n_train=192, n_val=64)


@pytest.fixture(scope="session")
def tiny_backbone(tiny_dir: Path) -> str:
    return str(tiny_dir / "clip")


@pytest.fixture(scope="session")
def other_backbone(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A second tiny CLIP with the same config but other weights: a different embedding space."""
    from reco_lightning.apps.tiny import COLOURS, SHAPES, TEMPLATES
    from reco_lightning.tiny_clip import save_tiny_clip

    captions = [t.format(c=c, s=s) for t in TEMPLATES for c in COLOURS for s in SHAPES]
    return str(save_tiny_clip(tmp_path_factory.mktemp("other") / "clip", captions, seed=1))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """In the autofaiss environment (RECO_REQUIRE_AUTOFAISS=1) an autofaiss test may not skip: a missing
    extra there is a broken install, not an optional backend."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("RECO_REQUIRE_AUTOFAISS") == "1" and report.skipped and "autofaiss" in item.keywords:
        report.outcome = "failed"
        report.longrepr = f"skipped in the autofaiss environment: {report.longrepr}"


@pytest.fixture(scope="session")
def tiny_reco(tiny_dir: Path):
    """A builder of untrained RecoModules over the tiny memory (k 4, residual fusion, skip 0.5), seeded so
    that the same settings give the same fusion weights; ``settings`` are RecoModule options."""
    import torch

    from reco_lightning.model import RecoModule

    def build(**settings):
        torch.manual_seed(0)
        module = RecoModule(
            backbone=str(tiny_dir / "clip"),
            memory=str(tiny_dir / "memory"),
            k=4,
            fusion_config={"num_heads": 4, "residual": True, "retrieved_skip": 0.5},
            **settings,
        )
        module.setup("test")
        return module.eval()

    return build
