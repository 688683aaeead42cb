"""Exact inner-product search (faiss flat): the reference every approximate backend is measured against."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import faiss
import numpy as np
import torch

from reco_lightning.arrays import release_pages
from reco_lightning.errors import RecoMemoryError
from reco_lightning.memory.base import MemoryBackend, register_backend
from reco_lightning.memory.gpu import index_to_cpu, index_to_gpu

__all__ = ["ExactBackend", "MappedExactBackend", "block_topk", "scan_topk"]

#: Batches at least this large are searched by blocked torch GEMM + top-k on CPU (see ``_blocked_search``).
BLOCKED_MIN_BATCH = 64
#: Memory rows per GEMM block: [B, 16384] scores stay small and the GEMM shape stays efficient.
BLOCK_ROWS = 16_384
#: Queries per GEMM block (bounds the score block for huge query batches).
BLOCK_QUERIES = 4096
#: Scores per group of the two-level top-k of a block (see :func:`block_topk`).
TOPK_GROUP = 32


@register_backend("exact")
class ExactBackend(MemoryBackend):
    """Brute-force search; 4 bytes x dim per vector, recall 1.0, cost linear in the memory size."""

    search_args = frozenset()

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.index: faiss.Index = faiss.IndexFlatIP(self.dim)

    def add(self, vectors: np.ndarray) -> None:
        self.index.add(np.ascontiguousarray(self._check(vectors, "vectors"), dtype=np.float32))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        self._check_k(k)
        queries = np.ascontiguousarray(self._check(queries, "queries"), dtype=np.float32)
        if len(queries) >= BLOCKED_MIN_BATCH and type(self.index) is faiss.IndexFlatIP:
            return self._blocked_search(queries, k)
        scores, ids = self.index.search(queries, k)
        return scores, ids.astype(np.int64, copy=False)

    def _blocked_search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The same search as faiss's flat index, by :func:`scan_topk` over the index's rows in place.

        Why: on CPU, faiss's flat search reached about half the machine's matmul rate on large batches
        (measured at N = 1M, d = 512, B = 1024: 85 GFLOP/s of 163); blocked torch GEMM reaches 114.
        """
        rows = faiss.rev_swig_ptr(self.index.get_xb(), self.ntotal * self.dim).reshape(self.ntotal, self.dim)
        return scan_topk(queries, rows, k)

    def to_device(self, device: int | None) -> None:
        self.index = index_to_gpu(self.index, device)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def nbytes(self) -> int:
        return self.ntotal * self.dim * 4

    def _save_index(self, path: Path) -> None:
        faiss.write_index(index_to_cpu(self.index), str(path))

    def _load_index(self, path: Path) -> None:
        index = faiss.read_index(str(path))
        if index.d != self.dim:
            raise ValueError(f"index dim {index.d} != {self.dim}")
        self.index = index


@register_backend("exact_mmap")
class MappedExactBackend(MemoryBackend):
    """Brute-force search straight over the store's fp16 rows (memory-mapped): no index, no copy in RAM.

    ``exact`` copies the rows into a float32 faiss index (20 GB at 10M x 512); this one scans the memmap in
    blocks (:func:`scan_topk`), so any memory fits, at the cost of widening fp16 per block. Its index file
    records only the row count; searching needs the rows (:meth:`attach`; a ``MemoryStore`` attaches them).
    """

    search_args = frozenset()

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self._count = 0
        self._rows: np.ndarray | None = None

    def add(self, vectors: np.ndarray) -> None:
        self._count += len(self._check(vectors, "vectors"))

    def build(self, vectors: np.ndarray, train_size: int | None = None, seed: int = 0) -> None:
        """Nothing to build: the rows are searched where they are; only their count is kept."""
        self.add(vectors)

    def attach(self, rows: np.ndarray) -> None:
        if rows.ndim != 2 or rows.shape[1] != self.dim or len(rows) != self._count:
            raise RecoMemoryError(
                f"exact_mmap needs the store's [{self._count}, {self.dim}] rows, got {tuple(rows.shape)}: attach "
                "the store this index was built from"
            )
        self._rows = rows

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        self._check_k(k)
        if self._rows is None:
            raise RecoMemoryError("exact_mmap searches the store's rows: call attach(store_rows) first")
        return scan_topk(
            np.ascontiguousarray(self._check(queries, "queries"), dtype=np.float32), self._rows, k
        )

    @property
    def ntotal(self) -> int:
        return self._count

    def nbytes(self) -> int:
        return 0

    def _save_index(self, path: Path) -> None:
        path.write_text(json.dumps({"ntotal": self._count}))

    def _load_index(self, path: Path) -> None:
        self._count = int(json.loads(path.read_text())["ntotal"])


