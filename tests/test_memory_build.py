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
    assert store.manifest["bad_samples"] == 3
    assert store.manifest["bad_reasons"] == {
        "not an image PIL can open": 1,
        "empty caption": 1,
        "image not found": 1,
    }
    assert store.manifest["bad_keys"] == [  # each with why: a user can tell what to fix
        "pairs.csv:8 (not an image PIL can open)",
        "pairs.csv:9 (empty caption)",
        f"pairs.csv:10 (image not found: {tmp_path / 'missing.png'})",
    ]


def test_existing_memory_and_changed_interrupted_build_are_refused(tmp_path, tiny_dir, tiny_backbone):
    with pytest.raises(RecoMemoryError, match="already exists"):
        build_memory(tiny_dir / "train.csv", tiny_dir / "memory", tiny_backbone)
    (tmp_path / ".mem.partial" / "chunks").mkdir(parents=True)
    (tmp_path / ".mem.partial" / "build.json").write_text('{"source": "elsewhere"}')
    (tmp_path / ".mem.partial" / "chunks" / "000000.safetensors").write_bytes(b"a finished chunk")
    with pytest.raises(
        RecoMemoryError, match=r"interrupted build with other settings \(.*source: 'elsewhere'"
    ):
        build_memory(tiny_dir / "train.csv", tmp_path / "mem", tiny_backbone, trainer_kwargs=TRAINER)
    # index settings that cannot fit the backbone's dim are refused before any encoding (nothing to resume)
    with pytest.raises(RecoMemoryError, match="m=7 must divide dim"):
        bad = {"class_path": "ivfpq", "init_args": {"m": 7}}
        build_memory(
            tiny_dir / "train.csv", tmp_path / "ivf", tiny_backbone, backend=bad, trainer_kwargs=TRAINER
        )
    assert not (tmp_path / ".ivf.partial").exists()


def test_a_refused_trainer_setting_leaves_nothing_and_an_unstarted_build_is_taken_over(
    tmp_path, tiny_dir, tiny_backbone
):
    lines = (tiny_dir / "train.csv").read_text().splitlines()[:9]
    (tmp_path / "images").symlink_to(tiny_dir / "images")
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(RecoMemoryError, match=r"the Trainer refuses \{'precision': 'fp8'.*Precision 'fp8'"):
        build_memory(
            tmp_path / "pairs.csv", tmp_path / "mem", tiny_backbone, precision="fp8", trainer_kwargs=TRAINER
        )
    assert not (tmp_path / ".mem.partial").exists()
    # a build stopped before its first chunk was finished (its plan only): another one takes the folder over
    (tmp_path / ".mem.partial" / "chunks" / "000000.ranks").mkdir(parents=True)
    (tmp_path / ".mem.partial" / "build.json").write_text('{"source": "elsewhere"}')
    out = build_memory(tmp_path / "pairs.csv", tmp_path / "mem", tiny_backbone, trainer_kwargs=TRAINER)
    assert len(MemoryStore.open(out)) == 8 and not (tmp_path / ".mem.partial").exists()


