"""The MemoryBackend interface: a k-NN index over one modality of a memory.

Row ids returned by a backend are positions in the memory store (row i of every store file is pair i),
so a backend never needs to know about captions, pairs or the other modality. Backends are chosen by
class path (``reco_lightning.memory.IVFPQBackend``) or by a registered short name (``ivfpq``), so users
can plug in their own by subclassing and pointing the YAML at their class.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import tempfile
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from reco_lightning.arrays import release_pages
from reco_lightning.atomic import atomic_write_text
from reco_lightning.errors import RecoMemoryError

__all__ = [
    "BACKENDS",
    "DEFAULT_TRAIN_SIZE",
    "MemoryBackend",
    "backend_class",
    "backend_from_spec",
    "check_buildable",
    "recorded_spec",
    "register_backend",
    "training_sample",
]

#: Rows sampled to train an index's quantisers, the same for every way a memory is built (the API, `reco
#: memory build`): an IVF's derived nlist depends on it (at 1M: 4096 lists from 200k, 2048 from 100k).
DEFAULT_TRAIN_SIZE = 200_000
#: Rows read at a time when a backend is built from (possibly memory-mapped) rows.
_BLOCK = 65_536

BACKENDS: dict[str, type[MemoryBackend]] = {}

# (backend class, ignored names) already warned about: a memory opens two indexes, and one config may open
# many memories; the user needs to read it once.
_WARNED_IGNORED: set[tuple[type, tuple[str, ...]]] = set()


def register_backend(name: str) -> Callable[[type[MemoryBackend]], type[MemoryBackend]]:
    """Class decorator: make a backend selectable by a short name in configs and manifests."""

    def wrap(cls: type[MemoryBackend]) -> type[MemoryBackend]:
        cls.name = name
        BACKENDS[name] = cls
        return cls

    return wrap


def backend_class(name_or_path: str) -> type[MemoryBackend]:
    """Resolve a registered short name or a dotted class path to a MemoryBackend subclass."""
    if name_or_path in BACKENDS:
        return BACKENDS[name_or_path]
    module_name, _, attr = name_or_path.rpartition(".")
    if not module_name:
        raise RecoMemoryError(
            f"unknown memory backend {name_or_path!r}: use one of {sorted(BACKENDS)} or a class path like "
            "'my_pkg.my_module.MyBackend'"
        )
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise RecoMemoryError(f"cannot import memory backend {name_or_path!r}: {err}") from err
    if not (isinstance(cls, type) and issubclass(cls, MemoryBackend)):
        raise RecoMemoryError(f"{name_or_path!r} is not a MemoryBackend subclass")
    return cls


def check_buildable(spec: str | dict[str, Any] | MemoryBackend) -> None:
    """Refuse, before any encoding, a backend spec this environment cannot build (see
    :meth:`MemoryBackend.check_buildable`); an instance is already built or buildable."""
    if isinstance(spec, MemoryBackend):
        return
    if isinstance(spec, str):
        backend_class(spec).check_buildable()
    elif "class_path" in spec:
        backend_class(spec["class_path"]).check_buildable(**dict(spec.get("init_args") or {}))


def backend_from_spec(spec: str | dict[str, Any] | MemoryBackend, dim: int) -> MemoryBackend:
    """Build a backend from a name, ``{"class_path": ..., "init_args": {...}}``, or pass an instance through."""
    if isinstance(spec, MemoryBackend):
        return spec
    if isinstance(spec, str):
        return backend_class(spec)(dim=dim)
    if "class_path" not in spec:
        raise RecoMemoryError(
            f"backend spec {spec!r} needs a 'class_path' (a name like 'exact' or a class path)"
        )
    return backend_class(spec["class_path"])(dim=dim, **dict(spec.get("init_args") or {}))


def recorded_spec(directory: str | os.PathLike) -> dict[str, Any]:
    """The spec a saved index records in ``directory/backend.json`` (class path, init_args, derived, tuned)."""
    meta = json.loads((Path(directory) / "backend.json").read_text())
    return {key: value for key, value in meta.items() if key not in ("dim", "ntotal")}


def training_sample(vectors: np.ndarray, train_size: int | None, seed: int = 0) -> np.ndarray:
    """``train_size`` rows of ``vectors`` drawn by ``seed``, as float32 (all rows if None or more).

    The one sampling rule of every build (in RAM or sharded), so the same rows train the same quantisers;
    gathered block by block, releasing a memmap's pages as it goes.
    """
    count = len(vectors)
    if train_size is None or train_size >= count:
        sample = np.ascontiguousarray(vectors, dtype=np.float32)  # no copy of rows already float32 in RAM
        release_pages(vectors)
        return sample
    picked = np.sort(np.random.default_rng(seed).choice(count, train_size, replace=False))
    sample = np.empty((len(picked), vectors.shape[1]), dtype=np.float32)
    for lo in range(0, len(picked), _BLOCK):
        sample[lo : lo + _BLOCK] = vectors[picked[lo : lo + _BLOCK]]
        release_pages(vectors)
    return sample


class MemoryBackend(ABC):
    """k-NN search by inner product over L2-normalised float32 vectors.

    Lifecycle: ``train(sample)`` (no-op for indexes that need none) -> ``add(vectors)`` in chunks ->
    ``save(dir)``; later ``load(dir)`` -> optional ``attach(store_rows)`` / ``to_device(...)`` ->
    ``search(queries, k)``.
    """

    name: ClassVar[str] = "base"
    #: Constructor arguments that only change how a built index is searched, so ``load`` (and a model's
    #: ``memory_search_params``) may override them. ``None``: every keyword argument of ``__init__``.
    search_args: ClassVar[frozenset[str] | None] = None

    @classmethod
    def check_buildable(cls, **init_args: Any) -> None:
        """Raise :class:`RecoMemoryError` (one line, naming the fix) if this environment cannot build such
        an index; called before a build starts encoding. Opening a built index never calls it."""
        return None

    def __init__(self, dim: int) -> None:
        if dim <= 0:
            raise RecoMemoryError(f"backend dim must be positive, got {dim}")
        self.dim = int(dim)

    # --- building -------------------------------------------------------------------------------------
    @property
    def needs_training(self) -> bool:
        """Whether ``train`` must see data before ``add`` (IVF/PQ quantisers)."""
        return False

    def train(self, vectors: np.ndarray) -> None:  # noqa: B027 - intentional no-op default
        """Fit quantisers on a sample of the vectors that will be added."""

    @abstractmethod
    def add(self, vectors: np.ndarray) -> None:
        """Append rows; their ids continue from ``ntotal``."""

    def build(self, vectors: np.ndarray, train_size: int | None = DEFAULT_TRAIN_SIZE, seed: int = 0) -> None:
        """Train on a sample of ``train_size`` rows (all if None) when needed, then add them all in chunks.

        Quantiser k-means barely improves past a few 100k points and costs minutes per extra 100k on CPU.
        """
        vectors = self._check(vectors, "vectors")
        if self.needs_training:
            self.train(training_sample(vectors, train_size, seed))
        for start in range(0, len(vectors), _BLOCK):
            self.add(np.ascontiguousarray(vectors[start : start + _BLOCK], dtype=np.float32))
            release_pages(vectors)  # a memmap's pages read so far leave this process's RSS

    def build_saved(
        self,
        rows: np.ndarray,
        directory: str | os.PathLike,
        train_size: int | None = DEFAULT_TRAIN_SIZE,
        seed: int = 0,
    ) -> None:
        """``build(rows)`` then ``save(directory)``: how a memory indexes its rows.

        A backend that can build out of core (``ivfpq_ondisk``: shard by shard, resumable) overrides it.
        """
        self.build(rows, train_size=train_size, seed=seed)
        self.save(directory)

    # --- searching ------------------------------------------------------------------------------------
    @abstractmethod
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Return (scores float32 [B, k], row ids int64 [B, k]), best first.

        Where fewer than k vectors are found the id is -1 (its score is meaningless; -inf by convention).
        """

    def attach(self, rows: np.ndarray) -> None:  # noqa: B027 - intentional no-op default
        """Give read access to the store's full-precision rows (fp16 memmap) for exact re-ranking."""

    def to_device(self, device: int | None) -> None:  # noqa: B027 - CPU-only backends ignore it
        """Move the index to GPU ``device`` (an int) when faiss has GPUs; ``None`` keeps it on CPU."""

    # --- persistence and accounting -------------------------------------------------------------------
    @property
    @abstractmethod
    def ntotal(self) -> int:
        """Number of vectors in the index."""

    @abstractmethod
    def nbytes(self) -> int:
        """Bytes the index itself occupies (not counting the store's fp16 rows)."""

    @abstractmethod
    def _save_index(self, path: Path) -> None:
        """Write the index to the file ``path``."""

    @abstractmethod
    def _load_index(self, path: Path) -> None:
        """Read the index from the file ``path`` into this (freshly constructed) backend."""

    def init_args(self) -> dict[str, Any]:
        """Constructor arguments (besides dim) that rebuild this backend; recorded in the manifest."""
        return {}

    def spec(self) -> dict[str, Any]:
        cls = type(self)
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": self.init_args()}

    def save(self, directory: str | os.PathLike) -> None:
        """Write ``index.faiss`` + ``backend.json`` into ``directory`` atomically (temp file, then rename)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".index.", suffix=".tmp")
        os.close(fd)
        try:
            self._save_index(Path(tmp))
            os.chmod(tmp, 0o644)
            os.replace(tmp, directory / "index.faiss")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        meta = {**self.spec(), "dim": self.dim, "ntotal": self.ntotal}
        atomic_write_text(directory / "backend.json", json.dumps(meta, indent=2))

    @classmethod
    def load(cls, directory: str | os.PathLike, **overrides: Any) -> MemoryBackend:
        """Rebuild the backend recorded in ``directory/backend.json``; ``overrides`` change search-time args."""
        directory = Path(directory)
        meta_path, index_path = directory / "backend.json", directory / "index.faiss"
        for p in (meta_path, index_path):
            if not p.is_file():
                raise RecoMemoryError(f"missing index file {p}: rebuild the memory with `reco memory build`")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as err:
            raise RecoMemoryError(f"corrupt {meta_path}: {err}; rebuild the memory") from err
        klass = backend_class(meta["class_path"]) if cls is MemoryBackend else cls
        backend = klass(
            dim=meta["dim"], **{**meta.get("init_args", {}), **klass.usable_search_args(overrides)}
        )
        try:
            backend._load_index(index_path)
        except Exception as err:  # faiss raises RuntimeError with C++ text on truncated files
            raise RecoMemoryError(
                f"cannot read index {index_path} ({err}); the file is truncated or corrupt, rebuild it"
            ) from err
        if backend.ntotal != meta["ntotal"]:
            raise RecoMemoryError(
                f"{index_path} holds {backend.ntotal} vectors but {meta_path} records {meta['ntotal']}: rebuild it"
            )
        return backend

    @classmethod
    def usable_search_args(cls, overrides: dict[str, Any]) -> dict[str, Any]:
        """The ``overrides`` this backend understands; the rest are dropped with one warning per process.

        Why: one config's ``memory_search_params`` (e.g. ``{nprobe: 64}``) must open an exact memory as
        well as an IVF one, so a memory swap never needs a config edit.
        """
        known = cls.search_args
        if known is None:
            params = inspect.signature(cls.__init__).parameters.values()
            if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
                return dict(overrides)
            known = frozenset(p.name for p in params if p.name not in ("self", "dim"))
        ignored = tuple(sorted(set(overrides) - known))
        if ignored and (cls, ignored) not in _WARNED_IGNORED:
            _WARNED_IGNORED.add((cls, ignored))
            warnings.warn(
                f"memory search params {list(ignored)} ignored: the {cls.name!r} backend ({cls.__qualname__}) "
                f"understands {sorted(known) or 'none'}",
                stacklevel=3,
            )
        return {key: value for key, value in overrides.items() if key in known}

    # --- helpers --------------------------------------------------------------------------------------
    def _check(self, x: np.ndarray, what: str) -> np.ndarray:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise RecoMemoryError(f"{what} must have shape [n, {self.dim}], got {tuple(x.shape)}")
        return x

    def _check_k(self, k: int) -> None:
        if self.ntotal == 0:
            raise RecoMemoryError("cannot search an empty memory: build it from at least one image-text pair")
        if not 0 < k <= self.ntotal:
            raise RecoMemoryError(
                f"k={k} but the memory holds {self.ntotal} vectors: use 0 < k <= {self.ntotal}"
            )
