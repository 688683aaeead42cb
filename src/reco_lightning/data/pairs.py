"""Streaming image-text pairs: webdataset shards, CSV/TSV files, or image folders with sidecar captions.

Every pair has a global position in a fixed (per-epoch shuffled at shard level) order. Position ``i`` goes
to rank ``i % world`` and, inside a rank, to DataLoader worker ``(i // world) % workers``. So under DDP
every rank receives exactly ``N // world`` pairs (the < world leftover pairs are counted and logged),
no pair is seen twice in an epoch, and ranks never read each other's image bytes (tar members of other
ranks are skipped by seeking over them). Batches are formed inside the stream, so every rank yields the
same number of batches, which DDP needs to avoid hanging.

Bad samples (undecodable or missing image, empty caption) never stop training: the collator drops them
and passes their keys along in the batch (``bad_keys``) so the main process can count and report them.
Every pair carries an integer id (its position in the source, an ``id`` column, or the shard's json
``id``) so a memory built from the same source lets training exclude each pair's own row.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import tarfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.utilities import rank_zero_info
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

__all__ = [
    "IMAGE_EXTENSIONS",
    "CsvSource",
    "FolderSource",
    "ImageTextDataModule",
    "PairCollator",
    "PairRecord",
    "PairSource",
    "PairStream",
    "ShardSource",
    "open_source",
    "read_pairs",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass(frozen=True)
class PairRecord:
    """One pair before decoding: ``load`` returns the image bytes or path when the pair is needed."""

    id: int
    key: str
    caption: str
    load: Callable[[], bytes | str]


class PairSource(ABC):
    """A finite sequence of pairs in a deterministic order, split into units (files or shards).

    ``units`` are independently readable chunks; ``iter_unit(unit, keep)`` yields ``(position, pair)`` for
    the pairs of one unit whose position (counted from the unit's first pair) passes ``keep``, reading
    nothing of the others.
    """

    name: str

    @abstractmethod
    def units(self) -> list[Any]:
        """The independently readable parts, in source order."""

    @abstractmethod
    def unit_length(self, unit: Any) -> int:
        """Pairs in ``unit``."""

    @abstractmethod
    def iter_unit(self, unit: Any, keep: Callable[[int], bool]) -> Iterator[tuple[int, PairRecord]]:
        """``(position in unit, pair)`` for the kept positions of ``unit``."""

    def __len__(self) -> int:
        return sum(self.unit_length(u) for u in self.units())

    def __iter__(self) -> Iterator[PairRecord]:
        for unit in self.units():
            for _, record in self.iter_unit(unit, lambda _: True):
                yield record


class CsvSource(PairSource):
    """CSV/TSV rows (image path, caption[, id]); paths may be relative to the file. One unit: the file."""

    def __init__(
        self,
        path: str | os.PathLike,
        image_column: str = "filepath",
        caption_column: str = "caption",
        id_column: str | None = None,
    ) -> None:
        self.path, self.name = Path(path), str(path)
        self.image_column, self.caption_column, self.id_column = image_column, caption_column, id_column
        self.delimiter = "\t" if self.path.suffix.lower() in (".tsv", ".tab") else ","
        with self.path.open(newline="", encoding="utf-8") as fh:
            header = next(csv.reader(fh, delimiter=self.delimiter), [])
        for column, option in (
            (image_column, "image_column"),
            (caption_column, "caption_column"),
            (id_column, "id_column"),
        ):
            if column is not None and column not in header:
                raise ValueError(f"{self.path} has no column {column!r} (columns: {header}): set {option}")
        self._length: int | None = None

    def units(self) -> list[Any]:
        return [self.path]

    def unit_length(self, unit: Any) -> int:
        if self._length is None:  # one streaming pass, no rows kept
            with self.path.open(newline="", encoding="utf-8") as fh:
                self._length = sum(1 for _ in csv.DictReader(fh, delimiter=self.delimiter))
        return self._length

    def iter_unit(self, unit: Any, keep: Callable[[int], bool]) -> Iterator[tuple[int, PairRecord]]:
        with self.path.open(newline="", encoding="utf-8") as fh:
            for row_number, row in enumerate(csv.DictReader(fh, delimiter=self.delimiter)):
                if not keep(row_number):
                    continue
                path = Path(row[self.image_column] or "")
                path = path if path.is_absolute() else self.path.parent / path
                pair_id = int(row[self.id_column]) if self.id_column else row_number
                yield (
                    row_number,
                    PairRecord(
                        pair_id,
                        f"{self.path.name}:{row_number}",
                        row[self.caption_column] or "",
                        lambda p=str(path): p,
                    ),
                )


class FolderSource(PairSource):
    """Images under a folder with a ``<stem>.txt`` caption beside each; sorted paths give the order."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root, self.name = Path(root), str(root)
        self.images = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not self.images:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {self.root}")

    def units(self) -> list[Any]:
        return [self.root]

    def unit_length(self, unit: Any) -> int:
        return len(self.images)

    def iter_unit(self, unit: Any, keep: Callable[[int], bool]) -> Iterator[tuple[int, PairRecord]]:
        for i, image in enumerate(self.images):
            if keep(i):
                caption_file = image.with_suffix(".txt")
                caption = caption_file.read_text(encoding="utf-8").strip() if caption_file.is_file() else ""
                yield i, PairRecord(i, str(image.relative_to(self.root)), caption, lambda p=str(image): p)


class ShardSource(PairSource):
    """Webdataset tar shards in the img2dataset layout: ``KEY.jpg|png|webp`` + ``KEY.txt`` (+ ``KEY.json``).

    Pair ids come from the json's ``id`` (or ``key``) when numeric, else from the global position.
    Sample counts come from img2dataset's ``*_stats.json`` when present, else from one header scan.
    """

    def __init__(self, shards: str | os.PathLike | Sequence[str | os.PathLike]) -> None:
        if isinstance(shards, str | os.PathLike) and Path(shards).is_dir():
            paths = sorted(Path(shards).glob("*.tar"))
        elif isinstance(shards, str | os.PathLike):
            paths = [Path(p) for p in _expand_braces(str(shards))]
        else:
            paths = [Path(p) for p in shards]
        if not paths:
            raise ValueError(f"no .tar shards found in {shards}")
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"missing shard(s) {missing[:3]}: check the shard path pattern")
        self.paths, self.name = paths, str(shards)
        self._lengths: dict[Path, int] = {}
        self._offsets: dict[Path, int] | None = None

    def units(self) -> list[Any]:
        return list(self.paths)

    def unit_length(self, unit: Any) -> int:
        if unit not in self._lengths:
            stats = unit.with_name(unit.stem + "_stats.json")
            if stats.is_file():
                self._lengths[unit] = int(json.loads(stats.read_text())["successes"])
            else:
                with tarfile.open(unit, mode="r:") as tar:
                    self._lengths[unit] = sum(1 for _ in _group_members(tar))
        return self._lengths[unit]

    def _offset(self, unit: Path) -> int:
        if self._offsets is None:
            self._offsets, total = {}, 0
            for path in self.paths:
                self._offsets[path], total = total, total + self.unit_length(path)
        return self._offsets[unit]

    def iter_unit(self, unit: Any, keep: Callable[[int], bool]) -> Iterator[tuple[int, PairRecord]]:
        offset = self._offset(unit)
        with tarfile.open(unit, mode="r:") as tar:
            for position, (key, members) in enumerate(_group_members(tar)):
                if not keep(position):
                    continue  # members were only seeked over: their bytes are never read
                files = {name: tar.extractfile(m).read() for name, m in members.items() if m.isfile()}
                caption = files.get("txt", b"").decode("utf-8", errors="replace").strip()
                meta = _json_or_empty(files.get("json"))
                pair_id = meta.get("id", meta.get("key"))
                pair_id = int(pair_id) if str(pair_id).isdigit() else offset + position
                image = next((files[e] for e in ("jpg", "jpeg", "png", "webp") if e in files), b"")
                yield position, PairRecord(pair_id, f"{unit.name}:{key}", caption, lambda b=image: b)


