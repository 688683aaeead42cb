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
changes nothing. A memory grown with more rows of the known concepts would have those gated as if they
were new (74.8 -> 55.1 all-class on 9 stand-in backbones), so by default (:class:`ShareCheck`, since
session 11) a query is gated only if its share of added neighbours also exceeds what the training rows
themselves see (the 95th percentile over 2,000 of them): in a memory grown tenfold with the same concepts
they see mostly added rows too, and nothing is gated (74.8 kept). The score-gap check of sessions 9-10
(:class:`GapCheck`, ``novelty_gap``: the best added row must beat the best training row by more than
training rows do) kept 72.3 there and gives the new concepts of the strict protocol 0.6 points less
(validation); both leave a memory grown with more rows of one known concept 1.4 points under the fusion
alone. A base rate taken around each query instead (its nearest training rows') does not close that gap
and takes new concepts beside their look-alikes for known ones (session 13), and no label-free signal
measured there gates more new concepts at the same cost to the known ones. docs/results.md.

A gated image's caption mean meets the class prompts by cosine, which weighs the directions all captions
share (phrasings; on a text tower that never learned the new names, the region they collapse into) as
much as those that tell concepts apart. :class:`~reco_lightning.whitening.MemoryWhitening`
(``novelty_whiten``, off by default) sends it through the memory's caption covariance first: on the
demo's strict protocol +2.3 all-class at ridge 0.01 (validation, 9 stand-in backbones; a sharp optimum),
the demo's setting since session 14.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from reco_lightning.errors import RecoError
from reco_lightning.memory.store import MemoryStore
from reco_lightning.types import Modality
from reco_lightning.whitening import MemoryWhitening

__all__ = [
    "GapCheck",
    "NoveltyError",
    "NoveltyGate",
    "ShareCheck",
    "added_share",
    "known_rows",
    "novel_answer",
    "novel_queries",
    "reference_rows",
]


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


def reference_rows(
    memory: MemoryStore, known: np.ndarray, modality: Modality, sample: int
) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``sample`` training rows of ``memory`` (a fixed draw, sorted) and their ``modality`` embeddings:
    the stand-in queries both checks take their reference quantile from."""
    candidates = np.flatnonzero(known)
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(candidates, size=min(sample, len(candidates)), replace=False))
    return rows, np.asarray(memory.embeddings(modality)[rows], dtype=np.float32)


class GapCheck:
    """Is a query's best added row closer than a training row would be? (the gate's second condition)

    ``memory``: the attached memory; ``known``: bool [N], its rows the fusion trained with; ``training``: the
    training memory itself (opened with its indexes: the query's best score there is one search);
    ``quantile``: of the reference gap, best added score - best training score, measured for up to
    ``sample`` training rows of ``memory`` (their own row skipped by pair id), per searched modality, once.
    ``margin``: extra neighbours fetched for a reference row, whose best added row is then searched among
    ``k + margin`` (none there: the last score, an upper bound, so the threshold errs towards not gating).
    """

    def __init__(
        self,
        memory: MemoryStore,
        known: np.ndarray,
        training: MemoryStore,
        quantile: float,
        k: int,
        sample: int = 2000,
        margin: int = 16,
    ) -> None:
        if not 0.0 <= quantile < 1.0:
            raise ValueError(f"novelty_gap is a quantile in [0, 1), got {quantile}")
        self.memory, self.known, self.training, self.quantile = memory, known, training, quantile
        self.k, self.sample, self.margin = k, sample, margin
        self._thresholds: dict[str, float] = {}

    def _best_training(
        self, queries: np.ndarray, modality: Modality, own: np.ndarray | None = None
    ) -> np.ndarray:
        """Each query's best score in the training memory (``own`` [B] pair ids: skip the query's own row)."""
        scores, rows = self.training.index(modality).search(queries, 1 if own is None else 2)
        if own is None:
            return scores[:, 0]
        ids = np.asarray(self.training.ids)[np.clip(rows, 0, None)]
        return np.where(ids[:, 0] == own, scores[:, 1], scores[:, 0])

    def threshold(self, modality: Modality, searched: Modality) -> float:
        """The reference gap's ``quantile`` for ``modality`` queries searched in ``searched`` (computed once):
        training rows' own ``modality`` embeddings stand in for the queries."""
        key = f"{modality}->{searched}"
        if key not in self._thresholds:
            rows, queries = reference_rows(self.memory, self.known, modality, self.sample)
            depth = min(self.k + self.margin, len(self.memory))
            scores, found = self.memory.index(searched).search(queries, depth)
            added = (found >= 0) & ~self.known[np.clip(found, 0, None)]
            first = np.where(added.any(1), added.argmax(1), found.shape[1] - 1)
            best_added = np.take_along_axis(scores, first[:, None], 1)[:, 0]
            own = np.asarray(self.memory.ids)[rows]
            gap = best_added - self._best_training(queries, searched, own)
            self._thresholds[key] = float(np.quantile(gap, self.quantile))
        return self._thresholds[key]

    def __call__(
        self, queries: Tensor, modality: Modality, searched: Modality, rows: Tensor, added: Tensor
    ) -> Tensor:
        """[B] bool for ``modality`` queries [B, D] searched in ``searched`` whose neighbours ``rows`` [B, k]
        hold an added row (``added``): does the best added row beat their best training row by more than
        the threshold?"""
        q = queries.detach().to("cpu", torch.float32).numpy()
        flags, found = added.cpu().numpy(), rows.cpu().numpy()
        first = np.take_along_axis(found, flags.argmax(1)[:, None], 1)[:, 0]  # best-scored added row
        keys = np.asarray(self.memory.embeddings(searched)[np.clip(first, 0, None)], dtype=np.float32)
        gap = np.einsum("bd,bd->b", q, keys) - self._best_training(q, searched)
        return torch.from_numpy(gap > self.threshold(modality, searched)).to(queries.device)


