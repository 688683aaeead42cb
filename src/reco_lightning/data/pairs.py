"""Streaming image-text pairs: webdataset shards, CSV/TSV files, or image folders with sidecar captions.

Every pair has a global position in a fixed (per-epoch shuffled at shard level) order. Position ``i`` goes
to rank ``i % world`` and, inside a rank, to DataLoader worker ``(i // world) % workers``. So under DDP
every rank receives exactly ``N // world`` pairs (the < world leftover pairs are counted and logged),
no pair is seen twice in an epoch, and ranks never read each other's image bytes (tar members of other
ranks are skipped by seeking over them). Batches are formed inside the stream, so every rank yields the
same number of batches, which DDP needs to avoid hanging.

Bad samples (undecodable or missing image, empty caption, unreadable tar member, the unreadable rest of a
truncated shard) never stop training: the collator drops them and passes their keys along in the batch
(``bad_keys``) so the main process can count and report them. A shard yields exactly as many positions as
its length says (missing ones as bad samples, surplus ones skipped with a warning), so ranks stay in step.

Every pair carries an integer id that identifies it across files, so a memory built from one source lets
training on another exclude each pair's own row: a declared id column (CSV column or shard json field),
else a stable hash of the pair's key (the image path's last two components for CSVs and folders, the
shard file name and member key for shards). ``PairSource.id_scheme`` names which; memories record it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import random
import tarfile
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
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
    "derived_id",
    "id_namespace_problem",
    "open_source",
    "read_pairs",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
#: id schemes of sources whose ids are derived from keys (declared ids are ``column:<name>``)
ID_FROM_IMAGE_PATH, ID_FROM_SHARD_KEY = "image-path", "shard-key"
# what reading a damaged shard raises: a truncated member, a corrupt header, an unreadable file
_READ_ERRORS = (tarfile.TarError, OSError, EOFError)


def derived_id(namespace: str, key: str) -> int:
    """A stable non-negative int64 for ``key``: the same key gets the same id in every file and on every machine."""
    digest = hashlib.blake2b(f"{namespace}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def image_path_id(path: str | os.PathLike) -> int:
    """Id of a pair from its image path: the last two path components (``images/0001.png``).

    Nothing machine-specific (mount point, CSV location) enters the id, so the same image listed in two
    CSVs, in a folder source, or on another machine gets the same id. Two different images sharing a
    parent folder name and file name collide; that only costs a query one unrelated excluded neighbour.
    """
    parts = Path(os.path.abspath(path)).parts[-2:]
    return derived_id(ID_FROM_IMAGE_PATH, "/".join(parts))


def id_namespace_problem(memory_scheme: str | None, source: PairSource, memory: str) -> str | None:
    """One line saying why ids of ``memory`` and ``source`` cannot be compared, or None when they can.

    Self-exclusion compares ids; ids of different schemes never coincide, so a pair's own memory row would
    only be caught by the near-duplicate test. Declared ids (any column name) are trusted to agree.
    """
    scheme = source.id_scheme
    if memory_scheme == scheme or (
        memory_scheme is not None and memory_scheme.startswith("column:") and scheme.startswith("column:")
    ):
        return None
    found = memory_scheme or "an unrecorded scheme (built before ids identified pairs, or from arrays)"
    return (
        f"memory {memory} has ids from {found} but {source.name} has ids from {scheme}: its pairs' own memory "
        "rows are excluded only as near-duplicates, not by id; declare the same id column for both "
        "(data.id_column, `reco memory build --id_column`) or rebuild the memory"
    )


def _listing_digest(entries: Sequence[tuple[str, int, int]]) -> str:
    """Digest of (name, size, mtime_ns) entries: changes when a file is added, removed or rewritten."""
    digest = hashlib.blake2b(digest_size=16)
    for name, size, mtime in entries:
        digest.update(f"{name}\0{size}\0{mtime}\n".encode())
    return digest.hexdigest()


def _stat_entry(path: Path, root: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path.relative_to(root)), stat.st_size, stat.st_mtime_ns


_CONTENT_HASHES: dict[tuple[str, int, int], str] = {}


def _content_hash(path: Path) -> str:
    """blake2b of a file's bytes, memoised per (path, size, mtime) so repeated checks read it once."""
    stat = path.stat()
    memo = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if memo not in _CONTENT_HASHES:
        digest = hashlib.blake2b(digest_size=16)
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        _CONTENT_HASHES[memo] = digest.hexdigest()
    return _CONTENT_HASHES[memo]


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
    nothing of the others. Every position in ``range(unit_length(unit))`` is offered to ``keep`` exactly
    once: ranks and workers derive their share from the lengths, so a unit must never yield more or fewer.
    ``id_scheme`` says where pair ids come from (see the module docstring).
    """

    name: str
    id_scheme: str

    @abstractmethod
    def units(self) -> list[Any]:
        """The independently readable parts, in source order."""

    @abstractmethod
    def unit_length(self, unit: Any) -> int:
        """Pairs in ``unit``."""

    @abstractmethod
    def iter_unit(self, unit: Any, keep: Callable[[int], bool]) -> Iterator[tuple[int, PairRecord]]:
        """``(position in unit, pair)`` for the kept positions of ``unit``."""

    @abstractmethod
    def fingerprint(self) -> str:
        """What the pairs' content depends on (file hash or listing): caches built from it record this."""

    def __len__(self) -> int:
        return sum(self.unit_length(u) for u in self.units())

    def __iter__(self) -> Iterator[PairRecord]:
        for unit in self.units():
            for _, record in self.iter_unit(unit, lambda _: True):
                yield record