def _group_members(tar: tarfile.TarFile) -> Iterator[tuple[str, dict[str, tarfile.TarInfo]]]:
    """Consecutive members sharing a key (the path up to the first dot of the basename) form one sample."""
    key, group = None, {}
    for member in tar:
        if not member.isfile():
            continue
        base = os.path.basename(member.name)
        if base.startswith("."):
            continue
        stem, _, ext = base.partition(".")
        sample_key = os.path.join(os.path.dirname(member.name), stem)
        if sample_key != key and group:
            yield key, group
            group = {}
        key = sample_key
        group[ext.lower()] = member
    if group:
        yield key, group


def _json_or_empty(data: bytes | None) -> dict[str, Any]:
    try:
        return json.loads(data) if data else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}


def _expand_braces(pattern: str) -> list[str]:
    """``shard-{000..009}.tar`` -> 10 paths (the webdataset/img2dataset convention)."""
    import re

    match = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not match:
        return [pattern]
    lo, hi = match.group(1), match.group(2)
    return [
        p
        for n in range(int(lo), int(hi) + 1)
        for p in _expand_braces(pattern[: match.start()] + str(n).zfill(len(lo)) + pattern[match.end() :])
    ]


def open_source(
    source: str | os.PathLike | Sequence[str],
    image_column: str = "filepath",
    caption_column: str = "caption",
    id_column: str | None = None,
) -> PairSource:
    """A CSV/TSV file, an image folder with captions, a shard directory, a shard pattern or a shard list."""
    if not isinstance(source, str | os.PathLike):
        return ShardSource(source)
    path = Path(source)
    if path.is_dir():
        return ShardSource(path) if any(path.glob("*.tar")) else FolderSource(path)
    if str(source).endswith(".tar") or "{" in str(source):
        return ShardSource(source)
    if not path.is_file():
        raise FileNotFoundError(
            f"pair source {path} does not exist: give a CSV/TSV, an image folder or .tar shards"
        )
    return CsvSource(path, image_column, caption_column, id_column)


