"""Tests for reco_lightning.apps.demo: Fashion-MNIST parsing, the seen/unseen split, pair files, the stand-in CLIP."""

from __future__ import annotations

import csv
import dataclasses
import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reco_lightning.apps.demo import backbone as backbone_module
from reco_lightning.apps.demo import backbone_cli
from reco_lightning.apps.demo.backbone import ensure_backbone
from reco_lightning.apps.demo.backbone_train import train_backbone
from reco_lightning.apps.demo.fashion_mnist import (
    CAPTION_TEMPLATES,
    DEFAULT_ROOT,
    DEFAULT_SEEN_CLASSES,
    FASHION_MNIST_CLASSES,
    FashionMNISTError,
    fashion_mnist_files,
    load_fashion_mnist,
    make_captions,
    make_splits,
    write_image_folder,
    write_pairs,
)
from reco_lightning.apps.demo.probes import image_knn_accuracy, text_retrieval_precision, zero_shot_accuracy
from reco_lightning.apps.demo.recipe import RECIPE_FILENAME, RECIPE_VERSION, BackboneRecipe
from reco_lightning.data.sources import read_pairs
from reco_lightning.data.zeroshot import ImageFolderClassification, load_templates
from reco_lightning.encoders import FrozenCLIP
from reco_lightning.tiny_clip import build_clip_tokenizer

_HAVE_DATA = all(p.is_file() for split in ("train", "test") for p in fashion_mnist_files(DEFAULT_ROOT, split))
needs_data = pytest.mark.skipif(
    not _HAVE_DATA,
    reason=f"Fashion-MNIST not installed under {DEFAULT_ROOT} (apt-get install dataset-fashion-mnist)",
)

# A recipe that trains in about a second: 100 seen-class pairs, 30 steps, width 32, one layer.
TINY_RECIPE = BackboneRecipe(
    backbone_size=100, steps=30, batch_size=32, warmup_steps=5, width=32, layers=1, heads=2, embed_dim=32
)


@pytest.fixture(scope="module")
def train_data() -> tuple[np.ndarray, np.ndarray]:
    if not _HAVE_DATA:
        pytest.skip(
            f"Fashion-MNIST not installed under {DEFAULT_ROOT} (apt-get install dataset-fashion-mnist)"
        )
    return load_fashion_mnist(DEFAULT_ROOT, "train")


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory: pytest.TempPathFactory, train_data) -> Path:
    return ensure_backbone(tmp_path_factory.mktemp("demo") / "backbone", TINY_RECIPE, progress=False)


def _write_idx(path: Path, magic: int, array: np.ndarray) -> None:
    header = np.array([magic, *array.shape], dtype=">u4").tobytes()
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


# ------------------------------------------------------------------------------------------------------
# IDX parsing
# ------------------------------------------------------------------------------------------------------


def test_idx_round_trip(tmp_path: Path):
    images = np.arange(3 * 28 * 28, dtype=np.uint32).reshape(3, 28, 28).astype(np.uint8)
    labels = np.array([9, 0, 4], dtype=np.uint8)
    images_file, labels_file = fashion_mnist_files(tmp_path, "test")
    _write_idx(images_file, 2051, images)
    _write_idx(labels_file, 2049, labels)
    got_images, got_labels = load_fashion_mnist(tmp_path, "test")
    assert got_images.dtype == np.uint8 and got_images.shape == (3, 28, 28)
    assert got_labels.dtype == np.int64
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, [9, 0, 4])


def test_idx_errors_name_the_file(tmp_path: Path):
    images_file, labels_file = fashion_mnist_files(tmp_path, "train")
    with pytest.raises(FashionMNISTError, match="apt-get install dataset-fashion-mnist") as missing:
        load_fashion_mnist(tmp_path, "train")
    assert str(images_file) in str(missing.value)

    _write_idx(images_file, 2049, np.zeros((2, 28, 28)))  # label magic in an image file
    _write_idx(labels_file, 2049, np.zeros(2))
    with pytest.raises(FashionMNISTError, match=r"magic 2049, expected 2051") as bad_magic:
        load_fashion_mnist(tmp_path, "train")
    assert str(images_file) in str(bad_magic.value)

    _write_idx(images_file, 2051, np.zeros((2, 28, 28)))
    with gzip.open(labels_file, "wb") as fh:  # header says 5 labels, 2 present
        fh.write(np.array([2049, 5], dtype=">u4").tobytes() + bytes(2))
    with pytest.raises(FashionMNISTError, match="corrupt") as short:
        load_fashion_mnist(tmp_path, "train")
    assert str(labels_file) in str(short.value)

    labels_file.write_bytes(b"not gzip at all")
    with pytest.raises(FashionMNISTError, match="corrupt"):
        load_fashion_mnist(tmp_path, "train")
    with pytest.raises(FashionMNISTError, match="'train' or 'test'"):
        load_fashion_mnist(tmp_path, "val")


