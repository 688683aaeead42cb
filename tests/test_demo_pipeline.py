"""The demo protocol on a small slice of Fashion-MNIST: RECO must beat the frozen backbone on unseen classes."""

import json
from pathlib import Path

import pytest

from reco_lightning.demo.fashion_mnist import DEFAULT_ROOT

pytestmark = pytest.mark.skipif(
    not (Path(DEFAULT_ROOT) / "t10k-labels-idx1-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)


def test_reco_beats_the_frozen_backbone_on_unseen_classes(tmp_path):
    from reco_lightning.demo.pipeline import run_demo

    result = run_demo(
        tmp_path / "demo",
        limit=2000,
        grid=False,
        extra=["--trainer.max_epochs=2", "--trainer.enable_progress_bar=false"],
    )
    rows = result["top1"]
    clip, reco = rows["clip"], rows["reco[uni-search,cross-fusion]"]
    assert clip["unseen"] < 15, "the stand-in backbone must not know the unseen classes"
    assert reco["unseen"] > clip["unseen"] + 10, rows
    assert (tmp_path / "demo" / "demo_results.md").is_file()

    # the retrieval weight was calibrated on the validation split's seen classes and used for training
    calibration = json.loads(
        (tmp_path / "demo" / "runs" / "uni-search_cross-fusion" / "calibration.json").read_text()
    )
    weight = calibration["chosen"]
    assert reco["retrieved_skip"] == weight
    seen_top1 = {float(w): top1 for w, top1 in calibration["reco_seen"].items()}
    allowed = [
        w for w, top1 in seen_top1.items() if top1 >= calibration["clip_seen"] - calibration["tolerance"]
    ]
    assert weight == max(allowed, default=0.0)
    hparams = next((tmp_path / "demo" / "runs" / "uni-search_cross-fusion").rglob("hparams.yaml")).read_text()
    assert f"fusion_retrieved_skip: {weight}" in hparams


def test_missing_dataset_is_one_clear_line(tmp_path, capsys):
    from reco_lightning.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--out", str(tmp_path / "d"), "--data_root", str(tmp_path / "nowhere")])
    message = str(exit_info.value)
    assert message.startswith("reco demo: ") and "apt-get install dataset-fashion-mnist" in message
    assert "\n" not in message
