"""Tests for reco_lightning.data.zeroshot: tiny image folders, webdataset shards and retrieval CSVs."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from reco_lightning.data.zeroshot import (
    ImageFolderClassification,
    RetrievalPairs,
    WebDatasetClassification,
    ZeroShotDataError,
    available_classname_sets,
    available_template_sets,
    load_classnames,
    load_templates,
)


def _image_bytes(color: tuple[int, int, int], fmt: str = "PNG", size: tuple[int, int] = (4, 3)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def _write_image(path: Path, color: tuple[int, int, int], fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_image_bytes(color, fmt))


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """A stand-in for the module's processor: RGB of the top-left pixel as a float tensor."""
    return torch.tensor(image.getpixel((0, 0)), dtype=torch.float32)


# ------------------------------------------------------------------------------------------------------
# Templates and class names
# ------------------------------------------------------------------------------------------------------


def test_shipped_sets():
    assert {"clip_generic", "fashion_mnist"} <= set(available_template_sets())
    assert "fashion_mnist" in available_classname_sets()
    generic = load_templates("clip_generic")
    assert len(generic) >= 18 and all("{c}" in t for t in generic)
    assert generic[0] == "a photo of a {c}."
    assert len(load_templates("fashion_mnist.txt")) == 8
    assert load_classnames("fashion_mnist") == [
        "t-shirt or top",
        "trouser",
        "pullover",
        "dress",
        "coat",
        "sandal",
        "shirt",
        "sneaker",
        "bag",
        "ankle boot",
    ]


