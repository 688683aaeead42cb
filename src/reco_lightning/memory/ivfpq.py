"""IVF-PQ inner-product search with optional exact re-ranking against the store's fp16 rows.

At 1M x 512 an exact index costs 2 KiB per vector and a full scan per query; IVF-PQ keeps ``m`` bytes of code
(plus an 8-byte id) per vector and scans only ``nprobe`` of ``nlist`` lists. PQ scores are coarse, so with
``rerank > 0`` the index proposes ``max(k, rerank)`` candidates that are re-scored exactly from the
full-precision rows the store already keeps on disk, which restores near-exact top-k at a small cost.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from reco_lightning.errors import RecoMemoryError
from reco_lightning.memory.base import MemoryBackend, register_backend
from reco_lightning.memory.gpu import index_to_cpu, index_to_gpu

__all__ = ["IVFPQBackend", "rerank_exact"]

# Elements of float32 scratch per re-ranking block ([queries, candidates, dim]): 2M floats = 8 MB keeps
# memory flat whatever the batch size.
_RERANK_BLOCK_ELEMS = 1 << 21


@register_backend("ivfpq")
class IVFPQBackend(MemoryBackend):
    """Inverted lists of product-quantised codes; ``m`` bytes + 8-byte id per vector at ``nbits=8``.

    ``nlist``, ``m`` and ``nbits`` fix the index layout (train time); ``nprobe`` and ``rerank`` are search-time
    knobs that ``MemoryBackend.load(dir, nprobe=..., rerank=...)`` may change without rebuilding.
    """

    search_args = frozenset({"nprobe", "rerank"})

    def __init__(
        self, dim: int, nlist: int = 1024, m: int = 64, nbits: int = 8, nprobe: int = 32, rerank: int = 0
    ) -> None:
        super().__init__(dim)
        self.nlist, self.m, self.nbits = int(nlist), int(m), int(nbits)
        self.nprobe, self.rerank = int(nprobe), int(rerank)
        _validate(self.dim, self.nlist, self.m, self.nbits, self.nprobe, self.rerank)
        quantizer = faiss.IndexFlatIP(self.dim)
        self.index: faiss.Index = faiss.IndexIVFPQ(
            quantizer, self.dim, self.nlist, self.m, self.nbits, faiss.METRIC_INNER_PRODUCT
        )
        self.index.own_fields = True
        quantizer.this.disown()  # the IVF index owns and frees its quantizer
        self.index.nprobe = self.nprobe
        self._rows: np.ndarray | None = None

    # --- building -------------------------------------------------------------------------------------
    @property
    def needs_training(self) -> bool:
        return True

    def min_train_size(self) -> int:
        """Hard minimum of training vectors: k-means needs a point per IVF list and per PQ centroid."""
        return max(self.nlist, 2**self.nbits)

    def recommended_train_size(self) -> int:
        """faiss warns below 39 points per centroid; beyond 256 per centroid it subsamples anyway."""
        return 39 * max(self.nlist, 2**self.nbits)

    def train(self, vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(self._check(vectors, "training vectors"), dtype=np.float32)
        need = self.min_train_size()
        if len(vectors) < need:
            raise RecoMemoryError(
                f"ivfpq training needs at least {need} vectors (nlist={self.nlist}, 2**nbits={2**self.nbits}; "
                f"{self.recommended_train_size()} recommended) but got {len(vectors)}: add more pairs or lower "
                "nlist/nbits"
            )
        self.index.train(vectors)

    def add(self, vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(self._check(vectors, "vectors"), dtype=np.float32)
        if not self.index.is_trained:
            raise RecoMemoryError(
                "ivfpq index is not trained: call train(sample) (or build(vectors)) before add"
            )
        self.index.add(vectors)

    # --- searching ------------------------------------------------------------------------------------
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
        self.index = index_to_gpu(self.index, device)

    # --- persistence and accounting -------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def nbytes(self) -> int:
        """Serialised size: codes + ids + inverted-list headers + coarse centroids + PQ codebooks."""
        return len(faiss.serialize_index(index_to_cpu(self.index)))

    def init_args(self) -> dict[str, Any]:
        return {
            "nlist": self.nlist,
            "m": self.m,
            "nbits": self.nbits,
            "nprobe": self.nprobe,
            "rerank": self.rerank,
        }

    def _save_index(self, path: Path) -> None:
        faiss.write_index(index_to_cpu(self.index), str(path))

    def _load_index(self, path: Path) -> None:
        index = faiss.read_index(str(path))
        if not isinstance(index, faiss.IndexIVFPQ):
            raise ValueError(f"expected an IndexIVFPQ, found {type(index).__name__}")
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

    Vectorised per block of queries: gather [b, C, dim] rows (works on a memmap), widen fp16 to fp32 and run
    one batched mat-vec. Widening dominates the cost; a 65536-entry lookup table does it exactly and ~1.5x
    faster than numpy's scalar ``astype``, single-threaded, so it does not degrade when cores are busy
    (multi-threaded torch did, by up to 4x on a shared 2-core machine). Blocks keep scratch memory bounded.
    Ids of -1 (fewer candidates than asked) score -inf, sort last and come back as -1.
    """
    n_queries, n_cand = candidates.shape
    out_scores = np.empty((n_queries, k), dtype=np.float32)
    out_ids = np.empty((n_queries, k), dtype=np.int64)
    block = max(1, _RERANK_BLOCK_ELEMS // max(1, n_cand * rows.shape[1]))
    rows = np.asarray(rows)  # a plain view of a memmap: np.memmap results are slower to compute with
    fp16 = rows.dtype == np.float16
    source = rows.view(np.uint16) if fp16 else rows
    for start in range(0, n_queries, block):
        stop = min(start + block, n_queries)
        ids = candidates[start:stop]
        valid = ids >= 0
        gathered = source[np.where(valid, ids, 0)]  # [b, C, dim]
        vecs = np.take(_fp16_to_fp32(), gathered) if fp16 else gathered.astype(np.float32, copy=False)
        scores = np.matmul(vecs, queries[start:stop, :, None])[..., 0]  # [b, C] exact fp32 dot products
        scores[~valid] = -np.inf
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        top_scores = np.take_along_axis(scores, order, axis=1)
        top_ids = np.take_along_axis(ids, order, axis=1)
        top_ids[np.isneginf(top_scores)] = -1
        out_scores[start:stop] = top_scores
        out_ids[start:stop] = top_ids
    return out_scores, out_ids


@functools.cache
def _fp16_to_fp32() -> np.ndarray:
    """float32 value of every fp16 bit pattern (256 KB, stays in cache)."""
    return np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


def _validate(dim: int, nlist: int, m: int, nbits: int, nprobe: int, rerank: int) -> None:
    if nlist < 1:
        raise RecoMemoryError(f"ivfpq nlist={nlist} must be >= 1: use about 4*sqrt(N) inverted lists")
    if m < 1 or dim % m:
        divisors = [d for d in (96, 64, 48, 32, 16, 8) if dim % d == 0 and d <= dim] or [1]
        raise RecoMemoryError(
            f"ivfpq m={m} must divide dim={dim}: pick m among the divisors of {dim}, e.g. {divisors[:3]}"
        )
    if not 1 <= nbits <= 16:
        raise RecoMemoryError(f"ivfpq nbits={nbits} must be in 1..16: use 8 (one byte per sub-quantiser)")
    if nprobe < 1:
        raise RecoMemoryError(f"ivfpq nprobe={nprobe} must be >= 1: probe at least one inverted list")
    if rerank < 0:
        raise RecoMemoryError(f"ivfpq rerank={rerank} must be >= 0: 0 disables exact re-ranking")