class CsvSource(PairSource):
    """CSV/TSV rows (image path, caption[, id]); paths may be relative to the file. One unit: the file.

    Ids: the ``id_column`` when declared, else derived from the image path (:func:`image_path_id`), so the
    same image gets the same id in every CSV (a row number would name unrelated pairs in two files).
    """

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
        self.id_scheme = f"column:{id_column}" if id_column else ID_FROM_IMAGE_PATH
        self._length: int | None = None

    def fingerprint(self) -> str:
        return f"{self.path.stat().st_size} bytes, blake2b {_content_hash(self.path)}"

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
                pair_id = self._declared_id(row, row_number) if self.id_column else image_path_id(path)
                yield (
                    row_number,
                    PairRecord(
                        pair_id,
                        f"{self.path.name}:{row_number}",
                        row[self.caption_column] or "",
                        lambda p=str(path): p,
                    ),
                )

    def _declared_id(self, row: dict[str, str], row_number: int) -> int:
        value = row[self.id_column] or ""
        try:
            return int(value)
        except ValueError:
            raise ValueError(
                f"{self.path} row {row_number + 1}: id column {self.id_column!r} holds {value!r}, not an "
                "integer; fix the row or leave id_column unset to derive ids from image paths"
            ) from None


class FolderSource(PairSource):
    """Images under a folder with a ``<stem>.txt`` caption beside each; sorted paths give the order.

    Ids derive from image paths exactly as for CSVs, so a folder and a CSV listing the same images agree.
    """

    id_scheme = ID_FROM_IMAGE_PATH

    def __init__(self, root: str | os.PathLike) -> None:
        self.root, self.name = Path(root), str(root)
        self.images = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not self.images:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {self.root}")

    def fingerprint(self) -> str:
        captions = [c for c in (i.with_suffix(".txt") for i in self.images) if c.is_file()]
        entries = [_stat_entry(p, self.root) for p in sorted([*self.images, *captions])]
        return f"{len(self.images)} images, listing blake2b {_listing_digest(entries)}"

    def units(self) -> list[Any]:
        return [self.root]

    def unit_length(self, unit: Any) -> int:
        return len(self.images)

    def iter_unit(self, unit: Any, keep: Callable[[int], bool]) -> Iterator[tuple[int, PairRecord]]:
        for i, image in enumerate(self.images):
            if keep(i):
                caption_file = image.with_suffix(".txt")
                caption = caption_file.read_text(encoding="utf-8").strip() if caption_file.is_file() else ""
                key = str(image.relative_to(self.root))
                yield i, PairRecord(image_path_id(image), key, caption, lambda p=str(image): p)


