"""Zero-shot evaluation datasets: image folders, CLIP_benchmark webdataset shards, retrieval pairs.

Datasets yield ``(image, label)`` (classification) or ``(image, image_index)`` (retrieval), where image is
a PIL RGB image, or whatever ``transform`` (the module's image processor) makes of it. Class names and
prompt templates travel with the dataset (``.classnames``, ``.templates``) so the evaluation code can
build the zero-shot classifier without knowing where the data came from. Pass a ``transform`` that
returns tensors when batching with a DataLoader: the default collate cannot stack PIL images.
"""

from __future__ import annotations

import csv
import importlib.resources
import io
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset

from reco_lightning.data.sources import IMAGE_EXTENSIONS

__all__ = [
    "CLASSNAMES_FILENAME",
    "IMAGE_EXTENSIONS",
    "TEMPLATES_FILENAMES",
    "ImageFolderClassification",
    "RetrievalPairs",
    "WebDatasetClassification",
    "ZeroShotDataError",
    "available_classname_sets",
    "available_template_sets",
    "load_classnames",
    "load_templates",
]

CLASSNAMES_FILENAME = "classnames.txt"
# CLIP_benchmark's name first, then a short alias; the first one present in a dataset root is used.
TEMPLATES_FILENAMES = ("zeroshot_classification_templates.txt", "templates.txt")
PLACEHOLDER = "{c}"

Transform = Callable[[Image.Image], Any]
PathLike = str | os.PathLike[str]


class ZeroShotDataError(ValueError):
    """An evaluation dataset or its metadata files cannot be used; the message names the file and the fix."""


# --------------------------------------------------------------------------------------------------------
# Class names and templates (files or sets shipped with the package)
# --------------------------------------------------------------------------------------------------------


def _resource_dir(kind: str) -> Any:
    return importlib.resources.files("reco_lightning") / "resources" / kind


def _available(kind: str) -> list[str]:
    directory = _resource_dir(kind)
    if not directory.is_dir():
        return []
    return sorted(p.name[: -len(".txt")] for p in directory.iterdir() if p.name.endswith(".txt"))


def available_template_sets() -> list[str]:
    """Names accepted by :func:`load_templates` besides file paths."""
    return _available("templates")


def available_classname_sets() -> list[str]:
    """Names accepted by :func:`load_classnames` besides file paths."""
    return _available("classnames")


def _read_lines(name_or_path: PathLike, kind: str, option: str) -> tuple[str, list[tuple[int, str]]]:
    """Resolve a file path or a shipped set name; return (source label, [(line number, stripped line)]).

    A path that exists wins over a shipped name, so a local ``clip_generic.txt`` can shadow the packaged
    one on purpose. Blank lines are skipped (they would otherwise become empty class names).
    """
    path = Path(name_or_path)
    if path.is_file():
        source, text = str(path), path.read_text(encoding="utf-8")
    else:
        name = str(name_or_path)
        name = name[: -len(".txt")] if name.endswith(".txt") else name
        resource = _resource_dir(kind) / f"{name}.txt"
        if os.sep in name or "/" in name or not resource.is_file():
            raise ZeroShotDataError(
                f"{option} {str(name_or_path)!r} is neither an existing file nor a shipped set; "
                f"shipped sets: {_available(kind)}"
            )
        source, text = (
            f"{kind}/{name}.txt (shipped with reco_lightning)",
            resource.read_text(encoding="utf-8"),
        )
    lines = [(i, line.strip()) for i, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not lines:
        raise ZeroShotDataError(f"{source}: {option} file is empty; write one entry per line")
    return source, lines


def load_templates(name_or_path: PathLike) -> list[str]:
    """Prompt templates, one per line, each with a ``{c}`` placeholder for the class name."""
    source, lines = _read_lines(name_or_path, "templates", "templates")
    for number, line in lines:
        if PLACEHOLDER not in line:
            raise ZeroShotDataError(
                f"{source} line {number}: template {line!r} has no '{{c}}' placeholder; add it where the class name goes"
            )
    return [line for _, line in lines]


def load_classnames(name_or_path: PathLike) -> list[str]:
    """Human-readable class names, one per line, in label order."""
    _, lines = _read_lines(name_or_path, "classnames", "classnames")
    return [line for _, line in lines]


def _default_templates(root: Path) -> list[str] | None:
    for filename in TEMPLATES_FILENAMES:
        if (root / filename).is_file():
            return load_templates(root / filename)
    return None


def _load_image(data: PathLike | bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data)) if isinstance(data, bytes) else Image.open(data)
    with image:
        return image.convert("RGB")


# --------------------------------------------------------------------------------------------------------
# Classification: image folders
# --------------------------------------------------------------------------------------------------------


