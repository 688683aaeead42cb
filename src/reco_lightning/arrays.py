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
import mmap
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np

__all__ = ["LayoutError", "RowWriter", "open_array", "read_manifest", "release_pages"]

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


#: a memmap at most this large stays mapped while read at random; a larger one is released every
#: RELEASE_STEP bytes of mappings (:func:`release_pages_over`)
MAPPED_BUDGET, RELEASE_STEP = 1 << 30, 1 << 29


def _mapped_rss() -> int | None:
    """This process's file-backed resident bytes (Linux ``RssFile``), or None where /proc cannot say."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("RssFile:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


_mapped_floor: int | None = None  # file-backed RSS right after the last release (libraries and the like)


def release_pages_over(array: np.ndarray, budget: int = MAPPED_BUDGET, step: int = RELEASE_STEP) -> bool:
    """:func:`release_pages` for a memmap larger than ``budget`` once this process maps ``step`` bytes of
    files more than right after its last release (always where /proc cannot say); whether pages were
    released. One of at most ``budget`` bytes is never released: it cannot map more than itself.

    Why not a count of rows read: every release makes the next reads fault their pages in again, and
    releasing every 4096 re-ranked rows cost re-ranking 4/5 of its speed (5.2k q/s against 25k at 1M rows
    of 1 GB, 100 candidates). A 10 GB memory keeps its mapped rows within ``step`` (docs/memory.md: peak
    RSS while searching 10M rows).
    """
    global _mapped_floor
    if array.nbytes <= budget:
        return False
    mapped = _mapped_rss()
    if mapped is not None and _mapped_floor is not None and mapped <= _mapped_floor + step:
        return False
    released = release_pages(array)
    if released:
        _mapped_floor = _mapped_rss()
    return released


def release_pages(array: np.ndarray) -> bool:
    """Unmap the pages a file-backed memmap has touched from this process; whether ``array`` is one.

    Why: random reads of a memmap (exact re-ranking, a scan of a 10 GB memory) map pages into the process
    and count in its RSS until it exits; the kernel also maps up to 16 cached neighbours of each page read.
    ``MADV_DONTNEED`` on a read-only file mapping drops them from the process only: the data stays in the
    page cache, shared by every process of the machine, and the next read maps it again.
    """
    base: Any = array
    while base is not None and not isinstance(getattr(base, "_mmap", None), mmap.mmap):
        base = getattr(base, "base", None)
    mapped = None if base is None else base._mmap
    if mapped is None or mapped.closed or getattr(base, "mode", "r") != "r":  # written maps keep their pages
        return False
    mapped.madvise(mmap.MADV_DONTNEED)
    return True


class RowWriter:
    """An ``.npy`` file written by ``pwrite`` at row offsets, in order (an import, a concatenation).

    Created as its header alone and filled part by part: appending lets the filesystem allocate the file
    in order (writing into a pre-sized sparse file, as a ``w+`` memmap makes, ran 3-7x slower here), and
    no mapping means the rows never count in RSS. A writer reopened on an existing file (no ``shape``)
    overwrites rows where told: a resumed job rewrites from its next part.
    """

    def __init__(self, path: Path, dtype: Any = None, shape: tuple[int, ...] | None = None) -> None:
        """A new file of ``dtype`` and ``shape`` (its header alone), or, without ``shape``, an existing one."""
        if shape is not None:  # a new file: the header only
            with open(path, "wb") as fh:
                header = {
                    "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                    "fortran_order": False,
                    "shape": tuple(int(n) for n in shape),  # numpy 2 reprs np.int64 as a call
                }
                np.lib.format.write_array_header_1_0(fh, header)
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version != (1, 0):
                raise LayoutError(path, "format", found=version)
            shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
            self.offset = fh.tell()
        self.dtype = np.dtype(dtype)
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self.fd = os.open(path, os.O_RDWR)

    def write(self, row: int, block: np.ndarray) -> None:
        data = memoryview(np.ascontiguousarray(block)).cast("B")
        at = self.offset + row * self.row_bytes
        while data:
            written = os.pwrite(self.fd, data, at)
            data, at = data[written:], at + written

    def copy(
        self, row: int, rows: np.ndarray, lo: int = 0, hi: int | None = None, block: int = 65_536
    ) -> None:
        """Write ``rows[lo:hi]`` (cast to this file's dtype) from row ``row`` on, block by block.

        ``rows`` may be a memmap of any size: a block at a time is in RAM and its pages are released.
        """
        hi = len(rows) if hi is None else hi
        for start in range(lo, hi, block):
            self.write(row + start - lo, np.asarray(rows[start : min(hi, start + block)], dtype=self.dtype))
            release_pages(rows)

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