class ShardSource(PairSource):
    """Webdataset tar shards in the img2dataset layout: ``KEY.jpg|png|webp`` + ``KEY.txt`` (+ ``KEY.json``).

    Ids: the json field ``id_field`` when declared, else derived from the shard's file name and the member
    key (``00003.tar/000030042``), which survives moving or re-listing the shards.

    Lengths come from img2dataset's ``<shard>_stats.json`` when it is at least as new as the tar (a tar
    rewritten afterwards, e.g. filtered, is counted instead), else from one header scan. Whatever the
    length says is what a read yields, so every rank derives the same share: a shard holding fewer samples
    (truncated, or stats that lie) pads with bad samples naming the shard, one holding more skips the
    surplus with a warning. A truncated or corrupt shard yields its readable samples, then its unreadable
    rest as bad samples (one when no stats say how many are missing).
    """

    def __init__(
        self, shards: str | os.PathLike | Sequence[str | os.PathLike], id_field: str | None = None
    ) -> None:
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
        self.id_field = id_field
        self.id_scheme = f"column:{id_field}" if id_field else ID_FROM_SHARD_KEY
        self._lengths: dict[Path, int] = {}

    def units(self) -> list[Any]:
        return list(self.paths)

    def fingerprint(self) -> str:
        files = [f for p in self.paths for f in (p, _stats_path(p)) if f.is_file()]
        entries = [(str(f.resolve()), *_stat_entry(f, f.parent)[1:]) for f in files]
        return f"{len(self.paths)} shards, listing blake2b {_listing_digest(entries)}"

    def unit_length(self, unit: Any) -> int:
        if unit not in self._lengths:
            length = _stats_length(unit)
            self._lengths[unit] = length if length is not None else sum(1 for _ in _shard_samples(unit))
        return self._lengths[unit]

    def iter_unit(self, unit: Any, keep: Callable[[int], bool]) -> Iterator[tuple[int, PairRecord]]:
        length = self.unit_length(unit)
        position, damage, surplus = 0, None, False
        for tar, key, members in _shard_samples(unit):
            if members is None:  # the shard's unreadable rest: filled with bad samples below
                damage = key
                break
            if position == length:
                surplus = True
                break
            if keep(position):  # members not kept were only seeked over: their bytes are never read
                yield position, self._record(unit, tar, key, members)
            position += 1
        if surplus:
            warnings.warn(
                f"{unit} holds more samples than its {_stats_path(unit).name} says ({length}): the "
                "surplus is skipped; delete that stats file to have the shard counted",
                stacklevel=2,
            )
        elif position < length and damage is None:
            damage = (
                f"missing: the shard holds {position} samples, its {_stats_path(unit).name} says {length}"
            )
            warnings.warn(f"{unit}: {damage}; the missing ones count as bad samples", stacklevel=2)
        elif position < length:
            warnings.warn(
                f"{unit}: {damage} after {position} samples; the unreadable rest counts as bad samples",
                stacklevel=2,
            )
        for missing in range(position, length):
            if keep(missing):
                key = f"{unit.name}:#{missing} ({damage})"
                yield missing, PairRecord(derived_id(ID_FROM_SHARD_KEY, key), key, "", lambda: b"")

    def _record(
        self, unit: Path, tar: tarfile.TarFile, key: str, members: dict[str, tarfile.TarInfo]
    ) -> PairRecord:
        name = f"{unit.name}:{key}"
        pair_id = derived_id(ID_FROM_SHARD_KEY, f"{unit.name}/{key}")
        try:
            files = {ext: tar.extractfile(m).read() for ext, m in members.items()}
        except _READ_ERRORS as err:
            return PairRecord(pair_id, f"{name} (unreadable: {err})", "", lambda: b"")
        caption = files.get("txt", b"").decode("utf-8", errors="replace").strip()
        if self.id_field:
            declared = _json_or_empty(files.get("json")).get(self.id_field)
            if not (isinstance(declared, int) or str(declared).isdigit()):
                return PairRecord(pair_id, f"{name} (no integer json {self.id_field!r})", "", lambda: b"")
            pair_id = int(declared)
        image = next((files[e] for e in ("jpg", "jpeg", "png", "webp") if e in files), b"")
        return PairRecord(pair_id, name, caption, lambda b=image: b)


