"""`reco predict` with EmbeddingWriter: clip-retrieval's layout, one set of parts per rank, resumable."""

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import pytorch_lightning as pl
import torch
import yaml
from torch.utils.data import DataLoader

from helpers_data import write_shards
from reco_lightning.cli import main
from reco_lightning.data.datamodule import ImageTextDataModule
from reco_lightning.data.shards import ShardSource
from reco_lightning.data.sources import open_source
from reco_lightning.data.stream import PairStream
from reco_lightning.model import RecoModule
from reco_lightning.prediction import EmbeddingExportError, EmbeddingWriter

PART, BATCH = 20, 8  # the 64 validation pairs: parts of 20, 20, 20 and 4 rows
FOLDERS = ("img_emb", "text_emb", "metadata")
MODEL = {"k": 4, "fusion_config": {"num_heads": 4}}


@pytest.fixture(scope="module")
def ckpt(tiny_dir, tmp_path_factory) -> Path:
    """A checkpoint of an untrained (seeded) fusion: refined rows differ from frozen ones all the same."""
    pl.seed_everything(0)
    model = RecoModule(str(tiny_dir / "clip"), memory=str(tiny_dir / "memory"), **MODEL)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    trainer.strategy.connect(model)
    path = tmp_path_factory.mktemp("ckpt") / "model.ckpt"
    trainer.save_checkpoint(path)
    return path


def write_config(path: Path, tiny_dir: Path, out: Path, part_size: int = PART, devices: int = 1) -> Path:
    writer = {"output_dir": str(out), "part_size": part_size, "write_frozen": True}
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": devices,
            **({"strategy": "ddp"} if devices > 1 else {}),
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(path.parent / "runs"),
            "callbacks": [{"class_path": "reco_lightning.prediction.EmbeddingWriter", "init_args": writer}],
        },
        "model": {"backbone": str(tiny_dir / "clip"), "memory": str(tiny_dir / "memory"), **MODEL},
        "data": {
            "class_path": "reco_lightning.data.datamodule.ImageTextDataModule",
            "init_args": {"predict": str(tiny_dir / "val.csv"), "batch_size": BATCH},
        },
    }
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def reference(tiny_dir, ckpt, tmp_path_factory) -> Path:
    """One uninterrupted single-process `reco predict` export (refined + frozen)."""
    root = tmp_path_factory.mktemp("reference")
    config = write_config(root / "predict.yaml", tiny_dir, root / "emb")
    main(["predict", "--config", str(config), f"--ckpt_path={ckpt}"])
    return root / "emb"


@pytest.fixture(scope="module")
def expected(tiny_dir, ckpt) -> dict:
    """Every validation pair's frozen and refined embeddings, computed directly, by source position."""
    model = RecoModule.load_from_checkpoint(ckpt, map_location="cpu")
    model.setup("predict")
    model.eval()
    # The export's batch size: among memory rows with equal scores (equal captions here) the exact search
    # keeps other rows for a batch of 20+ queries (faiss's BLAS path) or 64+ (its torch path) than for a few.
    data = ImageTextDataModule(str(tiny_dir / "clip"), predict=str(tiny_dir / "val.csv"), batch_size=BATCH)
    batches = list(data.predict_dataloader())
    assert torch.cat([b["position"] for b in batches]).tolist() == list(range(64))
    out: dict = {"id": [], "caption": [], "image_path": [], "image": [], "text": []}
    out |= {"image_refined": [], "text_refined": []}
    with torch.no_grad():
        for batch in batches:
            v, t = model.embed(batch)
            for key, value in (("image", v), ("text", t)):
                out[key].append(value)
                out[f"{key}_refined"].append(model.refine(value, key))
            out["id"].append(batch["id"])
            out["caption"] += batch["caption"]
            out["image_path"] += batch["image_path"]
    return {
        key: value if isinstance(value[0], str) else torch.cat(value).numpy() for key, value in out.items()
    }


def read_as_clip_retrieval(root: Path) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """What clip-retrieval, autofaiss and embedding-reader do: every part of a folder in sorted name order."""
    image = np.concatenate([np.load(p) for p in sorted((root / "img_emb").glob("*.npy"))])
    text = np.concatenate([np.load(p) for p in sorted((root / "text_emb").glob("*.npy"))])
    parts = sorted((root / "metadata").glob("*.parquet"))
    return image, text, pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)


