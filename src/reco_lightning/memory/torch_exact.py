"""Exact inner-product search by torch matmul + top-k, on the device the rows are copied to (GPU or CPU).

Why: faiss-gpu wheels carry CUDA 12 runtimes of their own (``faiss-gpu-cu12`` is 46 MiB before cuBLAS and
does not match a CUDA 13 torch), while torch, which every install of this package has, already drives the
GPU the model runs on. A memory whose rows fit in GPU memory (1M x 512 float32: 2 GiB per modality) is
then searched exactly by one blocked GEMM and a running top-k, without faiss.

Like ``exact_mmap``, the saved index records only the row count: the rows are the store's (``attach``),
copied once to ``device`` in ``dtype``. ``add`` keeps the rows too, so a backend used on its own
(``add`` then ``search``) works without a store. Registered as ``torch_exact``
(``reco memory build --backend torch_exact``; ``memory_search_params={"device": "cuda"}`` to search on a GPU).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from reco_lightning.errors import RecoMemoryError
from reco_lightning.memory.base import MemoryBackend, register_backend

__all__ = ["SCORE_BLOCK_ELEMENTS", "TorchExactBackend", "exact_topk"]

#: Score-block budget (queries x rows, in elements) of one GEMM: 2**28 float32 scores are 1 GiB.
SCORE_BLOCK_ELEMENTS = 1 << 28
_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def exact_topk(
    queries: Tensor, rows: Tensor, k: int, block_elements: int = SCORE_BLOCK_ELEMENTS
) -> tuple[Tensor, Tensor]:
    """Exact top-``k`` inner products of ``queries`` [B, d] against ``rows`` [N, d], best first.

    Rows are scanned in blocks so a score block holds at most ``block_elements`` values, with a running
    top-k; queries are cast to the rows' dtype and scores are compared in that dtype (float32 rows: float32
    scores; float16 rows: what a half-precision GEMM gives). Autocast is switched off: a search called
    inside a bf16-mixed training step must not silently run in bf16.
    """
    count = rows.shape[0]
    k = min(k, count)
    block = min(count, max(k, block_elements // max(1, queries.shape[0])))
    with torch.autocast(device_type=rows.device.type, enabled=False):
        q = queries.to(device=rows.device, dtype=rows.dtype)
        best_scores = best_ids = None
        for start in range(0, count, block):
            scores, ids = (q @ rows[start : start + block].T).topk(min(k, count - start), dim=1)
            ids = ids + start
            if best_scores is not None:
                scores, order = torch.cat([best_scores, scores], dim=1).topk(k, dim=1)
                ids = torch.cat([best_ids, ids], dim=1).gather(1, order)
            best_scores, best_ids = scores, ids
    return best_scores, best_ids


@register_backend("torch_exact")
class TorchExactBackend(MemoryBackend):
    """Brute-force search with torch on ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``); recall 1.0 in
    float32 (at the process's float32 matmul precision: TF32, if enabled, rounds the scores).

    Args:
        dim: embedding dimension.
        device: where the rows live and the GEMM runs; ``"cuda"`` is the current CUDA device when the
            rows are copied (the rank's own GPU under DDP). A search-time argument: a saved memory opens
            on any device (``memory_search_params={"device": "cuda"}``).
        dtype: the rows' precision on the device: ``float32`` (exact), ``float16``/``bfloat16`` (half the
            memory, approximate scores), ``float64`` (a reference).
    """

    name: ClassVar[str] = "torch_exact"
    search_args = frozenset({"device", "dtype"})
    _warned_no_cuda: ClassVar[bool] = False

    def __init__(self, dim: int, device: str = "cpu", dtype: str = "float32") -> None:
        super().__init__(dim)
        if dtype not in _DTYPES:
            raise RecoMemoryError(f"torch_exact dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        try:
            kind = torch.device(str(device)).type
        except RuntimeError as err:
            raise RecoMemoryError(f"torch_exact device {device!r} is not a torch device ({err})") from err
        if kind == "cuda" and not torch.cuda.is_available():
            raise RecoMemoryError(
                f"torch_exact device {device!r}: torch sees no CUDA device here; search on 'cpu' (the default)"
            )
        self.device_name, self.dtype_name = str(device), dtype
        self._count = 0
        self._chunks: list[Tensor] = []
        self._rows: Tensor | None = None

    # --- building -------------------------------------------------------------------------------------
    def add(self, vectors: np.ndarray) -> None:
        vectors = self._check(vectors, "vectors")
        self._chunks.append(self._to_rows(vectors))
        self._count += len(vectors)

    def attach(self, rows: np.ndarray) -> None:
        """Search the store's rows (copied to ``device`` in ``dtype``) instead of any added ones."""
        if rows.ndim != 2 or rows.shape[1] != self.dim or len(rows) != self._count:
            raise RecoMemoryError(
                f"torch_exact needs the store's [{self._count}, {self.dim}] rows, got {tuple(rows.shape)}: "
                "attach the store this index was built from"
            )
        self._chunks = []
        self._rows = None  # free the old copy before making the new one
        self._rows = self._to_rows(rows)

    def _to_rows(self, rows: np.ndarray) -> Tensor:
        with warnings.catch_warnings():  # a read-only memmap: only read
            warnings.simplefilter("ignore", UserWarning)
            host = torch.from_numpy(np.ascontiguousarray(rows))
        return host.to(device=self.device, dtype=_DTYPES[self.dtype_name])

    @property
    def device(self) -> torch.device:
        device = torch.device(self.device_name)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return device

    # --- searching ------------------------------------------------------------------------------------
    def rows(self) -> Tensor:
        """The searched rows [N, dim] on ``device`` (added chunks are concatenated once, on first use)."""
        if self._rows is None:
            if not self._chunks:
                raise RecoMemoryError(
                    "torch_exact has no rows: add vectors, or attach the store's rows after loading"
                )
            self._rows = torch.cat(self._chunks) if len(self._chunks) > 1 else self._chunks[0]
            self._chunks = []
        return self._rows

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        self._check_k(k)
        queries = self._check(queries, "queries")
        scores, ids = exact_topk(
            torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)), self.rows(), k
        )
        return scores.float().cpu().numpy(), ids.cpu().numpy().astype(np.int64, copy=False)

    def to_device(self, device: int | None) -> None:
        """Move the rows to CUDA device ``device`` (``None``: to the CPU); warn once without CUDA."""
        if device is not None and not torch.cuda.is_available():
            if not TorchExactBackend._warned_no_cuda:
                warnings.warn(
                    "torch sees no CUDA device: torch_exact memory search stays on CPU", stacklevel=2
                )
                TorchExactBackend._warned_no_cuda = True
            return
        self.device_name = "cpu" if device is None else f"cuda:{int(device)}"
        if self._rows is not None:
            self._rows = self._rows.to(self.device)
        self._chunks = [chunk.to(self.device) for chunk in self._chunks]

    # --- persistence and accounting -------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        return self._count

    def nbytes(self) -> int:
        """Bytes of the rows' copy on ``device`` (nothing on disk: the store holds the rows)."""
        return self._count * self.dim * _DTYPES[self.dtype_name].itemsize

    def init_args(self) -> dict[str, Any]:
        return {"dtype": self.dtype_name}  # not the device: a saved memory opens on any machine

    def _save_index(self, path: Path) -> None:
        path.write_text(json.dumps({"ntotal": self._count}))

    def _load_index(self, path: Path) -> None:
        self._count = int(json.loads(path.read_text())["ntotal"])