@needs_data
def test_installed_splits(train_data):
    images, labels = train_data
    assert images.shape == (60_000, 28, 28) and images.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(labels), [6000] * 10)
    test_images, test_labels = load_fashion_mnist(DEFAULT_ROOT, "test")
    assert test_images.shape == (10_000, 28, 28)
    np.testing.assert_array_equal(np.bincount(test_labels), [1000] * 10)


# ------------------------------------------------------------------------------------------------------
# Splits and captions
# ------------------------------------------------------------------------------------------------------


@needs_data
def test_default_splits_disjoint_stratified(train_data):
    _, labels = train_data
    splits = make_splits(labels)
    assert splits.sizes() == {"backbone": 15_000, "memory": 30_000, "fusion_train": 15_000}
    assert set(splits.seen_classes) == set(DEFAULT_SEEN_CLASSES)
    assert set(splits.seen_classes).isdisjoint(splits.unseen_classes)
    assert len(splits.unseen_classes) == 5
    assert np.intersect1d(splits.backbone, splits.memory).size == 0
    assert set(np.unique(labels[splits.backbone])) == set(splits.seen_classes)
    backbone_counts = np.bincount(labels[splits.backbone], minlength=10)
    np.testing.assert_array_equal(backbone_counts[list(splits.seen_classes)], [3000] * 5)
    np.testing.assert_array_equal(np.bincount(labels[splits.memory], minlength=10), [3000] * 10)
    expected_fusion = splits.memory[np.isin(labels[splits.memory], splits.seen_classes)]
    np.testing.assert_array_equal(splits.fusion_train, expected_fusion)
    assert not splits.memory.flags.writeable


@needs_data
def test_splits_deterministic_and_seeded(train_data):
    _, labels = train_data
    a = make_splits(labels, seen_classes=(1, 2, 3), seed=7, backbone_size=301, memory_size=600)
    b = make_splits(labels, seen_classes=(3, 2, 1), seed=7, backbone_size=301, memory_size=600)
    c = make_splits(labels, seen_classes=(1, 2, 3), seed=8, backbone_size=301, memory_size=600)
    for name in ("backbone", "memory", "fusion_train"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.backbone, c.backbone)
    assert sorted(np.bincount(labels[a.backbone], minlength=10)[[1, 2, 3]]) == [100, 100, 101]
    # The backbone set does not depend on the memory size (the backbone cache relies on it).
    d = make_splits(labels, seen_classes=(1, 2, 3), seed=7, backbone_size=301, memory_size=0)
    np.testing.assert_array_equal(a.backbone, d.backbone)
    assert d.memory.size == 0


@needs_data
def test_split_errors(train_data):
    _, labels = train_data
    with pytest.raises(FashionMNISTError, match="class 0 has 6000 images"):
        make_splits(labels, seen_classes=(0,), backbone_size=4000, memory_size=30_000)
    with pytest.raises(FashionMNISTError, match="leave at least one class unseen"):
        make_splits(labels, seen_classes=range(10))
    with pytest.raises(FashionMNISTError, match="seen_classes"):
        make_splits(labels, seen_classes=(10,))


def test_captions_seeded_by_pair_id():
    ids = np.array([5, 17, 123, 40_000, 59_999, 0, 1, 2])
    labels = np.array([0, 1, 2, 3, 4, 5, 6, 7])
    captions = make_captions(ids, labels)
    again = make_captions(ids[::-1], labels[::-1])[::-1]
    assert captions == again  # the caption belongs to the pair id, not to its position
    for caption, label in zip(captions, labels, strict=True):
        assert FASHION_MNIST_CLASSES[label] in caption
    many = make_captions(np.arange(400), np.zeros(400, dtype=int))
    assert len(set(many)) == len(CAPTION_TEMPLATES)  # every phrasing is used
    assert make_captions(np.arange(400), np.zeros(400, dtype=int), seed=1) != many
    # Captions never repeat a zero-shot prompt verbatim (text retrieval would be string matching).
    prompts = {t.replace("{c}", c) for t in load_templates("fashion_mnist") for c in FASHION_MNIST_CLASSES}
    all_captions = {t.replace("{c}", c) for t in CAPTION_TEMPLATES for c in FASHION_MNIST_CLASSES}
    assert prompts.isdisjoint(all_captions)


