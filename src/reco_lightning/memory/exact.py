"""Exact inner-product search (faiss flat): the reference every approximate backend is measured against."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from reco_lightning.memory.base import MemoryBackend, register_backend
from reco_lightning.memory.gpu import index_to_cpu, index_to_gpu

__all__ = ["ExactBackend"]


@register_backend("exact")
class ExactBackend(MemoryBackend):
    """Brute-force search; 4 bytes x dim per vector, recall 1.0, cost linear in the memory size."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.index: faiss.Index = faiss.IndexFlatIP(self.dim)

    def add(self, vectors: np.ndarray) -> None:
        self.index.add(np.ascontiguousarray(self._check(vectors, "vectors"), dtype=np.float32))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        self._check_k(k)
        queries = np.ascontiguousarray(self._check(queries, "queries"), dtype=np.float32)
        scores, ids = self.index.search(queries, k)
        return scores, ids.astype(np.int64, copy=False)

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