class ImageFolderClassification(Dataset):
    """One sub-folder per class; sorted folder names define the label order.

    Images are found recursively inside each class folder (extensions in :data:`IMAGE_EXTENSIONS`, any
    case), sorted by path, so the sample order is deterministic. Hidden files and folders are ignored.
    An empty class folder is allowed with a warning: the class stays in the label space (the zero-shot
    classifier still has to reject it), it just contributes no test image.

    Class names: ``classnames_file`` (path or shipped set name), else ``root/classnames.txt``, else the
    folder names with ``_`` turned into spaces. Templates: ``templates_file`` (path or shipped set name),
    else the first of :data:`TEMPLATES_FILENAMES` present in ``root``, else ``None``.
    """

    def __init__(
        self,
        root: PathLike,
        classnames_file: PathLike | None = None,
        templates_file: PathLike | None = None,
        transform: Transform | None = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ZeroShotDataError(
                f"image folder root {str(self.root)!r} does not exist or is not a directory"
            )
        self.class_dirs = sorted(
            p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))
        )
        if not self.class_dirs:
            raise ZeroShotDataError(
                f"{self.root}: no class sub-folders; put each class's images in root/<class>/"
            )
        self.transform = transform

        if classnames_file is None and (self.root / CLASSNAMES_FILENAME).is_file():
            classnames_file = self.root / CLASSNAMES_FILENAME
        if classnames_file is None:
            self.classnames = [p.name.replace("_", " ") for p in self.class_dirs]
        else:
            self.classnames = load_classnames(classnames_file)
            if len(self.classnames) != len(self.class_dirs):
                raise ZeroShotDataError(
                    f"{classnames_file}: {len(self.classnames)} class names but {len(self.class_dirs)} class "
                    f"folders in {self.root}; write one name per folder, in sorted folder order"
                )
        self.templates = (
            load_templates(templates_file) if templates_file is not None else _default_templates(self.root)
        )

        self.samples: list[tuple[Path, int]] = []
        for label, class_dir in enumerate(self.class_dirs):
            files = sorted(
                p
                for p in class_dir.rglob("*")
                if p.suffix.lower() in IMAGE_EXTENSIONS
                and p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(class_dir).parts)
            )
            if not files:
                warnings.warn(
                    f"{class_dir}: class folder has no images; the class is kept as a candidate label",
                    UserWarning,
                    stacklevel=2,
                )
            self.samples.extend((f, label) for f in files)
        if not self.samples:
            raise ZeroShotDataError(
                f"{self.root}: no images with extensions {IMAGE_EXTENSIONS} in any class folder"
            )

    @property
    def targets(self) -> list[int]:
        """Labels of all samples, in sample order (handy for class-balance checks)."""
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        image = _load_image(path)
        return (self.transform(image) if self.transform is not None else image), label


# --------------------------------------------------------------------------------------------------------
# Classification: CLIP_benchmark webdataset shards
# --------------------------------------------------------------------------------------------------------


def _all_ranks(src: Iterator[Any], group: Any = None) -> Iterator[Any]:
    """Node splitter that gives every rank every shard (webdataset's default refuses multi-process runs)."""
    yield from src


class WebDatasetClassification(IterableDataset):
    """Streams a CLIP_benchmark-style webdataset: ``root/{classnames.txt, <templates>, <split>/*.tar}``.

    Each sample holds an image (the first of ``image_keys`` present) and ``cls`` (the integer label as
    text). Shards are read one sample at a time through ``webdataset`` (never the whole set in RAM), in
    sorted shard order without shuffling. Shards are split across DataLoader workers and, when
    ``split_by_node`` (default), across distributed ranks; ranks then see different sample counts, which is
    fine for :class:`~reco_lightning.metrics.ZeroShotClassificationAccumulator` (its counts are summed).
    With ``split_by_node=False`` every rank streams every sample.

    ``root_or_urls`` may also be shard paths/URLs (a list, or a brace pattern string such as
    ``"data/test/{0..9}.tar"``); then ``classnames_file`` is required since there is no root to look in.
    """

    def __init__(
        self,
        root_or_urls: PathLike | Sequence[str],
        transform: Transform | None = None,
        split: str = "test",
        classnames_file: PathLike | None = None,
        templates_file: PathLike | None = None,
        split_by_node: bool = True,
        image_keys: Sequence[str] = ("webp", "png", "jpg", "jpeg"),
    ) -> None:
        self.transform = transform
        self.split_by_node = split_by_node
        self.image_keys = tuple(image_keys)
        is_root = isinstance(root_or_urls, (str, os.PathLike)) and Path(root_or_urls).is_dir()
        if is_root:
            self.root: Path | None = Path(root_or_urls)  # type: ignore[arg-type]
            split_dir = self.root / split
            if not split_dir.is_dir():
                raise ZeroShotDataError(
                    f"{split_dir} does not exist; pass split= the sub-folder holding the *.tar shards"
                )
            self.shards = sorted(str(p) for p in split_dir.glob("*.tar"))
            if not self.shards:
                raise ZeroShotDataError(f"{split_dir}: no *.tar shards found")
            if classnames_file is None:
                classnames_file = self.root / CLASSNAMES_FILENAME
                if not classnames_file.is_file():
                    raise ZeroShotDataError(
                        f"{classnames_file} is missing; add it (one class name per line) or pass classnames_file="
                    )
        else:
            self.root = None
            if isinstance(root_or_urls, (str, os.PathLike)):
                from webdataset.shardlists import expand_urls

                self.shards = expand_urls(str(root_or_urls))  # "a::b" lists and {0..9} brace patterns
            else:
                self.shards = [str(u) for u in root_or_urls]
            if not self.shards:
                raise ZeroShotDataError("root_or_urls is an empty list: pass a dataset root or shard URLs")
            if classnames_file is None:
                raise ZeroShotDataError(
                    f"{self.shards[0]!r} is not a dataset directory, so classnames_file= is required"
                )
        self.classnames = load_classnames(classnames_file)
        if templates_file is not None:
            self.templates = load_templates(templates_file)
        else:
            self.templates = _default_templates(self.root) if self.root is not None else None

    def _decode(self, sample: dict[str, Any]) -> tuple[Any, int]:
        where = f"{sample.get('__url__', '?')} sample {sample.get('__key__', '?')!r}"
        image_key = next((k for k in self.image_keys if k in sample), None)
        if image_key is None:
            found = sorted(k for k in sample if not k.startswith("__"))
            raise ZeroShotDataError(f"{where}: no image entry among {list(self.image_keys)} (has {found})")
        if "cls" not in sample:
            raise ZeroShotDataError(f"{where}: no 'cls' entry holding the integer label")
        raw = sample["cls"]
        try:
            label = int(raw.decode("utf-8").strip() if isinstance(raw, bytes) else raw)
        except ValueError:
            raise ZeroShotDataError(f"{where}: 'cls' is {raw!r}, not an integer label") from None
        if not 0 <= label < len(self.classnames):
            raise ZeroShotDataError(
                f"{where}: label {label} outside [0, {len(self.classnames)}) of the class names"
            )
        image = _load_image(sample[image_key])
        return (self.transform(image) if self.transform is not None else image), label

    def __iter__(self) -> Iterator[tuple[Any, int]]:
        import webdataset as wds

        pipeline = wds.WebDataset(
            self.shards,
            shardshuffle=False,
            nodesplitter=wds.split_by_node if self.split_by_node else _all_ranks,
            workersplitter=wds.split_by_worker,
            empty_check=False,  # a rank or worker with no shard is legitimate (fewer shards than workers)
        )
        for sample in pipeline:
            yield self._decode(sample)