# ------------------------------------------------------------------------------------------------------
# Writing pairs and image folders
# ------------------------------------------------------------------------------------------------------


@needs_data
def test_write_pairs_csv_and_idempotence(tmp_path: Path, train_data):
    images, labels = train_data
    splits = make_splits(labels, backbone_size=50, memory_size=60)
    memory_csv = write_pairs(images, labels, splits.memory, tmp_path, "memory", progress=False)
    fusion_csv = write_pairs(images, labels, splits.fusion_train, tmp_path, "fusion_train", progress=False)
    with memory_csv.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["filepath", "caption", "id", "label"]
    assert [int(r["id"]) for r in rows] == splits.memory.tolist()
    for row in rows:
        with Image.open(tmp_path / row["filepath"]) as img:  # paths are relative to the CSV's folder
            np.testing.assert_array_equal(np.asarray(img), images[int(row["id"])])
        assert int(row["label"]) == labels[int(row["id"])]
        assert FASHION_MNIST_CLASSES[int(row["label"])] in row["caption"]
    # The package's pair reader takes the file as it is, with the Fashion-MNIST index as the pair id.
    records = read_pairs(memory_csv, id_column="id")
    assert [(r.id, r.caption) for r in records] == [(int(r["id"]), r["caption"]) for r in rows]
    # The fusion pairs are memory rows: same ids, same captions, same image files.
    with fusion_csv.open(newline="") as fh:
        fusion_rows = list(csv.DictReader(fh))
    memory_by_id = {r["id"]: r for r in rows}
    assert len(fusion_rows) == 30
    assert all(memory_by_id[r["id"]] == r for r in fusion_rows)

    csv_mtime = memory_csv.stat().st_mtime_ns
    png = tmp_path / rows[0]["filepath"]
    png_mtime = png.stat().st_mtime_ns
    assert write_pairs(images, labels, splits.memory, tmp_path, "memory", progress=False) == memory_csv
    assert memory_csv.stat().st_mtime_ns == csv_mtime and png.stat().st_mtime_ns == png_mtime
    png.unlink()  # a missing image makes the set incomplete: rewritten
    write_pairs(images, labels, splits.memory, tmp_path, "memory", progress=False)
    assert png.is_file()
    write_pairs(images, labels, splits.memory, tmp_path, "memory", caption_seed=3, progress=False)
    assert memory_csv.stat().st_mtime_ns != csv_mtime
    assert not list(tmp_path.rglob("*.tmp"))


