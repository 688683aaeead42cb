import pytest
import torch

from helpers_data import run_ddp_stream, write_shards
from reco_lightning.data.collate import PairCollator
from reco_lightning.data.datamodule import ImageTextDataModule
from reco_lightning.data.records import PairRecord
from reco_lightning.data.shards import ShardSource, _unusable
from reco_lightning.data.sources import CsvSource, FolderSource, open_source
from reco_lightning.data.stream import PairStream, decode


def ids_of(stream: PairStream) -> list[list[int]]:
    return [[r.id for _, r, _ in batch] for batch in stream]


def test_sources_read_csv_folder_and_shards(tmp_path, tiny_dir):
    assert isinstance(open_source(tiny_dir / "train.csv"), CsvSource)
    csv_pairs = list(open_source(tiny_dir / "train.csv"))
    assert len(csv_pairs) == 192 and len({r.id for r in csv_pairs}) == 192  # ids from distinct image paths
    assert decode(csv_pairs[0])["image"].size == (32, 32)

    folder = tmp_path / "folder"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes((tiny_dir / "images" / f"train_{i:06d}.png").read_bytes())
        (folder / f"{i}.txt").write_text(f"caption {i}\n")
    pairs = list(open_source(folder))
    assert isinstance(open_source(folder), FolderSource) and [r.caption for r in pairs] == [
        "caption 0",
        "caption 1",
        "caption 2",
    ]

    good = write_shards(tmp_path / "shards", [3, 5])
    source = open_source(tmp_path / "shards", id_column="id")  # the json field holding declared ids
    assert isinstance(source, ShardSource) and len(source) == 8
    assert [r.id for r in source] == good == list(range(1000, 1008))
    assert len({r.id for r in open_source(tmp_path / "shards")}) == 8  # else derived from member keys
    pattern = open_source(str(tmp_path / "shards" / "{00000..00001}.tar"))
    assert len(pattern) == 8


def test_bad_columns_and_missing_sources_are_clear(tmp_path):
    (tmp_path / "p.csv").write_text("path,text\nx.png,hello\n")
    with pytest.raises(ValueError, match="has no column 'filepath'.*set image_column"):
        open_source(tmp_path / "p.csv")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_source(tmp_path / "nope.csv")


@pytest.mark.parametrize("world,workers", [(2, 1), (2, 2), (3, 2)])
def test_ranks_and_workers_split_without_overlap_and_with_equal_batches(tmp_path, world, workers):
    write_shards(tmp_path, [7, 3, 11, 2])  # 23 pairs in uneven shards
    source = open_source(tmp_path)
    per_rank, batch_counts = [], set()
    for rank in range(world):
        ids = []
        for worker in range(workers):
            stream = PairStream(
                source, batch_size=4, shuffle=True, seed=3, rank=rank, world_size=world, num_workers=workers
            )
            records = list(stream._records(worker))
            ids.extend(r.id for _, r in records)
        stream = PairStream(source, batch_size=4, rank=rank, world_size=world, num_workers=workers)
        batch_counts.add(len(stream))
        per_rank.append(ids)
    flat = [i for ids in per_rank for i in ids]
    assert len(flat) == len(set(flat)), "no pair twice in an epoch"
    assert {len(ids) for ids in per_rank} == {23 // world}
    assert len(flat) == 23 - 23 % world and len(batch_counts) == 1


def test_shuffle_is_seeded_and_changes_with_epoch(tmp_path):
    write_shards(tmp_path, [10, 10, 10])
    source = open_source(tmp_path)

    def order(seed, epoch):
        stream = PairStream(source, batch_size=30, shuffle=True, seed=seed, shuffle_buffer=8)
        stream.set_epoch(epoch)
        return ids_of(stream)[0]

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1) and order(0, 0) != order(1, 0)
    assert sorted(order(0, 1)) == sorted(order(0, 0))


def test_bad_samples_are_dropped_and_reported_by_key_and_why(tmp_path, tiny_backbone):
    write_shards(tmp_path, [6], bad={1, 4})  # 1: an empty caption, 4: an image PIL cannot open
    from reco_lightning.encoders import Preprocessor

    collator = PairCollator(Preprocessor.from_pretrained(tiny_backbone, max_text_length=16))
    (batch,) = [collator(b) for b in PairStream(open_source(tmp_path, id_column="id"), batch_size=6)]
    assert batch["id"].tolist() == [1000, 1002, 1003, 1005]
    assert batch["pixel_values"].shape[0] == 4
    assert sorted(batch["bad_keys"]) == [
        "00000.tar:0000000001 (empty caption)",
        "00000.tar:0000000004 (not an image PIL can open)",
    ]
    empty = collator(
        [(0, r, "why") for _, r in open_source(tmp_path).iter_unit(tmp_path / "00000.tar", lambda p: p < 2)]
    )
    assert empty["id"].numel() == 0 and "pixel_values" not in empty and len(empty["bad_keys"]) == 2


def test_why_a_pair_is_bad(tmp_path, tiny_dir):
    """A missing file, a truncated image and a tar member named by a reader each say so (the key is kept)."""
    image = tiny_dir / "images" / "train_000000.png"
    (tmp_path / "cut.png").write_bytes(image.read_bytes()[:60])
    (tmp_path / "pairs.csv").write_text(
        f"filepath,caption\n{image},a photo\ngone.png,a photo\ncut.png,a photo\n{image},\n"
    )
    whys = [decode(r) for r in open_source(tmp_path / "pairs.csv")]
    assert isinstance(whys[0], dict)
    assert whys[1] == f"image not found: {tmp_path / 'gone.png'}"
    assert whys[2].startswith("unreadable image: ") or whys[2] == "not an image PIL can open"
    assert whys[3] == "empty caption"
    record = PairRecord(1, "00000.tar:7", "", _unusable("unreadable tar member: boom"))
    assert decode(record) == "unreadable tar member: boom" and record.key == "00000.tar:7"


def test_datamodule_loader_length_matches_what_it_yields(tiny_dir):
    dm = ImageTextDataModule(str(tiny_dir / "clip"), train=str(tiny_dir / "train.csv"), batch_size=50)
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(loader) == len(batches) == 4 and sum(len(b["id"]) for b in batches) == 192


def test_two_process_ddp_gives_equal_batches_and_disjoint_pairs(tmp_path, tiny_backbone):
    good = write_shards(tmp_path / "shards", [9, 4, 13, 5], bad={2, 17})  # 31 pairs, 2 bad
    ranks = run_ddp_stream(tmp_path / "shards", tiny_backbone, tmp_path)
    assert ranks[0]["batches"] == ranks[1]["batches"] > 0
    ids = ranks[0]["ids"] + ranks[1]["ids"]
    assert len(ids) == len(set(ids)), "a pair was seen twice in an epoch"
    assert set(ids) <= set(good) and len(ids) == 31 - 1 - 2  # one left out for balance, two bad
    assert ranks[0]["bad_reported"] == 2.0
    assert torch.tensor(ranks[0]["gathered_sizes"]).sum() == len(ids)
