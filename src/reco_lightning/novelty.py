"""The memory added after training, and the per-query gate that answers from it (issue 21).

A fusion trained with one memory learns maps fitted to the concepts that memory held. Swap in a memory
that also holds concepts training never saw (the strict protocol, the paper's "add knowledge without
retraining") and those maps mis-embed the new concepts: on 9 stand-in backbones the trained fusion falls
5.3 points of all-class top-1 under the training-free k-NN lookup on average, 11 on the hardest split
(docs/results.md).

What the model does know, label-free, is which memory rows it was trained with. A query whose neighbours
are mostly rows added since (at least ``threshold`` of them) bypasses the fusion:

- an image query becomes the unit mean of its *added* neighbours' captions (the lookup over what is new,
  so the old rows around a new concept do not pull it back to a known one);
- a text query keeps its frozen embedding: the learned maps never saw the concept it names, and the class
  prompts an image is compared with must stay where the captions live.

Every other query keeps the fusion's answer, so with the training memory attached (nothing added) the gate
changes nothing. It assumes the added rows are new concepts: a memory grown with more rows of the known
ones gets them gated as if they were new (docs/results.md measures what that costs).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from reco_lightning.errors import RecoError
from reco_lightning.types import Modality

__all__ = ["NoveltyError", "added_share", "gate_novel_queries", "known_rows"]


class NoveltyError(RecoError, ValueError):
    """``known_memory`` cannot be read or shares nothing with the attached memory."""


def known_rows(memory_ids: np.ndarray, known_memory: str | os.PathLike) -> np.ndarray:
    """bool [N]: which rows of a memory (its pair ids) the fusion was trained with, i.e. whose pair id is
    among the ids of the memory directory ``known_memory`` (``ids.npy``, read memory-mapped)."""
    path = Path(known_memory) / "ids.npy"
    if not path.is_file():
        raise NoveltyError(
            f"known_memory {known_memory}: no ids.npy there; give the memory directory the fusion was trained "
            "with (`reco memory build` output), or known_memory=None to turn the novelty gate off"
        )
    known = np.sort(np.load(path, mmap_mode="r"))
    ids = np.asarray(memory_ids, dtype=np.int64)
    where = np.searchsorted(known, ids).clip(max=max(len(known) - 1, 0))
    found = known[where] == ids if len(known) else np.zeros(len(ids), dtype=bool)
    if len(ids) and not found.any():
        raise NoveltyError(
            f"known_memory {known_memory} shares no pair id with the attached memory: every row would count "
            "as added after training; give the memory the fusion was trained with (same id scheme)"
        )
    return found


def added_share(added: Tensor, mask: Tensor) -> Tensor:
    """[B] share of each query's valid neighbours that were added after training (0 without any valid)."""
    valid = mask.to(torch.float32)
    return (added.to(torch.float32) * valid).sum(1) / valid.sum(1).clamp(min=1.0)


def gate_novel_queries(
    fused: Tensor,
    query: Tensor,
    modality: Modality,
    added: Tensor,
    mask: Tensor,
    captions: Tensor,
    threshold: float,
) -> Tensor:
    """``fused`` [B, D], except for queries with at least ``threshold`` of their neighbours added after
    training: an image query becomes the unit mean of its added neighbours' captions (``captions``
    [B, k, D], the neighbours' paired text embeddings), a text query its frozen ``query``."""
    novel = added_share(added, mask) >= threshold
    if not bool(novel.any()):
        return fused
    if modality == "image":
        weights = (added & mask).to(captions.dtype).unsqueeze(-1)
        answer = F.normalize((weights * captions).sum(1), dim=-1)
    else:
        answer = query.to(fused.dtype)
    return torch.where(novel.unsqueeze(1), answer.to(fused.dtype), fused)