def part_names(root: Path) -> dict[str, list[str]]:
    return {
        folder: sorted(p.name.removeprefix(folder + "_").rsplit(".", 1)[0] for p in (root / folder).iterdir())
        for folder in FOLDERS
    }


def files(root: Path) -> list[str]:
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.parent.name in FOLDERS
    )


def assert_same_export(out: Path, reference: Path) -> None:
    """The same part files as ``reference``: metadata equal, embeddings equal to fp16 precision."""
    assert files(out) == files(reference)
    for name in files(reference):
        if name.endswith(".parquet"):
            assert pq.read_table(out / name).equals(pq.read_table(reference / name)), name
        else:
            np.testing.assert_allclose(
                np.load(out / name).astype(np.float32), np.load(reference / name), rtol=0, atol=1e-3
            )


def assert_rows(root: Path, expected: dict, refined: tuple[bool, bool] = (True, True)) -> pd.DataFrame:
    image, text, meta = read_as_clip_retrieval(root)
    assert image.dtype == text.dtype == np.float16 and image.shape == text.shape == (len(meta), 32)
    np.testing.assert_allclose(np.linalg.norm(image.astype(np.float32), axis=1), 1, atol=2e-3)
    positions = meta["position"].to_numpy()
    assert list(meta.columns[:2]) == ["image_path", "caption"]  # clip-retrieval's columns
    assert meta["id"].tolist() == expected["id"][positions].tolist()
    assert meta["caption"].tolist() == [expected["caption"][p] for p in positions]
    assert meta["image_path"].tolist() == [expected["image_path"][p] for p in positions]
    for rows, side, refine in ((image, "image", refined[0]), (text, "text", refined[1])):
        want = expected[f"{side}_refined" if refine else side][positions]
        np.testing.assert_allclose(rows.astype(np.float32), want, rtol=0, atol=2e-3)
    return meta


def test_predict_writes_row_aligned_clip_retrieval_parts(reference, expected):
    names = part_names(reference)
    assert names == {f: [f"0000_{p:06d}" for p in range(4)] for f in FOLDERS}
    assert part_names(reference / "frozen") == names
    header = np.load(reference / "img_emb" / "img_emb_0000_000000.npy", mmap_mode="r")
    assert header.shape == (PART, 32) and header.dtype.str == "<f2"  # what embedding-reader parses

    meta = assert_rows(reference, expected)
    assert sorted(meta["position"]) == list(range(64))
    frozen = assert_rows(reference / "frozen", expected, refined=(False, False))
    pd.testing.assert_frame_equal(meta, frozen)
    refined_image, _, _ = read_as_clip_retrieval(reference)
    frozen_image, _, _ = read_as_clip_retrieval(reference / "frozen")
    assert np.abs(refined_image.astype(np.float32) - frozen_image).max() > 0.05, (
        "refined rows are not frozen ones"
    )

    manifest = json.loads((reference / "manifest.json").read_text())
    plan = manifest["plan"]
    assert manifest["complete"] and manifest["rows"] == 64 and manifest["parts"] == 4
    assert manifest["ranks"] == [{"rank": 0, "rows": 64, "rows_per_part": [20, 20, 20, 4], "bad_samples": 0}]
    assert manifest["bad_samples"] == 0
    assert plan["refined"] == {"image": True, "text": True} and plan["k"] == 4
    assert plan["world_size"] == 1 and plan["part_size"] == PART and plan["write_frozen"]
    assert plan["backbone"] == manifest["backbone_fingerprint"]["id"] and plan["memory"]


@pytest.mark.autofaiss
def test_embedding_reader_and_autofaiss_read_the_export_as_it_is(reference, tmp_path):
    embedding_reader = pytest.importorskip("embedding_reader")
    autofaiss = pytest.importorskip("autofaiss")
    image, _, meta = read_as_clip_retrieval(reference)
    reader = embedding_reader.EmbeddingReader(
        embeddings_folder=str(reference / "img_emb"),
        metadata_folder=str(reference / "metadata"),
        meta_columns=["id", "position"],
        file_format="parquet_npy",  # npy parts aligned with parquet parts by sorted file name
    )
    (read, read_meta), *more = list(reader(batch_size=1000, show_progress=False))
    assert not more and np.array_equal(read, image.astype(np.float32))
    assert (
        read_meta["id"].tolist() == meta["id"].tolist()
        and read_meta["position"].tolist() == meta["position"].tolist()
    )

    index, _ = autofaiss.build_index(
        embeddings=str(reference / "img_emb"),
        file_format="npy",
        index_path=str(tmp_path / "image.index"),
        index_infos_path=str(tmp_path / "image.json"),
        metric_type="ip",
        verbose=40,
    )
    assert index.ntotal == 64
    _, found = index.search(image[:8].astype(np.float32), 1)
    assert meta["id"][found.ravel()].tolist() == meta["id"][:8].tolist()


