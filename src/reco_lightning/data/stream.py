"""The stream stage: a pair source assigned to ranks and workers, shuffled, decoded and cut into batches.

Every pair has a global position in a fixed (per-epoch shuffled at unit level) order. Position ``i`` goes
to rank ``i % world`` and, inside a rank, to DataLoader worker ``(i // world) % workers`` (the rule of
:mod:`reco_lightning.data.ranks`). So under DDP every rank receives exactly ``N // world`` pairs (the
< world leftover pairs are counted and logged), no pair is seen twice in an epoch, and ranks never read
each other's image bytes (tar members of other ranks are skipped by seeking over them). Batches are
formed inside the stream, so every rank yields the same number of batches, which DDP needs to avoid
hanging.

Bad samples (undecodable or missing image, empty caption, unreadable tar member, the unreadable rest of a
truncated shard) never stop training: :func:`decode` returns None for them and the collator drops them,
passing their keys along in the batch (``bad_keys``) so the main process can count and report them.
Apart from the readers (which only list pairs) and the collator (which only makes tensors), so the DDP
contract is written in one place.
"""

from __future__ import annotations

import io
import random
import tarfile
from collections.abc import Iterator
from typing import Any

from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from reco_lightning.data.ranks import batch_count, share
from reco_lightning.data.records import PairRecord, PairSource

__all__ = ["PairStream", "decode"]


def decode(record: PairRecord) -> dict[str, Any] | None:
    """The pair with its image decoded, or None when it is unusable (the caller counts it)."""
    if not record.caption.strip():
        return None
    try:
        data = record.load()
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
            image = img.convert("RGB")
    except (OSError, ValueError, EOFError, tarfile.TarError, Image.DecompressionBombError):
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

    def _span(self) -> int:
        """Positions of the window split over the ranks (the < world_size left out for balance excluded)."""
        return self.per_rank * self.world_size if self.dropped_for_balance else self.stop - self.start

    def __len__(self) -> int:
        """Batches this rank yields per epoch (the same on every rank when dropping the remainder)."""
        return batch_count(self._span(), self.rank, self.world_size, self.num_workers, self.batch_size)

    def _unit_order(self) -> list[Any]:
        units = self.source.units()
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(units)
        return units

    def _records(self, worker: int) -> Iterator[tuple[int, PairRecord]]:
        span = self._span()
        mine = share(span, self.rank, self.world_size, worker, self.num_workers)
        stop = self.start + span
        start_of_unit = 0
        for unit in self._unit_order():
            length = self.source.unit_length(unit)
            if start_of_unit < stop and start_of_unit + length > self.start:
                base = start_of_unit

                def keep(position: int, base: int = base) -> bool:
                    return base + position - self.start in mine

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
