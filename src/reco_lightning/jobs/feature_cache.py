"""Build a feature cache: encode a source with a model's frozen backbone and search its memory for every pair.

The cache's format and its reading side live in :mod:`reco_lightning.data.features`; this job computes
one through ``Trainer.predict`` (every device, chunk by chunk, resumable: :mod:`reco_lightning.jobs.chunked`)
and records what it was computed from. It also says what a cache depends on from the model's side
(:meth:`RecoModule.cache_requirements`), which the model hands to the data so the data never reads the model.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from reco_lightning.atomic import atomic_write_text, replace_directory
from reco_lightning.data.collate import PairCollator
from reco_lightning.data.features import FORMAT, feature_requirements
from reco_lightning.data.ids import id_namespace_problem
from reco_lightning.data.sources import open_source
from reco_lightning.jobs.chunked import assemble, clear_work, predict_in_chunks

__all__ = ["build_feature_cache", "cache_requirements"]


def cache_requirements(
    model: pl.LightningModule,
    source: str,
    image_column: str = "filepath",
    caption_column: str = "caption",
    id_column: str | None = None,
) -> dict[str, Any]:
    """Everything a cache of ``source`` computed with ``model`` depends on (what its manifest must record)."""
    return feature_requirements(model.cache_requirements(), source, image_column, caption_column, id_column)


class _CacheEncoder(pl.LightningModule):
    """Predict-only view of a RecoModule: frozen embeddings + neighbour rows with training exclusion."""

    def __init__(self, model: pl.LightningModule) -> None:
        super().__init__()
        self.model = model

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        v, t = self.model.backbone.encode_batch(batch)
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
    model: pl.LightningModule,
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
    collator = PairCollator(model.backbone.preprocessor)
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
        _write_cache(work, files, requirements, model.backbone.dim)
        replace_directory(work, out)
    trainer.strategy.barrier()
    return out


def _write_cache(work: Path, files: list[Path], requirements: dict[str, Any], dim: int) -> None:
    """Concatenate chunk files into the cache's row-aligned arrays; the manifest goes last."""
    k = requirements["k"]
    count, rest = assemble(
        work,
        files,
        {
            "image_emb": ("image", np.float16, (dim,)),
            "text_emb": ("text", np.float16, (dim,)),
            "ids": ("id", np.int64, ()),
            "image_neighbours": ("image_neighbours", np.int64, (k,)),
            "text_neighbours": ("text_neighbours", np.int64, (k,)),
        },
    )
    clear_work(work)
    manifest = {
        "format": FORMAT,
        "count": count,
        "dim": dim,
        "bad_samples": rest.get("bad", 0),
        "created": dt.datetime.now(dt.UTC).isoformat(),
        "requirements": requirements,
    }
    atomic_write_text(work / "manifest.json", json.dumps(manifest, indent=2))