def test_print_config_shows_the_writer(tiny_dir, tmp_path, capsys):
    config = write_config(tmp_path / "predict.yaml", tiny_dir, tmp_path / "emb")
    with pytest.raises(SystemExit) as exit_:
        main(["predict", "--config", str(config), "--print_config"])
    assert exit_.value.code in (None, 0)
    printed = yaml.safe_load(capsys.readouterr().out)
    (writer,) = printed["trainer"]["callbacks"]
    assert writer["class_path"] == "reco_lightning.prediction.EmbeddingWriter"
    assert writer["init_args"] == {
        "output_dir": str(tmp_path / "emb"),
        "part_size": PART,
        "write_frozen": True,
        "keep_predictions": False,
    }


def positions_of(batch):
    return [position for position, _, _ in batch]


@pytest.mark.parametrize("workers", [0, 2])
def test_predict_stream_yields_a_rank_in_position_order_and_starts_after_a_position(tiny_dir, workers):
    source = open_source(tiny_dir / "val.csv")
    for rank, after in ((0, None), (1, None), (0, 20), (1, 20), (1, 63)):
        stream = PairStream(
            source,
            3,
            rank=rank,
            world_size=2,
            num_workers=workers,
            drop_remainder=False,
            ordered=True,
            after=after,
        )
        loader = DataLoader(stream, batch_size=None, num_workers=workers, collate_fn=positions_of)
        batches = list(loader)
        mine = [p for p in range(64) if p % 2 == rank and (after is None or p > after)]
        assert [p for batch in batches for p in batch] == mine, (rank, after)
        assert len(batches) == len(stream) == -(-len(mine) // 3)
        unordered = PairStream(
            source, 3, rank=rank, world_size=2, num_workers=workers, drop_remainder=False, after=after
        )
        batches = list(DataLoader(unordered, batch_size=None, num_workers=workers, collate_fn=positions_of))
        assert sorted(p for batch in batches for p in batch) == mine and len(batches) == len(unordered)


class Stop(pl.Callback):
    """Stands for a kill: the run dies after ``after`` batches (rows still buffered are lost)."""

    def __init__(self, after: int) -> None:
        self.after = after

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx + 1 == self.after:
            raise RuntimeError("killed")


class CtrlC(Stop):
    """Ctrl-C after ``after`` batches (Lightning turns it into exit status 1 and ignores SIGINT from then on)."""

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx + 1 == self.after:
            raise KeyboardInterrupt


def test_ctrl_c_says_a_rerun_resumes(tiny_dir, ckpt, tmp_path, capsys):
    import signal

    out, handler = tmp_path / "emb", signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):
            predict(tiny_dir, ckpt, out, CtrlC(after=6))
    finally:
        signal.signal(signal.SIGINT, handler)
    assert f"reco: interrupted; re-run the same command to resume ({out}'s written rows are kept)\n" in (
        capsys.readouterr().err
    )
    assert part_names(out)["metadata"] == ["0000_000000", "0000_000001"]


class Count(pl.Callback):
    """Rows that reach predict_step."""

    def __init__(self) -> None:
        self.rows = 0

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.rows += len(batch["id"])


def predict(
    tiny_dir, ckpt, out, *callbacks, batch_size=BATCH, num_workers=0, part_size=PART, source=None, **model
):
    module = RecoModule.load_from_checkpoint(ckpt, map_location="cpu", **model)
    data = ImageTextDataModule(
        str(tiny_dir / "clip"),
        predict=str(source or tiny_dir / "val.csv"),
        batch_size=batch_size,
        num_workers=num_workers,
        id_column="id" if source else None,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[EmbeddingWriter(str(out), part_size=part_size, write_frozen=True), *callbacks],
    )
    return trainer.predict(module, datamodule=data)