def test_write_image_folder(tmp_path: Path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(25, 28, 28), dtype=np.uint8)
    labels = np.arange(25) % 10
    root = write_image_folder(images, labels, tmp_path / "test", progress=False)
    dataset = ImageFolderClassification(root)
    assert dataset.classnames == list(FASHION_MNIST_CLASSES)
    assert [p.name for p in dataset.class_dirs][:2] == ["0_t-shirt_or_top", "1_trouser"]
    assert len(dataset) == 25
    for path, label in dataset.samples:
        index = int(path.stem)
        assert label == labels[index]
        with Image.open(path) as img:
            np.testing.assert_array_equal(np.asarray(img), images[index])
    stamp = (root / "classnames.txt").stat().st_mtime_ns
    write_image_folder(images, labels, root, progress=False)
    assert (root / "classnames.txt").stat().st_mtime_ns == stamp
    images[0] = 255 - images[0]
    write_image_folder(images, labels, root, progress=False)
    with Image.open(root / "0_t-shirt_or_top" / "00000.png") as img:
        np.testing.assert_array_equal(np.asarray(img), images[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test"]  # no temp folders left behind


# ------------------------------------------------------------------------------------------------------
# Stand-in CLIP
# ------------------------------------------------------------------------------------------------------


def test_tokenizer_is_deterministic():
    """tiny_clip.build_clip_tokenizer gives other ids on every call for these captions; this one must not."""
    texts = [t.replace("{c}", c) for t in CAPTION_TEMPLATES for c in FASHION_MNIST_CLASSES]
    tokenizer = build_clip_tokenizer(texts)
    assert all(build_clip_tokenizer(texts).get_vocab() == tokenizer.get_vocab() for _ in range(3))
    # Pinned ids: a change here changes every trained backbone, so bump RECIPE_VERSION with it.
    assert tokenizer("a photo of a bag.")["input_ids"] == [0, 322, 590, 514, 322, 610, 271, 1]
    for name in FASHION_MNIST_CLASSES[1:]:  # every class-name word is one token
        assert tokenizer.tokenize(f"a {name}.") == ["a</w>", *(f"{w}</w>" for w in name.split()), ".</w>"]
    assert tokenizer.tokenize("t-shirt") == [
        "t</w>",
        "-</w>",
        "shirt</w>",
    ]  # shares "shirt" with the shirt class
    assert tokenizer.tokenize("zebra") == ["z", "e", "b", "r", "a</w>"]  # unknown words still tokenize


@needs_data
def test_ensure_backbone_caches_and_rebuilds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_backbone):
    calls = []
    real = backbone_module.train_backbone

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(backbone_module, "train_backbone", counting)
    weights = next(tiny_backbone.glob("*.safetensors"))
    stamp = weights.stat().st_mtime_ns
    assert ensure_backbone(tiny_backbone, TINY_RECIPE, progress=False) == tiny_backbone
    assert calls == [] and weights.stat().st_mtime_ns == stamp
    key = json.loads((tiny_backbone / RECIPE_FILENAME).read_text())
    assert key["recipe"]["recipe_version"] == RECIPE_VERSION
    assert key["recipe"]["seen_classes"] == list(DEFAULT_SEEN_CLASSES)

    # A copy with a different recipe is rebuilt; a corrupt cache key too.
    other = tmp_path / "backbone"
    ensure_backbone(other, dataclasses.replace(TINY_RECIPE, seed=1), progress=False)
    assert len(calls) == 1
    before = FrozenCLIP(tiny_backbone).fingerprint["weights_sha"]
    assert FrozenCLIP(other).fingerprint["weights_sha"] != before
    (other / RECIPE_FILENAME).write_text("{not json")
    ensure_backbone(other, dataclasses.replace(TINY_RECIPE, seed=1), progress=False)
    assert len(calls) == 2


@needs_data
def test_training_is_deterministic(tiny_backbone):
    model, _, log = train_backbone(TINY_RECIPE, progress=False)
    assert log["train_pairs"] == 100 and np.isfinite(log["final_loss"])
    saved = FrozenCLIP(tiny_backbone).model.state_dict()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, saved[name], rtol=0, atol=0, msg=name)


@needs_data
def test_saved_backbone_loads_and_evaluates(tiny_backbone, train_data):
    images, labels = train_data
    clip = FrozenCLIP(tiny_backbone)
    assert clip.dim == TINY_RECIPE.embed_dim
    assert clip.max_text_length == TINY_RECIPE.max_text_len
    assert clip.preprocess_images([Image.fromarray(images[0])])["pixel_values"].shape == (1, 3, 28, 28)

    subset = np.arange(0, 60_000, 600)  # 100 images, all classes
    result = zero_shot_accuracy(tiny_backbone, images[subset], labels[subset])
    assert result["n_seen"] + result["n_unseen"] == 100
    for key in ("seen", "unseen", "all"):
        assert 0.0 <= result[key] <= 100.0
    weighted = (result["seen"] * result["n_seen"] + result["unseen"] * result["n_unseen"]) / 100
    assert result["all"] == pytest.approx(weighted, abs=0.01)  # values are rounded to 0.01

    # Each image's nearest neighbour in a memory holding it is itself.
    knn = image_knn_accuracy(clip, images[subset], labels[subset], images[subset], labels[subset], k=1)
    assert knn["all"] == 100.0
    # Exact prompt strings in the memory are found first.
    prompts = [f"a photo of a {c}." for c in FASHION_MNIST_CLASSES]
    text = text_retrieval_precision(clip, prompts, np.arange(10), templates=("a photo of a {c}.",), k=1)
    assert text == {"seen": 100.0, "unseen": 100.0, "all": 100.0}


@needs_data
def test_cli_main_reports_measurements(tiny_backbone, capsys: pytest.CaptureFixture[str]):
    overrides = {f.name: getattr(TINY_RECIPE, f.name) for f in dataclasses.fields(TINY_RECIPE)}
    argv = [
        "--out",
        str(tiny_backbone),
        "--recipe",
        json.dumps(overrides),
        "--memory-size",
        "200",
        "--eval-limit",
        "200",
    ]
    report = backbone_cli.main(argv)
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(report))
    assert set(report) >= {"zero_shot_top1", "image_10nn_top1_vs_memory", "text_to_text_precision_at_10"}
    assert report["training"]["train_pairs"] == 100
    assert os.path.samefile(report["backbone"], tiny_backbone)