def read_pairs(
    source: str | os.PathLike,
    image_column: str = "filepath",
    caption_column: str = "caption",
    id_column: str | None = None,
) -> list[PairRecord]:
    """All records of a source (paths and captions only, no images): for building memories and tests."""
    return list(open_source(source, image_column, caption_column, id_column))


def decode(record: PairRecord) -> dict[str, Any] | None:
    """The pair with its image decoded, or None when it is unusable (the caller counts it)."""
    if not record.caption.strip():
        return None
    try:
        data = record.load()
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
            image = img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return {"image": image, "caption": record.caption, "id": record.id, "key": record.key}


class PairStream(IterableDataset):
    """The rank/worker-assigned, shuffled, batched stream of one source (see the module docstring).

    Yields lists of up to ``batch_size`` samples ``(position, record, decoded-or-None)``; the DataLoader
    runs with ``batch_size=None`` and the collator turns each list into tensors.

    Args:
        drop_remainder: leave out the < world_size last pairs so every rank gets the same count (training
            and validation, where ranks meet in collectives); False for prediction and memory builds,
            where every pair must be encoded and ranks need not stay in step.
        window: only positions in [start, stop) (memory builds encode a source chunk by chunk).
    """

    def __init__(
        self,
        source: PairSource,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        drop_remainder: bool = True,
        window: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.source, self.batch_size, self.shuffle, self.seed = source, batch_size, shuffle, seed
        self.shuffle_buffer, self.rank, self.world_size = shuffle_buffer, rank, world_size
        self.num_workers = max(1, num_workers)
        self.epoch = 0
        total = len(source)
        self.start, self.stop = window if window is not None else (0, total)
        self.stop = min(self.stop, total)
        span = self.stop - self.start
        if drop_remainder:
            self.per_rank = span // world_size
            if self.per_rank == 0:
                raise ValueError(
                    f"{source.name} has {span} pairs, fewer than the {world_size} ranks: use more data"
                )
        else:
            self.per_rank = (span - rank + world_size - 1) // world_size
        self.dropped_for_balance = span - self.per_rank * world_size if drop_remainder else 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def worker_counts(self) -> list[int]:
        w = self.num_workers
        return [self.per_rank // w + (1 if i < self.per_rank % w else 0) for i in range(w)]

    def __len__(self) -> int:
        """Batches this rank yields per epoch (the same on every rank when dropping the remainder)."""
        return sum(math.ceil(n / self.batch_size) for n in self.worker_counts())

    def _unit_order(self) -> list[Any]:
        units = self.source.units()
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(units)
        return units

    def _records(self, worker: int) -> Iterator[tuple[int, PairRecord]]:
        world, rank, workers = self.world_size, self.rank, self.num_workers
        stop = self.start + self.per_rank * world if self.dropped_for_balance else self.stop
        start_of_unit = 0
        for unit in self._unit_order():
            length = self.source.unit_length(unit)
            if start_of_unit < stop and start_of_unit + length > self.start:
                base = start_of_unit

                def keep(position: int, base: int = base) -> bool:
                    p = base + position
                    if not self.start <= p < stop:
                        return False
                    q = p - self.start
                    return q % world == rank and (q // world) % workers == worker

                for position, record in self.source.iter_unit(unit, keep):
                    yield base + position, record
            start_of_unit += length

    def __iter__(self) -> Iterator[list[tuple[int, PairRecord, dict[str, Any] | None]]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if info is not None and info.num_workers != self.num_workers:
            raise RuntimeError(
                f"PairStream was set up for {self.num_workers} workers but runs in {info.num_workers}"
            )
        records: Iterator[tuple[int, PairRecord]] = self._records(worker)
        if self.shuffle:
            rng = random.Random(f"{self.seed}:{self.epoch}:{self.rank}:{worker}")
            records = _shuffled(records, self.shuffle_buffer, rng)
        batch: list[tuple[int, PairRecord, dict[str, Any] | None]] = []
        for position, record in records:
            batch.append((position, record, decode(record)))
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch


def _shuffled(items: Iterator[Any], buffer_size: int, rng: random.Random) -> Iterator[Any]:
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        i = rng.randrange(len(buffer))
        buffer[i], item = item, buffer[i]
        yield item
    rng.shuffle(buffer)
    yield from buffer


class PairCollator:
    """A list of samples -> backbone inputs. Bad samples are dropped and their keys passed on."""

    def __init__(self, processor: Any, max_text_length: int) -> None:
        self.processor, self.max_text_length = processor, max_text_length

    def __call__(self, samples: Sequence[tuple[int, PairRecord, dict[str, Any] | None]]) -> dict[str, Any]:
        good = [(p, s) for p, _, s in samples if s is not None]
        batch: dict[str, Any] = {
            "id": torch.tensor([s["id"] for _, s in good], dtype=torch.long),
            "position": torch.tensor([p for p, _ in good], dtype=torch.long),
            "key": [s["key"] for _, s in good],
            "caption": [s["caption"] for _, s in good],
            "bad_keys": [r.key for _, r, s in samples if s is None],
        }
        if (
            not good
        ):  # every sample bad: an empty batch that the module still steps through (DDP stays in sync)
            return batch
        text = self.processor.tokenizer(
            batch["caption"],
            padding="max_length",
            truncation=True,
            max_length=self.max_text_length,
            return_tensors="pt",
        )
        images = [s["image"] for _, s in good]
        batch["pixel_values"] = self.processor.image_processor(images, return_tensors="pt")["pixel_values"]
        batch["input_ids"], batch["attention_mask"] = text["input_ids"], text["attention_mask"]
        return batch


class EpochShuffled(Protocol):
    """A dataset whose order is a function of the epoch (PairStream, CachedPairs)."""

    def set_epoch(self, epoch: int) -> None: ...


class ImageTextDataModule(pl.LightningDataModule):
    """Streaming train/val/predict pairs for RecoModule (see the module docstring for DDP guarantees).

    Args:
        backbone: the model's backbone (linked from ``model.backbone`` by the CLI) whose processor is used.
        train / val / predict: sources: a CSV/TSV, an image folder with .txt captions, a directory of
            .tar shards, a brace pattern ``shards/{00000..00099}.tar``; any may be None.
        batch_size: per-device batch size (the loss uses the global batch under DDP).
        num_workers: DataLoader workers per device (each reads its own share of every unit).
        shuffle_buffer: per-worker shuffle buffer for training (shard order is also reshuffled per epoch).
        seed: shuffling seed (per epoch, rank and worker derived from it).
        image_column / caption_column / id_column: CSV/TSV columns.
        feature_cache: directory of precomputed features (`reco cache`); when set, training and validation
            read embeddings and neighbour rows from it instead of running CLIP and searching each step.
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

    @property
    def collator(self) -> PairCollator:
        if self._collator is None:
            from transformers import CLIPProcessor, CLIPTextConfig

            processor = CLIPProcessor.from_pretrained(self.hparams.backbone)
            max_len = CLIPTextConfig.from_pretrained(self.hparams.backbone).max_position_embeddings
            self._collator = PairCollator(processor, max_len)
        return self._collator

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
        )
        if stream.dropped_for_balance:
            rank_zero_info(
                f"{stage}: {stream.dropped_for_balance} of {len(pairs)} pairs left out this epoch so every "
                f"one of {world} ranks gets {stream.per_rank}"
            )
        self._streams[stage] = stream
        return stream

    def _loader(self, stage: str, source: str | None, shuffle: bool) -> DataLoader:
        if self.hparams.feature_cache and stage in ("train", "val"):
            from reco_lightning.data.features import cached_loader

            loader = cached_loader(self, stage, source, shuffle)
            self._streams[stage] = loader.dataset  # reshuffled per epoch like a PairStream
            return loader
        stream = self.stream(stage, source, shuffle)
        return DataLoader(
            stream,
            batch_size=None,
            num_workers=self.hparams.num_workers,
            collate_fn=self.collator,
            persistent_workers=False,
        )

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle the training stream for ``epoch`` (Lightning sets epochs only on samplers)."""
        if "train" in self._streams:
            self._streams["train"].set_epoch(epoch)

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
        keys = batch.pop("bad_keys", None) if isinstance(batch, dict) else None
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