def test_killed_run_resumes_without_redoing_rows_and_ends_as_an_uninterrupted_one(
    tiny_dir, ckpt, reference, tmp_path, caplog
):
    out = tmp_path / "emb"
    with pytest.raises(RuntimeError, match="killed"):
        predict(tiny_dir, ckpt, out, Stop(after=6))  # 48 rows seen: parts 0 and 1 written, 8 rows buffered
    assert part_names(out)["metadata"] == ["0000_000000", "0000_000001"]
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    # what a SIGKILL in the middle of part 2 leaves: its first file, and a temp file
    (out / "img_emb" / "img_emb_0000_000002.npy").write_bytes(b"half written")
    (out / "text_emb" / ".text_emb_0000_000002.npy.x1.tmp").write_bytes(b"half")

    counted = Count()  # resumed with 2 workers and another batch size (< 20: see `expected`): same row order
    assert predict(tiny_dir, ckpt, out, counted, batch_size=6, num_workers=2) is None  # not kept in RAM
    assert counted.rows == 64 - 40, "only the rows of the parts not written"
    assert_same_export(out, reference)
    manifest, done = (json.loads((d / "manifest.json").read_text()) for d in (out, reference))
    assert manifest["plan"] == done["plan"] and manifest["ranks"] == done["ranks"] and manifest["complete"]

    again = Count()  # a finished export re-run: nothing left to do, and it says so
    with warnings.catch_warnings(record=True) as caught, caplog.at_level("INFO"):
        warnings.simplefilter("always")
        predict(tiny_dir, ckpt, out, again)
    assert again.rows == 0 and files(out) == files(reference)
    assert f"{out}: already complete (64 rows), nothing to redo" in caplog.text
    assert not [w for w in caught if "across ranks is zero" in str(w.message)]
    other = tmp_path / "other.csv"  # the same rows but one caption: another source, never resumed into these
    other.write_text((tiny_dir / "val.csv").read_text().replace("triangle", "TRIANGLE", 1))
    text = other.read_text().replace("images/", f"{tiny_dir / 'images'}/")
    other.write_text("filepath,caption,id\n" + "".join(
        f"{line},{i}\n" for i, line in enumerate(text.splitlines()[1:])
    ))  # fmt: skip
    with pytest.raises(EmbeddingExportError, match=r"other settings \(source .* -> "):
        predict(tiny_dir, ckpt, out, source=other)
    assert files(out) == files(reference)


def test_resume_over_shards_with_bad_samples_skips_whole_shards_and_ends_as_an_uninterrupted_run(
    tiny_dir, ckpt, tmp_path, monkeypatch
):
    shards = tmp_path / "shards"
    good = write_shards(shards, [10, 14, 9], bad={4, 5, 17, 30})  # 29 good pairs of 33
    reference, out = tmp_path / "reference", tmp_path / "emb"
    predict(tiny_dir, ckpt, reference, source=shards, batch_size=4, part_size=7)
    image, _, meta = read_as_clip_retrieval(reference)
    assert meta["id"].tolist() == good and len(image) == 29
    # the 4 unreadable pairs are not lost silently: counted in the manifest, listed by key
    manifest = json.loads((reference / "manifest.json").read_text())
    assert manifest["bad_samples"] == 4 and manifest["ranks"][0]["bad_samples"] == 4
    bad_keys = json.loads((reference / "progress" / "rank_0000.json").read_text())["bad_keys"]
    assert len(bad_keys) == 4 and not set(bad_keys) & set(meta["key"].tolist())
    assert (
        meta["image_path"].tolist() == meta["key"].tolist()
    )  # clip-retrieval's image_path of a shard member

    with pytest.raises(
        RuntimeError, match="killed"
    ):  # positions 0-19 seen: 17 rows, parts of 7 and 7 written
        predict(tiny_dir, ckpt, out, Stop(after=5), source=shards, batch_size=4, part_size=7)
    assert part_names(out)["metadata"] == ["0000_000000", "0000_000001"]
    opened = []
    iter_unit = ShardSource.iter_unit

    def recording(self, unit, keep):
        opened.append(Path(unit).name)
        return iter_unit(self, unit, keep)

    monkeypatch.setattr(ShardSource, "iter_unit", recording)
    counted = Count()
    predict(tiny_dir, ckpt, out, counted, source=shards, batch_size=4, part_size=7)
    assert counted.rows == 29 - 14 and opened == ["00001.tar", "00002.tar"], "the first shard was all written"
    assert_same_export(out, reference)
    # the bad samples before the resume point (not re-read) are still listed, none twice
    assert json.loads((out / "manifest.json").read_text())["bad_samples"] == 4
    assert json.loads((out / "progress" / "rank_0000.json").read_text())["bad_keys"] == bad_keys


