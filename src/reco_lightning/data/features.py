"""Feature caches: frozen CLIP embeddings and memory neighbour rows of every training pair, precomputed.

CLIP is frozen and the memory fixed, so for a given (backbone, data, memory, k, search) the embeddings
and neighbour ids of a pair never change. Computing them once (through ``Trainer.predict``, so on every
device) turns a fusion training step into: read rows, gather k memory rows per query, run the fusion.

Layout (row i of every file is pair i, in source order)::

    manifest.json          what the cache was computed from; a mismatch with the model is refused
    image_emb.npy          float16 [N, dim]
    text_emb.npy           float16 [N, dim]
    ids.npy                int64 [N] pair ids
    image_neighbours.npy   int64 [N, k] memory rows found for the image query (-1: excluded, none left)
    text_neighbours.npy    int64 [N, k] memory rows found for the text query

This module is the cache's format and its reading side (the data stage of training); computing a cache is
a job of its own, :mod:`reco_lightning.jobs.feature_cache`. The data side never looks at the model: what
the model contributes to a cache's requirements is handed to it as plain values.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from reco_lightning.arrays import LayoutError, open_array, read_manifest
from reco_lightning.data.ranks import batch_count, share
from reco_lightning.data.sources import open_source

__all__ = [
    "FORMAT",
    "CachedPairs",
    "FeatureCacheError",
    "cached_loader",
    "feature_requirements",
    "open_feature_cache",
]

FORMAT = "reco-features"


class FeatureCacheError(RuntimeError):
    """A feature cache that is missing, incomplete, or computed for another model, data or memory."""


def feature_requirements(
    model: Mapping[str, Any],
    source: str,
    image_column: str = "filepath",
    caption_column: str = "caption",
    id_column: str | None = None,
) -> dict[str, Any]:
    """Everything a cache's rows depend on; two equal dicts mean the cache is valid for the model and data.

    The source is keyed by content (a CSV's bytes; the name, size and mtime of every shard or folder
    file), not only by path, so a file regenerated in place is stale; the memory by identity and the
    search-time settings its indexes run with (nprobe, rerank); the data by the columns read from it.
    The images a CSV points to are not hashed: replace them under new names, or rebuild the cache.

    ``model`` is the model's side, as plain values: ``backbone`` (fingerprint id), ``memory`` (identity),
    ``memory_search``, ``k``, ``search``, ``near_duplicate_threshold``, ``near_duplicate_of``,
    ``exclusion_margin`` (what :meth:`reco_lightning.model.RecoModule.cache_requirements` returns).
    """
    pairs = open_source(source, image_column, caption_column, id_column)
    requirements = {
        "backbone": model["backbone"],
        "source": str(Path(source).resolve()) if os.path.exists(source) else str(source),
        "source_content": pairs.fingerprint(),
        "image_column": image_column,
        "caption_column": caption_column,
        "id_column": id_column,
        "memory": model["memory"],
        "memory_search": model["memory_search"],
        "k": model["k"],
        "search": model["search"],
        "near_duplicate_threshold": model["near_duplicate_threshold"],
        "near_duplicate_of": model["near_duplicate_of"],
        "exclusion_margin": model["exclusion_margin"],
    }
    return json.loads(json.dumps(requirements))  # as the manifest will read back (tuples become lists)


def open_feature_cache(
    path: str | os.PathLike, requirements: dict[str, Any] | None = None
) -> dict[str, np.ndarray]:
    """Memory-map a cache after checking it was computed for ``requirements`` (see feature_requirements)."""
    path = Path(path)
    try:
        manifest = read_manifest(path, FORMAT)
    except LayoutError as problem:
        manifest_path = problem.path
        if problem.problem == "missing":
            message = f"no feature cache at {path} ({manifest_path} missing): build it with `reco cache --config <same config>`"
        elif problem.problem == "corrupt":
            message = f"corrupt {manifest_path}: {problem.cause}; rebuild the cache with `reco cache`"
        else:
            message = f"{manifest_path} is not a reco feature cache"
        raise FeatureCacheError(message) from problem.cause
    if requirements is not None:
        recorded = manifest["requirements"]
        stale = {
            key: (recorded.get(key), value)
            for key, value in requirements.items()
            if recorded.get(key) != value
        }
        if stale:
            changes = "; ".join(
                f"{key}: cache has {old!r}, model needs {new!r}" for key, (old, new) in stale.items()
            )
            raise FeatureCacheError(
                f"feature cache {path} is stale ({changes}): rebuild it with `reco cache`"
            )
    count, dim, k = manifest["count"], manifest["dim"], manifest["requirements"]["k"]
    shapes = {
        "image_emb": (count, dim),
        "text_emb": (count, dim),
        "ids": (count,),
        "image_neighbours": (count, k),
        "text_neighbours": (count, k),
    }
    arrays = {}
    for name, shape in shapes.items():
        file = path / f"{name}.npy"
        try:
            arrays[name] = open_array(file, shape)
        except LayoutError as problem:
            if problem.problem == "layout":
                message = f"{file} has shape {problem.found.shape}, expected {shape}: rebuild the cache"
            else:
                message = f"cannot map {file} ({problem.cause}): the cache is incomplete, rebuild it"
            raise FeatureCacheError(message) from problem.cause
    return arrays


class CachedPairs(IterableDataset):
    """Batches of cached rows with the same rank/worker split (:mod:`reco_lightning.data.ranks`) and balance as the streaming pairs.

    Rows are visited in a seeded per-epoch permutation (random access into a memory map is cheap), so
    shuffling is global rather than buffered.
    """

    def __init__(
        self,
        arrays: dict[str, np.ndarray],
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.arrays, self.batch_size, self.shuffle, self.seed = arrays, batch_size, shuffle, seed
        self.rank, self.world_size, self.num_workers = rank, world_size, max(1, num_workers)
        self.epoch = 0
        self.count = len(arrays["ids"])
        self.per_rank = self.count // world_size
        if self.per_rank == 0:
            raise FeatureCacheError(f"the cache holds {self.count} pairs, fewer than {world_size} ranks")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rows(self, worker: int) -> np.ndarray:
        order = np.arange(self.count)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.count)
        mine = share(self.per_rank * self.world_size, self.rank, self.world_size, worker, self.num_workers)
        return order[mine.start : mine.stop : mine.step]

    def __len__(self) -> int:
        return batch_count(
            self.per_rank * self.world_size, self.rank, self.world_size, self.num_workers, self.batch_size
        )

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        rows = self._rows(info.id if info is not None else 0)
        for start in range(0, len(rows), self.batch_size):
            batch_rows = np.sort(rows[start : start + self.batch_size])  # sorted reads are faster on a memmap
            if self.shuffle:
                random.Random(f"{self.seed}:{self.epoch}:{start}").shuffle(batch_rows)
            yield {
                "image_emb": torch.from_numpy(
                    np.asarray(self.arrays["image_emb"][batch_rows], dtype=np.float32)
                ),
                "text_emb": torch.from_numpy(
                    np.asarray(self.arrays["text_emb"][batch_rows], dtype=np.float32)
                ),
                "id": torch.from_numpy(np.asarray(self.arrays["ids"][batch_rows])),
                "image_neighbours": torch.from_numpy(np.asarray(self.arrays["image_neighbours"][batch_rows])),
                "text_neighbours": torch.from_numpy(np.asarray(self.arrays["text_neighbours"][batch_rows])),
            }


def cached_loader(
    directory: str | os.PathLike,
    requirements: dict[str, Any] | None,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
) -> DataLoader:
    """The DataLoader over the cache in ``directory``, checked against ``requirements`` (None: unchecked)."""
    arrays = open_feature_cache(directory, requirements)
    dataset = CachedPairs(
        arrays,
        batch_size,
        shuffle=shuffle,
        seed=seed,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
    )
    return DataLoader(dataset, batch_size=None, num_workers=num_workers)
