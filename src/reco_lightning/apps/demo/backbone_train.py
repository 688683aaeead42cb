"""How the demo's stand-in CLIP is trained: preprocessing, augmentation and the contrastive training loop.

Apart from :mod:`reco_lightning.apps.demo.recipe` (the settings) and :mod:`reco_lightning.apps.demo.backbone` (the cache that decides *whether* to train)
because this is the part that decides the weights: any change here that changes them for the same recipe
must bump :data:`reco_lightning.apps.demo.recipe.RECIPE_VERSION`. Plain torch: symmetric InfoNCE, AdamW, the
library's warm-up + cosine schedule.

The tokenizer is trained on captions of ALL classes, like CLIP's tokenizer whose vocabulary covers words
its weights never learned well: a tokenizer only defines the vocabulary. The knowledge gap lives in the
weights, where the unseen class names' tokens simply never receive a gradient (their embeddings stay at
their random initialisation).
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from reco_lightning.apps.demo.fashion_mnist import load_fashion_mnist, make_captions, make_splits
from reco_lightning.encoders import projected_embedding
from reco_lightning.optim import warmup_cosine
from reco_lightning.tiny_clip import build_clip_tokenizer, new_clip

if TYPE_CHECKING:
    from transformers import CLIPImageProcessor

    from reco_lightning.apps.demo.recipe import BackboneRecipe

__all__ = ["to_pil_images", "train_backbone"]


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


def to_pil_images(images: np.ndarray) -> list[Image.Image]:
    """``uint8 [N, H, W]`` grayscale arrays as PIL images, the input every CLIP image processor takes."""
    return [Image.fromarray(np.ascontiguousarray(a, dtype=np.uint8)) for a in images]


def _preprocess(
    processor: Any, images: np.ndarray, batch_size: int = 2048, desc: str = "preprocessing"
) -> Tensor:
    """Run the image processor once over a whole split (not per step): ``float32 [N, 3, S, S]``."""
    chunks = []
    for start in tqdm(
        range(0, len(images), batch_size), desc=desc, leave=False, disable=len(images) <= batch_size
    ):
        batch = to_pil_images(images[start : start + batch_size])
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
        for group in optimizer.param_groups:  # linear warm-up, then cosine decay to zero
            group["lr"] = warmup_cosine(step, recipe.warmup_steps, recipe.steps, peak=recipe.lr)
        batch_pixels = _random_shift(pixels[rows], recipe.max_shift, background, generator)
        text_rows = caption_row[rows]
        image_out = model.get_image_features(pixel_values=batch_pixels)
        image_emb = F.normalize(projected_embedding(image_out, "image"), dim=-1)
        text_out = model.get_text_features(
            input_ids=encoded["input_ids"][text_rows],
            attention_mask=encoded["attention_mask"][text_rows],
        )
        text_emb = F.normalize(projected_embedding(text_out, "text"), dim=-1)
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
