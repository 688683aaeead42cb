"""The stream stage: a pair source assigned to ranks and workers, shuffled, decoded and cut into batches.

Every pair has a global position in a fixed (per-epoch shuffled at unit level) order. Position ``i`` goes
to rank ``i % world`` and, inside a rank, to DataLoader worker ``(i // world) % workers`` (the rule of
:mod:`reco_lightning.data.ranks`). So under DDP every rank receives exactly ``N // world`` pairs (the
< world leftover pairs are counted and logged), no pair is seen twice in an epoch, and ranks never read
each other's image bytes (tar members of other ranks are skipped by seeking over them). Batches are
formed inside the stream, so every rank yields the same number of batches, which DDP needs to avoid
hanging.
A prediction stream is ``ordered`` instead (whole batches to workers in turn, so a rank's pairs come out of
the DataLoader in position order) and can start ``after`` a position, where an interrupted run stopped.

Bad samples (undecodable or missing image, empty caption, unreadable tar member, the unreadable rest of a
truncated shard) never stop training: :func:`decode` returns why instead of the sample and the collator
drops them, passing ``"<key> (<why>)"`` along in the batch (``bad_keys``) so the main process can count
and report them.
Apart from the readers (which only list pairs) and the collator (which only makes tensors), so the DDP
contract is written in one place.
"""

from __future__ import annotations

import io
import math
import random
import tarfile
from collections.abc import Callable, Iterator
from typing import Any

from PIL import Image, UnidentifiedImageError
from torch.utils.data import IterableDataset, get_worker_info

from reco_lightning.data.ranks import share
from reco_lightning.data.records import PairRecord, PairSource, UnusablePair

__all__ = ["PairStream", "decode", "load_rgb"]


def load_rgb(data: str | bytes | Any) -> Image.Image:
    """An image file (a path, its bytes or a file object) as a PIL RGB image: how every pair is decoded,
    and how :meth:`reco_lightning.pretrained.RecoModel.encode_image` reads paths, so both see one image."""
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
        return img.convert("RGB")


def decode(record: PairRecord) -> dict[str, Any] | str:
    """The pair with its image decoded, or why it is unusable (a short reason the bad-sample report shows
    beside the key, so a user can tell missing files from broken images from empty captions)."""
    try:
        data = record.load()
        image = load_rgb(data)
    except UnusablePair as why:
        return str(why)
    except FileNotFoundError as err:
        return f"image not found: {err.filename or data}"
    except UnidentifiedImageError:  # its message names a file object's address: not worth showing
        return "not an image PIL can open"
    except (OSError, ValueError, EOFError, tarfile.TarError, Image.DecompressionBombError) as err:
        return f"unreadable image: {err}"
    if not record.caption.strip():
        return "empty caption"
    # image_path: the file for file sources, the member key for shards (what clip-retrieval records)
    path = data if isinstance(data, str) else record.key
    return {"image": image, "caption": record.caption, "id": record.id, "key": record.key, "image_path": path}


class PairStream(IterableDataset):
    """The rank/worker-assigned, shuffled, batched stream of one source (see the module docstring).

    Yields lists of up to ``batch_size`` samples ``(position, record, decoded-or-why)``; the DataLoader
    runs with ``batch_size=None`` and the collator turns each list into tensors.

    Args:
        drop_remainder: leave out the < world_size last pairs so every rank gets the same count (training
            and validation, where ranks meet in collectives); False for prediction and memory builds,
            where every pair must be encoded and ranks need not stay in step.
        window: only positions in [start, stop) (memory builds encode a source chunk by chunk).
        ordered: the DataLoader yields this rank's pairs in position order whatever ``num_workers``:
            worker ``w`` reads the batches ``b`` with ``b % num_workers == w`` of the rank's share (the
            DataLoader takes one batch from each worker in turn) instead of every ``num_workers``-th pair.
            For prediction, whose outputs are written in the order they come (see ``after``).
        after: leave out the positions up to and including this one (a resumed prediction: the rows of
            this rank up to ``after`` are written already); with ``ordered``, the rest comes out exactly
            as it would have in an uninterrupted run.
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
        ordered: bool = False,
        after: int | None = None,
    ) -> None:
        super().__init__()
        self.source, self.batch_size, self.shuffle, self.seed = source, batch_size, shuffle, seed
        self.shuffle_buffer, self.rank, self.world_size = shuffle_buffer, rank, world_size
        self.num_workers = max(1, num_workers)
        self.ordered, self.after = ordered, after
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
        if self.ordered:
            return math.ceil(len(self._rank_share()) / self.batch_size)
        shares = (self._rank_share()[worker :: self.num_workers] for worker in range(self.num_workers))
        return sum(math.ceil(len(mine) / self.batch_size) for mine in shares)

    def _rank_share(self) -> range:
        """This rank's positions, relative to the window start and in order, those up to ``after`` left out.

        Worker ``w`` of ``W`` reads every ``W``-th of them from the ``w``-th (``ranks.share``), or with
        ``ordered`` the ``w``-th batch of every ``W``.
        """
        mine = share(self._span(), self.rank, self.world_size, 0, 1)
        if self.after is None:
            return mine
        done = len(range(self.rank, max(0, self.after - self.start + 1), self.world_size))
        return mine[done:]

    def _keep(self, worker: int) -> Callable[[int], bool]:
        """Whether a position (relative to the window start) goes to DataLoader ``worker`` of this rank."""
        rank_share = self._rank_share()
        if not self.ordered:
            return rank_share[worker :: self.num_workers].__contains__
        size, workers = self.batch_size, self.num_workers

        def keep(relative: int) -> bool:
            return relative in rank_share and (rank_share.index(relative) // size) % workers == worker

        return keep

    def _unit_order(self) -> list[Any]:
        units = self.source.units()
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(units)
        return units

    def _records(self, worker: int) -> Iterator[tuple[int, PairRecord]]:
        mine = self._keep(worker)
        stop = self.start + self._span()
        # a resumed stream does not open the units that end before its first position
        first = self.start if self.after is None else max(self.start, self.after + 1)
        start_of_unit = 0
        for unit in self._unit_order():
            length = self.source.unit_length(unit)
            if start_of_unit < stop and start_of_unit + length > first:
                base = start_of_unit

                def keep(position: int, base: int = base) -> bool:
                    return mine(base + position - self.start)

                for position, record in self.source.iter_unit(unit, keep):
                    yield base + position, record
            start_of_unit += length

    def __iter__(self) -> Iterator[list[tuple[int, PairRecord, dict[str, Any] | str]]]:
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
        batch: list[tuple[int, PairRecord, dict[str, Any] | str]] = []
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
