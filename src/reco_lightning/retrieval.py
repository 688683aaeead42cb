"""Retriever: find a query's k nearest memory pairs and return the embeddings the fusion will read.

The paper's grid is two choices. *search*: compare the query with memory items of its own modality
("uni") or of the other one ("cross"). *fusion*: hand the fusion model the other modality of the found
pairs ("cross", the paper's best) or the same one ("uni"). The retriever owns both choices and the
exclusion of a training pair's own row and its near-duplicates; the module only asks for neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from reco_lightning.memory.store import MemoryStore
from reco_lightning.types import Modality

if TYPE_CHECKING:
    from reco_lightning.novelty import NoveltyGate
    from reco_lightning.vote import MemoryVote

__all__ = ["Neighbours", "Retriever", "other_modality"]

Choice = Literal["uni", "cross"]
NearDuplicateOf = Literal["image", "query"]


def _pad(array: np.ndarray, width: int, fill) -> np.ndarray:
    """Right-pad the candidate axis of a [B, n] array to ``width`` columns."""
    if array.shape[1] >= width:
        return array
    return np.pad(array, ((0, 0), (0, width - array.shape[1])), constant_values=fill)


def _images_of(name: str, images: Tensor, q: np.ndarray) -> np.ndarray:
    """``images`` [B, D], one per query of ``q``, as the float32 array the exclusion compares with."""
    if tuple(images.shape) != q.shape:
        raise ValueError(f"{name} {tuple(images.shape)} must match the queries {q.shape}")
    return images.detach().to("cpu", torch.float32).numpy()


def other_modality(modality: Modality) -> Modality:
    return "text" if modality == "image" else "image"


@dataclass
class Neighbours:
    """k retrieved items per query; ``mask`` is False where fewer than k survived exclusion."""

    embeddings: Tensor  # [B, k, D] float32, zeros where masked
    mask: Tensor  # [B, k] bool
    rows: Tensor  # [B, k] int64 memory rows, -1 where masked
    scores: Tensor  # [B, k] float32 search scores
    excluded: Tensor | None = None  # [B] int64 candidates dropped by the evaluation leakage guard
    added: Tensor | None = None  # [B, k] bool: rows absent from the memory the fusion trained with (novelty)


class Retriever:
    """Uni/cross-modal search + cross/uni-modal fusion over a MemoryStore.

    Args:
        memory: the memory to search (any MemoryStore; swap it to change the knowledge).
        k: neighbours per query.
        search: "uni" searches same-modality memory items, "cross" the other modality.
        fusion: "cross" returns the paired other-modality embeddings, "uni" the same modality.
        near_duplicate_threshold: when excluding, drop candidates that are near-duplicates (cosine above
            this) of the training pair (catches copies of the pair that carry another pair id).
        near_duplicate_of: what a near-duplicate is compared on. "image" (default): the candidate's image
            against the training pair's image, for image and text queries alike: only a copy of the pair's
            image leaks the answer. "query": the candidate's item of the query's own modality against the
            query; for text queries this also drops every other pair with the same caption, which in
            templated or class-name captions removes all the knowledge the text side needs (measured in
            docs/results.md: it cost the demo's open protocol 10 points of unseen-class top-1).
        exclusion_margin: extra candidates fetched when excluding, so k usually survive.
        max_candidates: cap on the widened search for queries whose candidates were all excluded.
        novelty: the novelty gate of this memory (:class:`~reco_lightning.novelty.NoveltyGate`, built by
            ``open_retriever`` from ``known_memory``); given, every result marks its neighbours added after
            training (``Neighbours.added``) and refinement gates on them.
        vote: the memory's vote (:class:`~reco_lightning.vote.MemoryVote`, built by ``open_retriever`` from
            ``vote_weight``); given, inference's refined embeddings carry it as a second block.
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
        near_duplicate_of: NearDuplicateOf = "image",
        novelty: NoveltyGate | None = None,
        vote: MemoryVote | None = None,
    ) -> None:
        if search not in ("uni", "cross") or fusion not in ("uni", "cross"):
            raise ValueError(
                f"search and fusion must be 'uni' or 'cross', got search={search!r} fusion={fusion!r}"
            )
        if near_duplicate_of not in ("image", "query"):
            raise ValueError(f"near_duplicate_of must be 'image' or 'query', got {near_duplicate_of!r}")
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        if k > len(memory):
            raise ValueError(f"k={k} exceeds the memory size {len(memory)}: lower k or use a larger memory")
        self.memory, self.k, self.search, self.fusion = memory, k, search, fusion
        self.near_duplicate_threshold, self.near_duplicate_of = near_duplicate_threshold, near_duplicate_of
        self.exclusion_margin, self.max_candidates = exclusion_margin, max_candidates
        if novelty is not None and np.shape(novelty.added) != (len(memory),):
            raise ValueError(
                f"novelty.added must be a bool per memory row ({len(memory)}), got shape {np.shape(novelty.added)}"
            )
        self.novelty, self.vote = novelty, vote

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
        pair_images: Tensor | None = None,
        leak_threshold: float | None = None,
        leak_images: Tensor | None = None,
    ) -> Neighbours:
        """Neighbours of ``query`` [B, D] (a ``modality`` embedding).

        ``exclude_ids`` [B] (training): drop the row whose pair id equals the query's, and rows that are
        near-duplicates of the training pair (see ``near_duplicate_of``; text queries then need
        ``pair_images`` [B, D], the frozen image embeddings of their pairs).

        ``leak_threshold`` (evaluation): drop memory pairs whose image has cosine >= this with the evaluated
        image, i.e. copies of it that a web-scale memory may hold: for image queries the query itself, for
        text queries ``leak_images`` [B, D], the frozen embeddings of each caption's own image (without
        them text queries are not guarded: class prompts have no image of their own). How many were
        dropped per query is ``Neighbours.excluded``.
        """
        k = k or self.k
        memory = self.memory
        if k > len(memory):
            raise ValueError(f"k={k} exceeds the memory size {len(memory)}: lower k or use a larger memory")
        q = query.detach().to("cpu", torch.float32).numpy()
        index = memory.index(self.searched_modality(modality))
        excluded = None
        if exclude_ids is not None:
            ids = np.asarray(exclude_ids.detach().cpu().numpy(), dtype=np.int64)
            ref_modality, ref = self._duplicate_reference(q, modality, pair_images)
            scores, rows, valid, _ = self._search_excluding(
                index, q, ids, ref_modality, ref, k, self.near_duplicate_threshold
            )
        elif leak_threshold is not None and (modality == "image" or leak_images is not None):
            ref = q if leak_images is None else _images_of("leak_images", leak_images, q)
            # >= threshold is a leak: nudge the bound below it, since the check keeps cosine <= bound
            bound = np.nextafter(np.float32(leak_threshold), np.float32(-np.inf))
            scores, rows, valid, dropped = self._search_excluding(
                index, q, None, "image", ref, k, float(bound)
            )
            excluded = torch.from_numpy(dropped)
        else:
            scores, rows = index.search(q, k)
            valid = rows >= 0
        order = np.argsort(~valid, axis=1, kind="stable")[:, :k]  # first k valid, best-scored first
        rows = np.take_along_axis(rows, order, axis=1)
        scores = np.take_along_axis(scores, order, axis=1)
        valid = np.take_along_axis(valid, order, axis=1)
        neighbours = self.gather(
            torch.from_numpy(np.where(valid, rows, -1)),
            modality,
            query.device,
            scores=torch.from_numpy(np.where(valid, scores, 0.0).astype(np.float32)),
        )
        neighbours.excluded = excluded
        return neighbours

    def _duplicate_reference(
        self, q: np.ndarray, modality: Modality, pair_images: Tensor | None
    ) -> tuple[Modality, np.ndarray]:
        """The modality and vectors near-duplicates are measured against (see ``near_duplicate_of``)."""
        if self.near_duplicate_of == "query" or modality == "image":
            return modality, q
        if pair_images is None:
            raise ValueError(
                "near_duplicate_of='image' needs the pair images of text queries: pass pair_images, or set "
                "near_duplicate_of='query'"
            )
        return "image", _images_of("pair_images", pair_images, q)

    def _search_excluding(
        self,
        index,
        q: np.ndarray,
        ids: np.ndarray | None,
        ref_modality: Modality,
        ref: np.ndarray,
        k: int,
        threshold: float,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Search k + margin candidates; queries left with < k after exclusion search again, 4x wider.

        Dense clusters (many near-copies of one image) can exclude every candidate of a fixed-size
        search, so the pool grows for those queries only, up to ``max_candidates`` or the memory size.
        Returns scores, rows, valid and, per query, how many candidates the near-duplicate test dropped.
        """
        memory = self.memory
        fetch = min(len(memory), k + self.exclusion_margin)
        scores, rows, valid, dropped = self._excluded(index, q, ids, ref_modality, ref, fetch, threshold)
        while fetch < min(len(memory), self.max_candidates):
            starving = np.flatnonzero(valid.sum(axis=1) < k)
            if starving.size == 0:
                break
            fetch = min(len(memory), self.max_candidates, fetch * 4)
            *more, more_dropped = self._excluded(
                index,
                q[starving],
                None if ids is None else ids[starving],
                ref_modality,
                ref[starving],
                fetch,
                threshold,
            )
            fills = (0.0, -1, False)  # scores, rows, valid
            scores, rows, valid = (
                _pad(a, fetch, f) for a, f in zip((scores, rows, valid), fills, strict=True)
            )
            for array, update, fill in zip((scores, rows, valid), more, fills, strict=True):
                array[starving] = _pad(update, fetch, fill)
            dropped[starving] = more_dropped
        return scores, rows, valid, dropped

    def _excluded(
        self,
        index,
        q: np.ndarray,
        ids: np.ndarray | None,
        ref_modality: Modality,
        ref: np.ndarray,
        fetch: int,
        threshold: float,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        memory = self.memory
        scores, rows = index.search(q, fetch)
        valid = rows >= 0
        safe = np.where(valid, rows, 0)
        if ids is not None:
            valid &= memory.ids[safe.ravel()].reshape(safe.shape) != ids[:, None]
        same = np.asarray(memory.embeddings(ref_modality)[safe.ravel()], dtype=np.float32).reshape(
            *safe.shape, memory.dim
        )
        # cosine of renormalised rows: fp16 storage puts |x|^2 of a copy anywhere in 1 +- 2e-4, which a
        # threshold close to 1 (only copies excluded) must not depend on
        same /= np.maximum(np.linalg.norm(same, axis=-1, keepdims=True), 1e-12)
        ref = ref / np.maximum(np.linalg.norm(ref, axis=-1, keepdims=True), 1e-12)
        near = np.einsum("bkd,bd->bk", same, ref) > threshold
        dropped = (valid & near).sum(axis=1).astype(np.int64)
        return scores, rows, valid & ~near, dropped

    @torch.no_grad()
    def scores_of(self, queries: Tensor, modality: Modality, rows: Tensor) -> Tensor:
        """[B, k] cosine of each query with the memory items it is searched against at ``rows`` [B, k]
        (0 where -1): exact whatever the index approximates, and for rows found anywhere (a feature cache,
        a search shared between settings)."""
        rows_np = rows.detach().cpu().numpy()
        valid = rows_np >= 0
        searched = self.memory.embeddings(self.searched_modality(modality))
        items = np.asarray(searched[np.where(valid, rows_np, 0).ravel()], dtype=np.float32)
        items = torch.from_numpy(items.reshape(*rows_np.shape, self.memory.dim)).to(queries.device)
        query = F.normalize(queries.float(), dim=-1)
        scores = torch.einsum("bkd,bd->bk", F.normalize(items, dim=-1), query)
        return scores * torch.from_numpy(valid).to(queries.device)

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
        added = (
            None
            if self.novelty is None
            else torch.from_numpy(self.novelty.added[flat].reshape(rows_np.shape) & valid)
        )
        return Neighbours(
            embeddings=torch.from_numpy(gathered).to(device),
            mask=torch.from_numpy(valid).to(device),
            rows=torch.from_numpy(rows_np).to(device),
            scores=(scores if scores is not None else torch.zeros(rows_np.shape)).to(device),
            added=None if added is None else added.to(device),
        )
