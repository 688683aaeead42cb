"""The demo protocol on a small slice of Fashion-MNIST: every row is produced, RECO beats the frozen backbone
on unseen classes, the calibrated weights are chosen by the rule and used, duplicate captions reach the loss."""

from pathlib import Path

import pytest
import torch

from reco_lightning.apps.demo.fashion_mnist import DEFAULT_ROOT

pytestmark = pytest.mark.skipif(
    not (Path(DEFAULT_ROOT) / "t10k-labels-idx1-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)


def test_open_protocol_slice_produces_every_row(tmp_path):
    from reco_lightning.apps.demo.pipeline import (
        CONTROL_VOTED,
        MEMORY_FRACTION_ROW,
        RECO_WITHOUT_VOTE,
        run_demo,
    )
    from reco_lightning.apps.demo.probes import LABEL_VOTE_ROW, PROBE_ROW
    from reco_lightning.calibration import choose
    from reco_lightning.data.features import open_feature_cache
    from reco_lightning.model import RecoModule

    root = tmp_path / "demo"
    result = run_demo(
        root,
        limit=2000,
        grid=False,
        extra=["--trainer.max_epochs=2", "--trainer.enable_progress_bar=false"],
    )
    rows = result["top1"]
    expected = [
        "clip",
        "lookup",
        "lookup, whitened",
        "mix",
        "control",
        CONTROL_VOTED,
        RECO_WITHOUT_VOTE,
        "reco",
    ]
    expected += [MEMORY_FRACTION_ROW]
    expected += [LABEL_VOTE_ROW, PROBE_ROW]
    assert list(rows) == expected
    assert all(set(m) == {"seen", "seen_only", "unseen", "all", "seen_to_unseen"} for m in rows.values())
    clip, reco = rows["clip"], rows["reco"]
    assert clip["unseen"] < 15, "the stand-in backbone must not know the unseen classes"
    assert reco["unseen"] > clip["unseen"] + 10, rows
    # seen images among the seen classes only: fewer classes to confuse them with, never a lower top-1
    assert all(m["seen_only"] >= m["seen"] for m in rows.values())
    # the references read the memory's labels: they reach the unseen classes the backbone never learned
    assert min(rows[LABEL_VOTE_ROW]["unseen"], rows[PROBE_ROW]["unseen"]) > clip["unseen"] + 30, rows
    assert (root / "demo_results_open.md").is_file()

    # weights: chosen by the open protocol's rule on validation top-1, then used in training
    for name in ("mix_alpha", "reco[uni-search,cross-fusion]"):
        calibration = result["calibration"][name]
        scores = {float(w): s for w, s in calibration["values"].items()}
        assert calibration["chosen"] == choose(scores, "max")
    run = root / "runs" / "open" / "reco[uni-search,cross-fusion]"
    hparams = next(run.rglob("hparams.yaml")).read_text()
    weight = result["calibration"]["reco[uni-search,cross-fusion]"]["chosen"]
    assert f"retrieved_skip: {weight}" in hparams
    test_config = next((run / "test").rglob("config.yaml")).read_text()
    assert f"mix_alpha: {result['calibration']['mix_alpha']['chosen']}" in test_config
    assert (
        "mask_retrieved: true" in next((root / "runs" / "open" / "control").rglob("hparams.yaml")).read_text()
    )

    # duplicate captions reach the loss: the trained module's criterion marks identical cached captions
    checkpoint = sorted(run.rglob("*.ckpt"))[0]
    model = RecoModule.load_from_checkpoint(checkpoint, map_location="cpu")
    assert model.criterion.config.duplicate_threshold == pytest.approx(0.9999)
    cache = open_feature_cache(root / "cache" / "open" / "memory_all_uni" / "train")
    texts = torch.from_numpy(cache["text_emb"][:256].astype("float32"))
    positives = model.criterion.positives(texts, texts, 0)
    # 80 distinct captions (10 classes x 8 templates) among 256 pairs: most rows have identical siblings
    assert (positives.sum(1) > 1).float().mean() > 0.8


def test_missing_dataset_is_one_clear_line(tmp_path, capsys):
    from reco_lightning.apps.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--out", str(tmp_path / "d"), "--data_root", str(tmp_path / "nowhere")])
    message = str(exit_info.value)
    assert message.startswith("reco demo: ") and "apt-get install dataset-fashion-mnist" in message
    assert "\n" not in message
