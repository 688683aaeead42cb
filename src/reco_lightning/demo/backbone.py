"""A stand-in CLIP for the demo: contrastively pre-trained on the *seen* Fashion-MNIST classes only.

No pretrained CLIP can be installed offline, so the demo makes its own frozen backbone with a known
knowledge gap: it never sees an image or a caption of the unseen classes. RECO should then recover those
classes from a memory that has them. Everything here is plain torch (symmetric InfoNCE, AdamW); the
result is saved in hub layout by :func:`reco_lightning.tiny_clip.save_clip`, so the rest of the package
loads it like any CLIP through :class:`reco_lightning.encoders.FrozenCLIP`.

The tokenizer is trained on captions of ALL classes, like CLIP's tokenizer whose vocabulary covers words
its weights never learned well: a tokenizer only defines the vocabulary. The knowledge gap lives in the
weights, where the unseen class names' tokens simply never receive a gradient (their embeddings stay at
their random initialisation).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from reco_lightning.atomic import atomic_write_text
from reco_lightning.demo.fashion_mnist import (
    CAPTION_TEMPLATES,
    DEFAULT_ROOT,
    DEFAULT_SEEN_CLASSES,
    FASHION_MNIST_CLASSES,
    fashion_mnist_files,
    load_fashion_mnist,
    make_captions,
    make_splits,
)
from reco_lightning.encoders import FrozenCLIP
from reco_lightning.tiny_clip import build_clip_tokenizer, new_clip, save_clip

if TYPE_CHECKING:
    from transformers import CLIPImageProcessor

__all__ = [
    "RECIPE_FILENAME",
    "RECIPE_VERSION",
    "BackboneRecipe",
    "class_embeddings",
    "encode_uint8_images",
    "ensure_backbone",
    "image_knn_accuracy",
    "main",
    "text_retrieval_precision",
    "train_backbone",
    "zero_shot_accuracy",
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


def _image_processor(image_size: int) -> CLIPImageProcessor:
    """The processor :func:`save_clip` writes beside the model, so training sees exactly the saved inputs."""
    from transformers import CLIPImageProcessor
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # silence the "torchvision not installed, using the PIL backend" notice
    try:
        return CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        )
    finally:
        hf_logging.set_verbosity(verbosity)


def _to_pil(images: np.ndarray) -> list[Image.Image]:
    return [Image.fromarray(np.ascontiguousarray(a, dtype=np.uint8)) for a in images]


def _preprocess(
    processor: Any, images: np.ndarray, batch_size: int = 2048, desc: str = "preprocessing"
) -> Tensor:
    """Run the image processor once over a whole split (not per step): ``float32 [N, 3, S, S]``."""
    chunks = []
    for start in tqdm(
        range(0, len(images), batch_size), desc=desc, leave=False, disable=len(images) <= batch_size
    ):
        batch = _to_pil(images[start : start + batch_size])
        chunks.append(processor(batch, return_tensors="pt")["pixel_values"])
    return torch.cat(chunks) if chunks else torch.empty(0)


def _random_shift(pixels: Tensor, max_shift: int, fill: Tensor, generator: torch.Generator) -> Tensor:
    """Translate each image by up to ``max_shift`` pixels, filling with the (normalised) background."""
    if max_shift <= 0:
        return pixels
    n, c, h, w = pixels.shape
    padded = fill.view(1, c, 1, 1).expand(n, c, h + 2 * max_shift, w + 2 * max_shift).clone()
    padded[:, :, max_shift : max_shift + h, max_shift : max_shift + w] = pixels
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator)
    rows = (offsets[:, 0].view(n, 1) + torch.arange(h).view(1, h)).view(n, 1, h, 1).expand(n, c, h, w)
    cols = (offsets[:, 1].view(n, 1) + torch.arange(w).view(1, w)).view(n, 1, 1, w).expand(n, c, h, w)
    batch = torch.arange(n).view(n, 1, 1, 1).expand(n, c, h, w)
    chan = torch.arange(c).view(1, c, 1, 1).expand(n, c, h, w)
    return padded[batch, chan, rows, cols]


def _projected(output: Any) -> Tensor:
    return output if isinstance(output, Tensor) else output.pooler_output


def _lr_at(step: int, recipe: BackboneRecipe) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train_backbone(
    recipe: BackboneRecipe, progress: bool = True, num_threads: int | None = 1
) -> tuple[Any, Any, dict[str, Any]]:
    """Pre-train a CLIP on the recipe's backbone split; returns ``(model, tokenizer, training log)``.

    ``num_threads`` sets torch's intra-op threads for the run (``None``: leave torch's setting). One thread
    is the default: for a model this small two threads gain little, and when another process holds a core
    they wait on each other (measured here: a 2-layer width-64 step took 10x longer with two threads on a
    busy 2-core machine). It does not change the recipe.
    """
    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _train(recipe, progress)
    finally:
        torch.set_num_threads(previous_threads)


def _train(recipe: BackboneRecipe, progress: bool) -> tuple[Any, Any, dict[str, Any]]:
    start = time.perf_counter()
    images, labels = load_fashion_mnist(recipe.data_root, "train")
    splits = make_splits(labels, recipe.seen_classes, recipe.split_seed, recipe.backbone_size, memory_size=0)
    index = splits.backbone
    if len(index) == 0:
        raise ValueError("BackboneRecipe.backbone_size is 0: the backbone needs at least one training pair")

    # Vocabulary over every class name and template (see the module docstring), weights from seen data only.
    vocabulary_texts = [t.replace("{c}", c) for t in recipe.caption_templates for c in recipe.classnames]
    tokenizer = build_clip_tokenizer(vocabulary_texts, max_merges=recipe.max_merges)
    captions = make_captions(
        index, labels[index], recipe.classnames, recipe.caption_templates, recipe.caption_seed
    )
    unique = sorted(set(captions))
    encoded = tokenizer(
        unique, padding="max_length", truncation=True, max_length=recipe.max_text_len, return_tensors="pt"
    )
    lookup = {c: i for i, c in enumerate(unique)}
    caption_row = torch.tensor([lookup[c] for c in captions])  # each pair's row in the tokenized uniques

    processor = _image_processor(recipe.image_size)
    pixels = _preprocess(processor, images[index])
    background = _preprocess(processor, np.zeros((1, 28, 28), dtype=np.uint8))[0, :, 0, 0]
    prep_s = time.perf_counter() - start

    model = new_clip(tokenizer, seed=recipe.seed, **recipe.architecture())
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    generator = torch.Generator().manual_seed(recipe.seed)
    batch_size = min(recipe.batch_size, len(index))
    order = torch.randperm(len(index), generator=generator)
    cursor, losses = 0, []
    bar = tqdm(range(recipe.steps), desc="pre-training stand-in CLIP", disable=not progress, unit="step")
    for step in bar:
        if cursor + batch_size > len(order):
            order, cursor = torch.randperm(len(index), generator=generator), 0
        rows = order[cursor : cursor + batch_size]
        cursor += batch_size
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, recipe)
        batch_pixels = _random_shift(pixels[rows], recipe.max_shift, background, generator)
        text_rows = caption_row[rows]
        image_emb = F.normalize(_projected(model.get_image_features(pixel_values=batch_pixels)), dim=-1)
        text_emb = F.normalize(
            _projected(
                model.get_text_features(
                    input_ids=encoded["input_ids"][text_rows],
                    attention_mask=encoded["attention_mask"][text_rows],
                )
            ),
            dim=-1,
        )
        logits = model.logit_scale.exp() * image_emb @ text_emb.T
        target = torch.arange(len(rows))
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0.0, math.log(100.0))
        losses.append(loss.detach().item())
        if step % 10 == 0 or step == recipe.steps - 1:
            bar.set_postfix(
                loss=f"{np.mean(losses[-20:]):.3f}", scale=f"{model.logit_scale.exp().item():.1f}"
            )
    model.eval()
    log = {
        "train_pairs": len(index),
        "preprocess_s": round(prep_s, 2),
        "wall_s": round(time.perf_counter() - start, 2),
        "final_loss": float(np.mean(losses[-20:])) if losses else None,
        "logit_scale": model.logit_scale.detach().exp().item(),
        "torch_threads": torch.get_num_threads(),
    }
    return model, tokenizer, log


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


# --------------------------------------------------------------------------------------------------------
# Checks of the knowledge gap (zero-shot, image k-NN, text-to-text retrieval)
# --------------------------------------------------------------------------------------------------------

Backbone = str | os.PathLike | FrozenCLIP


def _clip(backbone: Backbone) -> FrozenCLIP:
    return backbone if isinstance(backbone, FrozenCLIP) else FrozenCLIP(backbone)


def encode_uint8_images(backbone: Backbone, images: np.ndarray, batch_size: int = 1024) -> Tensor:
    """L2-normalised image embeddings of ``uint8 [N, H, W]`` grayscale images, through the backbone's processor."""
    clip = _clip(backbone)
    out = []
    for start in tqdm(
        range(0, len(images), batch_size),
        desc="encoding images",
        leave=False,
        disable=len(images) <= batch_size,
    ):
        out.append(clip.encode_images(clip.preprocess_images(_to_pil(images[start : start + batch_size]))))
    return torch.cat(out) if out else torch.empty(0, clip.dim)


