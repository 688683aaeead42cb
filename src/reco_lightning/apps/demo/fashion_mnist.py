"""Fashion-MNIST as the real-image data of the RECO demo: loading, the seen/unseen split, pair files.

The demo needs a frozen CLIP that *lacks* some concepts. With no pretrained CLIP available offline, a
small stand-in CLIP is pre-trained here on the "seen" classes only; the "unseen" classes exist only in
the retrieval memory. This module fixes that protocol once (seeded, stratified, disjoint index sets),
writes the pairs in the package's CSV format (``filepath,caption,id,label``) and the official test
split as a per-class image folder for zero-shot classification.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from reco_lightning.atomic import atomic_write_text, replace_directory
from reco_lightning.data.zeroshot import load_classnames

__all__ = [
    "CAPTION_TEMPLATES",
    "DEFAULT_ROOT",
    "DEFAULT_SEEN_CLASSES",
    "DEFAULT_SPLIT",
    "DEMO_SPLITS",
    "FASHION_MNIST_CLASSES",
    "DemoSplits",
    "FashionMNISTError",
    "caption_templates_for",
    "fashion_mnist_files",
    "load_fashion_mnist",
    "make_captions",
    "make_splits",
    "resolve_split",
    "split_name",
    "write_image_folder",
    "write_pairs",
]

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
_INSTALL_HINT = "install it with `apt-get install dataset-fashion-mnist`"

#: Class names in label order (0..9), lower-case, as the zero-shot prompts spell them.
FASHION_MNIST_CLASSES: tuple[str, ...] = tuple(load_classnames("fashion_mnist"))  # the shipped resource file

#: Named seen/unseen splits (label ids of the SEEN classes), all reported by benchmarks/demo_accuracy.py.
#:
#: ``tops`` (the default): the backbone knows t-shirt or top, pullover, coat, shirt and bag, four of them
#: hard to tell apart; it has never seen trousers, dresses or any footwear. RECO must learn whole new
#: families from the memory and, among the unseen shoes, fine distinctions (sandal / sneaker / ankle boot)
#: that retrieval alone can teach.
#: ``shoes``: the complement (seen: trouser, dress, sandal, sneaker, ankle boot).
#: ``look-alikes``: every unseen class has a seen look-alike in its garment family (seen: t-shirt or top,
#: dress, coat, sneaker, bag; unseen: trouser, pullover, sandal, shirt, ankle boot). Here the frozen
#: model's seen-class score is flattered by the gap itself: it never predicts an unseen class, so a coat
#: is never mistaken for a pullover. Once RECO makes the unseen classes real competitors, seen images that
#: resemble their unseen look-alike start going to it, and seen accuracy drops (measured in docs/results.md).
DEMO_SPLITS: dict[str, tuple[int, ...]] = {
    "tops": (0, 2, 4, 6, 8),
    "shoes": (1, 3, 5, 7, 9),
    "look-alikes": (0, 3, 4, 7, 8),
}
DEFAULT_SPLIT = "tops"
DEFAULT_SEEN_CLASSES: tuple[int, ...] = DEMO_SPLITS[DEFAULT_SPLIT]

#: Caption phrasings of the backbone/memory pairs. Together they use the words of the zero-shot prompt
#: templates (``resources/templates/fashion_mnist.txt``: photo, low resolution, black and white, grayscale,
#: product, small, fashion item, type/piece of clothing, plain background), as a real CLIP has seen the
#: language of prompts, but never one of those prompt strings itself: text-to-text retrieval of a class
#: prompt against memory captions must generalise over wording, not match the exact string.
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a photo of a {c}.",
    "a picture of a {c}, a type of clothing.",
    "a low resolution image of a {c}.",
    "a black and white picture of a {c}.",
    "a grayscale product image of a {c}.",
    "a small image of a {c}, a piece of clothing.",
    "a {c}, a fashion item, on a plain background.",
    "this is a {c}.",
)

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IMAGE_MAGIC, _LABEL_MAGIC = 2051, 2049


class FashionMNISTError(ValueError):
    """A Fashion-MNIST file is missing or corrupt, or a split request cannot be met; the message says which."""


# --------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """Parse one gzip IDX file (big-endian header: magic, then one uint32 per dimension, then uint8 data)."""
    if not path.is_file():
        raise FashionMNISTError(f"Fashion-MNIST file {path} is missing: {_INSTALL_HINT}")
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as err:
        raise FashionMNISTError(
            f"Fashion-MNIST file {path} is corrupt ({err}): reinstall with `apt-get install --reinstall dataset-fashion-mnist`"
        ) from err
    header_len = 4 * (1 + ndim)
    if len(raw) < header_len:
        raise FashionMNISTError(
            f"Fashion-MNIST file {path} is truncated (no IDX header): reinstall with `apt-get install --reinstall dataset-fashion-mnist`"
        )
    header = np.frombuffer(raw, dtype=">u4", count=1 + ndim)
    if int(header[0]) != magic:
        raise FashionMNISTError(
            f"Fashion-MNIST file {path} has IDX magic {int(header[0])}, expected {magic}: the file is corrupt or "
            "not the right one; reinstall with `apt-get install --reinstall dataset-fashion-mnist`"
        )
    shape = tuple(int(d) for d in header[1:])
    expected = int(np.prod(shape))
    if len(raw) - header_len != expected:
        raise FashionMNISTError(
            f"Fashion-MNIST file {path} holds {len(raw) - header_len} data bytes, header says {expected}: the file "
            "is corrupt; reinstall with `apt-get install --reinstall dataset-fashion-mnist`"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(shape).copy()


def fashion_mnist_files(root: str | os.PathLike = DEFAULT_ROOT, split: str = "train") -> tuple[Path, Path]:
    """Paths of the (images, labels) gzip IDX files of ``split`` under ``root``."""
    if split not in _FILES:
        raise FashionMNISTError(f"split={split!r} is not a Fashion-MNIST split: use 'train' or 'test'")
    image_name, label_name = _FILES[split]
    return Path(root) / image_name, Path(root) / label_name


def load_fashion_mnist(
    root: str | os.PathLike = DEFAULT_ROOT, split: str = "train"
) -> tuple[np.ndarray, np.ndarray]:
    """Images ``uint8 [N, 28, 28]`` and labels ``int64 [N]`` of the ``train`` (60k) or ``test`` (10k) split.

    The IDX files are parsed directly (no torchvision: it does not import beside this torch build).
    """
    image_file, label_file = fashion_mnist_files(root, split)
    images = _read_idx(image_file, _IMAGE_MAGIC, ndim=3)
    labels = _read_idx(label_file, _LABEL_MAGIC, ndim=1).astype(np.int64)
    if len(images) != len(labels):
        raise FashionMNISTError(
            f"{image_file} has {len(images)} images but {label_file} has {len(labels)} labels: reinstall with "
            "`apt-get install --reinstall dataset-fashion-mnist`"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= len(FASHION_MNIST_CLASSES)):
        raise FashionMNISTError(f"{label_file} has labels outside 0..9: the file is corrupt")
    return images, labels


# --------------------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------------------


def _readonly(array: np.ndarray) -> np.ndarray:
    array = np.ascontiguousarray(array, dtype=np.int64)
    array.setflags(write=False)
    return array


@dataclass(frozen=True, eq=False)
class DemoSplits:
    """Disjoint index sets into the Fashion-MNIST *train* split (the official test split is the evaluation set).

    - ``backbone``: seen classes only; the stand-in CLIP's pre-training pairs.
    - ``memory``: all classes, never seen by the backbone; the retrieval memory at evaluation.
    - ``fusion_train``: the seen-class subset of ``memory``. The fusion is trained on seen pairs while
      retrieving from a memory restricted to seen classes, so no unseen concept leaks into training; its
      pairs are memory rows too, so each query's own row is dropped by RECO's self-exclusion (same pair id)
      rather than by holding out yet another disjoint set, which keeps every unseen image for the memory.
    """

    seen_classes: tuple[int, ...]
    num_classes: int
    seed: int
    backbone: np.ndarray = field(repr=False)
    memory: np.ndarray = field(repr=False)
    fusion_train: np.ndarray = field(repr=False)

    @property
    def unseen_classes(self) -> tuple[int, ...]:
        return tuple(c for c in range(self.num_classes) if c not in self.seen_classes)

    def sizes(self) -> dict[str, int]:
        return {
            "backbone": len(self.backbone),
            "memory": len(self.memory),
            "fusion_train": len(self.fusion_train),
        }


def _per_class(total: int, classes: Sequence[int]) -> dict[int, int]:
    """Split ``total`` as evenly as possible over ``classes`` (the first ``total % n`` classes get one more)."""
    base, extra = divmod(total, len(classes)) if classes else (0, 0)
    return {c: base + (1 if i < extra else 0) for i, c in enumerate(sorted(classes))}


def make_splits(
    labels: np.ndarray,
    seen_classes: Sequence[int] = DEFAULT_SEEN_CLASSES,
    seed: int = 0,
    backbone_size: int = 15_000,
    memory_size: int = 30_000,
    num_classes: int = len(FASHION_MNIST_CLASSES),
) -> DemoSplits:
    """Seeded, stratified, disjoint index sets (see :class:`DemoSplits`).

    Each class's indices are shuffled once with ``seed``; the backbone takes a prefix of every seen class
    and the memory the next block of every class. So the backbone set depends only on
    (labels, seen_classes, seed, backbone_size), never on ``memory_size``. Defaults (15k backbone = 3,000 per
    seen class, 30k memory = 3,000 per class) use all 6,000 train images of each seen class and keep the
    pre-training inside the CPU time budget.
    """
    labels = np.asarray(labels, dtype=np.int64)
    seen = _checked_seen(seen_classes, num_classes)
    if backbone_size < 0 or memory_size < 0:
        raise FashionMNISTError("backbone_size and memory_size must be >= 0")
    backbone_counts = _per_class(backbone_size, seen)
    memory_counts = _per_class(memory_size, range(num_classes))
    rng = np.random.default_rng(seed)
    backbone, memory = [], []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        need = backbone_counts.get(c, 0) + memory_counts[c]
        if need > len(members):
            raise FashionMNISTError(
                f"class {c} has {len(members)} images but backbone_size={backbone_size} and "
                f"memory_size={memory_size} need {need} of it: lower backbone_size or memory_size"
            )
        order = members[rng.permutation(len(members))]
        b = backbone_counts.get(c, 0)
        backbone.append(order[:b])
        memory.append(order[b : b + memory_counts[c]])
    backbone_idx = np.sort(np.concatenate(backbone))
    memory_idx = np.sort(np.concatenate(memory))
    fusion_idx = memory_idx[np.isin(labels[memory_idx], seen)]
    return DemoSplits(
        seen_classes=seen,
        num_classes=num_classes,
        seed=int(seed),
        backbone=_readonly(backbone_idx),
        memory=_readonly(memory_idx),
        fusion_train=_readonly(fusion_idx),
    )


def resolve_split(spec: str | Sequence[int | str]) -> tuple[int, ...]:
    """Seen class ids from a split name (:data:`DEMO_SPLITS`), or from class names / ids (a list or a
    comma-separated string such as ``"coat,bag"`` or ``"0,3"``); sorted, validated."""
    if isinstance(spec, str):
        if spec in DEMO_SPLITS:
            return DEMO_SPLITS[spec]
        spec = [part.strip() for part in spec.split(",") if part.strip()]
    seen = set()
    for item in spec:
        if isinstance(item, int) or str(item).isdigit():
            seen.add(int(item))
        elif item in FASHION_MNIST_CLASSES:
            seen.add(FASHION_MNIST_CLASSES.index(item))
        else:
            raise FashionMNISTError(
                f"unknown split or class {item!r}: use one of {sorted(DEMO_SPLITS)} or class names "
                f"{list(FASHION_MNIST_CLASSES)} (or their ids 0-9), comma-separated"
            )
    return _checked_seen(seen, len(FASHION_MNIST_CLASSES))


def _checked_seen(seen_classes: Sequence[int], num_classes: int) -> tuple[int, ...]:
    """Sorted unique seen class ids; a non-empty subset of 0..num_classes-1 that leaves a class unseen."""
    seen = tuple(sorted({int(c) for c in seen_classes}))
    if not seen or any(c < 0 or c >= num_classes for c in seen):
        raise FashionMNISTError(
            f"seen_classes={list(seen)} must be a non-empty subset of 0..{num_classes - 1}"
        )
    if len(seen) == num_classes:
        raise FashionMNISTError(
            "seen_classes covers every class: it must be a proper subset, leave at least one class unseen"
        )
    return seen


def split_name(seen_classes: Sequence[int]) -> str:
    """The :data:`DEMO_SPLITS` name of a set of seen classes, or its ids joined by '-'."""
    seen = tuple(sorted(int(c) for c in seen_classes))
    for name, classes in DEMO_SPLITS.items():
        if classes == seen:
            return name
    return "-".join(str(c) for c in seen)


# --------------------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------------------


def caption_templates_for(ids: np.ndarray, num_templates: int, seed: int = 0) -> np.ndarray:
    """Template index for each pair id: a seeded counter-based draw (SplitMix64 of ``seed`` and the id).

    Keyed by the stable pair id rather than drawn in sequence, so an image gets the same caption in every
    split and every CSV it appears in, whatever the order or the subset.
    """
    with np.errstate(over="ignore"):  # SplitMix64 relies on uint64 wrap-around
        x = np.asarray(ids, dtype=np.uint64) + np.uint64(seed & 0xFFFFFFFF) * np.uint64(0x9E3779B97F4A7C15)
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x % np.uint64(num_templates)).astype(np.int64)


def make_captions(
    ids: np.ndarray,
    labels: np.ndarray,
    classnames: Sequence[str] = FASHION_MNIST_CLASSES,
    templates: Sequence[str] = CAPTION_TEMPLATES,
    seed: int = 0,
) -> list[str]:
    """One caption per pair: a seeded choice among ``templates`` filled with the pair's class name."""
    if not templates or any("{c}" not in t for t in templates):
        raise FashionMNISTError("caption templates must be non-empty and each contain a '{c}' placeholder")
    choice = caption_templates_for(np.asarray(ids), len(templates), seed)
    return [
        templates[t].replace("{c}", classnames[int(y)])
        for t, y in zip(choice, np.asarray(labels), strict=True)
    ]


