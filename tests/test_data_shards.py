"""Damaged and mis-counted webdataset shards: readable members are used, the rest is counted as bad samples
naming the shard, and every rank still derives the same number of batches (uneven counts hang DDP)."""

import json
import os
import tarfile
import warnings
from pathlib import Path

import pytest

from helpers_data import run_ddp_stream, write_shards
from reco_lightning.data.sources import open_source
from reco_lightning.data.stream import PairStream, decode


def truncate_inside(shard: Path, member: int, into: int = 10) -> None:
    """Cut ``shard`` ``into`` bytes into the data of its ``member``-th member, as an interrupted copy does."""
    with tarfile.open(shard) as tar:
        info = tar.getmembers()[member]
    shard.write_bytes(shard.read_bytes()[: info.offset_data + into])


def write_stats(shard: Path, successes: int, age_s: float = 0.0) -> None:
    """img2dataset's ``<shard>_stats.json``; ``age_s`` > 0 makes it older than the tar (written before it)."""
    stats = shard.with_name(shard.stem + "_stats.json")
    stats.write_text(json.dumps({"count": successes, "successes": successes}))
    tar_mtime = shard.stat().st_mtime
    stamp = tar_mtime - age_s if age_s else max(tar_mtime, stats.stat().st_mtime) + 1
    os.utime(stats, (stamp, stamp))


