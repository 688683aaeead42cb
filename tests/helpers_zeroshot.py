"""The tiny zero-shot set computed by hand, without the evaluation: what evaluation rows are checked against."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from reco_lightning.data.zeroshot import ImageFolderClassification, load_templates
from reco_lightning.encoders import FrozenEncoder
from reco_lightning.metrics import build_class_embeddings


@dataclass
class Shapes:
    images: Tensor  # [N, D] frozen image embeddings of every image of the set, in the dataset's order
    labels: Tensor  # [N]
    classnames: list[str]
    templates: list[str]  # the generic CLIP templates the evaluations here use
    frozen_classes: Tensor  # [C, D] the frozen model's class embeddings


def shapes_by_hand(backbone: FrozenEncoder, tiny_dir: Path) -> Shapes:
    data = ImageFolderClassification(tiny_dir / "zeroshot")
    images, labels = zip(*[data[i] for i in range(len(data))], strict=True)
    templates = load_templates("clip_generic")
    return Shapes(
        images=backbone.encode_images(backbone.preprocess_images(images)),
        labels=torch.tensor(labels),
        classnames=list(data.classnames),
        templates=list(templates),
        frozen_classes=build_class_embeddings(data.classnames, templates, backbone.encode_captions),
    )
