"""Exact inner-product search (faiss flat): the reference every approximate backend is measured against."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import torch

from reco_lightning.memory.base import MemoryBackend, register_backend
from reco_lightning.memory.gpu import index_to_cpu, index_to_gpu

__all__ = ["ExactBackend"]

#: Batches at least this large are searched by blocked torch GEMM + top-k on CPU (see ``_blocked_search``).
BLOCKED_MIN_BATCH = 64
#: Memory rows per GEMM block: [B, 16384] scores stay small and the GEMM shape stays efficient.
BLOCK_ROWS = 16_384
#: Queries per GEMM block (bounds the score block for huge query batches).
BLOCK_QUERIES = 4096


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
        """The same search as faiss's flat index, as torch GEMM over blocks of rows with a running top-k.

        Why: on CPU, faiss's flat search reached about half the machine's matmul rate on large batches
        (measured at N = 1M, d = 512, B = 1024: 85 GFLOP/s of 163); blocked torch GEMM reaches 114. The rows
        are read in place from the faiss index (no copy); queries go ``BLOCK_QUERIES`` at a time, so the
        score block never exceeds ``BLOCK_QUERIES x BLOCK_ROWS`` floats (256 MiB).
        """
        rows = torch.from_numpy(
            faiss.rev_swig_ptr(self.index.get_xb(), self.ntotal * self.dim).reshape(self.ntotal, self.dim)
        )
        all_scores, all_ids = [], []
        for q in torch.from_numpy(queries).split(BLOCK_QUERIES):
            best_scores = torch.full((len(q), k), -float("inf"))
            best_ids = torch.zeros((len(q), k), dtype=torch.long)
            for start in range(0, self.ntotal, BLOCK_ROWS):
                block = rows[start : start + BLOCK_ROWS]
                block_scores, block_ids = (q @ block.T).topk(min(k, len(block)), dim=1)
                scores = torch.cat([best_scores, block_scores], dim=1)
                ids = torch.cat([best_ids, block_ids + start], dim=1)
                best_scores, order = scores.topk(k, dim=1)
                best_ids = ids.gather(1, order)
            all_scores.append(best_scores)
            all_ids.append(best_ids)
        return torch.cat(all_scores).numpy(), torch.cat(all_ids).numpy()

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