def test_a_side_not_refined_is_written_frozen_and_recorded(tiny_dir, ckpt, expected, tmp_path):
    out = tmp_path / "emb"
    predict(tiny_dir, ckpt, out, refine_text=False)
    assert_rows(out, expected, refined=(True, False))
    assert json.loads((out / "manifest.json").read_text())["plan"]["refined"] == {
        "image": True,
        "text": False,
    }
    with pytest.raises(EmbeddingExportError, match=r"refined .*'text': False.* -> .*'text': True"):
        predict(tiny_dir, ckpt, out)  # refined texts into a folder of frozen ones: refused


def test_a_novelty_gate_marks_the_rows_it_answered_and_the_manifest_counts_them(
    tiny_dir, ckpt, tmp_path, caplog
):
    """With ``known_memory`` (here lacking every other memory row) each refined side gets a boolean column,
    ``image_gated`` / ``text_gated``: the rows the gate answered from the rows added after training, as
    ``refine_and_gate`` decides them for the same batches; the manifest counts them and records the gate,
    so that a resume without it is refused."""
    from reco_lightning.memory.store import MemoryStore

    ids = np.asarray(MemoryStore.open(tiny_dir / "memory", load_indexes=False).ids)
    known = tmp_path / "known"
    known.mkdir()
    np.save(known / "ids.npy", ids[::2])
    gate = {"known_memory": str(known), "novelty_threshold": 0.5, "novelty_share_quantile": None}
    out = tmp_path / "emb"
    with caplog.at_level("INFO"):
        predict(tiny_dir, ckpt, out, **gate)
    image, text, meta = read_as_clip_retrieval(out)
    model = RecoModule.load_from_checkpoint(ckpt, map_location="cpu", **gate)
    model.setup("predict")
    model.eval()
    data = ImageTextDataModule(str(tiny_dir / "clip"), predict=str(tiny_dir / "val.csv"), batch_size=BATCH)
    want: dict = {"image": [], "text": [], "image_emb": [], "text_emb": []}
    with torch.no_grad():
        for batch in data.predict_dataloader():
            for side, frozen in zip(("image", "text"), model.embed(batch), strict=True):
                refined = model.refine_and_gate(frozen, side)
                want[side].append(refined.gated)
                want[f"{side}_emb"].append(refined.embeddings)
    positions = meta["position"].to_numpy()
    for side, rows in (("image", image), ("text", text)):
        flags = torch.cat(want[side]).numpy()[positions]
        assert meta[f"{side}_gated"].dtype == bool and meta[f"{side}_gated"].tolist() == flags.tolist()
        assert 0 < flags.sum() < len(flags), side
        expected = torch.cat(want[f"{side}_emb"]).numpy()[positions]
        np.testing.assert_allclose(rows.astype(np.float32), expected, rtol=0, atol=2e-3)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["gated"] == {
        "image": int(meta["image_gated"].sum()),
        "text": int(meta["text_gated"].sum()),
    }
    assert manifest["columns"][-2:] == ["image_gated", "text_gated"]
    assert manifest["plan"]["novelty"] == {
        "known_memory": str(known),
        "threshold": 0.5,
        "share_quantile": None,
        "gap": None,
        "whiten": None,
    }
    assert f"the novelty gate answered {manifest['gated']['image']} images" in caplog.text
    with pytest.raises(EmbeddingExportError, match=r"other settings \(novelty "):
        predict(tiny_dir, ckpt, out)  # the same folder without the gate: refused