# --------------------------------------------------------------------------------------------------------
# Retrieval: image-caption pairs
# --------------------------------------------------------------------------------------------------------


class RetrievalPairs(Dataset):
    """Image-text retrieval set from a CSV/TSV with one (image path, caption) per row.

    Several rows may share an image (COCO/Flickr have 5 captions each). The dataset indexes the unique
    images in first-seen order and yields ``(image, image_index)``; ``captions`` and ``text_to_image``
    (caption i belongs to image ``text_to_image[i]``) feed :func:`~reco_lightning.metrics.retrieval_metrics`.
    Relative image paths are resolved against ``image_root`` (default: the CSV's folder). The delimiter
    defaults to tab for ``.tsv`` files and comma otherwise. Images are opened only in ``__getitem__``; with
    ``check_files`` (default) their existence is checked up front so a typo fails before any encoding.
    """

    def __init__(
        self,
        annotations: PathLike,
        image_root: PathLike | None = None,
        transform: Transform | None = None,
        image_column: str = "filepath",
        caption_column: str = "caption",
        delimiter: str | None = None,
        check_files: bool = True,
    ) -> None:
        self.annotations = Path(annotations)
        if not self.annotations.is_file():
            raise ZeroShotDataError(f"retrieval annotations file {str(self.annotations)!r} does not exist")
        self.image_root = Path(image_root) if image_root is not None else self.annotations.parent
        self.transform = transform
        if delimiter is None:
            delimiter = "\t" if self.annotations.suffix.lower() == ".tsv" else ","

        images: dict[str, int] = {}
        captions: list[str] = []
        owners: list[int] = []
        with self.annotations.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle, delimiter=delimiter)
            columns = reader.fieldnames or []
            for column, option in ((image_column, "image_column"), (caption_column, "caption_column")):
                if column not in columns:
                    raise ZeroShotDataError(
                        f"{self.annotations}: no column {column!r} (columns: {columns}); set {option}= to the right one"
                    )
            for row in reader:
                line = reader.line_num
                raw_path, caption = (row[image_column] or "").strip(), (row[caption_column] or "").strip()
                if not raw_path or not caption:
                    raise ZeroShotDataError(f"{self.annotations} line {line}: empty image path or caption")
                key = os.path.normpath(self.image_root / raw_path)
                if key not in images:
                    if check_files and not os.path.isfile(key):
                        raise ZeroShotDataError(
                            f"{self.annotations} line {line}: image {key!r} not found; fix the path or image_root="
                        )
                    images[key] = len(images)
                captions.append(caption)
                owners.append(images[key])
        if not captions:
            raise ZeroShotDataError(f"{self.annotations}: no rows below the header")
        self.images: list[Path] = [Path(p) for p in images]
        self.captions: list[str] = captions
        self.text_to_image: Tensor = torch.tensor(owners, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = _load_image(self.images[index])
        return (self.transform(image) if self.transform is not None else image), index