def _encode_texts(clip: FrozenCLIP, texts: Sequence[str], batch_size: int = 1024) -> Tensor:
    return torch.cat(
        [clip.encode_captions(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
    )


def class_embeddings(backbone: Backbone, classnames: Sequence[str], templates: Sequence[str]) -> Tensor:
    """Zero-shot classifier ``[C, D]``: per class, the mean of normalised prompt embeddings, renormalised."""
    clip = _clip(backbone)
    prompts = [t.replace("{c}", c) for c in classnames for t in templates]
    emb = clip.encode_captions(prompts).view(len(classnames), len(templates), -1)
    return F.normalize(emb.mean(dim=1), dim=-1)


def _split_accuracy(correct: np.ndarray, labels: np.ndarray, seen: Sequence[int]) -> dict[str, float]:
    seen_mask = np.isin(labels, list(seen))
    result = {}
    for name, mask in (("seen", seen_mask), ("unseen", ~seen_mask), ("all", np.ones_like(seen_mask))):
        result[name] = round(100.0 * float(correct[mask].mean()), 2) if mask.any() else float("nan")
    result["n_seen"], result["n_unseen"] = int(seen_mask.sum()), int((~seen_mask).sum())
    return result


def zero_shot_accuracy(
    backbone: Backbone,
    images: np.ndarray,
    labels: np.ndarray,
    classnames: Sequence[str] = FASHION_MNIST_CLASSES,
    templates: Sequence[str] = ("a photo of a {c}.",),
    seen_classes: Sequence[int] = DEFAULT_SEEN_CLASSES,
) -> dict[str, float]:
    """Top-1 (percent) of all-classes zero-shot classification, over seen-class, unseen-class and all images.

    Every image competes against all ``len(classnames)`` classes; "seen" counts only images of seen classes.
    """
    clip = _clip(backbone)
    classifier = class_embeddings(clip, classnames, templates)
    predicted = (encode_uint8_images(clip, images) @ classifier.T).argmax(dim=1).numpy()
    labels = np.asarray(labels)
    return _split_accuracy(predicted == labels, labels, seen_classes)


def image_knn_accuracy(
    backbone: Backbone,
    query_images: np.ndarray,
    query_labels: np.ndarray,
    memory_images: np.ndarray,
    memory_labels: np.ndarray,
    k: int = 10,
    seen_classes: Sequence[int] = DEFAULT_SEEN_CLASSES,
) -> dict[str, float]:
    """Top-1 (percent) of a k-NN majority vote of query images against labelled memory images (cosine).

    RECO's image side retrieves by image similarity, so it needs the frozen image embeddings to keep the
    unseen classes apart even though the backbone never learned their names; this measures that.
    Ties are broken toward the class with the nearer neighbours (votes weigh 1 + 0.001 * closeness).
    """
    clip = _clip(backbone)
    queries, memory = encode_uint8_images(clip, query_images), encode_uint8_images(clip, memory_images)
    memory_labels = torch.as_tensor(np.asarray(memory_labels))
    num_classes = int(max(memory_labels.max().item(), int(np.max(query_labels))) + 1)
    weights = (1.0 + 1e-3 * torch.arange(k, 0, -1) / k).view(1, k, 1)
    predicted = []
    for start in range(0, len(queries), 2048):
        top = (queries[start : start + 2048] @ memory.T).topk(k, dim=1).indices
        votes = (F.one_hot(memory_labels[top], num_classes).float() * weights).sum(dim=1)
        predicted.append(votes.argmax(dim=1))
    query_labels = np.asarray(query_labels)
    return _split_accuracy(torch.cat(predicted).numpy() == query_labels, query_labels, seen_classes)


def text_retrieval_precision(
    backbone: Backbone,
    memory_captions: Sequence[str],
    memory_labels: np.ndarray,
    classnames: Sequence[str] = FASHION_MNIST_CLASSES,
    templates: Sequence[str] = ("a photo of a {c}.",),
    k: int = 10,
    seen_classes: Sequence[int] = DEFAULT_SEEN_CLASSES,
) -> dict[str, float]:
    """Precision@k (percent) of text-to-text retrieval: class prompts against memory captions.

    RECO's text side retrieves memory captions with the class prompt; each prompt (class x template) counts
    the fraction of its ``k`` nearest memory captions that belong to its class. Averaged over seen-class,
    unseen-class and all prompts.
    """
    clip = _clip(backbone)
    unique = sorted(set(memory_captions))
    lookup = {c: i for i, c in enumerate(unique)}
    unique_emb = _encode_texts(clip, unique)
    memory = unique_emb[torch.tensor([lookup[c] for c in memory_captions])]
    memory_labels = torch.as_tensor(np.asarray(memory_labels))
    prompt_labels = np.repeat(np.arange(len(classnames)), len(templates))
    prompts = [t.replace("{c}", c) for c in classnames for t in templates]
    top = (_encode_texts(clip, prompts) @ memory.T).topk(k, dim=1).indices
    hits = (memory_labels[top] == torch.as_tensor(prompt_labels).view(-1, 1)).numpy()
    precision = hits.mean(axis=1, dtype=np.float64)
    seen_mask = np.isin(prompt_labels, list(seen_classes))
    result = {}
    for name, mask in (("seen", seen_mask), ("unseen", ~seen_mask), ("all", np.ones_like(seen_mask))):
        result[name] = round(100.0 * float(precision[mask].mean()), 2) if mask.any() else float("nan")
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Build (or reuse) the default stand-in CLIP and print its knowledge-gap checks on the official test split.

    ``python -m reco_lightning.demo.backbone --out artifacts/fmnist-backbone``
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
    known = {f.name for f in fields(BackboneRecipe)}
    if not isinstance(overrides, dict) or not set(overrides) <= known:
        parser.error(f"--recipe must be a JSON object with keys among {sorted(known)}")
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    recipe = BackboneRecipe(**{"data_root": args.data_root, **overrides})
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
    clip = FrozenCLIP(directory)
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
