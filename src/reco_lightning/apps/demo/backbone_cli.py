"""The stand-in CLIP's command line: build (or reuse) a backbone, then report its knowledge gap.

Apart from the library code it drives (:mod:`~reco_lightning.apps.demo.backbone` builds,
:mod:`~reco_lightning.apps.demo.probes` measures) because it only parses arguments, loads the test and memory
splits and prints JSON. Run it as ``python -m reco_lightning.apps.demo.backbone_cli --out artifacts/fmnist-backbone``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from reco_lightning.apps.demo.backbone import ensure_backbone
from reco_lightning.apps.demo.fashion_mnist import (
    DEFAULT_ROOT,
    load_fashion_mnist,
    make_captions,
    make_splits,
)
from reco_lightning.apps.demo.probes import image_knn_accuracy, text_retrieval_precision, zero_shot_accuracy
from reco_lightning.apps.demo.recipe import TRAINING_LOG_FILENAME, BackboneRecipe
from reco_lightning.encoders import FrozenEncoder

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Build (or reuse) the default stand-in CLIP and print its knowledge-gap checks on the official test split.

    ``python -m reco_lightning.apps.demo.backbone_cli --out artifacts/fmnist-backbone``
    """
    parser = argparse.ArgumentParser(description="Build the stand-in CLIP and measure its knowledge gap.")
    parser.add_argument("--out", required=True, help="backbone directory (cached by recipe.json)")
    parser.add_argument("--data-root", default=DEFAULT_ROOT)
    parser.add_argument(
        "--memory-size", type=int, default=30_000, help="memory split size for the k-NN checks"
    )
    parser.add_argument(
        "--templates", default="fashion_mnist", help="zero-shot prompt templates (file or shipped set)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads while training (0: torch's default)"
    )
    parser.add_argument(
        "--recipe", default="{}", help='JSON object of BackboneRecipe overrides: {"steps": 600}'
    )
    parser.add_argument(
        "--eval-limit",
        type=int,
        default=None,
        help="evaluate on this many evenly spaced test images (default: all)",
    )
    args = parser.parse_args(argv)

    overrides = json.loads(args.recipe)
    if not isinstance(overrides, dict):
        parser.error('--recipe must be a JSON object such as {"steps": 600}')
    try:
        recipe = BackboneRecipe(data_root=args.data_root).replaced(overrides)
    except ValueError as err:
        parser.error(f"--recipe: {err}")
    previous_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        report = _knowledge_gap_report(args, recipe)
    finally:
        torch.set_num_threads(previous_threads)
    print(json.dumps(report, indent=2))
    return report


def _knowledge_gap_report(args: argparse.Namespace, recipe: BackboneRecipe) -> dict[str, Any]:
    from reco_lightning.data.zeroshot import load_templates

    directory = ensure_backbone(args.out, recipe, num_threads=None)
    clip = FrozenEncoder(directory)
    templates = load_templates(args.templates)
    train_images, train_labels = load_fashion_mnist(args.data_root, "train")
    test_images, test_labels = load_fashion_mnist(args.data_root, "test")
    if args.eval_limit is not None and args.eval_limit < len(test_labels):
        keep = np.linspace(0, len(test_labels) - 1, args.eval_limit).astype(np.int64)
        test_images, test_labels = test_images[keep], test_labels[keep]
    splits = make_splits(
        train_labels,
        recipe.seen_classes,
        recipe.split_seed,
        recipe.backbone_size,
        memory_size=args.memory_size,
    )
    memory = splits.memory
    memory_images, memory_labels = train_images[memory], train_labels[memory]
    memory_captions = make_captions(
        memory, memory_labels, recipe.classnames, recipe.caption_templates, recipe.caption_seed
    )
    seen = recipe.seen_classes
    return {
        "backbone": str(directory),
        "training": json.loads((directory / TRAINING_LOG_FILENAME).read_text(encoding="utf-8")),
        "seen_classes": [recipe.classnames[c] for c in seen],
        "zero_shot_top1": zero_shot_accuracy(
            clip, test_images, test_labels, recipe.classnames, templates, seen
        ),
        "image_10nn_top1_vs_memory": image_knn_accuracy(
            clip, test_images, test_labels, memory_images, memory_labels, 10, seen
        ),
        "text_to_text_precision_at_10": text_retrieval_precision(
            clip, memory_captions, memory_labels, recipe.classnames, templates, 10, seen
        ),
    }


if __name__ == "__main__":
    main()
