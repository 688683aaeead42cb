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


DDP_SCRIPT = Path(__file__).parent / "scripts" / "ddp_stream.py"


def run_ddp_stream(shards: Path, backbone: str, out: Path, timeout: float = 240) -> list[dict]:
    """Run tests/scripts/ddp_stream.py (2 gloo processes, one epoch over ``shards``) and return each rank's
    report; a hung run is killed with its whole process group and fails with its output."""
    import os
    import signal
    import subprocess
    import sys

    import pytest

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.Popen(
        [sys.executable, str(DDP_SCRIPT), str(shards), backbone, str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env=env,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"DDP data run hung:\n{proc.communicate()[0][-12000:]}")
    assert proc.returncode == 0, output[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