def _stats_path(shard: Path) -> Path:
    return shard.with_name(shard.stem + "_stats.json")


def _stats_length(shard: Path) -> int | None:
    """img2dataset's sample count for ``shard``, or None when absent, unreadable, or older than the tar."""
    stats = _stats_path(shard)
    try:
        if stats.stat().st_mtime_ns < shard.stat().st_mtime_ns:
            return None  # the tar was rewritten after img2dataset counted it (filtered?): count it
        return int(json.loads(stats.read_text())["successes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _shard_samples(
    path: Path,
) -> Iterator[tuple[tarfile.TarFile | None, str, dict[str, tarfile.TarInfo] | None]]:
    """``(tar, key, members)`` per sample in member order; a damaged shard ends with ``(tar, why, None)``.

    Consecutive members sharing a key (the path up to the first dot of the basename) form one sample.
    The header scan that counts a shard and the read that yields it both go through here, so they agree
    on where a truncated or corrupt shard stops.
    """
    try:
        tar = tarfile.open(path, mode="r:")  # noqa: SIM115 - closed by the with below, after the open check
    except _READ_ERRORS as err:
        yield None, f"unreadable shard: {err}", None
        return
    with tar:
        key, group, damage = None, {}, None
        members = iter(tar)
        while True:
            try:
                member = next(members)
            except StopIteration:
                damage = _end_of_archive_problem(tar)
                break
            except _READ_ERRORS as err:
                damage = f"truncated or corrupt shard: {err}"
                break
            if not member.isfile():
                continue
            base = os.path.basename(member.name)
            if base.startswith("."):
                continue
            stem, _, ext = base.partition(".")
            sample_key = os.path.join(os.path.dirname(member.name), stem)
            if sample_key != key and group:
                yield tar, key, group
                group = {}
            key = sample_key
            group[ext.lower()] = member
        if group:
            yield tar, key, group
        if damage:
            yield tar, damage, None


def _end_of_archive_problem(tar: tarfile.TarFile) -> str | None:
    """tarfile ends quietly at a cut or corrupt header; a whole tar ends with a zero block there instead."""
    try:
        tar.fileobj.seek(tar.offset)
        block = tar.fileobj.read(tarfile.BLOCKSIZE)
    except _READ_ERRORS as err:
        return f"unreadable shard end: {err}"
    if len(block) == tarfile.BLOCKSIZE and not block.strip(b"\0"):
        return None
    if not block:
        return "truncated shard: it ends without an end-of-archive marker"
    return f"truncated or corrupt shard: no valid header at byte {tar.offset}"


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
    """A CSV/TSV file, an image folder with captions, a shard directory, a shard pattern or a shard list.

    ``id_column`` names the CSV column, or the shards' json field, holding integer pair ids; without it
    ids derive from keys (see the module docstring).
    """
    if not isinstance(source, str | os.PathLike):
        return ShardSource(source, id_column)
    path = Path(source)
    if path.is_dir():
        if any(path.glob("*.tar")):
            return ShardSource(path, id_column)
        if id_column is not None:
            raise ValueError(
                f"{path} is an image folder, which has no id column: unset id_column (ids derive from paths)"
            )
        return FolderSource(path)
    if str(source).endswith(".tar") or "{" in str(source):
        return ShardSource(source, id_column)
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
    """Streaming train/val/predict pairs for RecoModule (see the module docstring for DDP guarantees).

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
        module = self.trainer.lightning_module if self.trainer is not None else None
        memory = getattr(getattr(module, "retriever", None), "memory", None)
        if memory is None:
            return
        label = str(memory.path or "(in RAM)")
        problem = id_namespace_problem(memory.manifest.get("id_scheme"), pairs, label)
        if problem and (label, pairs.name) not in self._warned:
            self._warned.add((label, pairs.name))
            rank_zero_warn(problem)

    def _loader(self, stage: str, source: str | None, shuffle: bool) -> DataLoader:
        if self.hparams.feature_cache and stage in ("train", "val"):
            from reco_lightning.data.features import cached_loader

            loader = cached_loader(self, stage, source, shuffle)
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
