"""Chunked multi-rank prediction: no row lost or repeated when ranks finish at different times."""

import io
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from reco_lightning.errors import ChunkedJobError
from reco_lightning.jobs.chunked import _merge_ranks, load_chunk, save_chunk
from reco_lightning.memory import MemoryStore


def share(positions, bad=0):
    positions = torch.tensor(positions, dtype=torch.long)
    return {
        "position": positions,
        "value": positions * 10,
        "key": [str(p) for p in positions.tolist()],
        "bad": bad,
    }


def test_merge_needs_every_rank_of_this_run_and_every_row_once(tmp_path):
    rank_dir, final = tmp_path / "000000.ranks", tmp_path / "000000.safetensors"
    rank_dir.mkdir()
    save_chunk(share([0, 2, 4]), rank_dir / "rank0.safetensors")
    with pytest.raises(
        ChunkedJobError, match=r"merged 3 rows .* from 1 of 2 rank files, but the plan needs 6"
    ):
        _merge_ranks(rank_dir, final, world_size=2, window=(0, 6))
    assert not final.exists() and rank_dir.is_dir()

    save_chunk(share([2, 5]), rank_dir / "rank1.safetensors")  # a repeated row, and row 3 missing
    with pytest.raises(ChunkedJobError, match=r"merged 5 rows \(4 distinct\)"):
        _merge_ranks(rank_dir, final, world_size=2, window=(0, 6))

    save_chunk(share([1, 5], bad=1), rank_dir / "rank1.safetensors")  # row 3 was a bad sample
    save_chunk(share([1, 3]), rank_dir / "rank2.safetensors")  # left by a killed run with 3 ranks: not ours
    _merge_ranks(rank_dir, final, world_size=2, window=(0, 6))
    merged = load_chunk(final)
    assert merged["position"].tolist() == [0, 1, 2, 4, 5]
    assert merged["value"].tolist() == [0, 10, 20, 40, 50] and merged["key"] == ["0", "1", "2", "4", "5"]
    assert merged["bad"] == 1 and not rank_dir.exists()


# Rank SLOW_RANK writes its share of every chunk SLOW_SECONDS late, as on a busy machine. A script file,
# not `python -c`: Lightning's DDP launcher starts the other rank by re-running this command line.
SLOW_RANK_BUILD = """
import os, time
from reco_lightning.jobs import chunked
write = chunked._RankWriter.write_on_epoch_end
def late_write(self, trainer, *args, **kwargs):
    if trainer.global_rank == int(os.environ["SLOW_RANK"]):
        time.sleep(float(os.environ["SLOW_SECONDS"]))
    write(self, trainer, *args, **kwargs)
chunked._RankWriter.write_on_epoch_end = late_write
from reco_lightning.cli import main
main()
"""


def test_two_ranks_with_a_slow_one_killed_and_resumed_equal_the_one_process_build(tmp_path, tiny_dir):
    script = tmp_path / "slow_rank_build.py"
    script.write_text(SLOW_RANK_BUILD)
    out = tmp_path / "mem"
    command = [
        sys.executable,
        str(script),
        "memory",
        "build",
        *("--source", str(tiny_dir / "train.csv"), "--out", str(out), "--backbone", str(tiny_dir / "clip")),
        *("--accelerator", "cpu", "--devices", "2", "--chunk_size", "48", "--batch_size", "16"),
    ]
    env = {**os.environ, "SLOW_RANK": "1", "SLOW_SECONDS": "1.5"}
    chunks = tmp_path / ".mem.partial" / "chunks"  # 192 rows: 4 chunks of 48, 24 rows per rank each

    killed = subprocess.Popen(
        command,
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.time() + 180
    while not (chunks / "000001.safetensors").is_file() and time.time() < deadline and killed.poll() is None:
        time.sleep(0.05)
    os.killpg(killed.pid, signal.SIGKILL)  # both ranks, mid-chunk, no cleanup
    _, err = killed.communicate()
    done = sorted(p.name for p in chunks.glob("*.safetensors"))
    assert done == ["000000.safetensors", "000001.safetensors"], (done, err.decode()[-3000:])

    resumed = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        stdout, err = resumed.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(resumed.pid, signal.SIGKILL)
        stdout, err = resumed.communicate()
        pytest.fail(f"resumed 2-rank build hung:\n{err.decode()[-3000:]}")
    assert resumed.returncode == 0, err.decode()[-3000:]
    summary = [line for line in stdout.decode().splitlines() if "memory written to" in line]
    assert summary == [f"memory written to {out}: 192 rows, 0 bad samples skipped"], "once, by rank 0"

    built, reference = MemoryStore.open(out), MemoryStore.open(tiny_dir / "memory")  # 1 process, 1 run
    assert np.array_equal(built.ids, reference.ids)
    assert pq.read_table(out / "metadata.parquet").equals(
        pq.read_table(tiny_dir / "memory" / "metadata.parquet")
    )
    for modality in ("image", "text"):
        a, b = (
            built.embeddings(modality).astype(np.float32),
            reference.embeddings(modality).astype(np.float32),
        )
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-3)
    assert not (tmp_path / ".mem.partial").exists()


class _Payload:
    """Unpickling this runs code: it leaves a marker file. Nothing of the package may ever unpickle it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_tampered_pickle_in_a_chunk_folder_is_refused_never_unpickled(tmp_path):
    marker = tmp_path / "ran"
    rank_dir, final = tmp_path / "000000.ranks", tmp_path / "000000.safetensors"
    rank_dir.mkdir()
    save_chunk(share([0, 1]), rank_dir / "rank0.safetensors")
    torch.save(
        {"position": _Payload(str(marker))}, rank_dir / "rank1.safetensors"
    )  # a pickle, named as a share
    with pytest.raises(ChunkedJobError, match=r"rank1.safetensors is not a chunk file"):
        _merge_ranks(rank_dir, final, world_size=2, window=(0, 4))
    torch.save({"position": _Payload(str(marker))}, final)
    with pytest.raises(ChunkedJobError, match="is not a chunk file"):
        load_chunk(final)
    assert not marker.exists()
    # the payload does run when unpickled (the test would catch a loader that unpickles)
    torch.load(io.BytesIO(final.read_bytes()), weights_only=False)
    assert marker.exists()


def test_chunks_keep_the_kind_of_every_value(tmp_path):
    chunk = {**share([3, 1]), "bad_keys": ("a", "b"), "image": torch.ones(2, 4, dtype=torch.float16)}
    save_chunk(chunk, tmp_path / "c.safetensors")
    loaded = load_chunk(tmp_path / "c.safetensors")
    assert loaded["key"] == ["3", "1"] and loaded["bad_keys"] == ("a", "b") and loaded["bad"] == 0
    assert torch.equal(loaded["image"], chunk["image"]) and loaded["image"].dtype == torch.float16
    assert not list(tmp_path.glob("*.tmp"))