def block_topk(scores: torch.Tensor, k: int, group: int = TOPK_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """``scores.topk(k, dim=1)`` of a [B, n] score block, by two levels: the max of each group of
    ``group`` columns (one vectorised pass), the top-k groups by their max, then the top-k of those groups'
    ``k * group`` scores.

    Exact (up to the order of tied scores, which topk leaves open too): a column of the top k lies in a
    group whose max is at least the k-th score, and at most k groups can have that. Why: torch's top-k
    reads a whole [1024, 16384] block with a partial sort per row, about a fifth of a block's GEMM time on
    2 cores; a max reduction is a fraction of that (measured in docs/benchmarks.md, exact search).
    """
    rows, n = scores.shape
    if n % group or n // group < k:
        return scores.topk(min(k, n), dim=1)
    groups = scores.view(rows, n // group, group).amax(dim=2).topk(k, dim=1).indices  # [B, k]
    columns = (groups.unsqueeze(2) * group + torch.arange(group)).reshape(rows, k * group)
    best, picked = scores.gather(1, columns).topk(k, dim=1)
    return best, columns.gather(1, picked)


def scan_topk(queries: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner products of float32 ``queries`` [B, d] against ``rows`` [N, d] (fp32 or fp16).

    Torch GEMM over ``BLOCK_ROWS`` rows at a time with a running top-k (:func:`block_topk`); queries go
    ``BLOCK_QUERIES`` at a time, so the score block never exceeds ``BLOCK_QUERIES x BLOCK_ROWS`` floats
    (256 MiB). The score block and, for fp16 rows (a memmap), the widened block are buffers reused from
    block to block: a fresh 64 MiB tensor per block is fresh pages for the kernel to fault in, which cost
    a quarter of the scan (docs/benchmarks.md, exact search). A memmap's pages are released per block
    (:func:`~reco_lightning.arrays.release_pages`): a scan of a 10 GB memory keeps a small RSS.
    """
    count, dim = rows.shape
    all_scores, all_ids = [], []
    for q in torch.from_numpy(queries).split(BLOCK_QUERIES):
        best_scores = torch.full((len(q), k), -float("inf"))
        best_ids = torch.zeros((len(q), k), dtype=torch.long)
        score_buffer = torch.empty(len(q), min(BLOCK_ROWS, count))
        widen_buffer = torch.empty(min(BLOCK_ROWS, count), dim) if rows.dtype != np.float32 else None
        for start in range(0, count, BLOCK_ROWS):
            with warnings.catch_warnings():  # a read-only memmap: the block is only read
                warnings.simplefilter("ignore", UserWarning)
                block = torch.from_numpy(np.asarray(rows[start : start + BLOCK_ROWS]))
            if start // BLOCK_ROWS % 16 == 15:
                release_pages(rows)
            n = len(block)
            if widen_buffer is not None:
                block = widen_buffer[:n].copy_(block)  # fp16 -> fp32 into the same pages every block
            scores = score_buffer if n == score_buffer.shape[1] else torch.empty(len(q), n)
            torch.matmul(q, block.T, out=scores)
            block_scores, block_ids = block_topk(scores, k)
            merged_scores = torch.cat([best_scores, block_scores], dim=1)
            merged_ids = torch.cat([best_ids, block_ids + start], dim=1)
            best_scores, order = merged_scores.topk(k, dim=1)
            best_ids = merged_ids.gather(1, order)
        all_scores.append(best_scores)
        all_ids.append(best_ids)
    release_pages(rows)
    return torch.cat(all_scores).numpy(), torch.cat(all_ids).numpy()
