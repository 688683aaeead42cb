"""Re-index a memory's rows without re-encoding them: ``reco memory index``.

Three ways: build a backend in one step (any backend, ``stage="all"``); build an ``ivfpq_ondisk`` index in
stages and shards on many processes or machines (:class:`~reco_lightning.memory.ondisk.ShardedIndexBuild`);
or adopt an index built elsewhere over the same rows in the same order (autofaiss's distributed mode, a
faiss index from another pipeline), checked against the memory before it is used. Each modality's index
directory is swapped in whole, then the manifest records the new backend.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reco_lightning.atomic import replace_directory
from reco_lightning.errors import RecoMemoryError
from reco_lightning.memory.base import DEFAULT_TRAIN_SIZE, backend_from_spec, check_buildable
from reco_lightning.memory.ondisk import PLAN_FILE, OnDiskIVFPQBackend, ShardedIndexBuild
from reco_lightning.memory.store import MemoryStore, record_backend

__all__ = ["STAGES", "adopt_index", "index_memory"]


STAGES = ("all", "train", "shard", "merge")


def index_memory(
    memory_dir: str | os.PathLike,
    backend: str | dict[str, Any] | None = None,
    stage: str = "all",
    shard: int | None = None,
    num_shards: int | None = None,
    modalities: tuple[str, ...] = ("image", "text"),
    train_size: int | None = DEFAULT_TRAIN_SIZE,
    seed: int = 0,
) -> dict[str, Any]:
    """(Re-)index a complete memory's rows with ``backend`` without re-encoding: ``reco memory index``.

    ``ivfpq_ondisk`` goes stage by stage (see the module's docstring): ``train`` once, ``shard`` per process
    (``shard=i`` of ``num_shards``; ``None``: every shard not yet built), ``merge`` once; ``all`` runs the
    three here. Work lives in ``<memory>/.index_build/<modality>``; the merge swaps each modality's index
    directory in whole and then records the new backend in the manifest. Other backends build in one step
    (``stage="all"``). Returns what the stage did, for the command's summary.

    ``backend=None``: ``ivfpq_ondisk``, or for the ``shard`` and ``merge`` stages the spec the ``train``
    stage recorded (with its ``num_shards`` when not given, and its ``train_size`` and ``seed``, which only
    training reads), so later stages need only the memory and the stage.
    """
    if stage not in STAGES:
        raise RecoMemoryError(f"unknown stage {stage!r}: use one of {list(STAGES)}")
    store = MemoryStore.open(memory_dir, load_indexes=False)
    root = Path(memory_dir)
    started = _started_plan(root, modalities) if stage in ("shard", "merge") else None
    if started is not None:
        backend = started["spec"] if backend is None else backend
        num_shards = started["num_shards"] if num_shards is None else num_shards
        train_size, seed = started["train_size"], started["seed"]
    backend = "ivfpq_ondisk" if backend is None else backend
    dim = store.dim
    check_buildable(backend)
    probe = backend_from_spec(backend, dim)
    if not isinstance(probe, OnDiskIVFPQBackend):
        if stage != "all" or shard is not None:
            raise RecoMemoryError(
                f"only 'ivfpq_ondisk' builds in stages and shards; {type(probe).__name__} builds with --stage all"
            )
        spec = None
        for modality in modalities:
            index = backend_from_spec(backend, dim)
            rows = store.embeddings(modality)  # type: ignore[arg-type]
            _swap_index(
                root, modality, lambda fresh, i=index, r=rows: i.build_saved(r, fresh, train_size, seed)
            )
            spec = index.spec()
        record_backend(root, spec)
        return {"stage": "all", "modalities": list(modalities)}
    done: dict[str, Any] = {"stage": stage, "modalities": list(modalities), "shards": {}}
    builds = {
        m: ShardedIndexBuild(
            store.embeddings(m),  # type: ignore[arg-type]
            root / ".index_build" / m,
            backend,
            num_shards=num_shards,
            train_size=train_size,
            seed=seed,
        )
        for m in modalities
    }
    for modality, build in builds.items():
        if stage in ("all", "train"):
            build.train()
        if stage in ("all", "shard"):
            todo = build.missing_shards() if shard is None else [shard]
            for s in todo:
                build.build_shard(s)
            done["shards"][modality] = todo
        done["num_shards"] = build.num_shards
    if stage in ("all", "merge"):
        spec = None
        for modality, build in builds.items():
            spec = build.merge(root / f"index_{modality}").spec()
        record_backend(root, spec)
        shutil.rmtree(root / ".index_build", ignore_errors=True)
    return done


def _started_plan(root: Path, modalities: tuple[str, ...]) -> dict[str, Any] | None:
    """The plan a ``train`` stage recorded under ``root/.index_build`` (the first modality's found), or None."""
    for modality in modalities:
        path = root / ".index_build" / modality / PLAN_FILE
        if path.is_file():
            return json.loads(path.read_text())
    return None


def adopt_index(
    memory_dir: str | os.PathLike,
    indexes: dict[str, str | os.PathLike],
    backend: str | dict[str, Any] = "autofaiss",
) -> dict[str, Any]:
    """Make faiss index files built elsewhere a memory's indexes: ``{"image": path, "text": path}``.

    For indexes built outside the package over this memory's rows in this memory's order, e.g. by
    autofaiss's distributed (pyspark) mode over the ``reco memory export`` of it: ``backend`` says how the
    package searches them (``autofaiss``: any faiss index, search-time ``nprobe`` applied where it has
    inverted lists; ``ivfpq``: an IVF-PQ of inner-product codes, re-ranked from the rows). Each file is
    loaded by that backend and refused unless it holds the memory's row count at its dim; then saved into the
    memory like a built one. The rows are not compared: that the file indexes these rows is the caller's word.
    """
    store = MemoryStore.open(memory_dir, load_indexes=False)
    root = Path(memory_dir)
    unknown = set(indexes) - {"image", "text"}
    if unknown or not indexes:
        raise RecoMemoryError(f"indexes to adopt are named 'image' and/or 'text', got {sorted(indexes)}")
    spec = None
    for modality, path in indexes.items():
        path = Path(path)
        if not path.is_file():
            raise RecoMemoryError(f"index file {path} does not exist")
        index = backend_from_spec(backend, store.dim)
        try:
            index._load_index(path)
        except Exception as err:  # faiss's C++ errors, a backend's layout check
            raise RecoMemoryError(f"{path} cannot be read as a {type(index).__name__} index: {err}") from err
        if index.ntotal != len(store) or index.dim != store.dim:
            raise RecoMemoryError(
                f"{path} indexes {index.ntotal} vectors but memory {root} has {len(store)} {modality} rows of dim "
                f"{store.dim}: build the index over this memory's rows (e.g. from `reco memory export {root}`)"
            )
        _swap_index(root, modality, index.save)
        spec = index.spec()
    record_backend(root, spec)
    return {"adopted": sorted(indexes), "backend": spec}


def _swap_index(root: Path, modality: str, write: Callable[[Path], object]) -> None:
    """``write(fresh)`` fills a new index directory beside the memory's, which then replaces it in whole."""
    fresh = root / f".index_{modality}.new"
    shutil.rmtree(fresh, ignore_errors=True)
    write(fresh)
    replace_directory(fresh, root / f"index_{modality}")
