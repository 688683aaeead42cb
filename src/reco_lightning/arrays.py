"""Directories of row-aligned arrays: a ``manifest.json`` plus ``.npy`` files memory-mapped and checked against it.

A memory (``memory/store.py``) and a feature cache (``data/features.py``) are both such directories, and
both refuse one whose files do not match what its manifest says before anything is used. The checks live
here, once: the manifest exists, parses and names the expected format; each array file maps and has the
shape (and dtype) the manifest implies. A failed check raises :class:`LayoutError` naming the file and
which check failed; each caller re-raises it in its own words (a memory says to rebuild the memory, a
cache to rebuild the cache). Bottom layer: numpy only, nothing of the package above it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np

__all__ = ["LayoutError", "open_array", "read_manifest"]

#: which check failed: the file is absent, unparsable, of another format, unreadable, or of another shape/dtype
Problem = Literal["missing", "corrupt", "format", "unreadable", "layout"]


class LayoutError(Exception):
    """One file of an array directory fails a check; callers turn it into their own error.

    ``problem`` names the check (see :data:`Problem`), ``cause`` is the underlying exception when there is
    one (a JSON or numpy read error), ``found`` what was found instead (the manifest's format, the mapped
    array whose shape or dtype is wrong).
    """

    def __init__(self, path: Path, problem: Problem, cause: BaseException | None = None, found: Any = None):
        super().__init__(f"{path}: {problem}" + (f" ({cause})" if cause is not None else ""))
        self.path, self.problem, self.cause, self.found = path, problem, cause, found


def read_manifest(directory: Path, format_name: str) -> dict[str, Any]:
    """``directory/manifest.json`` parsed, after checking it exists, is JSON and has ``format == format_name``."""
    path = directory / "manifest.json"
    if not path.is_file():
        raise LayoutError(path, "missing")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise LayoutError(path, "corrupt", err) from err
    if manifest.get("format") != format_name:
        raise LayoutError(path, "format", found=manifest.get("format"))
    return manifest


def open_array(path: Path, shape: tuple[int, ...], dtype: Any = None) -> np.ndarray:
    """Memory-map the ``.npy`` file ``path`` after checking its shape (and dtype, unless None)."""
    try:
        array = np.load(path, mmap_mode="r")
    except Exception as err:  # EOFError (0 bytes), ValueError (bad header, short data), OSError, ...
        raise LayoutError(path, "unreadable" if path.is_file() else "missing", err) from err
    if array.shape != shape or (dtype is not None and array.dtype != dtype):
        raise LayoutError(path, "layout", found=array)
    return array
