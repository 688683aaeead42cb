"""Pair ids identify a pair across files, so self-exclusion compares like with like (issue: a CSV's row
number made validation pair i drop the unrelated memory row i)."""

import shutil
import warnings
from types import SimpleNamespace

import numpy as np
import pytest

from helpers_data import write_shards
from reco_lightning.data.datamodule import ImageTextDataModule
from reco_lightning.data.ids import id_namespace_problem
from reco_lightning.data.sources import open_source
from reco_lightning.memory import MemoryStore


def test_the_same_image_gets_the_same_id_in_any_csv_and_row_numbers_mean_nothing(tmp_path, tiny_dir):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "images").symlink_to(tiny_dir / "images")
    rows = (tiny_dir / "train.csv").read_text().splitlines()[1:5]
    (tmp_path / "data" / "a.csv").write_text("filepath,caption\n" + "\n".join(rows) + "\n")
    (tmp_path / "data" / "splits").mkdir()
    moved = [f"../{row}" for row in reversed(rows)]  # other folder, other order
    (tmp_path / "data" / "splits" / "b.csv").write_text("filepath,caption\n" + "\n".join(moved) + "\n")
    a = {r.caption: r.id for r in open_source(tmp_path / "data" / "a.csv")}
    b = {r.caption: r.id for r in open_source(tmp_path / "data" / "splits" / "b.csv")}
    assert a == b and len(set(a.values())) == len(a)
    folder = tmp_path / "folder" / "images"
    folder.mkdir(parents=True)
    for row in rows:
        shutil.copy(tiny_dir / row.split(",")[0], folder)
    assert {r.id for r in open_source(tmp_path / "folder")} == set(a.values())  # a folder of the same images

    train = [r.id for r in open_source(tiny_dir / "train.csv")]
    val = [r.id for r in open_source(tiny_dir / "val.csv")]
    assert not set(train) & set(val), "pair i of val.csv is not pair i of train.csv"


def test_declared_ids_win_and_bad_ones_are_named(tmp_path, tiny_dir):
    (tmp_path / "images").symlink_to(tiny_dir / "images")
    (tmp_path / "p.csv").write_text(
        "filepath,caption,id\nimages/train_000000.png,a,70\nimages/train_000001.png,b,x\n"
    )
    with pytest.raises(ValueError, match=r"p.csv row 2: id column 'id' holds 'x', not an integer"):
        list(open_source(tmp_path / "p.csv", id_column="id"))
    assert open_source(tmp_path / "p.csv", id_column="id").id_scheme == "column:id"
    with pytest.raises(ValueError, match="no id column"):
        open_source(tiny_dir / "zeroshot" / "00", id_column="id")


def test_shard_ids_derive_from_shard_name_and_key_wherever_the_shards_live(tmp_path):
    write_shards(tmp_path / "a", [3, 4])
    shutil.copytree(tmp_path / "a", tmp_path / "elsewhere" / "b")
    a, b = (open_source(tmp_path / p) for p in ("a", "elsewhere/b"))
    assert [r.id for r in a] == [r.id for r in b] and len({r.id for r in a}) == 7
    assert a.id_scheme == "shard-key" and open_source(tmp_path / "a", id_column="id").id_scheme == "column:id"


def test_the_quickstart_memory_excludes_own_rows_by_id_and_nothing_else(tiny_dir):
    """Memory from train.csv: training on train.csv finds each pair's own row; val.csv pairs none."""
    memory = MemoryStore.open(tiny_dir / "memory")
    assert memory.manifest["id_scheme"] == "image-path"
    train = np.array([r.id for r in open_source(tiny_dir / "train.csv")])
    val = np.array([r.id for r in open_source(tiny_dir / "val.csv")])
    np.testing.assert_array_equal(np.asarray(memory.ids), train)
    assert not np.isin(val, np.asarray(memory.ids)).any()


def test_memory_select_keeps_the_id_scheme(tiny_dir, tmp_path):
    memory = MemoryStore.open(tiny_dir / "memory")
    subset = MemoryStore.open(memory.select(np.arange(10), tmp_path / "subset"))
    assert subset.manifest["id_scheme"] == "image-path"


def _attached(dm: ImageTextDataModule, memory: MemoryStore) -> ImageTextDataModule:
    """The datamodule as RecoModule.setup leaves it when the model holds ``memory`` (what it is told)."""
    dm.trainer = SimpleNamespace(global_rank=0, world_size=1)
    dm.expect(None, memory_id_scheme=memory.manifest.get("id_scheme"), memory=str(memory.path))
    return dm


def test_a_memory_and_a_source_whose_ids_cannot_meet_are_warned_about_in_one_line(tiny_dir, tmp_path):
    memory = MemoryStore.open(tiny_dir / "memory")  # ids from image paths
    write_shards(tmp_path / "shards", [4, 4])
    backbone = str(tiny_dir / "clip")
    shards = _attached(ImageTextDataModule(backbone, val=str(tmp_path / "shards"), batch_size=4), memory)
    with pytest.warns(
        UserWarning, match="has ids from image-path but .*shards has ids from shard-key"
    ) as caught:
        shards.val_dataloader()
    assert all("\n" not in str(w.message) for w in caught)
    same = _attached(ImageTextDataModule(backbone, val=str(tiny_dir / "val.csv"), batch_size=4), memory)
    with warnings.catch_warnings(record=True) as quiet:
        warnings.simplefilter("always")
        same.val_dataloader()  # CSV against a memory built from a CSV: ids comparable, no warning
    assert not [w for w in quiet if "has ids from" in str(w.message)]

    declared = SimpleNamespace(name="p.csv", id_scheme="column:pair_id")
    assert id_namespace_problem("column:id", declared, "m") is None  # declared ids are trusted to agree
    assert "unrecorded scheme" in id_namespace_problem(None, declared, "m")
