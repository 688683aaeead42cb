"""Small on-disk pair sources for data tests: webdataset shards (uneven sizes, bad samples) and CSVs."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from PIL import Image


def png_bytes(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (value % 256, 40, 90)).save(buffer, format="PNG")
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(directory: Path, sizes: list[int], bad: set[int] = frozenset()) -> list[int]:
    """Shards of the given sizes; global sample i has json id 1000+i. Samples in ``bad`` get a broken
    image (even) or an empty caption (odd). Returns the ids of the good samples."""
    directory.mkdir(parents=True, exist_ok=True)
    good, i = [], 0
    for shard, size in enumerate(sizes):
        with tarfile.open(directory / f"{shard:05d}.tar", "w") as tar:
            for _ in range(size):
                key = f"{shard:05d}{i:05d}"
                broken = i in bad
                _add(tar, f"{key}.png", b"garbage" if broken and i % 2 == 0 else png_bytes(i))
                _add(tar, f"{key}.txt", b"" if broken and i % 2 == 1 else f"a photo number {i}".encode())
                _add(tar, f"{key}.json", json.dumps({"id": 1000 + i, "key": key}).encode())
                if not broken:
                    good.append(1000 + i)
                i += 1
    return good
