"""IVF-PQ inner-product search with optional exact re-ranking against the store's fp16 rows.

At 1M x 512 an exact index costs 2 KiB per vector and a full scan per query; IVF-PQ keeps ``m`` bytes of code
(plus an 8-byte id) per vector and scans only ``nprobe`` of ``nlist`` lists. PQ scores are coarse, so with
``rerank > 0`` the index proposes ``max(k, rerank)`` candidates that are re-scored exactly from the
full-precision rows the store already keeps on disk, which restores near-exact top-k at a small cost.

Defaults follow the number of vectors N, known when the index is trained (``build``, or ``train(sample,
ntotal=N)``): ``nlist`` ~ 4*sqrt(N) lists (faiss's guideline) rounded to a power of two and capped so every
list has at least 39 training points (below that faiss warns and k-means centroids are noisy), ``nprobe``
= nlist / 256 (at least 16, at most nlist), and exact re-ranking of 200 candidates, whatever N: the
rules read off the tuning curves of ``benchmarks/ivfpq_curves.py`` at 100k, 1M and 10M rows (docs/memory.md).
The resolved values are what ``init_args`` (and so ``backend.json`` and the manifest) record, and the spec's
``derived`` lists which came from the rule, so a memory re-indexed for other rows (``MemoryStore.select``,
``concat``) derives them again; ``None`` given to ``load`` as a search-time override means the rule again.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from reco_lightning.arrays import release_pages_over
from reco_lightning.errors import RecoMemoryError
from reco_lightning.memory.base import DEFAULT_TRAIN_SIZE, MemoryBackend, register_backend
from reco_lightning.memory.gpu import index_to_cpu, index_to_gpu

__all__ = ["IVFPQBackend", "default_nlist", "default_nprobe", "default_rerank", "rerank_exact"]

#: faiss warns below 39 training points per k-means centroid; a derived nlist never goes below it.
MIN_POINTS_PER_LIST = 39
#: Default nprobe = nlist // NPROBE_DIVISOR, at least MIN_NPROBE.
NPROBE_DIVISOR, MIN_NPROBE = 256, 16
#: Candidates re-scored exactly by default.
DEFAULT_RERANK = 200


def default_nlist(ntotal: int, n_train: int | None = None) -> int:
    """IVF lists for ``ntotal`` vectors trained on ``n_train`` (default: all of them).

    ~4*sqrt(N) (faiss's guideline), rounded to the nearest power of two, and at most the largest power of two
    that leaves every list ``MIN_POINTS_PER_LIST`` training points: 1024 at 100k, 4096 at 1M (with >= 160k
    training points, as the default 200k sample, ``memory.base.DEFAULT_TRAIN_SIZE``), 16384 at 10M (with
    >= 639k; 4096 from the default sample).
    """
    n_train = ntotal if n_train is None else min(n_train, ntotal)
    target = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(ntotal))))
    cap = 2 ** int(math.log2(max(1, n_train // MIN_POINTS_PER_LIST)))
    return int(max(1, min(target, cap)))


def default_nprobe(nlist: int) -> int:
    """Lists probed by default: 1/256 of them, at least 16 (all of them below 16 lists).

    Measured on benchmarks/synthetic.py data (d = 512, ``benchmarks/ivfpq_curves.py``, docs/memory.md): with
    4096 lists (1M rows, and 10M from the default 200k training sample), 16 probes reach recall@10 0.964
    with 200 re-ranked candidates and 32 or 64 probes no more than 0.979 / 0.983 at 1M and the same 0.964 at
    10M, at half or a quarter of the speed; with 1024 lists (100k) 16 probes reach 0.992. The lists a
    query's true neighbours fall into grow far more slowly than nlist, hence a floor rather than a
    fraction until 4096 lists; 16384 lists (10M trained on 640k+ rows, lists a quarter as long): 64.
    """
    return int(min(nlist, max(MIN_NPROBE, nlist // NPROBE_DIVISOR)))


def default_rerank(ntotal: int) -> int:
    """Candidates re-scored exactly by default: 200, whatever N (``ntotal`` is kept for the rule's callers).

    PQ codes alone put about half of the true top-10 in their own top-10 on CLIP-like data; re-scoring the
    PQ's best 200 from the store's fp16 rows gave recall@10 0.992 (100k), 0.964 (1M) and 0.964 (10M) at 16
    probes (benchmarks/ivfpq_curves.py): the share of true neighbours the PQ ranks below 200 did not grow
    from 1M to 10M, so the rule of sqrt(N / 10) candidates (set at <= 1M) only over-provisioned at 10M.
    """
    del ntotal
    return DEFAULT_RERANK


# Elements of float32 scratch per re-ranking block ([queries, candidates, dim]): 8M floats = 32 MB keeps
# memory flat whatever the batch size.
_RERANK_BLOCK_ELEMS = 1 << 23
# Rows gathered from a memmap between two looks at how much of it is mapped (``arrays.release_pages_over``):
# each random row maps up to ~110 KB (the kernel maps cached neighbours too), ~450 MB per 4096 rows.
_RELEASE_ROWS = 4096


@register_backend("ivfpq")
class IVFPQBackend(MemoryBackend):
    """Inverted lists of product-quantised codes; ``m`` bytes + 8-byte id per vector at ``nbits=8``.

    ``nlist``, ``m`` and ``nbits`` fix the index layout (train time); ``nprobe`` and ``rerank`` are search-time
    knobs that ``MemoryBackend.load(dir, nprobe=..., rerank=...)`` may change without rebuilding.
    ``nlist=None`` (default) is chosen from the number of vectors when the index is trained
    (:func:`default_nlist`); ``nprobe=None`` (default) is :func:`default_nprobe` of ``nlist``, resolved as
    soon as ``nlist`` is known; ``rerank=None`` (default) is :func:`default_rerank` of the number of vectors,
    resolved when trained. Re-ranking needs the store's rows (:meth:`attach`; a ``MemoryStore`` attaches
    them); ``rerank=0`` searches the PQ codes alone.
    """

    search_args = frozenset({"nprobe", "rerank"})

    def __init__(
        self,
        dim: int,
        nlist: int | None = None,
        m: int = 64,
        nbits: int = 8,
        nprobe: int | None = None,
        rerank: int | None = None,
    ) -> None:
        super().__init__(dim)
        self.nlist = None if nlist is None else int(nlist)
        self.m, self.nbits = int(m), int(nbits)
        self.nprobe = None if nprobe is None else int(nprobe)
        self.rerank = None if rerank is None else int(rerank)
        given = {"nlist": nlist, "nprobe": nprobe, "rerank": rerank}
        self._derived = sorted(name for name, value in given.items() if value is None)
        _validate(self.dim, self.nlist, self.m, self.nbits, self.nprobe, self.rerank)
        self.index: faiss.Index | None = None  # created once nlist is known (here, or when trained)
        self._rows: np.ndarray | None = None
        self._planned_total: int | None = None  # set by build(): the N that sizes a derived nlist
        if self.nlist is not None:
            self._create_index(self.nlist)

    def _create_index(self, nlist: int) -> None:
        """Fix the layout: an empty IVF-PQ with ``nlist`` lists; a derived nprobe follows from it."""
        self.nlist = int(nlist)
        if self.nprobe is None:
            self.nprobe = default_nprobe(self.nlist)
        quantizer = faiss.IndexFlatIP(self.dim)
        self.index = faiss.IndexIVFPQ(
            quantizer, self.dim, self.nlist, self.m, self.nbits, faiss.METRIC_INNER_PRODUCT
        )
        self.index.own_fields = True
        quantizer.this.disown()  # the IVF index owns and frees its quantizer
        self.index.nprobe = self.nprobe

    # --- building -------------------------------------------------------------------------------------
    @property
    def needs_training(self) -> bool:
        return True

    def min_train_size(self) -> int:
        """Hard minimum of training vectors: k-means needs a point per IVF list and per PQ centroid.

        A derived nlist (``nlist=None``) never exceeds training size / 39, so only the PQ's centroids count.
        """
        return max(self.nlist or 1, 2**self.nbits)

    def recommended_train_size(self) -> int:
        """faiss warns below 39 points per centroid; beyond 256 per centroid it subsamples anyway.

        With a derived nlist, the PQ's share: the IVF's is met by construction (see :func:`default_nlist`).
        """
        return MIN_POINTS_PER_LIST * max(self.nlist or 1, 2**self.nbits)

    def build(self, vectors: np.ndarray, train_size: int | None = DEFAULT_TRAIN_SIZE, seed: int = 0) -> None:
        """As :meth:`MemoryBackend.build`; a derived nlist is sized for all ``len(vectors)`` rows."""
        self._planned_total = len(vectors)
        try:
            super().build(vectors, train_size=train_size, seed=seed)
        finally:
            self._planned_total = None

    def train(self, vectors: np.ndarray, ntotal: int | None = None) -> None:
        """Train the coarse quantiser and the PQ on ``vectors`` (a sample of what will be added).

        ``ntotal``: how many vectors will be added, which sizes a derived nlist (:func:`default_nlist`);
        default: as many as ``build`` was given, else the sample's size (the sample is everything).
        """
        vectors = np.ascontiguousarray(self._check(vectors, "training vectors"), dtype=np.float32)
        need = self.min_train_size()
        if len(vectors) < need:
            raise RecoMemoryError(
                f"ivfpq training needs at least {need} vectors (nlist={self.nlist or 'derived'}, "
                f"2**nbits={2**self.nbits}; {self.recommended_train_size()} recommended) but got {len(vectors)}: "
                "add more pairs or lower nlist/nbits"
            )
        total = max(ntotal if ntotal is not None else self._planned_total or 0, len(vectors))
        if self.index is None:
            self._create_index(default_nlist(total, len(vectors)))
        if self.rerank is None:
            self.rerank = default_rerank(total)
        self.index.train(vectors)

    def add(self, vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(self._check(vectors, "vectors"), dtype=np.float32)
        if self.index is None or not self.index.is_trained:
            raise RecoMemoryError(
                "ivfpq index is not trained: call train(sample) (or build(vectors)) before add"
            )
        self.index.add(vectors)

    # --- searching ------------------------------------------------------------------------------------
    def set_search(self, nprobe: int | None = None, rerank: int | None = None) -> None:
        """Change the search-time settings of a built index (``None`` keeps one as it is)."""
        _validate(self.dim, self.nlist, self.m, self.nbits, nprobe, rerank)
        if nprobe is not None:
            self.nprobe = int(nprobe)
            if self.index is not None:
                self.index.nprobe = self.nprobe
        if rerank is not None:
            self.rerank = int(rerank)

    def attach(self, rows: np.ndarray) -> None:
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise RecoMemoryError(
                f"attached store rows must have shape [n, {self.dim}], got {tuple(rows.shape)}"
            )
        if len(rows) < self.ntotal:
            raise RecoMemoryError(
                f"attached store has {len(rows)} rows but the index holds {self.ntotal} vectors: attach the "
                "store this index was built from"
            )
        self._rows = rows

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        self._check_k(k)
        queries = np.ascontiguousarray(self._check(queries, "queries"), dtype=np.float32)
        if self.rerank is None:  # an index given to this backend without training it here
            self.rerank = default_rerank(self.ntotal)
        if self.rerank <= 0:
            scores, ids = self.index.search(queries, k)
            ids = ids.astype(np.int64, copy=False)
            scores[ids < 0] = -np.inf
            return scores, ids
        if self._rows is None:
            raise RecoMemoryError(
                f"ivfpq rerank={self.rerank} re-scores candidates exactly and needs the store rows: call "
                "attach(store_rows) after loading (or load with rerank=0)"
            )
        n_candidates = min(max(k, self.rerank), self.ntotal)
        _, candidates = self.index.search(queries, n_candidates)
        return rerank_exact(queries, candidates.astype(np.int64, copy=False), self._rows, k)

    def to_device(self, device: int | None) -> None:
        if self.index is not None:
            self.index = index_to_gpu(self.index, device)

    # --- persistence and accounting -------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        return 0 if self.index is None else int(self.index.ntotal)

    def nbytes(self) -> int:
        """Serialised size: codes + ids + inverted-list headers + coarse centroids + PQ codebooks."""
        return 0 if self.index is None else len(faiss.serialize_index(index_to_cpu(self.index)))

    def init_args(self) -> dict[str, Any]:
        return {
            "nlist": self.nlist,
            "m": self.m,
            "nbits": self.nbits,
            "nprobe": self.nprobe,
            "rerank": self.rerank,
        }

    def spec(self) -> dict[str, Any]:
        """The class path and resolved init_args, plus ``derived``: the args the default rules chose."""
        spec = super().spec()
        if self._derived:
            spec["derived"] = list(self._derived)
        return spec

    def _save_index(self, path: Path) -> None:
        if self.index is None:
            raise RecoMemoryError("ivfpq index is not trained: build it before saving")
        faiss.write_index(index_to_cpu(self.index), str(path))

    def _load_index(self, path: Path) -> None:
        self._adopt(faiss.read_index(str(path)))

    def _adopt(self, index: faiss.Index) -> None:
        """Take an index read from disk: check its layout against backend.json's, apply search-time args."""
        if not isinstance(index, faiss.IndexIVFPQ):
            raise ValueError(f"expected an IndexIVFPQ, found {type(index).__name__}")
        if self.nlist is None:  # backend.json records the resolved nlist; tolerate one that does not
            self.nlist = int(index.nlist)
        if self.nprobe is None:  # e.g. load(dir, nprobe=None): the default rule
            self.nprobe = default_nprobe(self.nlist)
        if self.rerank is None:
            self.rerank = default_rerank(int(index.ntotal))
        found = (index.d, index.nlist, index.pq.M, index.pq.nbits)
        expected = (self.dim, self.nlist, self.m, self.nbits)
        if found != expected:
            raise ValueError(f"index has (dim, nlist, m, nbits)={found} but backend.json records {expected}")
        # The file stores the build-time nprobe; apply this backend's (possibly overridden) one.
        index.nprobe = self.nprobe
        self.index = index


def rerank_exact(
    queries: np.ndarray, candidates: np.ndarray, rows: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Re-score candidate ids [B, C] by exact inner product with ``rows`` and keep the best ``k``.

    Per block of queries: gather the [b * C, dim] candidate rows (``index_select``, works on a memmap),
    widen them into a float32 buffer reused from block to block, one batched mat-vec, a top-k. Torch does
    the gather and the fp16 widening with vector instructions: 10x the numpy lookup-table widening it
    replaces at 2 threads and 6x at 1 thread (benchmarks in docs/memory.md, "IVF-PQ defaults"), which is
    what made re-ranking, not the PQ scan, the cost of a search. Ids of -1 (fewer candidates than asked)
    score -inf, sort last and come back as -1. Pages of a memmapped ``rows`` are released as it goes
    (:func:`~reco_lightning.arrays.release_pages`), so RSS stays bounded however large the memory: the rows
    stay in the page cache, shared by the node's processes.
    """
    n_queries, n_cand = candidates.shape
    out_scores = np.empty((n_queries, k), dtype=np.float32)
    out_ids = np.empty((n_queries, k), dtype=np.int64)
    if n_queries == 0:
        return out_scores, out_ids
    dim = rows.shape[1]
    block = max(1, _RERANK_BLOCK_ELEMS // max(1, n_cand * dim))
    with warnings.catch_warnings():  # a read-only memmap: only read
        warnings.simplefilter("ignore", UserWarning)
        source = torch.from_numpy(np.asarray(rows))
    all_queries, all_ids = torch.from_numpy(queries), torch.from_numpy(candidates)
    widened = torch.empty(min(block, n_queries) * n_cand, dim) if source.dtype != torch.float32 else None
    gathered_since_release = 0
    for start in range(0, n_queries, block):
        stop = min(start + block, n_queries)
        ids = all_ids[start:stop]
        gathered = source.index_select(0, ids.clamp(min=0).reshape(-1))  # [b * C, dim]
        if widened is not None:
            gathered = widened[: gathered.shape[0]].copy_(gathered)
        gathered_since_release += ids.numel()
        if gathered_since_release >= _RELEASE_ROWS:
            release_pages_over(rows)
            gathered_since_release = 0
        scores = torch.bmm(gathered.view(stop - start, n_cand, dim), all_queries[start:stop].unsqueeze(2))
        scores = scores.squeeze(2)  # [b, C] exact fp32 dot products
        scores[ids < 0] = -float("inf")
        top_scores, order = scores.topk(min(k, n_cand), dim=1)
        top_ids = ids.gather(1, order)
        top_ids[torch.isneginf(top_scores)] = -1
        out_scores[start:stop, : top_scores.shape[1]] = top_scores.numpy()
        out_ids[start:stop, : top_ids.shape[1]] = top_ids.numpy()
    if n_cand < k:  # fewer candidates than k: the rest is empty
        out_scores[:, n_cand:], out_ids[:, n_cand:] = -np.inf, -1
    return out_scores, out_ids


def _validate(
    dim: int, nlist: int | None, m: int, nbits: int, nprobe: int | None, rerank: int | None
) -> None:
    if nlist is not None and nlist < 1:
        raise RecoMemoryError(f"ivfpq nlist={nlist} must be >= 1: use about 4*sqrt(N) inverted lists")
    if m < 1 or dim % m:
        divisors = [d for d in (96, 64, 48, 32, 16, 8) if dim % d == 0 and d <= dim] or [1]
        raise RecoMemoryError(
            f"ivfpq m={m} must divide dim={dim}: pick m among the divisors of {dim}, e.g. {divisors[:3]} "
            f"(--backend '{{class_path: ivfpq, init_args: {{m: {divisors[0]}}}}}')"
        )
    if not 1 <= nbits <= 16:
        raise RecoMemoryError(f"ivfpq nbits={nbits} must be in 1..16: use 8 (one byte per sub-quantiser)")
    if nprobe is not None and nprobe < 1:
        raise RecoMemoryError(f"ivfpq nprobe={nprobe} must be >= 1: probe at least one inverted list")
    if rerank is not None and rerank < 0:
        raise RecoMemoryError(f"ivfpq rerank={rerank} must be >= 0: 0 disables exact re-ranking")
