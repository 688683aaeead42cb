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


def _pad(array: np.ndarray, width: int, fill) -> np.ndarray:
    """Right-pad the candidate axis of a [B, n] array to ``width`` columns."""
    if array.shape[1] >= width:
        return array
    return np.pad(array, ((0, 0), (0, width - array.shape[1])), constant_values=fill)


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
        max_candidates: cap on the widened search for queries whose candidates were all excluded.
    """

    def __init__(
        self,
        memory: MemoryStore,
        k: int = 10,
        search: Choice = "uni",
        fusion: Choice = "cross",
        near_duplicate_threshold: float = 0.95,
        exclusion_margin: int = 16,
        max_candidates: int = 1024,
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
        self.exclusion_margin, self.max_candidates = exclusion_margin, max_candidates

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
        q = query.detach().to("cpu", torch.float32).numpy()
        index = memory.index(self.searched_modality(modality))
        if not excluding:
            scores, rows = index.search(q, k)
            valid = rows >= 0
        else:
            ids = np.asarray(exclude_ids.detach().cpu().numpy(), dtype=np.int64)
            scores, rows, valid = self._search_excluding(index, q, ids, modality, k)
        order = np.argsort(~valid, axis=1, kind="stable")[:, :k]  # first k valid, best-scored first
        rows = np.take_along_axis(rows, order, axis=1)
        scores = np.take_along_axis(scores, order, axis=1)
        valid = np.take_along_axis(valid, order, axis=1)
        return self.gather(
            torch.from_numpy(np.where(valid, rows, -1)),
            modality,
            query.device,
            scores=torch.from_numpy(np.where(valid, scores, 0.0).astype(np.float32)),
        )

    def _search_excluding(
        self, index, q: np.ndarray, ids: np.ndarray, modality: Modality, k: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Search k + margin candidates; queries left with < k after exclusion search again, 4x wider.

        Dense clusters (many near-copies of one image) can exclude every candidate of a fixed-size
        search, so the pool grows for those queries only, up to ``max_candidates`` or the memory size.
        """
        memory = self.memory
        fetch = min(len(memory), k + self.exclusion_margin)
        scores, rows, valid = self._excluded(index, q, ids, modality, fetch)
        while fetch < min(len(memory), self.max_candidates):
            starving = np.flatnonzero(valid.sum(axis=1) < k)
            if starving.size == 0:
                break
            fetch = min(len(memory), self.max_candidates, fetch * 4)
            more = self._excluded(index, q[starving], ids[starving], modality, fetch)
            fills = (0.0, -1, False)  # scores, rows, valid
            scores, rows, valid = (
                _pad(a, fetch, f) for a, f in zip((scores, rows, valid), fills, strict=True)
            )
            for array, update, fill in zip((scores, rows, valid), more, fills, strict=True):
                array[starving] = _pad(update, fetch, fill)
        return scores, rows, valid

    def _excluded(
        self, index, q: np.ndarray, ids: np.ndarray, modality: Modality, fetch: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        memory = self.memory
        scores, rows = index.search(q, fetch)
        valid = rows >= 0
        safe = np.where(valid, rows, 0)
        valid &= memory.ids[safe.ravel()].reshape(safe.shape) != ids[:, None]
        same = np.asarray(memory.embeddings(modality)[safe.ravel()], dtype=np.float32).reshape(
            *safe.shape, memory.dim
        )
        valid &= np.einsum("bkd,bd->bk", same, q) <= self.near_duplicate_threshold
        return scores, rows, valid

    def gather(
        self,
        rows: Tensor,
        modality: Modality,
        device: torch.device | str = "cpu",
        scores: Tensor | None = None,
    ) -> Neighbours:
        """Neighbours from known memory rows [B, k] (-1 = none): what a feature cache stores instead of searching."""
        rows_np = rows.detach().cpu().numpy()
        valid = rows_np >= 0
        fused = self.memory.embeddings(self.fused_modality(modality))
        flat = np.where(valid, rows_np, 0).ravel()
        gathered = np.asarray(fused[flat], dtype=np.float32).reshape(*rows_np.shape, self.memory.dim)
        gathered[~valid] = 0.0
        return Neighbours(
            embeddings=torch.from_numpy(gathered).to(device),
            mask=torch.from_numpy(valid).to(device),
            rows=torch.from_numpy(rows_np).to(device),
            scores=(scores if scores is not None else torch.zeros(rows_np.shape)).to(device),
        )