def test_ctrl_c_in_the_encoding_is_a_keyboard_interrupt_that_keeps_the_finished_chunks(
    tmp_path, tiny_dir, tiny_backbone
):
    import signal

    import pytorch_lightning as pl

    class CtrlC(pl.Callback):
        def on_predict_batch_end(self, trainer, *args, **kwargs):
            if any((tmp_path / ".m.partial" / "chunks").glob("*.safetensors")):
                raise KeyboardInterrupt  # in the second chunk, the first one finished

    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(KeyboardInterrupt):  # not Lightning's exit(1): the CLI then says what was kept
            build_memory(
                tiny_dir / "train.csv",
                tmp_path / "m",
                tiny_backbone,
                batch_size=8,
                chunk_size=16,
                trainer_kwargs={**TRAINER, "callbacks": [CtrlC()]},
            )
    finally:
        signal.signal(signal.SIGINT, handler)
    assert [p.name for p in (tmp_path / ".m.partial" / "chunks").glob("*.safetensors")] == [
        "000000.safetensors"
    ]


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
    while not list(chunks.glob("000001.safetensors")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the real thing: no cleanup handlers run
    proc.wait()
    done = sorted(p.name for p in chunks.glob("*.safetensors"))
    assert "000000.safetensors" in done and "000003.safetensors" not in done, done
    with pytest.raises(RecoMemoryError, match="interrupted build"):
        MemoryStore.open(out)
    first_mtime = (chunks / "000000.safetensors").stat().st_mtime_ns

    seen_chunks = []
    from reco_lightning.jobs import chunked as build_module

    original = build_module._merge_ranks
    build_module._merge_ranks = lambda rank_dir, final, *args: (
        seen_chunks.append(final.name),
        original(rank_dir, final, *args),
    )
    try:
        assert (chunks / "000000.safetensors").stat().st_mtime_ns == first_mtime
        build_memory(
            tiny_dir / "train.csv", out, tiny_backbone, batch_size=16, chunk_size=48, trainer_kwargs=TRAINER
        )
    finally:
        build_module._merge_ranks = original
    assert "000000.safetensors" not in seen_chunks, "finished chunks are not re-encoded"
    resumed, reference = MemoryStore.open(out), MemoryStore.open(tiny_dir / "memory")
    assert resumed.ids.tolist() == reference.ids.tolist()
    assert np.allclose(resumed.image_embeddings, reference.image_embeddings, atol=2e-3)
    assert not (tmp_path / ".mem.partial").exists()


# --- encoding precision and DataLoader workers -----------------------------------------------------------
@pytest.fixture
def gpus(monkeypatch):
    """Pretend torch sees ``n`` CUDA GPUs (no MPS)."""
    import torch

    def set_gpus(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)

    return set_gpus


def test_default_num_workers_follows_the_accelerator_and_devices(gpus):
    from reco_lightning.jobs.memory_build import default_num_workers

    gpus(0)
    assert default_num_workers("cpu", 1, cpus=16) == 0  # the encoder itself needs the cores
    assert default_num_workers("auto", "auto", cpus=16) == 0  # auto without a GPU runs on CPU
    gpus(4)
    assert default_num_workers("cpu", "auto", cpus=16) == 0
    assert default_num_workers("auto", "auto", cpus=32) == 8  # 32 // 4 = 8
    assert default_num_workers("gpu", -1, cpus=64) == 8  # capped at 8
    assert default_num_workers("gpu", 4, cpus=16) == 4
    assert default_num_workers("cuda", "2", cpus=16) == 8
    assert default_num_workers("gpu", "0,1", cpus=6) == 3  # device ids
    assert default_num_workers("gpu", [0], cpus=4) == 4
    assert default_num_workers("gpu", 4, cpus=2) == 0  # fewer CPUs than device processes
    assert default_num_workers("tpu", 8, cpus=16) == 2


def test_precision_and_default_workers_reach_the_trainer_and_loader(
    tmp_path, tiny_dir, tiny_backbone, monkeypatch
):
    from reco_lightning.jobs import chunked
    from reco_lightning.jobs import memory_build as memory_build_module

    seen = []
    loader_of = chunked._ChunkData.predict_dataloader

    def spy(self):
        loader = loader_of(self)
        seen.append((loader.num_workers, self.trainer.precision))
        return loader

    monkeypatch.setattr(chunked._ChunkData, "predict_dataloader", spy)
    asked = []
    monkeypatch.setattr(  # what the default would be on a GPU node: one worker, to spawn it for real
        memory_build_module, "default_num_workers", lambda *args: asked.append(args) or 1
    )
    lines = (tiny_dir / "train.csv").read_text().splitlines()[:17]
    (tmp_path / "images").symlink_to(tiny_dir / "images")
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
    out = build_memory(
        tmp_path / "pairs.csv",
        tmp_path / "mem",
        tiny_backbone,
        batch_size=8,
        trainer_kwargs=TRAINER,
        precision="bf16-mixed",
    )
    assert asked == [("cpu", 1)] and seen == [(1, "bf16-mixed")]
    store, reference = MemoryStore.open(out), MemoryStore.open(tiny_dir / "memory")
    assert store.manifest["precision"] == "bf16-mixed"
    assert store.image_embeddings.dtype == np.float16  # stored fp16 whatever the encoding precision
    np.testing.assert_allclose(store.image_embeddings, reference.image_embeddings[:16], atol=3e-2)
    np.testing.assert_allclose(store.text_embeddings, reference.text_embeddings[:16], atol=3e-2)
    assert reference.manifest["precision"] == "32-true"  # the default, recorded too
    # an explicit count is used as given, without asking for the default
    seen.clear()
    build_memory(
        tmp_path / "pairs.csv", tmp_path / "mem0", tiny_backbone, num_workers=0, trainer_kwargs=TRAINER
    )
    assert len(asked) == 1 and seen == [(0, "32-true")]


def test_memory_build_command_passes_precision_and_workers(tmp_path, monkeypatch):
    from reco_lightning import cli
    from reco_lightning.jobs import memory_build as memory_build_module

    calls = []
    monkeypatch.setattr(memory_build_module, "build_memory", lambda *a, **k: calls.append(k) or tmp_path)
    monkeypatch.setattr(cli, "build_summary", lambda out: "built")
    base = ["build", "--source", "pairs.csv", "--out", str(tmp_path / "m"), "--backbone", "clip"]
    cli.memory_main(base)
    cli.memory_main([*base, "--precision", "bf16-mixed", "--num_workers", "3"])
    assert (calls[0]["precision"], calls[0]["num_workers"]) == ("32-true", None)  # None: by the accelerator
    assert (calls[1]["precision"], calls[1]["num_workers"]) == ("bf16-mixed", 3)
