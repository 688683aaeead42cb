"""Retriever: find a query's k nearest memory pairs and return the embeddings the fusion will read.

The paper's grid is two choices. *search*: compare the query with memory items of its own modality
("uni") or of the other one ("cross"). *fusion*: hand the fusion model the other modality of the found
pairs ("cross", the paper's best) or the same one ("uni"). The retriever owns both choices and the
exclusion of a training pair's own row and its near-duplicates; the module only asks for neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from reco_lightning.memory.store import MemoryStore, Modality

__all__ = ["Neighbours", "Retriever", "other_modality"]

Choice = Literal["uni", "cross"]


def other_modality(modality: Modality) -> Modality:
    return "text" if modality == "image" else "image"


@dataclass
class Neighbours:
    """k retrieved items per query; ``mask`` is False where fewer than k survived exclusion."""

    embeddings: Tensor  # [B, k, D] float32, zeros where masked
    mask: Tensor  # [B, k] bool
    rows: Tensor  # [B, k] int64 memory rows, -1 where masked
    scores: Tensor  # [B, k] float32 search scores


class Retriever:
    """Uni/cross-modal search + cross/uni-modal fusion over a MemoryStore.

    Args:
        memory: the memory to search (any MemoryStore; swap it to change the knowledge).
        k: neighbours per query.
        search: "uni" searches same-modality memory items, "cross" the other modality.
        fusion: "cross" returns the paired other-modality embeddings, "uni" the same modality.
        near_duplicate_threshold: when excluding, drop candidates whose same-modality cosine to the query
            exceeds this (catches copies of the query that carry another pair id).
        exclusion_margin: extra candidates fetched when excluding, so k usually survive.
    """

    def __init__(
        self,
        memory: MemoryStore,
        k: int = 10,
        search: Choice = "uni",
        fusion: Choice = "cross",
        near_duplicate_threshold: float = 0.95,
        exclusion_margin: int = 16,
    ) -> None:
        if search not in ("uni", "cross") or fusion not in ("uni", "cross"):
            raise ValueError(
                f"search and fusion must be 'uni' or 'cross', got search={search!r} fusion={fusion!r}"
            )
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        if k > len(memory):
            raise ValueError(f"k={k} exceeds the memory size {len(memory)}: lower k or use a larger memory")
        self.memory, self.k, self.search, self.fusion = memory, k, search, fusion
        self.near_duplicate_threshold = near_duplicate_threshold
        self.exclusion_margin = exclusion_margin

    def searched_modality(self, query_modality: Modality) -> Modality:
        return query_modality if self.search == "uni" else other_modality(query_modality)

    def fused_modality(self, query_modality: Modality) -> Modality:
        return other_modality(query_modality) if self.fusion == "cross" else query_modality

    @torch.no_grad()
    def __call__(
        self,
        query: Tensor,
        modality: Modality,
        exclude_ids: Tensor | None = None,
        k: int | None = None,
    ) -> Neighbours:
        """Neighbours of ``query`` [B, D] (a ``modality`` embedding).

        ``exclude_ids`` [B] (training): drop the row whose pair id equals the query's, and rows that are
        near-duplicates of the query in its own modality.
        """
        k = k or self.k
        memory = self.memory
        if k > len(memory):
            raise ValueError(f"k={k} exceeds the memory size {len(memory)}: lower k or use a larger memory")
        excluding = exclude_ids is not None
        fetch = min(len(memory), k + self.exclusion_margin) if excluding else k
        q = query.detach().to("cpu", torch.float32).numpy()
        scores, rows = memory.index(self.searched_modality(modality)).search(q, fetch)
        valid = rows >= 0
        if excluding:
            safe = np.where(valid, rows, 0)
            ids = np.asarray(exclude_ids.detach().cpu().numpy(), dtype=np.int64)
            valid &= memory.ids[safe.ravel()].reshape(safe.shape) != ids[:, None]
            same = np.asarray(memory.embeddings(modality)[safe.ravel()], dtype=np.float32).reshape(
                *safe.shape, -1
            )
            cosine = np.einsum("bkd,bd->bk", same, q)
            valid &= cosine <= self.near_duplicate_threshold
        order = np.argsort(~valid, axis=1, kind="stable")[:, :k]  # first k valid, best-scored first
        rows = np.take_along_axis(rows, order, axis=1)
        scores = np.take_along_axis(scores, order, axis=1)
        valid = np.take_along_axis(valid, order, axis=1)
        rows = np.where(valid, rows, -1)
        fused = memory.embeddings(self.fused_modality(modality))
        gathered = np.asarray(fused[np.where(valid, rows, 0).ravel()], dtype=np.float32).reshape(
            *rows.shape, -1
        )
        gathered[~valid] = 0.0
        device = query.device
        return Neighbours(
            embeddings=torch.from_numpy(gathered).to(device),
            mask=torch.from_numpy(valid).to(device),
            rows=torch.from_numpy(rows).to(device),
            scores=torch.from_numpy(np.where(valid, scores, 0.0).astype(np.float32)).to(device),
        )
