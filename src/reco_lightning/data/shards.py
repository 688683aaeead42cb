"""Webdataset tar shards as a pair source: member grouping, lengths from img2dataset stats, damage handling.

A shard is read by seeking over the members of pairs another rank or worker owns, so no process reads
image bytes that are not its own. Bad samples (unreadable tar member, the unreadable rest of a truncated
or corrupt shard, a missing declared id) never stop training: they are yielded as records with an empty
caption, which the stream counts as bad. A shard yields exactly as many positions as its length says
(missing ones as bad samples, surplus ones skipped with a warning), so ranks stay in step. Apart from the
CSV and folder readers because all of the tar format's failure modes live here.
"""

from __future__ import annotations

import json
import os
import tarfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from reco_lightning.data.ids import ID_FROM_SHARD_KEY, derived_id
from reco_lightning.data.records import PairRecord, PairSource, UnusablePair, listing_digest, stat_entry

__all__ = ["ShardSource"]

# what reading a damaged shard raises: a truncated member, a corrupt header, an unreadable file
_READ_ERRORS = (tarfile.TarError, OSError, EOFError)


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
        entries = [(str(f.resolve()), *stat_entry(f, f.parent)[1:]) for f in files]
        return f"{len(self.paths)} shards, listing blake2b {listing_digest(entries)}"

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
                key = f"{unit.name}:#{missing}"
                yield missing, PairRecord(derived_id(ID_FROM_SHARD_KEY, key), key, "", _unusable(damage))

    def _record(
        self, unit: Path, tar: tarfile.TarFile, key: str, members: dict[str, tarfile.TarInfo]
    ) -> PairRecord:
        name = f"{unit.name}:{key}"
        pair_id = derived_id(ID_FROM_SHARD_KEY, f"{unit.name}/{key}")
        try:
            files = {ext: tar.extractfile(m).read() for ext, m in members.items()}
        except _READ_ERRORS as err:
            return PairRecord(pair_id, name, "", _unusable(f"unreadable tar member: {err}"))
        caption = files.get("txt", b"").decode("utf-8", errors="replace").strip()
        if self.id_field:
            declared = _json_or_empty(files.get("json")).get(self.id_field)
            if not (isinstance(declared, int) or str(declared).isdigit()):
                why = f"no integer {self.id_field!r} in its .json"
                return PairRecord(pair_id, name, "", _unusable(why))
            pair_id = int(declared)
        image = next((files[e] for e in ("jpg", "jpeg", "png", "webp") if e in files), b"")
        return PairRecord(pair_id, name, caption, lambda b=image: b)


def _unusable(why: str) -> Callable[[], bytes]:
    """A record's ``load`` for a pair known unusable: raises :class:`UnusablePair` saying ``why``."""

    def load() -> bytes:
        raise UnusablePair(why)

    return load


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