def test_a_vote_writes_two_blocks_and_a_resume_with_another_weight_is_refused(
    tiny_dir, ckpt, expected, tmp_path
):
    """``vote_weight``: both refined sides written as [n, 2 x 32], unit rows whose first block is the fusion's
    (scaled by 1 / sqrt(1 + W)) and a text's second its frozen self; the manifest records the vote, so a
    resume with another weight is refused."""
    out = tmp_path / "emb"
    predict(tiny_dir, ckpt, out, vote_weight=3.0)
    image, text, meta = read_as_clip_retrieval(out)
    assert image.shape == text.shape == (len(meta), 64)
    np.testing.assert_allclose(np.linalg.norm(image.astype(np.float32), axis=1), 1, atol=2e-3)
    positions = meta["position"].to_numpy()
    for rows, side in ((image, "image"), (text, "text")):
        want = expected[f"{side}_refined"][positions] / 2.0  # 1 / sqrt(1 + 3)
        np.testing.assert_allclose(rows[:, :32].astype(np.float32), want, rtol=0, atol=2e-3)
    frozen_text = expected["text"][positions] * (3.0**0.5 / 2.0)
    np.testing.assert_allclose(text[:, 32:].astype(np.float32), frozen_text, rtol=0, atol=2e-3)
    assert json.loads((out / "manifest.json").read_text())["plan"]["vote"] == {"weight": 3.0, "whiten": 0.001}
    with pytest.raises(EmbeddingExportError, match=r"other settings \(vote "):
        predict(tiny_dir, ckpt, out, vote_weight=2.0)


def test_resume_with_other_part_size_or_world_size_is_refused_in_one_line(
    tiny_dir, ckpt, reference, tmp_path, capsys
):
    out = tmp_path / "emb"
    shutil.copytree(reference, out)
    config = write_config(tmp_path / "predict.yaml", tiny_dir, out, part_size=16)
    with pytest.raises(SystemExit) as exit_:
        main(["predict", "--config", str(config), f"--ckpt_path={ckpt}"])
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("reco: error: ") and "part_size 20 -> 16" in err

    writer = EmbeddingWriter(str(out), part_size=PART, write_frozen=True)
    trainer = SimpleNamespace(
        global_rank=0, world_size=2, datamodule=None, predict_loop=SimpleNamespace(return_predictions=None)
    )
    module = SimpleNamespace(predict_step=lambda batch, batch_idx: None)
    with pytest.raises(EmbeddingExportError, match="world_size 1 -> 2") as refused:
        writer.setup(trainer, module, "predict")
    assert "\n" not in str(refused.value)
    assert files(out) == files(reference)


# A script file, not `python -c`: Lightning's DDP launcher starts the other rank by re-running it. Each rank
# logs the rows it writes; rank SLOW_RANK sleeps SLOW_SECONDS after each batch, so that a run can be killed
# when the other rank is done and this one is half-way.
CLI_SCRIPT = """
import os, time
from pathlib import Path
from reco_lightning.prediction import EmbeddingWriter
write = EmbeddingWriter.write_on_batch_end
def logged(self, trainer, pl_module, prediction, batch_indices, batch, *args):
    write(self, trainer, pl_module, prediction, batch_indices, batch, *args)
    with open(Path(os.environ["ROWS_LOG"]) / f"rank{trainer.global_rank}.txt", "a") as log:
        log.write(f"{len(batch['id'])}\\n")
    if trainer.global_rank == int(os.environ["SLOW_RANK"]):
        time.sleep(float(os.environ["SLOW_SECONDS"]))
EmbeddingWriter.write_on_batch_end = logged
from reco_lightning.cli import main
main()
"""


def launch(command, cwd, log: Path, slow: float) -> subprocess.Popen:
    log.mkdir()
    env = {**os.environ, "ROWS_LOG": str(log), "SLOW_RANK": "1", "SLOW_SECONDS": str(slow)}
    return subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )


def logged_rows(log: Path, rank: int) -> int:
    path = log / f"rank{rank}.txt"
    return sum(int(line) for line in path.read_text().split()) if path.is_file() else 0


