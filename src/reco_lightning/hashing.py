"""Stable ids from strings: the one rule every id the package derives follows (pairs read from data, rows of
imported memories), so the same key gets the same id in every file, process and machine. Foundation layer:
hashlib only."""

from __future__ import annotations

import hashlib

__all__ = ["derived_id"]


def derived_id(namespace: str, key: str) -> int:
    """A stable non-negative int64 for ``key``: the same key gets the same id in every file and on every machine."""
    digest = hashlib.blake2b(f"{namespace}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1