# --------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _save_png(array: np.ndarray, path: Path) -> None:
    """Write one grayscale PNG atomically (temp name + rename); an identical existing file is kept as is."""
    data = _png_bytes(array)
    try:
        if path.stat().st_size == len(data) and path.read_bytes() == data:
            return
    except FileNotFoundError:
        pass
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_pairs(
    images: np.ndarray,
    labels: np.ndarray,
    indices: np.ndarray,
    directory: str | os.PathLike,
    name: str,
    classnames: Sequence[str] = FASHION_MNIST_CLASSES,
    templates: Sequence[str] = CAPTION_TEMPLATES,
    caption_seed: int = 0,
    image_dir: str = "images",
    progress: bool = True,
) -> Path:
    """Write ``directory/<name>.csv`` (``filepath,caption,id,label``) and its PNGs; return the CSV path.

    ``id`` is the image's index in ``images`` (the Fashion-MNIST train split), a pair id that stays the
    same across CSVs, so a memory and a training set built from different CSVs can exclude a query's own
    row. PNGs live in a shared ``directory/<image_dir>/<id>.png`` pool (the fusion set is a subset of the
    memory: its images are written once). Idempotent: when the CSV already holds exactly these rows and
    every image exists, nothing is written. Atomic: each PNG and the CSV go through a temp file + rename,
    the CSV last, so an existing CSV always points at complete images.
    """
    directory = Path(directory)
    indices = np.asarray(indices, dtype=np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= len(images)):
        raise FashionMNISTError(f"write_pairs({name!r}): indices outside 0..{len(images) - 1}")
    width = max(5, len(str(max(len(images) - 1, 0))))
    rel = [f"{image_dir}/{int(i):0{width}d}.png" for i in indices]
    captions = make_captions(indices, labels[indices], classnames, templates, caption_seed)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["filepath", "caption", "id", "label"])
    writer.writerows(zip(rel, captions, indices.tolist(), labels[indices].tolist(), strict=True))
    text = buffer.getvalue()

    csv_path = directory / f"{name}.csv"
    if (
        csv_path.is_file()
        and csv_path.read_text(encoding="utf-8") == text
        and all((directory / r).is_file() for r in rel)
    ):
        return csv_path
    (directory / image_dir).mkdir(parents=True, exist_ok=True)
    for i, r in zip(
        tqdm(indices, desc=f"writing {name} PNGs", disable=not progress, unit="img"), rel, strict=True
    ):
        _save_png(images[int(i)], directory / r)
    atomic_write_text(csv_path, text)
    return csv_path


