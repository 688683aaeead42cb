"""The training-framework stage: the Lightning DataModule that wires sources, stream, collator and caches.

Everything below it (readers, stream, collator, feature caches) is plain Python and PyTorch; this is the
one data module that knows Lightning: it asks the Trainer for its rank, world size and epoch, builds the
DataLoaders Lightning iterates, collects bad-sample keys in the main process, and receives from the
model what it must check (:meth:`ImageTextDataModule.expect`). Apart so that memory builds and feature
caches can read pairs without a DataModule.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from reco_lightning.data.collate import PairCollator
from reco_lightning.data.features import FeatureCacheError, cached_loader, feature_requirements
from reco_lightning.data.ids import id_namespace_problem
from reco_lightning.data.records import PairSource
from reco_lightning.data.sources import open_source
from reco_lightning.data.stream import PairStream

__all__ = ["EpochShuffled", "ImageTextDataModule", "fit_epoch"]


@dataclass(frozen=True)
class _Expectations:
    """What the model attached to the data told it to check (see :meth:`ImageTextDataModule.expect`)."""

    cache_requirements: dict[str, Any] | None
    memory_id_scheme: str | None
    memory: str | None


class EpochShuffled(Protocol):
    """A dataset whose order is a function of the epoch (PairStream, CachedPairs)."""

    epoch: int

    def set_epoch(self, epoch: int) -> None: ...


def fit_epoch(trainer: pl.Trainer | None) -> int:
    """The training epoch Lightning runs next (what it gives samplers); 0 outside a fit.

    ``trainer.current_epoch`` lags by one while resuming from an end-of-epoch checkpoint.
    """
    if trainer is None:
        return 0
    return int(trainer.fit_loop.epoch_progress.current.processed)


class ImageTextDataModule(pl.LightningDataModule):
    """Streaming train/val/predict pairs for RecoModule (DDP guarantees: see :mod:`reco_lightning.data.stream`).

    Args:
        backbone: the model's backbone (linked from ``model.backbone`` by the CLI) whose processor is used.
        train / val / predict: sources: a CSV/TSV, an image folder with .txt captions, a directory of
            .tar shards, a brace pattern ``shards/{00000..00099}.tar``; any may be None.
        batch_size: per-device batch size (the loss uses the global batch under DDP).
        num_workers: DataLoader workers per device (each reads its own share of every unit).
        shuffle_buffer: per-worker shuffle buffer for training (shard order is also reshuffled per epoch).
        seed: shuffling seed (per epoch, rank and worker derived from it).
        image_column / caption_column: CSV/TSV columns.
        id_column: CSV/TSV column (or shard json field) of integer pair ids; unset, ids derive from image
            paths (CSV, folder) or shard member keys, so they match a memory built from other files.
        feature_cache: directory of precomputed features (`reco cache`); when set, training and validation
            read embeddings and neighbour rows from it instead of running CLIP and searching each step.

    What the data checks against the model (a feature cache's requirements, whether the memory's pair ids
    can be compared with the source's) it is told by the model through :meth:`expect`; it never reads
    the model. Used without a model that calls it, nothing is checked.
    """

    def __init__(
        self,
        backbone: str,
        train: str | None = None,
        val: str | None = None,
        predict: str | None = None,
        batch_size: int = 256,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        image_column: str = "filepath",
        caption_column: str = "caption",
        id_column: str | None = None,
        feature_cache: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self._collator: PairCollator | None = None
        self.bad_samples: dict[str, list[str]] = {}
        self._streams: dict[str, EpochShuffled] = {}  # what set_epoch reshuffles, per stage
        self._warned: set[tuple[str, str]] = set()
        self._expected: _Expectations | None = None  # what the attached model told us (see expect)
        self._predict_after: int | None = None  # see skip_predict

    @property
    def collator(self) -> PairCollator:
        if self._collator is None:
            from reco_lightning.encoders import Preprocessor

            self._collator = PairCollator(Preprocessor.from_pretrained(self.hparams.backbone))
        return self._collator

    def expect(
        self, cache_requirements: dict[str, Any] | None, memory_id_scheme: str | None, memory: str | None
    ) -> None:
        """Take what the attached model needs the data to check (RecoModule.setup calls this).

        ``cache_requirements``: the model's side of a feature cache's requirements
        (:meth:`reco_lightning.model.RecoModule.cache_requirements`), None when the model has no memory.
        ``memory_id_scheme`` and ``memory`` (a name for messages): the id scheme of the memory whose rows
        training excludes by pair id, checked against each source's; None when there is no memory.
        """
        self._expected = _Expectations(cache_requirements, memory_id_scheme, memory)

    def skip_predict(self, after_position: int | None) -> None:
        """Start this rank's predict stream after source position ``after_position`` (None: from the start).

        For a resumed prediction (``reco_lightning.prediction.EmbeddingWriter`` calls this from its
        ``setup``, before Lightning builds the predict dataloader): this rank's rows up to that position are
        written already. The predict stream yields each rank's pairs in position order whatever
        ``num_workers``, so the rest comes out as it would have in an uninterrupted run. A rank may then
        have nothing left: Lightning is told to accept its empty predict loader (prediction has no collective).
        """
        self._predict_after = after_position
        if after_position is not None:
            self.allow_zero_length_dataloader_with_multiple_devices = True

    def stream(self, stage: str, source: str | None, shuffle: bool) -> PairStream:
        if source is None:
            raise ValueError(
                f"data.{stage} is not set: give a CSV/TSV, an image folder or shards for the {stage} pairs"
            )
        hp = self.hparams
        rank, world = (
            (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        )
        pairs = open_source(source, hp.image_column, hp.caption_column, hp.id_column)
        if stage != "predict":  # where RecoModule excludes each pair's own memory row by id
            self._check_id_namespace(pairs)
        stream = PairStream(
            pairs,
            hp.batch_size,
            shuffle=shuffle,
            seed=hp.seed,
            shuffle_buffer=hp.shuffle_buffer,
            rank=rank,
            world_size=world,
            num_workers=hp.num_workers,
            drop_remainder=stage != "predict",
            ordered=stage == "predict",
            after=self._predict_after if stage == "predict" else None,
        )
        if stream.dropped_for_balance:
            rank_zero_info(
                f"{stage}: {stream.dropped_for_balance} of {len(pairs)} pairs left out this epoch so every "
                f"one of {world} ranks gets {stream.per_rank}"
            )
        self._streams[stage] = stream
        return stream

    def _check_id_namespace(self, pairs: PairSource) -> None:
        """Warn once per memory and source when their ids cannot be compared (self-exclusion would miss)."""
        expected = self._expected
        if expected is None or expected.memory is None:
            return
        label = expected.memory
        problem = id_namespace_problem(expected.memory_id_scheme, pairs, label)
        if problem and (label, pairs.name) not in self._warned:
            self._warned.add((label, pairs.name))
            rank_zero_warn(problem)

    def _loader(self, stage: str, source: str | None, shuffle: bool) -> DataLoader:
        if self.hparams.feature_cache and stage in ("train", "val"):
            loader = self._cached_loader(stage, source, shuffle)
            self._streams[stage] = loader.dataset  # reshuffled per epoch like a PairStream
            if stage == "train":
                loader.dataset.set_epoch(fit_epoch(self.trainer))
            return loader
        stream = self.stream(stage, source, shuffle)
        if stage == "train":  # Lightning iterates this loader before any epoch hook runs
            stream.set_epoch(fit_epoch(self.trainer))
        return DataLoader(
            stream,
            batch_size=None,
            num_workers=self.hparams.num_workers,
            collate_fn=self.collator,
            persistent_workers=False,
        )

    def _cached_loader(self, stage: str, source: str | None, shuffle: bool) -> DataLoader:
        """The DataLoader of ``stage`` read from ``feature_cache/<stage>``, checked against what the model expects."""
        if source is None:
            raise ValueError(f"data.{stage} is not set")
        hp = self.hparams
        directory = Path(hp.feature_cache) / stage
        requirements = None
        if self._expected is not None:
            if self._expected.cache_requirements is None:
                raise FeatureCacheError(
                    f"feature cache {directory} cannot be checked: the model has no memory; set model.memory "
                    "to the memory the cache was computed with"
                )
            requirements = feature_requirements(
                self._expected.cache_requirements, source, hp.image_column, hp.caption_column, hp.id_column
            )
        rank, world = (
            (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        )
        return cached_loader(
            directory,
            requirements,
            hp.batch_size,
            shuffle,
            seed=hp.seed,
            rank=rank,
            world_size=world,
            num_workers=hp.num_workers,
        )

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle the training stream for ``epoch`` (Lightning sets epochs only on samplers)."""
        if "train" in self._streams:
            self._streams["train"].set_epoch(epoch)

    @property
    def train_epoch(self) -> int | None:
        """The epoch whose order the training stream yields (None before train_dataloader)."""
        return self._streams["train"].epoch if "train" in self._streams else None

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.hparams.train, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return [] if self.hparams.val is None else self._loader("val", self.hparams.val, shuffle=False)

    def test_dataloader(self) -> DataLoader | list:
        return [] if self.hparams.val is None else self._loader("test", self.hparams.val, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", self.hparams.predict or self.hparams.train, shuffle=False)

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """Collect bad-sample keys in the main process (collators run in workers) for the epoch report."""
        if not isinstance(batch, dict):
            return batch
        keys = batch.pop("bad_keys", None)
        batch.pop("bad_why", None)  # the keys carry it; only memory builds tally it
        if keys:
            stage = (
                self.trainer.state.stage.value
                if self.trainer is not None and self.trainer.state.stage
                else "run"
            )
            self.bad_samples.setdefault(stage, []).extend(keys)
        return batch

    def pop_bad_samples(self, stage: str) -> list[str]:
        return self.bad_samples.pop(stage, [])