def rank_batches(source, world: int, workers: int) -> list[tuple[int, int, list]]:
    """(declared length, batches yielded, samples) per rank, every worker's share read as a DataLoader would."""
    out = []
    for rank in range(world):
        yielded, samples = 0, []
        for worker in range(workers):
            stream = PairStream(
                source, batch_size=2, shuffle=True, rank=rank, world_size=world, num_workers=workers
            )
            records = list(stream._records(worker))
            yielded += -(-len(records) // 2)
            samples.extend(records)
        out.append((len(stream), yielded, samples))
    return out


def assert_ranks_in_step(source) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for world, workers in ((1, 1), (2, 1), (2, 2), (3, 2)):
            ranks = rank_batches(source, world, workers)
            assert {(declared, yielded) for declared, yielded, _ in ranks} == {(ranks[0][0], ranks[0][0])}, (
                f"world {world}, workers {workers}: (declared, yielded) per rank {[r[:2] for r in ranks]}"
            )
            positions = [p for _, _, samples in ranks for p, _ in samples]
            assert len(positions) == len(set(positions)) == len(source) - len(source) % world


@pytest.mark.parametrize("stats", [False, True], ids=["header-scan", "img2dataset-stats"])
def test_truncated_shard_keeps_readable_members_and_counts_the_rest_as_bad(tmp_path, stats):
    good = write_shards(tmp_path, [5, 6, 4])  # ids 1000..1014; shard 1 holds 1005..1010
    shard = tmp_path / "00001.tar"
    truncate_inside(shard, member=3 * 2 + 1)  # the caption of 1007: 1005 and 1006 stay whole
    if stats:
        for path, n in zip(sorted(tmp_path.glob("*.tar")), (5, 6, 4), strict=True):
            write_stats(path, n)
    source = open_source(tmp_path, id_column="id")
    records = list(source)  # a bare tarfile.ReadError before
    kept = [r.id for r in records if isinstance(decode(r), dict)]
    assert kept == [i for i in good if not 1007 <= i <= 1010]
    bad = {r.key: decode(r) for r in records if isinstance(decode(r), str)}
    assert bad and all(key.startswith("00001.tar:") for key in bad)
    assert any("truncated" in why and "unexpected end of data" in why for why in bad.values())
    # with stats every missing sample of the shard is one bad sample; without, the cut one and one for the rest
    assert len(source) == len(records) == (15 if stats else 9 + 2 + 2)
    assert_ranks_in_step(source)


@pytest.mark.parametrize("where", ["first-header", "empty-file", "end-marker"])
def test_shard_cut_anywhere_is_named_and_keeps_ranks_in_step(tmp_path, where):
    write_shards(tmp_path, [4, 5])
    shard = tmp_path / "00001.tar"
    data = shard.read_bytes()
    with tarfile.open(shard) as tar:
        last = tar.getmembers()[-1]
    cut = {"first-header": 300, "empty-file": 0, "end-marker": last.offset_data + last.size}[where]
    shard.write_bytes(data[:cut])
    source = open_source(tmp_path, id_column="id")
    bad = {r.key: decode(r) for r in source if isinstance(decode(r), str)}
    assert bad and all(key.startswith("00001.tar:") for key in bad)
    assert all(("shard" in why or "tar" in why) for why in bad.values()), bad
    assert_ranks_in_step(source)


def test_stats_older_than_a_rewritten_shard_are_not_trusted(tmp_path):
    """img2dataset wrote 9 samples and its stats; a filter then rewrote the tar with 6: count the tar."""
    write_shards(tmp_path, [9, 5])
    write_stats(tmp_path / "00000.tar", 9, age_s=60)  # the stats predate the tar
    write_shards(tmp_path / "filtered", [6])
    os.replace(tmp_path / "filtered" / "00000.tar", tmp_path / "00000.tar")
    source = open_source(tmp_path, id_column="id")
    assert len(source) == 11
    assert all(isinstance(decode(r), dict) for r in source), "no padding: the real samples only"
    assert_ranks_in_step(source)


@pytest.mark.parametrize("claimed", [4, 8], ids=["stats-claim-fewer", "stats-claim-more"])
def test_stats_that_disagree_with_the_tar_still_keep_ranks_in_step(tmp_path, claimed):
    """Stats newer than the tar but wrong (copied from elsewhere): the length they give is what is read."""
    write_shards(tmp_path, [6, 5])
    write_stats(tmp_path / "00000.tar", claimed)
    source = open_source(tmp_path, id_column="id")
    assert len(source) == claimed + 5
    with pytest.warns(UserWarning, match="00000.tar"):
        records = list(source)
    assert len(records) == claimed + 5
    assert_ranks_in_step(source)


@pytest.mark.parametrize("stats", [False, True], ids=["header-scan", "img2dataset-stats"])
def test_memory_build_over_a_truncated_shard_finishes_and_counts_bad_samples(tmp_path, tiny_backbone, stats):
    from reco_lightning.jobs.memory_build import build_memory
    from reco_lightning.memory import MemoryStore

    write_shards(tmp_path / "shards", [5, 6])
    truncate_inside(tmp_path / "shards" / "00001.tar", member=3 * 2 + 1)
    if stats:
        write_stats(tmp_path / "shards" / "00000.tar", 5)
        write_stats(tmp_path / "shards" / "00001.tar", 6)
    out = build_memory(
        tmp_path / "shards",
        tmp_path / "mem",
        tiny_backbone,
        batch_size=4,
        chunk_size=4,
        trainer_kwargs={"accelerator": "cpu", "devices": 1, "enable_progress_bar": False},
    )
    store = MemoryStore.open(out)
    assert len(store) == 7  # 5 + the two whole samples of the cut shard
    bad = 4 if stats else 2
    assert f"{bad} bad samples skipped" in store.manifest["source"]
    # the tally adds up over chunks (of 4 pairs): every bad sample is a shard's damage, none an image's
    reasons = store.manifest["bad_reasons"]
    assert sum(reasons.values()) == bad and all("shard" in r or "tar" in r for r in reasons), reasons


def test_two_process_ddp_over_a_truncated_shard_and_stale_stats_stays_in_step(tmp_path, tiny_backbone):
    shards = tmp_path / "shards"
    write_shards(shards, [7, 6, 9, 5])  # ids 1000..1026
    truncate_inside(shards / "00001.tar", member=3 * 3 + 1)  # 1007..1009 whole, the rest of shard 1 lost
    write_stats(shards / "00001.tar", 6)
    write_stats(shards / "00002.tar", 12)  # claims 3 more than the tar holds
    write_stats(shards / "00003.tar", 8, age_s=60)  # predates the tar: counted instead
    ranks = run_ddp_stream(shards, tiny_backbone, tmp_path)
    assert ranks[0]["batches"] == ranks[1]["batches"] > 0
    ids = ranks[0]["ids"] + ranks[1]["ids"]
    assert len(ids) == len(set(ids))
    whole = [*range(1000, 1010), *range(1013, 1027)]
    assert sorted(ids) == whole  # 7 + 6 + 12 + 5 = 30 positions, even: none left out for balance
    assert ranks[0]["bad_reported"] == 30 - len(whole)
    listing = (tmp_path / "bad_samples_train_epoch0.txt").read_text().splitlines()
    assert len(listing) == 6 and {key.split(":")[0] for key in listing} == {"00001.tar", "00002.tar"}
