"""RecoModel and `reco export`: a trained RECO that loads without Lightning or pickle and encodes what
`reco predict` writes; the README's Python example, run as it is; every backbone family end to end."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from reco_lightning.apps.tiny import prepare_tiny
from reco_lightning.cli import main
from reco_lightning.encoders import FrozenEncoder
from reco_lightning.errors import RecoMemoryError
from reco_lightning.pretrained import (
    BackboneMismatchError,
    ExportError,
    ImageLoadError,
    RecoModel,
)

ROOT = Path(__file__).parents[1]
CONFIG = ROOT / "configs" / "tiny.yaml"
EXAMPLE = re.compile(r"<!-- python-example:start -->\n```python\n(.*?)```\n<!-- python-example:end -->", re.S)
LIGHTNING = ("pytorch_lightning", "lightning", "lightning_fabric")
CKPT = "runs/tiny/lightning_logs/version_0/checkpoints/last.ckpt"


def _project(root: Path, tiny: Path) -> Path:
    """A directory laid out as the README's commands expect: artifacts/tiny is ``tiny``."""
    (root / "artifacts").mkdir(parents=True, exist_ok=True)
    (root / "artifacts" / "tiny").symlink_to(tiny)
    return root


def _fit_and_export(root: Path, *overrides: str) -> None:
    """`reco fit` (2 steps of configs/tiny.yaml) then `reco export`, run from ``root``, as the README says."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        main(
            [
                "fit",
                "--config",
                str(CONFIG),
                "--trainer.default_root_dir=runs/tiny",
                "--trainer.max_steps=2",
                "--trainer.val_check_interval=1",
                "--trainer.enable_progress_bar=false",
                *overrides,
            ]
        )
        main(["export", "--ckpt_path", CKPT, "--out", "runs/tiny/export"])


def _predict(root: Path, pairs: list[tuple[str, str]], out: str, *overrides: str) -> dict[str, np.ndarray]:
    """`reco predict --output_dir` over ``pairs`` from ``root``; the refined rows it wrote, per side."""
    source = root / f"{out}.csv"
    with source.open("w", newline="") as fh:
        csv.writer(fh).writerows([("filepath", "caption"), *pairs])
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        main(
            [
                "predict",
                "--config",
                str(CONFIG),
                f"--ckpt_path={CKPT}",
                f"--data.init_args.predict={source}",
                f"--output_dir={out}",
                "--trainer.enable_progress_bar=false",
                *overrides,
            ]
        )
    return {
        side: np.concatenate([np.load(p) for p in sorted((root / out / side).glob("*.npy"))])
        for side in ("img_emb", "text_emb")
    }


@pytest.fixture(scope="module")
def project(tiny_dir, tmp_path_factory) -> Path:
    root = _project(tmp_path_factory.mktemp("project"), tiny_dir)
    _fit_and_export(root)
    return root


def test_readme_example_runs_without_lightning_and_equals_reco_predict(project):
    """The README's Python example, verbatim, in a fresh process: it never imports Lightning, and its
    embeddings are the rows `reco predict` writes for the same pair (fp16 tolerance)."""
    found = EXAMPLE.findall((ROOT / "README.md").read_text())
    assert len(found) == 1, "README.md must hold exactly one python-example block"
    example = found[0]
    image = re.search(r'encode_image\(\["([^"]+)"\]\)', example).group(1)
    caption = re.search(r'encode_text\(\["([^"]+)"\]\)', example).group(1)
    epilogue = (
        "\nimport json, sys\nimport numpy as np\n"
        "np.save('example_images.npy', images.numpy()); np.save('example_texts.npy', texts.numpy())\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {LIGHTNING!r})))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", example + epilogue], cwd=project, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    printed = run.stdout.strip().splitlines()
    assert json.loads(printed[-1]) == [], "the example imported Lightning"
    assert printed[-2].strip("[]'\" ") in ("red circle", "blue square", "green triangle")

    rows = _predict(project, [(image, caption)], "example_predict")
    images, texts = np.load(project / "example_images.npy"), np.load(project / "example_texts.npy")
    assert images.shape == rows["img_emb"].shape == (1, 32)
    np.testing.assert_allclose(images, rows["img_emb"].astype(np.float32), atol=2e-3)
    np.testing.assert_allclose(texts, rows["text_emb"].astype(np.float32), atol=2e-3)
    frozen = FrozenEncoder(project / "artifacts" / "tiny" / "clip")
    assert not np.allclose(frozen.encode_captions([caption]).numpy(), texts, atol=1e-2), "nothing was refined"


def test_export_holds_the_trained_fusions_and_describes_the_run(project, tiny_dir):
    from safetensors.torch import load_file

    export = project / "runs" / "tiny" / "export"
    assert sorted(p.name for p in export.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    state = torch.load(project / CKPT, weights_only=True)["state_dict"]
    saved = load_file(export / "model.safetensors")
    assert set(saved) == {k for k in state if k.startswith(("image_fusion.", "text_fusion."))} | {
        "logit_scale"
    }
    for key, value in saved.items():
        expected = state["criterion.log_scale"].exp() if key == "logit_scale" else state[key]
        torch.testing.assert_close(value, expected)
    config = json.loads((export / "config.json").read_text())
    assert (
        config["format"] == "reco-lightning/1" and config["k"] == 4 and config["backbone"]["family"] == "clip"
    )
    # local paths are recorded absolute, so the export loads from any working directory
    assert config["memory"]["path"] == os.path.abspath(project / "artifacts/tiny/memory")
    assert config["memory"]["count"] == 192 and config["calibration"] == {}  # none given: none recorded
    assert config["backbone"]["name_or_path"] == os.path.abspath(project / "artifacts/tiny/clip")
    assert config["trained_steps"] == 2 and config["fusion_config"]["num_heads"] == 4
    card = (export / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: reco-lightning") and "| shapes | reco |" in card
    assert "| shapes | clip |" in card and "k = 4, uni-modal search, cross-modal fusion" in card

    model = RecoModel.from_pretrained(export, memory=tiny_dir / "memory", backbone=tiny_dir / "clip", k=2)
    assert model.config.k == 2 and model.retriever.k == 2 and len(model.memory) == 192
    for key, value in model.trained_state().items():
        torch.testing.assert_close(value, saved[key])
    model.save_pretrained(project / "again")  # a loaded model saves the same weights again
    assert load_file(project / "again" / "model.safetensors").keys() == saved.keys()
    assert not [p for p in project.iterdir() if p.name.startswith(".again")], "a temp dir was left behind"


def test_novelty_gate_settings_load_refuse_a_missing_memory_and_reach_the_card(project, tiny_dir, tmp_path):
    from reco_lightning.model_card import model_card
    from reco_lightning.novelty import NoveltyError

    export = project / "runs" / "tiny" / "export"
    with pytest.raises(NoveltyError, match="known_memory .*missing.*no ids.npy there"):
        RecoModel.from_pretrained(
            export, memory=tiny_dir / "memory", backbone=tiny_dir / "clip", known_memory=tmp_path / "missing"
        )
    model = RecoModel.from_pretrained(
        export, memory=tiny_dir / "memory", backbone=tiny_dir / "clip", known_memory=tiny_dir / "memory"
    )
    assert not model.retriever.novelty.added.any()  # its own training memory: nothing was added
    config = json.loads((export / "config.json").read_text())
    assert config["known_memory"] is None and "novelty gate" not in model_card(config)
    card = model_card({**config, "known_memory": "runs/memory_seen", "novelty_threshold": 0.9})
    assert (
        "novelty gate | on: queries with at least 0.9 of their neighbours absent from `runs/memory_seen` "
        "(rows added after training), that share above the 0.95 quantile of what training rows see "
        "(novelty_share_quantile) bypass the fusion" in card
    )
    assert "caption covariance" not in card  # novelty_whiten off
    whitened = model_card({**config, "known_memory": "runs/memory_seen", "novelty_whiten": 0.01})
    assert (
        "bypass the fusion (an image: its added neighbours' caption mean through the memory's caption "
        in whitened
    )
    assert "ridge 0.01, novelty_whiten)" in whitened


def test_return_gated_says_which_queries_the_memory_added_after_training_answered(
    project, tiny_dir, tmp_path
):
    """With ``known_memory`` lacking every other row of the attached memory, ``return_gated`` marks the
    images answered from the added rows (their embedding is then the mean of those rows' captions, not the
    fusion's) and the captions kept frozen; the embeddings are those returned without it; without a gate,
    or not refined, nothing is gated."""
    from reco_lightning.memory.store import MemoryStore

    ids = np.asarray(MemoryStore.open(tiny_dir / "memory", load_indexes=False).ids)
    (tmp_path / "known").mkdir()
    np.save(tmp_path / "known" / "ids.npy", ids[::2])
    export = project / "runs" / "tiny" / "export"
    kwargs = {"memory": tiny_dir / "memory", "backbone": tiny_dir / "clip"}
    gate = {"known_memory": tmp_path / "known", "novelty_threshold": 0.5, "novelty_share_quantile": None}
    model, plain = (
        RecoModel.from_pretrained(export, **kwargs, **gate),
        RecoModel.from_pretrained(export, **kwargs),
    )
    images = sorted((tiny_dir / "images").glob("val_*.png"))[:16]
    embeddings, gated = model.encode_image(images, batch_size=8, return_gated=True)
    assert torch.equal(embeddings, model.encode_image(images, batch_size=8))
    assert gated.dtype == torch.bool and gated.shape == (16,) and 0 < int(gated.sum()) < 16
    fused = plain.encode_image(images, batch_size=8)
    assert (
        torch.equal(embeddings[~gated], fused[~gated])
        and not torch.isclose(embeddings[gated], fused[gated]).all()
    )
    captions = ["a photo of a red circle", "a blue square", "green triangle"] * 4
    texts, kept = model.encode_text(captions, return_gated=True)
    frozen = model.encode_text(captions, refine=False)
    assert torch.equal(texts[kept], frozen[kept]) and kept.any()
    assert not plain.encode_image(images, batch_size=8, return_gated=True).gated.any()
    assert not model.encode_image(images, refine=False, return_gated=True).gated.any()
    refined = model.refine(model.encode_image(images[:8], refine=False), "image", return_gated=True)
    assert torch.equal(refined.gated.cpu(), gated[:8])  # the same batch: ties among neighbours break alike


def test_encode_image_inputs_errors_and_frozen_side(project, tiny_dir):
    model = RecoModel.from_pretrained(project / "runs" / "tiny" / "export", backbone=tiny_dir / "clip")
    image = tiny_dir / "images" / "val_000001.png"
    frozen = FrozenEncoder(tiny_dir / "clip")
    from PIL import Image

    expected = frozen.encode_images(frozen.preprocess_images([Image.open(image).convert("RGB")]))
    torch.testing.assert_close(model.encode_image([image], refine=False), expected)  # no memory needed
    with pytest.raises(RuntimeError, match="no memory is attached"):
        model.encode_image([image])
    model.set_memory(tiny_dir / "memory")
    pixels = frozen.preprocess_images([Image.open(image).convert("RGB")])["pixel_values"]
    torch.testing.assert_close(model.encode_image(pixels), model.encode_image([image]))  # pixel tensors too
    missing = tiny_dir / "images" / "nope.png"
    with pytest.raises(ImageLoadError, match="nope.png"):
        model.encode_image([image, missing])
    with pytest.warns(UserWarning, match=r"1 image\(s\) could not be read.*nope.png"):
        rows = model.encode_image([image, missing, image], on_error="skip", batch_size=2)
    assert torch.isnan(rows[1]).all() and not torch.isnan(rows[[0, 2]]).any()
    torch.testing.assert_close(rows[0], rows[2])
    with pytest.raises(TypeError, match="list of captions"):
        model.encode_text("a red circle")
    classify = model.classifier(["red circle", "blue square"], templates=["a photo of a {c}."])
    assert classify.weights.shape == (2, 32) and classify.logits([image]).shape == (1, 2)
    assert classify.predict(model.encode_image([image])) == classify.predict([image])


def test_a_vote_doubles_the_refined_dimension_and_reaches_the_classifier_export_and_card(
    project, tiny_dir, tmp_path
):
    """``vote_weight`` (an override at load, or saved): refined embeddings [N, 2 x 32] whose first block is
    the fusion's, the classifier's scores are the fusion's plus W x the vote's over 1 + W, a frozen side
    meets a refined one lifted, and an export keeps the setting and says so in its card."""
    export = project / "runs" / "tiny" / "export"
    kwargs = {"memory": tiny_dir / "memory", "backbone": tiny_dir / "clip"}
    plain = RecoModel.from_pretrained(export, **kwargs)
    voted = RecoModel.from_pretrained(export, **kwargs, vote_weight=3.0)
    assert plain.vote is None and voted.vote.weight == 3.0
    assert (plain.embedding_dim, voted.embedding_dim, voted.dim) == (32, 64, 32)
    images = sorted((tiny_dir / "images").glob("val_*.png"))[:8]
    fused, joined = plain.encode_image(images), voted.encode_image(images)
    assert joined.shape == (8, 64)
    torch.testing.assert_close(joined[:, :32], fused / 2.0)  # 1 / sqrt(1 + 3)
    assert voted.encode_image(images, refine=False).shape == (8, 32)
    names, templates = ["red circle", "blue square", "green triangle"], ["a photo of a {c}.", "a {c}."]
    classes, frozen_classes = (
        plain.classifier(names, templates),
        plain.classifier(names, templates, refine=False),
    )
    vote_block = joined[:, 32:] / (3.0**0.5 / 2.0)
    expected = (
        plain.logit_scale
        * (fused @ classes.weights.t() + 3.0 * vote_block @ frozen_classes.weights.t())
        / 4.0
    )
    classify = voted.classifier(names, templates)
    assert classify.weights.shape == (3, 64)
    torch.testing.assert_close(classify.logits(images), expected, atol=1e-4, rtol=1e-4)
    frozen_images = voted.encode_image(images, refine=False)
    torch.testing.assert_close(  # a frozen image lifted: the fusion's and the vote's blocks both see it
        classify.logits(frozen_images),
        plain.logit_scale
        * (frozen_images @ classes.weights.t() + 3.0 * frozen_images @ frozen_classes.weights.t())
        / 4.0,
        atol=1e-4,
        rtol=1e-4,
    )
    rows = _predict(project, [(str(images[0]), "a red circle")], "voted_predict", "--model.vote_weight=3.0")
    assert rows["img_emb"].shape == rows["text_emb"].shape == (1, 64)  # reco predict writes both blocks
    np.testing.assert_allclose(rows["img_emb"].astype(np.float32), joined[:1].numpy(), atol=2e-3)
    np.testing.assert_allclose(
        rows["text_emb"].astype(np.float32), voted.encode_text(["a red circle"]).numpy(), atol=2e-3
    )
    saved = voted.save_pretrained(tmp_path / "voted")
    assert json.loads((saved / "config.json").read_text())["vote_weight"] == 3.0
    assert (
        "| memory's vote | on: refined embeddings carry the whitened k-NN lookup"
        in (saved / "README.md").read_text()
    )
    assert RecoModel.from_pretrained(saved, **kwargs).embedding_dim == 64
    assert RecoModel.from_pretrained(saved, **kwargs, vote_weight=0.0).embedding_dim == 32
    sharper = RecoModel.from_pretrained(saved, **kwargs, vote_temperature=0.01)  # a run-level setting
    assert sharper.vote.temperature == 0.01
    assert not torch.allclose(sharper.encode_image(images)[:, 32:], joined[:, 32:], atol=1e-3)
    torch.testing.assert_close(
        sharper.encode_image(images)[:, :32], joined[:, :32]
    )  # the fusion's block kept
    card = (sharper.save_pretrained(tmp_path / "sharper") / "README.md").read_text()
    assert "softmax(cosine / 0.01) weights" in card


def test_wrong_backbone_memory_or_files_are_refused_in_one_line(project, tiny_dir, other_backbone, tmp_path):
    export = project / "runs" / "tiny" / "export"
    with pytest.raises(BackboneMismatchError, match="pass backbone= the one it was trained on"):
        RecoModel.from_pretrained(export, backbone=other_backbone)
    model = RecoModel.from_pretrained(export, backbone=tiny_dir / "clip")
    other_memory = tmp_path / "other_memory"
    main(["memory", "build", "--source", str(tiny_dir / "val.csv"), "--out", str(other_memory),
          "--backbone", other_backbone, "--accelerator", "cpu", "--devices", "1"])  # fmt: skip
    with pytest.raises(RecoMemoryError, match="rebuild the memory with this backbone"):
        model.set_memory(other_memory)
    with pytest.raises(ExportError, match="has no config.json"):
        RecoModel.from_pretrained(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((export / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ExportError, match="not a readable safetensors file"):
        RecoModel.from_pretrained(broken, backbone=tiny_dir / "clip")
    with pytest.raises(ExportError, match="does not exist"):
        RecoModel.from_pretrained(tmp_path / "missing" / "export")
    with pytest.raises(ExportError, match="is a file, not an export directory: .*reco export --ckpt_path"):
        RecoModel.from_pretrained(project / CKPT)
    moved = tmp_path / "moved"
    moved.mkdir()
    recorded = json.loads((export / "config.json").read_text())
    recorded["backbone"]["name_or_path"] = str(tmp_path / "gone" / "clip")
    (moved / "config.json").write_text(json.dumps(recorded))
    (moved / "model.safetensors").write_bytes((export / "model.safetensors").read_bytes())
    with pytest.raises(
        ExportError, match=r"does not exist here: pass from_pretrained\(\.\.\., backbone=PATH\)"
    ):
        RecoModel.from_pretrained(moved)
    assert RecoModel.from_pretrained(moved, backbone=tiny_dir / "clip").config.k == 4


class _Payload:
    """Unpickling this runs code (it creates a marker file): no load path of the package may do it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_tampered_checkpoint_is_never_unpickled(project, tmp_path, capsys):
    marker = tmp_path / "ran"
    checkpoint = torch.load(project / CKPT, weights_only=True)
    checkpoint["hyper_parameters"]["note"] = _Payload(str(marker))
    evil = tmp_path / "evil.ckpt"
    torch.save(checkpoint, evil)
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(project)
        for args in (
            ["export", "--ckpt_path", str(evil), "--out", str(tmp_path / "export")],
            ["test", "--config", str(CONFIG), f"--ckpt_path={evil}", "--trainer.enable_progress_bar=false"],
            ["predict", "--config", str(CONFIG), f"--ckpt_path={evil}", f"--output_dir={tmp_path / 'p'}"],
        ):
            with pytest.raises(SystemExit) as exit_info:
                main(args)
            assert exit_info.value.code == 1
            err = capsys.readouterr().err.strip()
            assert "holds objects other than tensors" in err and "\n" not in err, err
    from reco_lightning.model import RecoModule

    with pytest.raises(Exception, match="Weights only load failed"):
        RecoModule.load_from_checkpoint(evil, weights_only=True)
    assert not marker.exists()
    torch.load(io.BytesIO(evil.read_bytes()), weights_only=False)  # the payload runs when unpickled
    assert marker.exists()


def test_no_load_path_of_the_package_unpickles():
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in (ROOT / "src").rglob("*.py")
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if "weights_only=False" in line or "pickle.load" in line
    ]
    assert offenders == []


