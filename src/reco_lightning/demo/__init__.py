"""Real-data demo ingredients: Fashion-MNIST splits and pair files, and a stand-in CLIP that lacks some classes.

The backbone names load lazily (module ``__getattr__``), so that ``python -m reco_lightning.demo.backbone``
does not find its own module already imported by this package (runpy warns about that).
"""

from __future__ import annotations

import importlib
from typing import Any

from reco_lightning.demo.fashion_mnist import (
    CAPTION_TEMPLATES,
    DEFAULT_SEEN_CLASSES,
    FASHION_MNIST_CLASSES,
    DemoSplits,
    FashionMNISTError,
    load_fashion_mnist,
    make_captions,
    make_splits,
    write_image_folder,
    write_pairs,
)

_BACKBONE_NAMES = {  # name -> the module that defines it
    "BackboneRecipe": "reco_lightning.demo.backbone",
    "ensure_backbone": "reco_lightning.demo.backbone",
    "train_backbone": "reco_lightning.demo.backbone_train",
    "zero_shot_accuracy": "reco_lightning.demo.probes",
}

__all__ = [
    "CAPTION_TEMPLATES",
    "DEFAULT_SEEN_CLASSES",
    "FASHION_MNIST_CLASSES",
    "BackboneRecipe",
    "DemoSplits",
    "FashionMNISTError",
    "ensure_backbone",
    "load_fashion_mnist",
    "make_captions",
    "make_splits",
    "train_backbone",
    "write_image_folder",
    "write_pairs",
    "zero_shot_accuracy",
]


def __getattr__(name: str) -> Any:
    if name in _BACKBONE_NAMES:
        return getattr(importlib.import_module(_BACKBONE_NAMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
