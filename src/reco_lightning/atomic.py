"""Atomic file writes: readers see the old file or the new one, never a half-written one."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "claim_plan",
    "plan_diff",
    "replace_directory",
]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(temp)`` on a temp file beside ``path``, then rename it over ``path``.

    For writers that need a path (``np.lib.format.open_memmap``, ``pyarrow.parquet.write_table``). The file
    gets the permissions a plain ``open()`` would give it (mkstemp's 0600 would hide manifests and reports
    from the other users of a shared machine).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to a temp file beside ``path``, then rename it over ``path`` (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def replace_directory(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Move a completed ``tmp`` directory to ``final``; an old ``final`` is moved aside first, then deleted.

    Readers see the old directory or the new one: never a missing or half-filled one.
    """
    tmp, final = Path(tmp), Path(final)
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


def claim_plan(path: str | os.PathLike, plan: dict[str, Any], replace: bool = False) -> dict[str, Any] | None:
    """Record ``plan`` (what a resumable job is doing) at ``path``, unless a plan is there already.

    Returns the plan found there when it is another one (the caller refuses to mix two jobs), else None:
    the job is new, or the same job resuming. ``replace``: record ``plan`` over any other (the caller
    checked that the other job left nothing to keep).
    """
    path = Path(path)
    if path.is_file() and not replace:
        found = json.loads(path.read_text())
        return None if found == plan else found
    atomic_write_text(path, json.dumps(plan, indent=2))
    return None


def plan_diff(found: dict[str, Any], plan: dict[str, Any], width: int = 60) -> str:
    """What differs between two plans, one line: ``key: found -> plan`` per changed key (long values cut
    to ``width`` characters), so a refused resume names the argument to restore."""

    def shown(value: Any) -> str:
        text = repr(value)
        return text if len(text) <= width else text[: width - 3] + "..."

    changed = [k for k in sorted(set(found) | set(plan)) if found.get(k) != plan.get(k)]
    return ", ".join(f"{k}: {shown(found.get(k))} -> {shown(plan.get(k))}" for k in changed)