def test_predict_without_a_writer_is_refused_in_one_line(project, capsys):
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(project)
        with pytest.raises(SystemExit) as exit_info:
            main(
                [
                    "predict",
                    "--config",
                    str(CONFIG),
                    f"--ckpt_path={CKPT}",
                    "--trainer.enable_progress_bar=false",
                ]
            )
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert "add --output_dir DIR" in err and "\n" not in err, err


@pytest.mark.parametrize("family", ["siglip", "siglip2"])
def test_siglip_families_fit_test_predict_export_and_load(family, tmp_path_factory):
    """A tiny random model of each family, saved through save_pretrained: the whole path a user takes."""
    tiny = prepare_tiny(tmp_path_factory.mktemp(f"tiny_{family}"), n_train=64, n_val=32, family=family)
    root = _project(tmp_path_factory.mktemp(f"project_{family}"), tiny)
    model_args = [
        f"--model.backbone=artifacts/tiny/{family}",
        f"--model.memory=artifacts/tiny/memory_{family}",
    ]
    manifest = json.loads((tiny / f"memory_{family}" / "manifest.json").read_text())
    assert manifest["fingerprint"]["family"] == family
    _fit_and_export(root, *model_args)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        main(["test", "--config", str(CONFIG), f"--ckpt_path={CKPT}", *model_args,
              "--trainer.default_root_dir=runs/test", "--trainer.enable_progress_bar=false"])  # fmt: skip
    report = json.loads(next((root / "runs" / "test").rglob("zeroshot_report.json")).read_text())
    assert {("shapes", "clip"), ("shapes", "reco")} <= {(r["dataset"], r["setting"]) for r in report["rows"]}
    pair = ("artifacts/tiny/images/val_000003.png", "a photo of a blue square.")
    rows = _predict(root, [pair], "predicted", *model_args)
    export = root / "runs" / "tiny" / "export"
    assert json.loads((export / "config.json").read_text())["backbone"]["family"] == family
    model = RecoModel.from_pretrained(export, memory=tiny / f"memory_{family}", backbone=tiny / family)
    np.testing.assert_allclose(model.encode_image([root / pair[0]]).numpy(), rows["img_emb"], atol=2e-3)
    np.testing.assert_allclose(model.encode_text([pair[1]]).numpy(), rows["text_emb"], atol=2e-3)
