"""The demo's stand-in CLIP, built once per recipe: the cache that decides *whether* to train.

No pretrained CLIP can be installed offline, so the demo makes its own frozen backbone with a known
knowledge gap: it never sees an image or a caption of the unseen classes. RECO should then recover those
classes from a memory that has them. The result is saved in hub layout by
:func:`reco_lightning.tiny_clip.save_clip`, so the rest of the package loads it like any CLIP through
:class:`reco_lightning.encoders.FrozenEncoder`.

The stages live beside it, each importing only those before it:
:mod:`~reco_lightning.apps.demo.recipe` (every setting that affects the weights) ->
:mod:`~reco_lightning.apps.demo.backbone_train` (preprocessing, augmentation, the training loop) -> this
module (:func:`ensure_backbone`) -> :mod:`~reco_lightning.apps.demo.probes` (zero-shot, image k-NN and
text retrieval checks of the knowledge gap) -> :mod:`~reco_lightning.apps.demo.backbone_cli`
(``python -m reco_lightning.apps.demo.backbone_cli``, the knowledge-gap report).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from reco_lightning.apps.demo.backbone_train import train_backbone
from reco_lightning.apps.demo.fashion_mnist import fashion_mnist_files
from reco_lightning.apps.demo.recipe import RECIPE_FILENAME, TRAINING_LOG_FILENAME, BackboneRecipe
from reco_lightning.atomic import atomic_write_text
from reco_lightning.tiny_clip import save_clip

__all__ = ["ensure_backbone"]


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
