import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from reco_lightning.encoders import FrozenCLIP
from reco_lightning.errors import RecoMemoryError
from reco_lightning.jobs.memory_build import build_memory
from reco_lightning.memory import MemoryStore

TRAINER = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False}


def test_tiny_memory_matches_direct_encoding(tiny_dir, tiny_backbone):
    store = MemoryStore.open(tiny_dir / "memory")
    clip = FrozenCLIP(tiny_backbone)
    assert store.fingerprint["id"] == clip.fingerprint["id"]
    from reco_lightning.data.sources import read_pairs
    from reco_lightning.data.stream import decode

    records = read_pairs(tiny_dir / "train.csv")
    assert len(store) == len(records) and store.ids.tolist() == [r.id for r in records]
    samples = [decode(records[i]) for i in (0, 5)]
    v = clip.encode_images(clip.preprocess_images([s["image"] for s in samples])).numpy()
    t = clip.encode_captions([s["caption"] for s in samples]).numpy()
    assert np.allclose(store.image_embeddings[[0, 5]], v, atol=2e-3)
    assert np.allclose(store.text_embeddings[[0, 5]], t, atol=2e-3)


def test_bad_samples_are_skipped_and_counted(tmp_path, tiny_dir, tiny_backbone):
    lines = (tiny_dir / "train.csv").read_text().splitlines()[:9]
    (tmp_path / "images").symlink_to(tiny_dir / "images")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    lines += ["broken.png,a red circle.", "images/train_000001.png,", "missing.png,a blue square."]
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
    out = build_memory(
        tmp_path / "pairs.csv", tmp_path / "mem", tiny_backbone, batch_size=4, trainer_kwargs=TRAINER
    )
    store = MemoryStore.open(out)
    first_eight = MemoryStore.open(tiny_dir / "memory").ids[:8].tolist()  # the same pairs, built without gaps
    assert len(store) == 8 and store.ids.tolist() == first_eight
    assert "3 bad samples skipped" in store.manifest["source"]
    assert store.manifest["bad_samples"] == 3 and len(store.manifest["bad_keys"]) == 3


def test_existing_memory_and_changed_interrupted_build_are_refused(tmp_path, tiny_dir, tiny_backbone):
    with pytest.raises(RecoMemoryError, match="already exists"):
        build_memory(tiny_dir / "train.csv", tiny_dir / "memory", tiny_backbone)
    (tmp_path / ".mem.partial").mkdir()
    (tmp_path / ".mem.partial" / "build.json").write_text('{"source": "elsewhere"}')
    with pytest.raises(RecoMemoryError, match="interrupted build with other settings"):
        build_memory(tiny_dir / "train.csv", tmp_path / "mem", tiny_backbone, trainer_kwargs=TRAINER)


BUILD = """
import sys, time
from reco_lightning.jobs.chunked import _RankWriter
slow = _RankWriter.write_on_epoch_end
def write_then_pause(self, *a, **k):
    slow(self, *a, **k)
    time.sleep(float(sys.argv[4]))
_RankWriter.write_on_epoch_end = write_then_pause
from reco_lightning.jobs.memory_build import build_memory
build_memory(sys.argv[1], sys.argv[2], sys.argv[3], batch_size=16, chunk_size=48,
             trainer_kwargs={"accelerator": "cpu", "devices": 1, "enable_progress_bar": False})
"""


def test_killed_build_resumes_without_duplicate_or_missing_rows(tmp_path, tiny_dir, tiny_backbone):
    out = tmp_path / "mem"
    chunks = tmp_path / ".mem.partial" / "chunks"  # one file per finished chunk of 48 rows
    proc = subprocess.Popen(
        [sys.executable, "-c", BUILD, str(tiny_dir / "train.csv"), str(out), tiny_backbone, "3"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 120
    while not list(chunks.glob("000001.pt")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the real thing: no cleanup handlers run
    proc.wait()
    done = sorted(p.name for p in chunks.glob("*.pt"))
    assert "000000.pt" in done and "000003.pt" not in done, done
    with pytest.raises(RecoMemoryError, match="interrupted build"):
        MemoryStore.open(out)
    first_mtime = (chunks / "000000.pt").stat().st_mtime_ns

    seen_chunks = []
    from reco_lightning.jobs import chunked as build_module

    original = build_module._merge_ranks
    build_module._merge_ranks = lambda rank_dir, final, *args: (
        seen_chunks.append(final.name),
        original(rank_dir, final, *args),
    )
    try:
        assert (chunks / "000000.pt").stat().st_mtime_ns == first_mtime
        build_memory(
            tiny_dir / "train.csv", out, tiny_backbone, batch_size=16, chunk_size=48, trainer_kwargs=TRAINER
        )
    finally:
        build_module._merge_ranks = original
    assert "000000.pt" not in seen_chunks, "finished chunks are not re-encoded"
    resumed, reference = MemoryStore.open(out), MemoryStore.open(tiny_dir / "memory")
    assert resumed.ids.tolist() == reference.ids.tolist()
    assert np.allclose(resumed.image_embeddings, reference.image_embeddings, atol=2e-3)
    assert not (tmp_path / ".mem.partial").exists()
