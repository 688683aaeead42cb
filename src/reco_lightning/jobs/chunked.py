"""Resumable, multi-device prediction over a pair source, chunk by chunk.

Both a memory build (frozen embeddings) and a feature cache (embeddings + neighbour rows) encode a whole
source through ``Trainer.predict``. This module does the shared part: the source is cut into fixed
windows of rows; each window is split over the Trainer's ranks, every rank writes its share, and rank 0
merges the shares in source order into one chunk file, written atomically. Shares and chunks are
safetensors files (tensors, with the per-row lists and per-chunk values as JSON metadata): reading them
back never unpickles anything, so a tampered file in a work folder is refused, not run. A re-run with the same plan
skips finished chunks, so an interrupted build loses at most one chunk of work; a build that stopped before
its first chunk was finished is taken over by a re-run with other settings (nothing to keep).

Lightning's predict loop ends without a barrier, so ranks leave ``trainer.predict`` at different times:
rank 0 merges only after a barrier that every rank reaches once its share is on disk, checks that the
merged rows cover the chunk's window exactly, and the ranks meet again before the next chunk.

Once every chunk is on disk, :func:`assemble` concatenates them into the job's row-aligned ``.npy``
files (the layout both memories and feature caches use); each job then writes its own manifest. Failures
of the plan or of the ranks' shares raise :class:`~reco_lightning.errors.ChunkedJobError`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader

from reco_lightning.atomic import claim_plan, plan_diff
from reco_lightning.data.collate import PairCollator
from reco_lightning.data.records import PairSource
from reco_lightning.data.stream import PairStream
from reco_lightning.errors import ChunkedJobError

__all__ = [
    "assemble",
    "clear_work",
    "concat_parts",
    "iter_chunks",
    "load_chunk",
    "predict_in_chunks",
    "save_chunk",
]

CHUNK_SUFFIX = ".safetensors"
_EXTRAS = "reco_chunk_extras"  # the metadata key of a chunk's non-tensor values


def save_chunk(chunk: dict[str, Any], path: Path) -> None:
    """Write a chunk (or one rank's share) atomically: tensors as safetensors, the rest as JSON metadata.

    Lists (per row), tuples (per chunk) and numbers keep their kind, so :func:`concat_parts` joins a
    loaded chunk exactly as it joined the one in memory.
    """
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in chunk.items() if isinstance(v, torch.Tensor)}
    extras = {
        k: [type(v).__name__, list(v) if isinstance(v, list | tuple) else v]
        for k, v in chunk.items()
        if not isinstance(v, torch.Tensor)
    }
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={_EXTRAS: json.dumps(extras)})
    os.replace(tmp, path)


def load_chunk(path: Path) -> dict[str, Any]:
    """A chunk written by :func:`save_chunk`; anything else is a :class:`ChunkedJobError` naming the file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            chunk: dict[str, Any] = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118
            extras = json.loads((fh.metadata() or {})[_EXTRAS])
    except (SafetensorError, OSError, KeyError, ValueError) as err:
        raise ChunkedJobError(
            f"{path} is not a chunk file of this job ({type(err).__name__}): delete it (or its work folder) and "
            "re-run the same command"
        ) from None
    kinds = {"list": list, "tuple": tuple}
    for key, (kind, value) in extras.items():
        chunk[key] = kinds[kind](value) if kind in kinds else value
    return chunk


def concat_parts(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Join per-batch (or per-rank) outputs: tensors are concatenated, lists and tuples extended, numbers summed.

    Tensors and lists are per-row (one entry per ``position``, put in source order on merge); tuples are
    per-chunk extras (e.g. the keys of bad samples), kept in the order they come.
    """
    if not parts:
        return {}
    joined: dict[str, Any] = {}
    for key, first in parts[0].items():
        values = [p[key] for p in parts]
        if isinstance(first, torch.Tensor):
            joined[key] = torch.cat(values)
        elif isinstance(first, list | tuple):
            joined[key] = type(first)(item for value in values for item in value)
        else:
            joined[key] = sum(values)
    return joined


def _take(part: dict[str, Any], order: list[int]) -> dict[str, Any]:
    return {
        key: value[order]
        if isinstance(value, torch.Tensor)
        else [value[i] for i in order]
        if isinstance(value, list)
        else value
        for key, value in part.items()
    }


class _ChunkData(pl.LightningDataModule):
    """One window of the source as a prediction stream, split over the ranks the Trainer runs."""

    def __init__(
        self,
        source: PairSource,
        window: tuple[int, int],
        batch_size: int,
        num_workers: int,
        collator: PairCollator,
    ) -> None:
        super().__init__()
        self.source, self.window, self.batch_size, self.num_workers = source, window, batch_size, num_workers
        self.collator = collator

    def predict_dataloader(self) -> DataLoader:
        stream = PairStream(
            self.source,
            self.batch_size,
            rank=self.trainer.global_rank,
            world_size=self.trainer.world_size,
            num_workers=self.num_workers,
            drop_remainder=False,
            window=self.window,
        )
        return DataLoader(stream, batch_size=None, num_workers=self.num_workers, collate_fn=self.collator)


class _RankWriter(BasePredictionWriter):
    """Each rank writes its share of a chunk to ``rank<R>.safetensors`` when its prediction epoch ends."""

    def __init__(self, directory: Path) -> None:
        super().__init__(write_interval="epoch")
        self.directory = directory

    def write_on_epoch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        predictions: list[Any],
        batch_indices: Any,
    ) -> None:
        save_chunk(concat_parts(predictions), _rank_file(self.directory, trainer.global_rank))


def _rank_file(rank_dir: Path, rank: int) -> Path:
    return rank_dir / f"rank{rank}{CHUNK_SUFFIX}"


def _merge_ranks(rank_dir: Path, final: Path, world_size: int, window: tuple[int, int]) -> None:
    """Merge the shares of ranks ``0..world_size-1`` in source order; refuse any that miss or repeat a row.

    Only this run's ranks are read (a share left by a killed run with more ranks is ignored). Every
    position of ``window`` must appear once, either as a row or among the ``bad`` samples counted.
    """
    files = [_rank_file(rank_dir, rank) for rank in range(world_size)]
    parts = [load_chunk(p) for p in files if p.is_file()]
    merged = concat_parts([p for p in parts if p])
    rows = len(merged.get("position", ()))
    bad = int(merged.get("bad", 0))
    positions = merged["position"] if rows else torch.zeros(0, dtype=torch.long)
    span = window[1] - window[0]
    unique = len(torch.unique(positions))
    inside = rows == 0 or (window[0] <= int(positions.min()) and int(positions.max()) < window[1])
    if rows + bad != span or unique != rows or not inside:
        raise ChunkedJobError(
            f"chunk {final.name} of rows [{window[0]}, {window[1]}) merged {rows} rows ({unique} distinct) and "
            f"{bad} bad samples from {sum(p.is_file() for p in files)} of {world_size} rank files, but the plan "
            f"needs {span}: the ranks' shares were incomplete; re-run the same command to redo this chunk"
        )
    if merged:
        merged = _take(merged, torch.argsort(merged["position"]).tolist())  # source order, any world size
    save_chunk(merged, final)
    shutil.rmtree(rank_dir)


def predict_in_chunks(
    module: pl.LightningModule,
    pairs: PairSource,
    work: Path,
    plan: dict[str, Any],
    collator: PairCollator,
    chunk_size: int,
    batch_size: int,
    num_workers: int = 0,
    trainer_kwargs: dict[str, Any] | None = None,
) -> tuple[list[Path], pl.Trainer]:
    """Predict every pair of ``pairs`` with ``module`` into ``work/chunks/*.safetensors``; resume a matching plan.

    ``module.predict_step`` must return a dict with a ``position`` tensor (from the batch), the number of
    ``bad`` samples it skipped, and any other tensors/lists (per row), tuples (per chunk) or counts; the
    rows plus the bad samples of a chunk must cover its window exactly, else the chunk is refused.
    ``plan`` identifies the job; an interrupted job with another plan is refused.
    Returns the chunk files (in order) and the Trainer (for its rank and barrier).
    """
    settings = {"accelerator": "auto", "devices": "auto", **(trainer_kwargs or {})}
    try:  # before anything is written: a bad setting must not leave a work folder that refuses the fix
        trainer = pl.Trainer(
            **{"logger": False, "enable_checkpointing": False, "enable_model_summary": False, **settings}
        )
    except (ValueError, TypeError, MisconfigurationException) as err:
        shown = {k: settings[k] for k in ("precision", "accelerator", "devices", "strategy") if k in settings}
        raise ChunkedJobError(f"the Trainer refuses {shown}: {err}") from err
    chunks_dir = work / "chunks"
    total = len(pairs)
    n_chunks = (total + chunk_size - 1) // chunk_size
    files = [chunks_dir / f"{chunk:06d}{CHUNK_SUFFIX}" for chunk in range(n_chunks)]
    chunks_dir.mkdir(parents=True, exist_ok=True)
    previous = claim_plan(work / "build.json", plan)
    if previous is not None and not any(chunks_dir.glob(f"*{CHUNK_SUFFIX}")):  # nothing finished to keep
        shutil.rmtree(chunks_dir)  # the other build's unmerged shares
        chunks_dir.mkdir()
        previous = claim_plan(work / "build.json", plan, replace=True)
    if previous is not None:
        raise ChunkedJobError(
            f"{work} holds an interrupted build with other settings ({plan_diff(previous, plan)}): delete {work} "
            "to start over, or resume with the original arguments"
        )
    for chunk, final in enumerate(files):
        if final.is_file():  # written by rank 0 between two barriers: every rank sees the same files here
            continue
        rank_dir = chunks_dir / f"{chunk:06d}.ranks"
        rank_dir.mkdir(exist_ok=True)
        # Each rank clears only its own share (left by a killed run): a rank with no batch writes nothing,
        # and no rank may delete a folder another rank is writing into.
        _rank_file(rank_dir, trainer.global_rank).unlink(missing_ok=True)
        window = (chunk * chunk_size, min(total, (chunk + 1) * chunk_size))
        writers = [c for c in trainer.callbacks if not isinstance(c, _RankWriter)]
        trainer.callbacks = [*writers, _RankWriter(rank_dir)]
        try:
            trainer.predict(
                module,
                datamodule=_ChunkData(pairs, window, batch_size, num_workers, collator),
                return_predictions=False,
            )
        except SystemExit:
            if trainer.interrupted:  # Lightning turns Ctrl-C into exit(1): the caller says what was kept
                raise KeyboardInterrupt from None
            raise
        trainer.strategy.barrier()  # every rank's share is on disk (predict itself ends without a barrier)
        if trainer.global_rank == 0:
            _merge_ranks(rank_dir, final, trainer.world_size, window)
        trainer.strategy.barrier()  # the chunk file exists before any rank looks at the next one
    return files, trainer


def iter_chunks(files: list[Path]) -> Iterator[dict[str, Any]]:
    """Load finished chunk files one at a time (a whole source never has to fit in RAM)."""
    for path in files:
        chunk = load_chunk(path)
        if chunk:
            yield chunk


def assemble(
    work: Path, files: list[Path], arrays: dict[str, tuple[str, Any, tuple[int, ...]]]
) -> tuple[int, dict[str, Any]]:
    """Concatenate the chunk files into row-aligned ``<name>.npy`` files in ``work``; return (rows, the rest).

    ``arrays`` maps each file name to ``(chunk key, dtype, shape of one row)``: ``{"ids": ("id", np.int64,
    ())}`` writes every chunk's ``id`` tensor, in source order, into ``work/ids.npy``. The chunks' other
    outputs come back joined as :func:`concat_parts` joins them (per-row lists and per-chunk tuples
    extended, counts summed); tensors not written to a file are dropped. Two passes over the chunk files
    (count, then copy into memory-mapped files), so a whole source never has to fit in RAM.
    """
    count = sum(len(chunk["position"]) for chunk in iter_chunks(files))
    out = {
        name: np.lib.format.open_memmap(work / f"{name}.npy", mode="w+", dtype=dtype, shape=(count, *row))
        for name, (_, dtype, row) in arrays.items()
    }
    written = {key for key, _, _ in arrays.values()}
    rest: list[dict[str, Any]] = []
    start = 0
    for chunk in iter_chunks(files):
        n = len(chunk["position"])
        for name, (key, _, _) in arrays.items():
            out[name][start : start + n] = chunk[key].numpy()
        rest.append({k: v for k, v in chunk.items() if k not in written and not isinstance(v, torch.Tensor)})
        start += n
    for array in out.values():
        array.flush()
    del out
    return count, concat_parts(rest)


def clear_work(work: Path) -> None:
    """Remove the chunk files and the plan once their content is assembled into the final layout."""
    shutil.rmtree(work / "chunks")
    (work / "build.json").unlink()
