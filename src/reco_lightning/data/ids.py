"""Pair ids: the integer that names an image-text pair across files, machines and memories.

Every pair carries an integer id that identifies it across files, so a memory built from one source lets
training on another exclude each pair's own row: a declared id column (CSV column or shard json field),
else a stable hash of the pair's key (the image path's last two components for CSVs and folders, the
shard file name and member key for shards). ``PairSource.id_scheme`` names which; memories record it.
Apart from the readers because the rule is shared by all of them, by memories that record it, and by the
check that a memory's ids and a source's ids can be compared at all.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from reco_lightning.hashing import derived_id

__all__ = [
    "ID_FROM_IMAGE_PATH",
    "ID_FROM_SHARD_KEY",
    "IdentifiedPairs",
    "derived_id",
    "id_namespace_problem",
    "image_path_id",
]

#: id schemes of sources whose ids are derived from keys (declared ids are ``column:<name>``)
ID_FROM_IMAGE_PATH, ID_FROM_SHARD_KEY = "image-path", "shard-key"


class IdentifiedPairs(Protocol):
    """What :func:`id_namespace_problem` reads of a source (any ``PairSource``): its name and id scheme."""

    name: str
    id_scheme: str


def image_path_id(path: str | os.PathLike) -> int:
    """Id of a pair from its image path: the last two path components (``images/0001.png``).

    Nothing machine-specific (mount point, CSV location) enters the id, so the same image listed in two
    CSVs, in a folder source, or on another machine gets the same id. Two different images sharing a
    parent folder name and file name collide; that only costs a query one unrelated excluded neighbour.
    """
    parts = Path(os.path.abspath(path)).parts[-2:]
    return derived_id(ID_FROM_IMAGE_PATH, "/".join(parts))


def id_namespace_problem(memory_scheme: str | None, source: IdentifiedPairs, memory: str) -> str | None:
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
