"""Probes of the stand-in CLIP's knowledge gap: zero-shot accuracy, image k-NN, text-to-text retrieval, and
the demo's label-reading references (a k-NN label vote and an MLP probe over the memory's labelled images).

Apart from the training (:mod:`reco_lightning.apps.demo.backbone_train`) because they only read a finished
backbone, any backbone: each takes a directory or a loaded :class:`reco_lightning.encoders.FrozenEncoder`.
Results are percentages over seen-class, unseen-class and all queries, so one report shows what the
backbone knows and what RECO has to recover. The zero-shot classifier is the library's
(:func:`reco_lightning.metrics.build_class_embeddings`), the same one RECO is scored with.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from reco_lightning.apps.demo.backbone_train import to_pil_images
from reco_lightning.apps.demo.fashion_mnist import DEFAULT_SEEN_CLASSES, FASHION_MNIST_CLASSES
from reco_lightning.encoders import FrozenEncoder
from reco_lightning.metrics import build_class_embeddings, build_prompts

__all__ = [
    "LABEL_VOTE_ROW",
    "PROBE_ROW",
    "Backbone",
    "encode_uint8_images",
    "image_knn_accuracy",
    "label_reading_references",
    "text_retrieval_precision",
    "train_probe",
    "zero_shot_accuracy",
]

#: A backbone directory, or the backbone already loaded.
Backbone = str | os.PathLike | FrozenEncoder


def _clip(backbone: Backbone) -> FrozenEncoder:
    return backbone if isinstance(backbone, FrozenEncoder) else FrozenEncoder(backbone)


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
        pil = to_pil_images(images[start : start + batch_size])
        out.append(clip.encode_images(clip.preprocess_images(pil)))
    return torch.cat(out) if out else torch.empty(0, clip.dim)


def _encode_texts(clip: FrozenEncoder, texts: Sequence[str], batch_size: int = 1024) -> Tensor:
    return torch.cat(
        [clip.encode_captions(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
    )


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
    classifier = build_class_embeddings(classnames, templates, clip.encode_captions)
    predicted = (encode_uint8_images(clip, images) @ classifier.T).argmax(dim=1).numpy()
    labels = np.asarray(labels)
    return _split_accuracy(predicted == labels, labels, seen_classes)


def knn_label_votes(neighbour_labels: Tensor, num_classes: int) -> Tensor:
    """[B, C] votes of each query's neighbours' labels [B, k] (nearest first): one each, plus 0.001 x
    closeness, so a tie goes to the class with the nearer neighbours."""
    k = neighbour_labels.shape[1]
    weights = (1.0 + 1e-3 * torch.arange(k, 0, -1) / k).view(1, k, 1)
    return (F.one_hot(neighbour_labels, num_classes).float() * weights).sum(dim=1)


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
    Ties are broken toward the class with the nearer neighbours (:func:`knn_label_votes`).
    """
    clip = _clip(backbone)
    queries, memory = encode_uint8_images(clip, query_images), encode_uint8_images(clip, memory_images)
    memory_labels = torch.as_tensor(np.asarray(memory_labels))
    num_classes = int(max(memory_labels.max().item(), int(np.max(query_labels))) + 1)
    predicted = []
    for start in range(0, len(queries), 2048):
        top = (queries[start : start + 2048] @ memory.T).topk(k, dim=1).indices
        predicted.append(knn_label_votes(memory_labels[top], num_classes).argmax(dim=1))
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
    prompts = build_prompts(classnames, templates)  # class-major, the order of prompt_labels
    top = (_encode_texts(clip, prompts) @ memory.T).topk(k, dim=1).indices
    hits = (memory_labels[top] == torch.as_tensor(prompt_labels).view(-1, 1)).numpy()
    precision = hits.mean(axis=1, dtype=np.float64)
    seen_mask = np.isin(prompt_labels, list(seen_classes))
    result = {}
    for name, mask in (("seen", seen_mask), ("unseen", ~seen_mask), ("all", np.ones_like(seen_mask))):
        result[name] = round(100.0 * float(precision[mask].mean()), 2) if mask.any() else float("nan")
    return result


#: the demo's rows of the two references that read the memory's labels (ceilings, not peers of RECO)
LABEL_VOTE_ROW = "label vote (reads labels: a ceiling)"
PROBE_ROW = "MLP probe (reads labels: a ceiling)"


def train_probe(
    embeddings: Tensor, labels: Tensor, num_classes: int, seed: int = 0, epochs: int = 100
) -> torch.nn.Module:
    """The MLP probe reference: 512 hidden units trained ``epochs`` on labelled embeddings (AdamW, lr 1e-3,
    batch 256; seeded here, so the same call gives the same probe)."""
    torch.manual_seed(seed)
    probe = torch.nn.Sequential(
        torch.nn.Linear(embeddings.shape[1], 512), torch.nn.GELU(), torch.nn.Linear(512, num_classes)
    )
    optimizer = torch.optim.AdamW(probe.parameters(), lr=1e-3, weight_decay=1e-4)
    for _ in range(epochs):
        for batch in torch.randperm(len(embeddings)).split(256):
            loss = F.cross_entropy(probe(embeddings[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return probe


def label_reading_references(
    backbone: Backbone,
    memory_dir: str | os.PathLike,
    train_labels: np.ndarray,
    test_root: str | os.PathLike,
    groups: dict[str, Sequence[int]],
    seed: int = 0,
    k: int = 10,
    epochs: int = 100,
) -> dict[str, dict[str, float]]:
    """Zero-shot-report metrics of two classifiers that read the labels of the memory's images: the
    majority label of each test image's ``k`` nearest memory images, and an MLP (512 hidden) trained on the
    memory's image embeddings and labels.

    RECO reads no label: what these reach bounds what any function of the frozen image embeddings and this
    memory can do on the unseen classes (docs/results.md), so they sit beside the rows as ceilings.
    ``train_labels``: Fashion-MNIST train labels, indexed by the memory's pair ids (the images' indices).
    """
    from reco_lightning.data.zeroshot import ImageFolderClassification
    from reco_lightning.evaluation import grouped_classification_metrics
    from reco_lightning.memory.store import MemoryStore

    clip = _clip(backbone)
    store = MemoryStore.open(memory_dir, load_indexes=False)
    memory = F.normalize(torch.from_numpy(np.asarray(store.image_embeddings, dtype=np.float32)), dim=-1)
    memory_labels = torch.as_tensor(np.asarray(train_labels)[np.asarray(store.ids)], dtype=torch.long)
    test = ImageFolderClassification(test_root)
    queries, labels = [], []
    for start in range(0, len(test), 1024):
        images, batch_labels = zip(
            *(test[i] for i in range(start, min(len(test), start + 1024))), strict=True
        )
        queries.append(clip.encode_images(clip.preprocess_images(images)))
        labels.extend(batch_labels)
    queries, labels = torch.cat(queries), torch.tensor(labels)
    num_classes = len(test.classnames)
    votes = torch.cat(
        [
            knn_label_votes(memory_labels[(block @ memory.T).topk(k, dim=1).indices], num_classes)
            for block in queries.split(2048)
        ]
    )
    probe = train_probe(memory, memory_labels, num_classes, seed, epochs)
    with torch.no_grad():
        logits = probe(queries)
    members = {name: torch.tensor(sorted(ids), dtype=torch.long) for name, ids in groups.items()}
    return {
        LABEL_VOTE_ROW: grouped_classification_metrics(votes, labels, members),
        PROBE_ROW: grouped_classification_metrics(logits, labels, members),
    }
