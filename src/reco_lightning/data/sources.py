"""Readers of pair files: CSV/TSV tables and image folders with caption sidecars, and the one entry point.

:func:`open_source` turns what a user writes in a config (a CSV/TSV, an image folder, a shard directory,
a shard pattern or list) into a :class:`~reco_lightning.data.records.PairSource`; the tar shard reader
lives in ``shards.py``. This stage only lists pairs and where their images are: nothing here decodes an
image (``stream.py``) or tokenizes a caption (``collate.py``), so listing a source, counting it or
fingerprinting it for a cache costs no image reads.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from reco_lightning.data.ids import ID_FROM_IMAGE_PATH, image_path_id
from reco_lightning.data.records import PairRecord, PairSource, content_hash, listing_digest, stat_entry
from reco_lightning.data.shards import ShardSource

__all__ = ["IMAGE_EXTENSIONS", "CsvSource", "FolderSource", "open_source", "read_pairs"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


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
        return f"{self.path.stat().st_size} bytes, blake2b {content_hash(self.path)}"

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
        entries = [stat_entry(p, self.root) for p in sorted([*self.images, *captions])]
        return f"{len(self.images)} images, listing blake2b {listing_digest(entries)}"

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


def open_source(
    source: str | os.PathLike | Sequence[str],
    image_column: str = "filepath",
    caption_column: str = "caption",
    id_column: str | None = None,
) -> PairSource:
    """A CSV/TSV file, an image folder with captions, a shard directory, a shard pattern or a shard list.

    ``id_column`` names the CSV column, or the shards' json field, holding integer pair ids; without it
    ids derive from keys (see :mod:`reco_lightning.data.ids`).
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
