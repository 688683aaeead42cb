"""A tiny end-to-end setup (backbone, image-text pairs, memory) that runs `reco fit` on CPU in seconds.

Images are coloured shapes drawn with Pillow and captioned from their attributes, so the whole pipeline
(processor, tokenizer, memory build, retrieval, fusion, checkpoint) runs on real image files without any
download. Used by the tests, by configs/tiny.yaml, and as a smoke test of an installation.
"""

from __future__ import annotations

import csv
import os
import random
from pathlib import Path

from PIL import Image, ImageDraw

from reco_lightning.atomic import replace_directory
from reco_lightning.tiny_clip import TINY_FAMILIES, save_tiny_backbone

__all__ = ["COLOURS", "SHAPES", "make_shape_classes", "make_shape_pairs", "prepare_tiny"]

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
TEMPLATES = (
    "a photo of a {c} {s}.",
    "a {c} {s}.",
    "a drawing of a {s} in {c}.",
    "{c} {s} on a grey background.",
)


def _draw(shape: str, colour: tuple[int, int, int], rng: random.Random, size: int = 32) -> Image.Image:
    grey = rng.randint(90, 160)
    image = Image.new("RGB", (size, size), (grey, grey, grey))
    draw = ImageDraw.Draw(image)
    r = rng.randint(size // 5, size // 3)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    return image


def make_shape_pairs(directory: str | os.PathLike, n: int, seed: int = 0, name: str = "pairs.csv") -> Path:
    """Write ``n`` shape images and a CSV (filepath, caption) in ``directory``; returns the CSV path."""
    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
        path = Path("images") / f"{Path(name).stem}_{i:06d}.png"
        _draw(shape, COLOURS[colour], rng).save(directory / path)
        rows.append((str(path), rng.choice(TEMPLATES).format(c=colour, s=shape)))
    csv_path = directory / name
    tmp = csv_path.with_suffix(".tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["filepath", "caption"])
        writer.writerows(rows)
    os.replace(tmp, csv_path)
    return csv_path


def make_shape_classes(directory: str | os.PathLike, per_class: int, seed: int = 0) -> Path:
    """A zero-shot classification folder: one sub-folder per "<colour> <shape>" class, plus classnames.txt."""
    directory = Path(directory)
    rng = random.Random(seed)
    names = [f"{c} {s}" for c in sorted(COLOURS) for s in SHAPES]
    tmp = directory.with_name(f".{directory.name}.tmp")
    for label, name in enumerate(names):
        colour, shape = name.split()
        (tmp / f"{label:02d}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            _draw(shape, COLOURS[colour], rng).save(tmp / f"{label:02d}" / f"{i:04d}.png")
    (tmp / "classnames.txt").write_text("\n".join(names) + "\n")
    replace_directory(tmp, directory)
    return directory


def prepare_tiny(
    directory: str | os.PathLike, n_train: int = 256, n_val: int = 64, seed: int = 0, family: str = "clip"
) -> Path:
    """Create ``train.csv``, ``val.csv``, ``zeroshot/``, the backbone and its memory under ``directory``
    unless present. The backbone (a random tiny one of ``family``: clip, siglip or siglip2) goes to
    ``<family>/`` and its memory to ``memory/`` (clip) or ``memory_<family>/``."""
    from reco_lightning.jobs.memory_build import build_memory

    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny backbone family {family!r}: use one of {', '.join(TINY_FAMILIES)}")
    directory = Path(directory)
    backbone, memory = directory / family, directory / ("memory" if family == "clip" else f"memory_{family}")
    train_csv = directory / "train.csv"
    if not train_csv.is_file():
        make_shape_pairs(directory, n_train, seed=seed, name="train.csv")
    if not (directory / "val.csv").is_file():
        make_shape_pairs(directory, n_val, seed=seed + 1, name="val.csv")
    if not (directory / "zeroshot").is_dir():
        make_shape_classes(directory / "zeroshot", per_class=4, seed=seed + 2)
    if not (backbone / "config.json").is_file():
        captions = [t.format(c=c, s=s) for t in TEMPLATES for c in COLOURS for s in SHAPES]
        save_tiny_backbone(backbone, captions, family=family, seed=seed)
    if not (memory / "manifest.json").is_file():
        build_memory(
            train_csv,
            memory,
            backbone=str(backbone),
            batch_size=64,
            chunk_size=128,
            trainer_kwargs={"accelerator": "cpu", "devices": 1, "enable_progress_bar": False},
        )
    return directory