def test_templates_from_file_skip_blank_lines(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("a {c}.\n\n  the {c}!  \n")
    assert load_templates(path) == ["a {c}.", "the {c}!"]


def test_template_without_placeholder_names_file_and_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("a {c}.\n\na photo.\n")
    with pytest.raises(ZeroShotDataError, match=rf"{path} line 3: template 'a photo.' has no '\{{c\}}'"):
        load_templates(path)


def test_unknown_set_and_empty_file(tmp_path):
    with pytest.raises(
        ZeroShotDataError, match=r"'nope' is neither an existing file nor a shipped set; shipped sets: \["
    ):
        load_templates("nope")
    with pytest.raises(ZeroShotDataError, match="neither an existing file"):
        load_classnames(str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ZeroShotDataError, match=rf"{empty}: classnames file is empty"):
        load_classnames(empty)


# ------------------------------------------------------------------------------------------------------
# Image folders
# ------------------------------------------------------------------------------------------------------


@pytest.fixture
def folder_root(tmp_path: Path) -> Path:
    root = tmp_path / "folder"
    _write_image(root / "golden_retriever" / "b.JPG", (10, 0, 0), "JPEG")
    _write_image(root / "golden_retriever" / "a.png", (20, 0, 0))
    _write_image(root / "golden_retriever" / "nested" / "c.webp", (30, 0, 0), "WEBP")
    _write_image(root / "golden_retriever" / ".hidden.png", (99, 0, 0))
    (root / "golden_retriever" / "notes.txt").write_text("not an image")
    _write_image(root / "airliner" / "x.BMP", (0, 40, 0), "BMP")
    (root / ".cache").mkdir()
    return root


def test_image_folder_labels_and_default_classnames(folder_root):
    dataset = ImageFolderClassification(folder_root)
    # Sorted folders define labels: airliner=0, golden_retriever=1. Files sorted by path, recursive,
    # hidden files / non-images / hidden folders skipped.
    assert dataset.classnames == ["airliner", "golden retriever"]
    assert [p.relative_to(folder_root).as_posix() for p, _ in dataset.samples] == [
        "airliner/x.BMP",
        "golden_retriever/a.png",
        "golden_retriever/b.JPG",
        "golden_retriever/nested/c.webp",
    ]
    assert dataset.targets == [0, 1, 1, 1]
    assert dataset.templates is None
    image, label = dataset[1]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and label == 1


def test_image_folder_transform_and_files_in_root(folder_root):
    (folder_root / "classnames.txt").write_text("jet airliner\ngolden retriever dog\n")
    (folder_root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\n")
    dataset = ImageFolderClassification(folder_root, transform=_to_tensor)
    assert dataset.classnames == ["jet airliner", "golden retriever dog"]
    assert dataset.templates == ["a photo of a {c}."]
    image, label = dataset[0]
    assert torch.equal(image, torch.tensor([0.0, 40.0, 0.0])) and label == 0
    # Explicit arguments win over root files; shipped set names work too.
    explicit = ImageFolderClassification(folder_root, templates_file="clip_generic")
    assert explicit.templates == load_templates("clip_generic")


def test_image_folder_classnames_count_mismatch(folder_root, tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("a\nb\nc\n")
    with pytest.raises(
        ZeroShotDataError, match=rf"{names}: 3 class names but 2 class folders in {folder_root}"
    ):
        ImageFolderClassification(folder_root, classnames_file=names)


def test_image_folder_empty_class_warns_and_keeps_label(folder_root):
    (folder_root / "zebra").mkdir()
    with pytest.warns(UserWarning, match="zebra: class folder has no images"):
        dataset = ImageFolderClassification(folder_root)
    assert dataset.classnames[-1] == "zebra" and len(dataset) == 4


def test_image_folder_errors(tmp_path):
    with pytest.raises(ZeroShotDataError, match="does not exist or is not a directory"):
        ImageFolderClassification(tmp_path / "missing")
    (tmp_path / "flat").mkdir()
    _write_image(tmp_path / "flat" / "a.png", (0, 0, 0))
    with pytest.raises(ZeroShotDataError, match="no class sub-folders"):
        ImageFolderClassification(tmp_path / "flat")
    (tmp_path / "flat" / "only_empty").mkdir()
    with pytest.warns(UserWarning), pytest.raises(ZeroShotDataError, match="no images with extensions"):
        ImageFolderClassification(tmp_path / "flat")


# ------------------------------------------------------------------------------------------------------
# WebDataset shards
# ------------------------------------------------------------------------------------------------------


def _write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, entries in samples:
            for ext, data in entries.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _sample(key: str, label: int | str, shade: int, fmt: str = "webp") -> tuple[str, dict[str, bytes]]:
    pil_format = {"webp": "WEBP", "png": "PNG", "jpg": "JPEG"}[fmt]
    return key, {fmt: _image_bytes((shade, shade, shade), pil_format), "cls": str(label).encode()}


@pytest.fixture
def wds_root(tmp_path: Path) -> Path:
    root = tmp_path / "wds"
    root.mkdir()
    (root / "classnames.txt").write_text("cat\ndog\nbird\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na {c}.\n")
    _write_shard(root / "test" / "0.tar", [_sample("s0", 2, 0), _sample("s1", 0, 100, "png")])
    _write_shard(root / "test" / "1.tar", [_sample("s2", 1, 200, "jpg")])
    return root


def test_webdataset_reads_root_layout(wds_root):
    dataset = WebDatasetClassification(wds_root)
    assert dataset.classnames == ["cat", "dog", "bird"]
    assert dataset.templates == ["a photo of a {c}.", "a {c}."]
    assert [Path(s).name for s in dataset.shards] == ["0.tar", "1.tar"]
    samples = list(dataset)
    assert [label for _, label in samples] == [2, 0, 1]
    assert all(isinstance(image, Image.Image) and image.mode == "RGB" for image, _ in samples)
    assert samples[1][0].getpixel((0, 0)) == (100, 100, 100)  # png decodes losslessly
    assert [label for _, label in dataset] == [2, 0, 1]  # iterable twice, same order


def test_webdataset_with_dataloader_workers_sees_each_sample_once(wds_root):
    dataset = WebDatasetClassification(wds_root, transform=_to_tensor)
    loader = DataLoader(dataset, batch_size=2, num_workers=2)
    labels = torch.cat([y for _, y in loader])
    assert sorted(labels.tolist()) == [0, 1, 2]


def test_webdataset_streams_before_reading_later_shards(wds_root):
    # Shard 1 is corrupt; the first samples must still arrive before the error is raised.
    _write_shard(wds_root / "test" / "1.tar", [_sample("bad", "dog", 0)])
    iterator = iter(WebDatasetClassification(wds_root, split_by_node=False))
    assert next(iterator)[1] == 2
    assert next(iterator)[1] == 0
    with pytest.raises(
        ZeroShotDataError, match=r"1\.tar sample 'bad': 'cls' is b'dog', not an integer label"
    ):
        next(iterator)


def test_webdataset_sample_errors(tmp_path, wds_root):
    _write_shard(wds_root / "test" / "1.tar", [_sample("far", 7, 0)])
    with pytest.raises(ZeroShotDataError, match=r"sample 'far': label 7 outside \[0, 3\)"):
        list(WebDatasetClassification(wds_root))
    _write_shard(wds_root / "test" / "1.tar", [("noimg", {"cls": b"1", "txt": b"hello"})])
    with pytest.raises(
        ZeroShotDataError, match=r"sample 'noimg': no image entry .* \(has \['cls', 'txt'\]\)"
    ):
        list(WebDatasetClassification(wds_root))


def test_webdataset_urls_need_classnames(wds_root):
    shards = [str(wds_root / "test" / "0.tar"), str(wds_root / "test" / "1.tar")]
    with pytest.raises(ZeroShotDataError, match="classnames_file= is required"):
        WebDatasetClassification(shards)
    dataset = WebDatasetClassification(shards, classnames_file=wds_root / "classnames.txt")
    assert dataset.templates is None
    assert [label for _, label in dataset] == [2, 0, 1]
    pattern = str(wds_root / "test" / "{0..1}.tar")
    braced = WebDatasetClassification(pattern, classnames_file=wds_root / "classnames.txt")
    assert braced.shards == shards


def test_webdataset_layout_errors(tmp_path, wds_root):
    with pytest.raises(ZeroShotDataError, match="val does not exist; pass split="):
        WebDatasetClassification(wds_root, split="val")
    (wds_root / "train").mkdir()
    with pytest.raises(ZeroShotDataError, match=r"train: no \*\.tar shards"):
        WebDatasetClassification(wds_root, split="train")
    (wds_root / "classnames.txt").unlink()
    with pytest.raises(ZeroShotDataError, match=r"classnames\.txt is missing"):
        WebDatasetClassification(wds_root)


# ------------------------------------------------------------------------------------------------------
# Retrieval pairs
# ------------------------------------------------------------------------------------------------------


@pytest.fixture
def pairs_root(tmp_path: Path) -> Path:
    root = tmp_path / "pairs"
    for name, shade in [("b.png", 10), ("a.png", 20), ("c.jpg", 30)]:
        _write_image(root / "images" / name, (shade, shade, shade), "JPEG" if name.endswith("jpg") else "PNG")
    return root


def test_retrieval_pairs_groups_captions_in_first_seen_order(pairs_root):
    csv_path = pairs_root / "pairs.csv"
    csv_path.write_text(
        "filepath,caption\n"
        "images/b.png,a dark square\n"
        "images/a.png,a grey square\n"
        './images/b.png,"another, darker square"\n'
        "images/c.jpg,a light square\n"
        "images/a.png,grey again\n"
    )
    dataset = RetrievalPairs(csv_path, transform=_to_tensor)
    assert [p.name for p in dataset.images] == ["b.png", "a.png", "c.jpg"]
    assert dataset.captions == [
        "a dark square",
        "a grey square",
        "another, darker square",
        "a light square",
        "grey again",
    ]
    assert dataset.text_to_image.tolist() == [0, 1, 0, 2, 1]
    assert dataset.text_to_image.dtype == torch.long
    assert len(dataset) == 3
    image, index = dataset[1]
    assert torch.equal(image, torch.tensor([20.0, 20.0, 20.0])) and index == 1


def test_retrieval_pairs_tsv_custom_columns_and_image_root(pairs_root, tmp_path):
    tsv = tmp_path / "meta.tsv"
    tsv.write_text("img\ttext\textra\na.png\tgrey, with a comma\tx\nc.jpg\tlight\ty\n")
    dataset = RetrievalPairs(tsv, image_root=pairs_root / "images", image_column="img", caption_column="text")
    assert dataset.captions == ["grey, with a comma", "light"]
    assert dataset.text_to_image.tolist() == [0, 1]
    assert isinstance(dataset[0][0], Image.Image)


def test_retrieval_pairs_errors(pairs_root):
    with pytest.raises(ZeroShotDataError, match="does not exist"):
        RetrievalPairs(pairs_root / "missing.csv")
    bad_columns = pairs_root / "cols.csv"
    bad_columns.write_text("path,caption\nimages/a.png,x\n")
    with pytest.raises(
        ZeroShotDataError, match=r"no column 'filepath' \(columns: \['path', 'caption'\]\); set image_column="
    ):
        RetrievalPairs(bad_columns)
    missing_image = pairs_root / "missing_image.csv"
    missing_image.write_text("filepath,caption\nimages/a.png,x\nimages/zzz.png,y\n")
    with pytest.raises(ZeroShotDataError, match=r"line 3: image .*zzz\.png' not found"):
        RetrievalPairs(missing_image)
    assert len(RetrievalPairs(missing_image, check_files=False)) == 2  # lazily loaded, so allowed
    empty_caption = pairs_root / "empty_caption.csv"
    empty_caption.write_text("filepath,caption\nimages/a.png,\n")
    with pytest.raises(ZeroShotDataError, match="line 2: empty image path or caption"):
        RetrievalPairs(empty_caption)
    header_only = pairs_root / "header.csv"
    header_only.write_text("filepath,caption\n")
    with pytest.raises(ZeroShotDataError, match="no rows below the header"):
        RetrievalPairs(header_only)
