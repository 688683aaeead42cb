"""What a pair source is: records of pairs before decoding, and the interface every reader implements.

A source is a finite sequence of pairs in a deterministic order, cut into independently readable units
(a file, a shard). The readers (``sources.py`` for CSV/TSV and caption folders, ``shards.py`` for
webdataset tars) implement :class:`PairSource`; everything downstream (the stream, memory builds, feature
caches) reads only this interface. Apart so that the readers and the stream share it without depending on
each other. Also here: the content digests a source's ``fingerprint`` is made of.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["PairRecord", "PairSource", "UnusablePair", "content_hash", "listing_digest", "stat_entry"]


def listing_digest(entries: Sequence[tuple[str, int, int]]) -> str:
    """Digest of (name, size, mtime_ns) entries: changes when a file is added, removed or rewritten."""
    digest = hashlib.blake2b(digest_size=16)
    for name, size, mtime in entries:
        digest.update(f"{name}\0{size}\0{mtime}\n".encode())
    return digest.hexdigest()


def stat_entry(path: Path, root: Path) -> tuple[str, int, int]:
    """A :func:`listing_digest` entry of ``path``: its name relative to ``root``, its size and its mtime."""
    stat = path.stat()
    return str(path.relative_to(root)), stat.st_size, stat.st_mtime_ns


_CONTENT_HASHES: dict[tuple[str, int, int], str] = {}


def content_hash(path: Path) -> str:
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


class UnusablePair(Exception):
    """Raised by a record's ``load`` when a reader already knows the pair is unusable (a tar member it
    could not read, the unreadable rest of a damaged shard): the message says why, for the bad-sample
    report, and the key stays the pair's own."""


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
    ``id_scheme`` says where pair ids come from (see :mod:`reco_lightning.data.ids`).
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