def _folder_digest(images: np.ndarray, labels: np.ndarray, classnames: Sequence[str]) -> str:
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(images, dtype=np.uint8).tobytes())
    digest.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    digest.update("\n".join(classnames).encode())
    return digest.hexdigest()


def write_image_folder(
    images: np.ndarray,
    labels: np.ndarray,
    root: str | os.PathLike,
    classnames: Sequence[str] = FASHION_MNIST_CLASSES,
    progress: bool = True,
) -> Path:
    """Write a classification set as ``root/<class_index>_<name>/<index>.png`` plus ``root/classnames.txt``.

    This is the layout :class:`reco_lightning.data.zeroshot.ImageFolderClassification` reads (sorted folder
    names = label order; the index prefix is zero-padded so sorting keeps it). Idempotent: a ``.digest``
    file holds a hash of images, labels and names, and a matching folder is left alone. Atomic: the folder
    is built under a temp name beside ``root`` and renamed into place.
    """
    root = Path(root)
    labels = np.asarray(labels, dtype=np.int64)
    if len(images) != len(labels):
        raise FashionMNISTError(f"write_image_folder({root}): {len(images)} images but {len(labels)} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= len(classnames)):
        raise FashionMNISTError(
            f"write_image_folder({root}): labels outside 0..{len(classnames) - 1} for the class names given"
        )
    digest = _folder_digest(images, labels, classnames)
    digest_file = root / ".digest"
    if digest_file.is_file() and digest_file.read_text(encoding="utf-8").strip() == digest:
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}."))
    try:
        digits = len(str(len(classnames) - 1))
        folders = [
            f"{c:0{digits}d}_{n.replace(' ', '_').replace('/', '_')}" for c, n in enumerate(classnames)
        ]
        for folder in folders:
            (tmp / folder).mkdir()
        width = max(5, len(str(max(len(images) - 1, 0))))
        for i in tqdm(range(len(images)), desc=f"writing {root.name}", disable=not progress, unit="img"):
            (tmp / folders[labels[i]] / f"{i:0{width}d}.png").write_bytes(_png_bytes(images[i]))
        (tmp / "classnames.txt").write_text("".join(f"{n}\n" for n in classnames), encoding="utf-8")
        (tmp / ".digest").write_text(digest + "\n", encoding="utf-8")
        replace_directory(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return root