class ShareCheck:
    """Is a query's share of added neighbours beyond what the training rows themselves see?

    The share of added rows around a known concept is a base rate of the memory: near zero when what was
    added is new concepts, near the added rows' share of the memory when the memory grew with more rows
    of the known ones. ``quantile`` of that share over up to ``sample`` training rows of ``memory`` (each
    searched with its own row skipped, per searched modality, once) is the threshold a query's share must
    exceed. Unlike :class:`GapCheck`, it needs no search of the training memory.
    """

    def __init__(
        self, memory: MemoryStore, known: np.ndarray, quantile: float, k: int, sample: int = 2000
    ) -> None:
        if not 0.0 <= quantile < 1.0:
            raise ValueError(f"novelty_share_quantile is a quantile in [0, 1), got {quantile}")
        self.memory, self.known, self.quantile, self.k, self.sample = memory, known, quantile, k, sample
        self._thresholds: dict[str, float] = {}

    def threshold(self, modality: Modality, searched: Modality) -> float:
        """The reference share's ``quantile`` for ``modality`` queries searched in ``searched`` (computed once)."""
        key = f"{modality}->{searched}"
        if key not in self._thresholds:
            rows, queries = reference_rows(self.memory, self.known, modality, self.sample)
            _, found = self.memory.index(searched).search(queries, min(self.k + 1, len(self.memory)))
            found = np.where(found == rows[:, None], -1, found)  # the row itself is no neighbour
            order = np.argsort(found < 0, axis=1, kind="stable")[:, : self.k]  # the first k others, in order
            found = np.take_along_axis(found, order, 1)
            valid = found >= 0
            added = valid & ~self.known[np.clip(found, 0, None)]
            share = added_share(torch.from_numpy(added), torch.from_numpy(valid))
            self._thresholds[key] = float(torch.quantile(share, self.quantile))
        return self._thresholds[key]

    def __call__(self, modality: Modality, searched: Modality, added: Tensor, mask: Tensor) -> Tensor:
        """[B] bool for ``modality`` queries searched in ``searched`` with neighbours flagged ``added`` among
        ``mask`` [B, k]: is their share of added neighbours above the threshold?"""
        return added_share(added, mask) > self.threshold(modality, searched)


@dataclass(frozen=True)
class NoveltyGate:
    """The gate of one attached memory, held by its Retriever (built once, in ``open_retriever``).

    ``added``: bool [N], the memory's rows absent from the training memory; ``threshold``: the share of a
    query's neighbours that must be added; ``share`` and ``gap``: further conditions (each given must
    hold), or None; ``whitening``: how a gated image's answer is mapped (None: the caption mean as it is)."""

    added: np.ndarray
    threshold: float
    gap: GapCheck | None = None
    share: ShareCheck | None = None
    whitening: MemoryWhitening | None = None


def added_share(added: Tensor, mask: Tensor) -> Tensor:
    """[B] share of each query's valid neighbours that were added after training (0 without any valid)."""
    valid = mask.to(torch.float32)
    return (added.to(torch.float32) * valid).sum(1) / valid.sum(1).clamp(min=1.0)


def novel_queries(
    added: Tensor, mask: Tensor, threshold: float, check: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """[B] bool: the queries the gate answers, those with at least ``threshold`` of their valid neighbours
    added after training (``added`` / ``mask`` [B, k]) and, given ``check``, for which ``check(candidates)``
    [C] bool holds (asked only for the candidates: it searches the training memory)."""
    novel = added_share(added, mask) >= threshold
    if check is not None and bool(novel.any()):
        candidates = torch.nonzero(novel).squeeze(1)
        novel = novel.clone()
        novel[candidates] = check(candidates).to(novel.device)
    return novel


def novel_answer(
    fused: Tensor,
    query: Tensor,
    modality: Modality,
    added: Tensor,
    mask: Tensor,
    captions: Tensor,
    novel: Tensor,
    whitening: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """``fused`` [B, D] where ``novel`` [B] is False; where True, an image query becomes the unit mean of its
    added neighbours' captions (``captions`` [B, k, D], the neighbours' paired text embeddings; mapped by
    ``whitening`` when given, :class:`~reco_lightning.whitening.MemoryWhitening`), a text query its frozen
    ``query``."""
    if not bool(novel.any()):
        return fused
    if modality == "image":
        weights = (added & mask).to(captions.dtype).unsqueeze(-1)
        answer = F.normalize((weights * captions).sum(1), dim=-1)
        if whitening is not None:
            answer = whitening(answer)
    else:
        answer = query.to(fused.dtype)
    return torch.where(novel.unsqueeze(1), answer.to(fused.dtype), fused)
