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
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import random
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

from reco_lightning.atomic import atomic_write_text, replace_directory
from reco_lightning.chunked import clear_work, iter_chunks, predict_in_chunks
from reco_lightning.data.pairs import PairCollator, id_namespace_problem, open_source

if TYPE_CHECKING:
    from reco_lightning.data.pairs import ImageTextDataModule
    from reco_lightning.model import RecoModule

__all__ = [
    "CachedPairs",
    "FeatureCacheError",
    "build_feature_cache",
    "cache_requirements",
    "open_feature_cache",
]

FORMAT = "reco-features"


class FeatureCacheError(RuntimeError):
    """A feature cache that is missing, incomplete, or computed for another model, data or memory."""


def cache_requirements(
    model: RecoModule,
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
    """
    retriever = model.require_retriever()
    hp = model.hparams
    pairs = open_source(source, image_column, caption_column, id_column)
    requirements = {
        "backbone": model.backbone.fingerprint["id"],
        "source": str(Path(source).resolve()) if os.path.exists(source) else str(source),
        "source_content": pairs.fingerprint(),
        "image_column": image_column,
        "caption_column": caption_column,
        "id_column": id_column,
        "memory": retriever.memory.identity,
        "memory_search": _memory_search(retriever.memory, hp),
        "k": int(hp.k),
        "search": hp.search,
        "near_duplicate_threshold": float(hp.near_duplicate_threshold),
        "near_duplicate_of": retriever.near_duplicate_of,
        "exclusion_margin": int(hp.exclusion_margin),
    }
    return json.loads(json.dumps(requirements))  # as the manifest will read back (tuples become lists)


def _memory_search(memory: Any, hp: Any) -> dict[str, Any]:
    """The search settings the memory's indexes actually run with (overrides applied), per modality."""
    indexes = getattr(memory, "indexes", None) or {}
    if not indexes:  # a memory opened without indexes: what the model asks for is all there is
        return {"memory_search_params": dict(hp.get("memory_search_params") or {})}
    return {name: index.spec() for name, index in sorted(indexes.items())}


class _CacheEncoder(pl.LightningModule):
    """Predict-only view of a RecoModule: frozen embeddings + neighbour rows with training exclusion."""

    def __init__(self, model: RecoModule) -> None:
        super().__init__()
        self.model = model

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        v, t = self.model.embed(batch)
        retriever = self.model.require_retriever()
        ids = batch["id"]
        k = retriever.k
        if len(ids):
            image_rows = retriever(v, "image", exclude_ids=ids).rows
            text_rows = retriever(t, "text", exclude_ids=ids, pair_images=v).rows
        else:
            image_rows = text_rows = torch.zeros(0, k, dtype=torch.long)
        return {
            "position": batch["position"].cpu(),
            "id": ids.cpu(),
            "image": v.half().cpu(),
            "text": t.half().cpu(),
            "image_neighbours": image_rows.cpu(),
            "text_neighbours": text_rows.cpu(),
            "bad": len(batch["bad_keys"]),
        }


def build_feature_cache(
    model: RecoModule,
    source: str,
    out: str | os.PathLike,
    batch_size: int = 256,
    num_workers: int = 0,
    chunk_size: int = 100_000,
    image_column: str = "filepath",
    caption_column: str = "caption",
    id_column: str | None = None,
    trainer_kwargs: dict[str, Any] | None = None,
) -> Path:
    """Encode ``source`` and search the model's memory for every pair; resumable and atomic like memories."""
    out = Path(out)
    if model.retriever is None:
        model.setup("predict")
    requirements = cache_requirements(model, source, image_column, caption_column, id_column)
    pairs = open_source(source, image_column, caption_column, id_column)
    memory = model.require_retriever().memory
    problem = id_namespace_problem(memory.manifest.get("id_scheme"), pairs, str(memory.path or "(in RAM)"))
    if problem:
        warnings.warn(problem, stacklevel=2)
    work = out.parent / f".{out.name}.partial"
    collator = PairCollator(model.backbone.processor, model.backbone.max_text_length)
    files, trainer = predict_in_chunks(
        _CacheEncoder(model),
        pairs,
        work,
        {**requirements, "rows": len(pairs), "chunk_size": chunk_size},
        collator,
        chunk_size,
        batch_size,
        num_workers,
        trainer_kwargs,
    )
    if trainer.global_rank == 0:
        _assemble(work, files, requirements, model.backbone.dim)
        replace_directory(work, out)
    trainer.strategy.barrier()
    return out


def _assemble(work: Path, files: list[Path], requirements: dict[str, Any], dim: int) -> None:
    count = sum(len(chunk["id"]) for chunk in iter_chunks(files))
    k = requirements["k"]
    arrays = {
        "image_emb": np.lib.format.open_memmap(work / "image_emb.npy", "w+", np.float16, (count, dim)),
        "text_emb": np.lib.format.open_memmap(work / "text_emb.npy", "w+", np.float16, (count, dim)),
        "ids": np.lib.format.open_memmap(work / "ids.npy", "w+", np.int64, (count,)),
        "image_neighbours": np.lib.format.open_memmap(
            work / "image_neighbours.npy", "w+", np.int64, (count, k)
        ),
        "text_neighbours": np.lib.format.open_memmap(
            work / "text_neighbours.npy", "w+", np.int64, (count, k)
        ),
    }
    sources = {
        "image_emb": "image",
        "text_emb": "text",
        "ids": "id",
        "image_neighbours": "image_neighbours",
        "text_neighbours": "text_neighbours",
    }
    start, bad = 0, 0
    for chunk in iter_chunks(files):
        n = len(chunk["id"])
        for name, key in sources.items():
            arrays[name][start : start + n] = chunk[key].numpy()
        start, bad = start + n, bad + chunk["bad"]
    for array in arrays.values():
        array.flush()
    del arrays
    clear_work(work)
    manifest = {
        "format": FORMAT,
        "count": count,
        "dim": dim,
        "bad_samples": bad,
        "created": dt.datetime.now(dt.UTC).isoformat(),
        "requirements": requirements,
    }
    atomic_write_text(work / "manifest.json", json.dumps(manifest, indent=2))


def open_feature_cache(
    path: str | os.PathLike, requirements: dict[str, Any] | None = None
) -> dict[str, np.ndarray]:
    """Memory-map a cache after checking it was computed for ``requirements`` (see cache_requirements)."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise FeatureCacheError(
            f"no feature cache at {path} ({manifest_path} missing): build it with `reco cache --config <same config>`"
        )
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT:
        raise FeatureCacheError(f"{manifest_path} is not a reco feature cache")
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
            arrays[name] = np.load(file, mmap_mode="r")
        except (OSError, ValueError) as err:
            raise FeatureCacheError(
                f"cannot map {file} ({err}): the cache is incomplete, rebuild it"
            ) from err
        if arrays[name].shape != shape:
            raise FeatureCacheError(
                f"{file} has shape {arrays[name].shape}, expected {shape}: rebuild the cache"
            )
    return arrays


class CachedPairs(IterableDataset):
    """Batches of cached rows with the same rank/worker split and balance as the streaming pairs.

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
        mine = order[: self.per_rank * self.world_size][self.rank :: self.world_size]
        return mine[worker :: self.num_workers]

    def __len__(self) -> int:
        w, n = self.num_workers, self.per_rank
        return sum(math.ceil((n // w + (1 if i < n % w else 0)) / self.batch_size) for i in range(w))

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
    datamodule: ImageTextDataModule, stage: str, source: str | None, shuffle: bool
) -> DataLoader:
    """The DataLoader of ``stage`` read from ``feature_cache/<stage>``, checked against the attached model."""
    if source is None:
        raise ValueError(f"data.{stage} is not set")
    trainer = datamodule.trainer
    model = trainer.lightning_module if trainer is not None else None
    hp = datamodule.hparams
    requirements = (
        cache_requirements(model, source, hp.image_column, hp.caption_column, hp.id_column)
        if model is not None
        else None
    )
    arrays = open_feature_cache(Path(hp.feature_cache) / stage, requirements)
    rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
    dataset = CachedPairs(
        arrays,
        hp.batch_size,
        shuffle=shuffle,
        seed=hp.seed,
        rank=rank,
        world_size=world,
        num_workers=hp.num_workers,
    )
    return DataLoader(dataset, batch_size=None, num_workers=hp.num_workers)
