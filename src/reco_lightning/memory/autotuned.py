"""An index chosen and tuned by autofaiss from a memory budget and a query-time budget.

autofaiss picks the index type (Flat / HNSW / IVF / OPQ+IVF+PQ) that fits ``max_index_memory_usage`` for the
number of vectors, trains and fills it, then searches for the probe setting that answers a single query
within ``max_index_query_time_ms``. It needs every vector up front (the choice depends on N), so ``add`` only
accumulates until the index is first needed; after that, adds go straight into the built index.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import psutil

from reco_lightning.errors import RecoMemoryError
from reco_lightning.memory.base import MemoryBackend, register_backend
from reco_lightning.memory.gpu import index_to_cpu, index_to_gpu

__all__ = ["AutofaissBackend"]

_EXTRA = (
    "autofaiss 2.18 needs numpy<2 and faiss-cpu<1.14, so it lives in its own environment: "
    "pip install 'reco-lightning[autofaiss]' there (here: make install-autofaiss), or use --backend ivfpq"
)
_INSTALL_HINT = f"the autofaiss backend cannot build here: autofaiss is not installed ({_EXTRA})"


def require_autofaiss(index_key: str | None) -> None:
    """Refuse, in one line naming the extra, a build that cannot work in this environment: autofaiss
    missing, or faiss >= 1.14 where autofaiss may choose an OPQ index (``OPQMatrix(M=...)`` fails there)."""
    try:
        import autofaiss  # noqa: F401
    except ImportError as err:
        raise RecoMemoryError(_INSTALL_HINT) from err
    version = tuple(int(part) for part in faiss.__version__.split(".")[:2] if part.isdigit())
    if version >= (1, 14) and (index_key is None or "OPQ" in index_key):
        raise RecoMemoryError(
            f"the autofaiss backend cannot build here: faiss {faiss.__version__} breaks autofaiss's OPQ indexes "
            f"({'it may choose one' if index_key is None else index_key}); {_EXTRA}, or give an index_key "
            "without OPQ"
        )


@register_backend("autofaiss")
class AutofaissBackend(MemoryBackend):
    """Budget-driven index: give memory and latency limits instead of index parameters.

    After a build, ``index_key``/``index_param`` hold autofaiss's choice and ``metrics`` what it measured
    (size, single-query latency, reconstruction error); all three are recorded by ``init_args`` so the
    manifest documents the index and a rebuild from it reproduces the same index type and search setting.
    ``nprobe`` overrides the tuned probe count where the chosen index has inverted lists.
    """

    search_args = frozenset({"nprobe", "index_param"})

    def __init__(
        self,
        dim: int,
        max_index_memory_usage: str = "4G",
        max_index_query_time_ms: float = 10.0,
        min_nearest_neighbors_to_retrieve: int = 20,
        index_key: str | None = None,
        nprobe: int | None = None,
        index_param: str | None = None,
        metrics: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(dim)
        if max_index_query_time_ms <= 0:
            raise RecoMemoryError(f"autofaiss max_index_query_time_ms={max_index_query_time_ms} must be > 0")
        if min_nearest_neighbors_to_retrieve < 1:
            raise RecoMemoryError(
                f"autofaiss min_nearest_neighbors_to_retrieve={min_nearest_neighbors_to_retrieve} must be >= 1"
            )
        if nprobe is not None and nprobe < 1:
            raise RecoMemoryError(f"autofaiss nprobe={nprobe} must be >= 1, or None to keep the tuned value")
        self.max_index_memory_usage = str(max_index_memory_usage)
        self.max_index_query_time_ms = float(max_index_query_time_ms)
        self.min_nearest_neighbors_to_retrieve = int(min_nearest_neighbors_to_retrieve)
        self.index_key = index_key
        self.nprobe = None if nprobe is None else int(nprobe)
        self.index_param = index_param
        self.metrics: dict[str, Any] | None = dict(metrics) if metrics else None
        self.index: faiss.Index | None = None
        self._pending: list[np.ndarray] = []

    # --- building -------------------------------------------------------------------------------------
    @classmethod
    def check_buildable(cls, index_key: str | None = None, **init_args: Any) -> None:
        require_autofaiss(index_key)

    def train(self, vectors: np.ndarray) -> None:
        """No-op: autofaiss draws its own training sample from all added vectors when it builds."""
        self._check(vectors, "training vectors")

    def add(self, vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(self._check(vectors, "vectors"), dtype=np.float32)
        if self.index is None:
            self._pending.append(vectors.copy())
        else:
            self.index.add(vectors)

    def build(self, vectors: np.ndarray, train_size: int | None = None, seed: int = 0) -> None:
        """Let autofaiss choose, train and fill the index from all of ``vectors`` in one call.

        ``train_size``/``seed`` are ignored: autofaiss sizes its training sample from the index it picks.
        """
        vectors = self._check(vectors, "vectors")
        if self.index is not None or self._pending:
            self.add(vectors)
            self._ensure_built()
        else:
            self._build_from(np.ascontiguousarray(vectors, dtype=np.float32))

    def _ensure_built(self) -> faiss.Index:
        if self.index is None:
            if not self._pending:
                raise RecoMemoryError(
                    "autofaiss index has no vectors: add() or build() at least one before use"
                )
            vectors = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
            self._pending = []
            self._build_from(vectors)
        assert self.index is not None
        return self.index

    def _build_from(self, vectors: np.ndarray) -> None:
        require_autofaiss(self.index_key)
        import autofaiss

        n = len(vectors)
        with _quiet_autofaiss() as messages:
            try:
                index, metrics = autofaiss.build_index(
                    embeddings=vectors,
                    index_path=None,
                    index_infos_path=None,
                    save_on_disk=False,
                    index_key=self.index_key,
                    index_param=self.index_param,
                    max_index_query_time_ms=self.max_index_query_time_ms,
                    max_index_memory_usage=self.max_index_memory_usage,
                    min_nearest_neighbors_to_retrieve=self.min_nearest_neighbors_to_retrieve,
                    current_memory_available=_available_memory(),
                    metric_type="ip",
                    verbose=logging.ERROR,
                )
            except IndexError as err:
                # autofaiss indexes its (empty) list of candidate index keys when no key fits the budget.
                index, metrics = None, None
                messages.append(f"no candidate index type fits this budget ({type(err).__name__}: {err})")
        if index is None:
            detail = f" (autofaiss: {'; '.join(messages)})" if messages else ""
            raise RecoMemoryError(
                f"no index fits max_index_memory_usage={self.max_index_memory_usage} for {n} vectors of dim "
                f"{self.dim}: raise max_index_memory_usage or max_index_query_time_ms{detail}"
            )
        self.index = index
        self.index_key = str(metrics.get("index_key", self.index_key)) if metrics else self.index_key
        self.index_param = (metrics.get("index_param") if metrics else None) or self.index_param
        self.metrics = _jsonable(
            {k: v for k, v in (metrics or {}).items() if k not in ("index_key", "index_param", "index_path")}
        )
        self._apply_search_params()

    # --- searching ------------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        self._check_k(k)
        queries = np.ascontiguousarray(self._check(queries, "queries"), dtype=np.float32)
        scores, ids = self._ensure_built().search(queries, k)
        ids = ids.astype(np.int64, copy=False)
        scores[ids < 0] = -np.inf
        return scores, ids

    def to_device(self, device: int | None) -> None:
        index = self._ensure_built()
        try:
            self.index = index_to_gpu(index, device)
        except RuntimeError as err:
            raise RecoMemoryError(
                f"faiss cannot move the autofaiss index {self.index_key!r} to GPU {device} ({err}); keep it on CPU "
                "(device=None) or rebuild with an index_key faiss-gpu supports, e.g. 'IVF4096,PQ64'"
            ) from err

    def _apply_search_params(self) -> None:
        assert self.index is not None
        if self.index_param:
            faiss.ParameterSpace().set_index_parameters(self.index, self.index_param)
        if self.nprobe is not None:
            try:
                ivf = faiss.extract_index_ivf(self.index)
            except RuntimeError:
                warnings.warn(
                    f"nprobe={self.nprobe} ignored: autofaiss chose {self.index_key!r}, which has no inverted lists",
                    stacklevel=3,
                )
            else:
                ivf.nprobe = self.nprobe

    # --- persistence and accounting -------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        built = int(self.index.ntotal) if self.index is not None else 0
        return built + sum(len(p) for p in self._pending)

    def nbytes(self) -> int:
        """Serialised size of the built index (what autofaiss compares with the memory budget)."""
        return len(faiss.serialize_index(index_to_cpu(self._ensure_built())))

    def init_args(self) -> dict[str, Any]:
        return {
            "max_index_memory_usage": self.max_index_memory_usage,
            "max_index_query_time_ms": self.max_index_query_time_ms,
            "min_nearest_neighbors_to_retrieve": self.min_nearest_neighbors_to_retrieve,
            "index_key": self.index_key,
            "nprobe": self.nprobe,
            "index_param": self.index_param,
            "metrics": self.metrics,
        }

    def _save_index(self, path: Path) -> None:
        faiss.write_index(index_to_cpu(self._ensure_built()), str(path))

    def _load_index(self, path: Path) -> None:
        index = faiss.read_index(str(path))
        if index.d != self.dim:
            raise ValueError(f"index dim {index.d} != {self.dim}")
        self.index = index
        self._pending = []
        self._apply_search_params()


@contextlib.contextmanager
def _quiet_autofaiss() -> Iterator[list[str]]:
    """Mute autofaiss's INFO logs and progress bars, collect its error lines, undo its logging set-up.

    ``autofaiss.build_index`` calls ``logging.basicConfig``, which would install a handler and level on the
    application's root logger; the root logger's handlers and level are restored on exit.
    """
    root, logger = logging.getLogger(), logging.getLogger("autofaiss")
    saved_root = (root.level, list(root.handlers))
    saved_logger = (logger.level, logger.propagate, list(logger.handlers))
    messages: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger.handlers = [_Collect(level=logging.ERROR)]
    logger.setLevel(logging.ERROR)
    logger.propagate = False
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # embedding-reader's tqdm bars
            yield messages
    finally:
        root.setLevel(saved_root[0])
        root.handlers = saved_root[1]
        logger.setLevel(saved_logger[0])
        logger.propagate = saved_logger[1]
        logger.handlers = saved_logger[2]


def _available_memory() -> str:
    """autofaiss refuses budgets above 90% of the memory it is told about; tell it what is really free."""
    return f"{max(1, psutil.virtual_memory().available // 2**20)}M"


def _jsonable(metrics: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, np.generic):
            value = value.item()
        out[key] = value if isinstance(value, str | int | float | bool) or value is None else str(value)
    return out