def test_two_processes_killed_and_resumed_write_disjoint_parts_that_cover_every_row_once(
    tiny_dir, ckpt, reference, expected, tmp_path
):
    script = tmp_path / "reco_cli.py"
    script.write_text(CLI_SCRIPT)
    out = tmp_path / "emb"
    config = write_config(tmp_path / "predict.yaml", tiny_dir, out, devices=2)
    command = [sys.executable, str(script), "predict", "--config", str(config), f"--ckpt_path={ckpt}"]

    killed = launch(command, tmp_path, tmp_path / "log_killed", slow=2.0)
    rank0_done, rank1_part0 = (
        out / "progress" / "rank_0000.json",
        out / "metadata" / "metadata_0001_000000.parquet",
    )
    deadline = time.time() + 180
    while not rank1_part0.is_file() and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(killed.pid, signal.SIGKILL)  # both ranks, with no cleanup: rank 1 half-way (2 s a batch)
    _, err = killed.communicate()
    assert rank1_part0.is_file() and json.loads(rank0_done.read_text())["complete"], err.decode()[-3000:]
    written = {rank: rows_of(out, rank) for rank in (0, 1)}
    assert written == {0: 32, 1: 20} and not json.loads((out / "manifest.json").read_text())["complete"]

    resumed = launch(command, tmp_path, tmp_path / "log_resumed", slow=0.0)
    try:
        _, err = resumed.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(resumed.pid, signal.SIGKILL)
        _, err = resumed.communicate()
        pytest.fail(f"resumed 2-process predict hung:\n{err.decode()[-3000:]}")
    assert resumed.returncode == 0, err.decode()[-12000:]
    # rank 0 had nothing left (no batch at all), rank 1 the 12 rows its complete part did not hold
    assert [logged_rows(tmp_path / "log_resumed", rank) for rank in (0, 1)] == [0, 12]

    names = [f"{rank:04d}_{part:06d}" for rank in (0, 1) for part in (0, 1)]  # 20 + 12 rows a rank
    assert part_names(out) == {f: names for f in FOLDERS} and part_names(out / "frozen") == part_names(out)
    meta = assert_rows(out, expected)
    assert_rows(out / "frozen", expected, refined=(False, False))
    positions = meta["position"].tolist()
    assert sorted(positions) == list(range(64)), "every row once"
    assert positions == list(range(0, 64, 2)) + list(range(1, 64, 2)), "rank 0's parts, then rank 1's"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["rows"] == 64 and manifest["plan"]["world_size"] == 2
    assert [r["rows_per_part"] for r in manifest["ranks"]] == [[20, 12], [20, 12]]
    reference_plan = json.loads((reference / "manifest.json").read_text())["plan"]
    assert {**manifest["plan"], "world_size": 1} == reference_plan


def rows_of(out: Path, rank: int) -> int:
    """Rows of ``rank``'s complete parts (those with a metadata file)."""
    return sum(pq.ParquetFile(p).metadata.num_rows for p in (out / "metadata").glob(f"metadata_{rank:04d}_*"))


def test_unreadable_pairs_are_named_and_a_run_that_writes_nothing_fails(tiny_dir, ckpt, tmp_path, capsys):
    """A source of some unreadable pairs warns with their keys; one of only unreadable pairs is an error."""
    rows = list(csv.reader((tiny_dir / "val.csv").open()))
    header, good = rows[0], rows[1:5]
    image = header.index("filepath")
    good = [[str(tiny_dir / v) if i == image else v for i, v in enumerate(row)] for row in good]
    missing = [[str(tmp_path / "gone.png") if i == image else v for i, v in enumerate(good[0])]]
    for name, data in (("some", [*good, *missing]), ("none", missing * 2)):
        with (tmp_path / f"{name}.csv").open("w", newline="") as fh:
            csv.writer(fh).writerows([header, *data])
        write_config(tmp_path / f"{name}.yaml", tiny_dir, tmp_path / f"{name}_emb")

    def args(name: str) -> list[str]:
        source = f"--data.init_args.predict={tmp_path / name}.csv"
        return ["predict", "--config", str(tmp_path / f"{name}.yaml"), f"--ckpt_path={ckpt}", source]

    gone = re.escape(str(tmp_path / "gone.png"))
    with pytest.warns(
        UserWarning,
        match=rf"1 source pairs could not be read .* e\.g\. some\.csv:4 \(image not found: {gone}\);",
    ):
        main(args("some"))
    assert json.loads((tmp_path / "some_emb" / "manifest.json").read_text())["rows"] == 4
    with pytest.raises(SystemExit) as exit_info:
        main(args("none"))
    assert exit_info.value.code == 1
    assert "nothing was written: 2 source pairs could not be read" in capsys.readouterr().err
