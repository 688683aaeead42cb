"""On-disk IVF-PQ built in shards (`ivfpq_ondisk`, `reco memory index`), the memmap-scanning exact backend,
and what keeps RSS small at scale (page release, streamed import)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from reco_lightning.arrays import release_pages
from reco_lightning.errors import RecoMemoryError
from reco_lightning.hashing import derived_id, derived_ids
from reco_lightning.memory import MemoryBackend, MemoryStore, interop, ondisk
from reco_lightning.memory.exact import ExactBackend, MappedExactBackend
from reco_lightning.memory.interop import import_embeddings
from reco_lightning.memory.ivfpq import IVFPQBackend, rerank_exact
from reco_lightning.memory.ondisk import OnDiskIVFPQBackend, ShardedIndexBuild
from reco_lightning.memory.reindex import index_memory

DIM, N = 32, 3000
SPEC = {"class_path": "ivfpq_ondisk", "init_args": {"nlist": 16, "m": 8, "nbits": 6, "rerank": 40}}
RECO = [str(Path(sys.executable).parent / "reco")]


def _unit(n: int, seed: int = 0, dim: int = DIM) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


@pytest.fixture()
def rows(tmp_path) -> np.ndarray:
    """fp16 rows memory-mapped from disk, as a memory keeps them."""
    np.save(tmp_path / "rows.npy", _unit(N).astype(np.float16))
    return np.load(tmp_path / "rows.npy", mmap_mode="r")


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def _full_build(rows: np.ndarray, root: Path, num_shards: int = 3) -> Path:
    build = ShardedIndexBuild(rows, root / "work", SPEC, num_shards=num_shards, train_size=None)
    build.train()
    for shard in range(num_shards):
        build.build_shard(shard, progress=False)
    build.merge(root / "index")
    return root / "index"


def test_sharded_build_searches_exactly_like_an_in_ram_ivfpq(rows, tmp_path):
    build = ShardedIndexBuild(rows, tmp_path / "work", SPEC, num_shards=3, train_size=None)
    assert [build.shard_range(s) for s in range(3)] == [(0, 1000), (1000, 2000), (2000, 3000)]
    build.train()
    for shard in (2, 0, 1):  # any order: each shard is independent
        build.build_shard(shard, progress=False)
    merged = build.merge(tmp_path / "index")
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == [
        "backend.json",
        "index.faiss",
        "lists.ivfdata",
    ]
    assert isinstance(merged, OnDiskIVFPQBackend) and merged.ntotal == N
    in_ram = IVFPQBackend(DIM, **{k: v for k, v in SPEC["init_args"].items()})
    in_ram.build(rows, train_size=None)
    queries = _unit(50, seed=1)
    for backend in (merged, in_ram):
        backend.attach(rows)
    np.testing.assert_array_equal(merged.search(queries, 10)[1], in_ram.search(queries, 10)[1])
    np.testing.assert_array_equal(merged.search(queries, 10)[0], in_ram.search(queries, 10)[0])
    reopened = MemoryBackend.load(tmp_path / "index", nprobe=2)  # search-time args still apply
    assert isinstance(reopened, OnDiskIVFPQBackend) and reopened.nprobe == 2 and reopened.index.nprobe == 2
    assert reopened.nbytes() >= (tmp_path / "index" / "lists.ivfdata").stat().st_size


def test_a_killed_shard_or_merge_resumes_to_the_files_of_an_uninterrupted_build(rows, tmp_path, monkeypatch):
    whole = _files(_full_build(rows, tmp_path / "whole"))

    root = tmp_path / "killed"
    build = ShardedIndexBuild(rows, root / "work", SPEC, num_shards=3, train_size=None)
    build.train()
    build.build_shard(0, progress=False)
    real_write = ondisk.faiss.write_index

    def killed(*args):
        raise KeyboardInterrupt("killed while writing shard 1")

    monkeypatch.setattr(ondisk.faiss, "write_index", killed)
    with pytest.raises(KeyboardInterrupt):
        build.build_shard(1, progress=False)
    monkeypatch.setattr(ondisk.faiss, "write_index", real_write)
    assert build.missing_shards() == [1, 2]
    assert not any(p.name.endswith(".tmp") for p in (root / "work").iterdir())  # nothing half-written kept
    (root / ".index.merging").mkdir(parents=True)  # and a merge killed half-way
    (root / ".index.merging" / "lists.ivfdata").write_bytes(b"junk")

    resumed = ShardedIndexBuild(rows, root / "work", SPEC, num_shards=3, train_size=None)
    monkeypatch.setattr(OnDiskIVFPQBackend, "train", lambda *a, **k: pytest.fail("trained again"))
    resumed.train()  # a no-op: trained.faiss is there
    for shard in resumed.missing_shards():
        resumed.build_shard(shard, progress=False)
    resumed.merge(root / "index")
    assert _files(root / "index") == whole
    assert not (root / ".index.merging").exists()


def test_a_build_with_other_arguments_or_missing_parts_is_refused_by_name(rows, tmp_path):
    build = ShardedIndexBuild(rows, tmp_path / "work", SPEC, num_shards=3, train_size=None)
    with pytest.raises(
        RecoMemoryError, match="trained.faiss is missing or incomplete .* run the train stage first"
    ):
        build.build_shard(0, progress=False)
    build.train()
    (tmp_path / "work" / "trained.json").unlink()  # killed between the stage's two files: not trained yet
    with pytest.raises(RecoMemoryError, match="trained.faiss is missing or incomplete"):
        build.build_shard(0, progress=False)
    build.train()
    build.build_shard(0, progress=False)
    with pytest.raises(RecoMemoryError, match=r"lacks shards \[1, 2\]"):
        build.merge(tmp_path / "index")
    with pytest.raises(RecoMemoryError, match="shard 3 does not exist: use 0..2"):
        build.build_shard(3)
    other = ShardedIndexBuild(rows, tmp_path / "work", SPEC, num_shards=4, train_size=None)
    with pytest.raises(RecoMemoryError, match="holds another index build"):
        other.build_shard(0, progress=False)
    with pytest.raises(RecoMemoryError, match="makes an 'ivfpq_ondisk' index, not IVFPQBackend"):
        ShardedIndexBuild(rows, tmp_path / "w2", {"class_path": "ivfpq", "init_args": {"m": 8}})
    with pytest.raises(RecoMemoryError, match="num_shards=0 must be in 1..3000"):
        ShardedIndexBuild(rows, tmp_path / "w3", SPEC, num_shards=0)


def test_a_missing_or_short_lists_file_is_refused_on_load(rows, tmp_path):
    index = _full_build(rows, tmp_path, num_shards=1)
    lists = index / "lists.ivfdata"
    lists.write_bytes(lists.read_bytes()[:100])
    with pytest.raises(RecoMemoryError, match="lists.ivfdata has 100 bytes but the index needs"):
        MemoryBackend.load(index)
    lists.unlink()
    with pytest.raises(RecoMemoryError, match="lists.ivfdata is missing"):
        MemoryBackend.load(index)


def _mapping(path: Path) -> list[str]:
    return [
        line
        for line in Path("/proc/self/maps").read_text().splitlines()
        if line.endswith(str(path.resolve()))
    ]


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs Linux /proc")
def test_every_process_maps_the_same_lists_file_read_only_and_shared(rows, tmp_path):
    """One page-cached copy per node: each process maps the file (shared, read-only), none copies it."""
    index = _full_build(rows, tmp_path, num_shards=2)
    lists = (index / "lists.ivfdata").resolve()
    backend = MemoryBackend.load(index)
    backend.attach(rows)
    backend.search(_unit(4, seed=2), 5)
    here = _mapping(lists)
    assert here and all(line.split()[1] == "r--s" for line in here)
    script = (
        "import sys, numpy as np\n"
        "from reco_lightning.memory import MemoryBackend\n"
        "b = MemoryBackend.load(sys.argv[1]); b.attach(np.load(sys.argv[2], mmap_mode='r'))\n"
        "b.search(np.ones((2, b.dim), dtype='float32') / b.dim ** 0.5, 5)\n"
        "print([l for l in open('/proc/self/maps') if l.rstrip().endswith(sys.argv[3])])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(index), str(tmp_path / "rows.npy"), str(lists)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    inode = os.stat(lists).st_ino
    assert "r--s" in out and str(inode) in out and str(inode) in here[0]


def _memory(tmp_path: Path) -> Path:
    return MemoryStore.write(tmp_path / "memory", _unit(N, 3), _unit(N, 4), backend="exact")


def test_reco_memory_index_in_stages_with_shards_in_separate_processes(tmp_path):
    """The cluster path through the command: train once, two shard processes at once, merge once."""
    memory = _memory(tmp_path)
    reference = tmp_path / "reference"
    shutil.copytree(memory, reference)
    index_memory(reference, SPEC, num_shards=2, train_size=None)

    common = [
        "memory",
        "index",
        str(memory),
        "--backend",
        json.dumps(SPEC),
        "--num_shards",
        "2",
        "--train_size",
        "3000",
    ]
    subprocess.run([*RECO, *common, "--stage", "train"], check=True, capture_output=True)
    # later stages may repeat the settings, or leave them to the train stage's plan
    later = {0: common, 1: ["memory", "index", str(memory)]}
    shards = [
        subprocess.Popen([*RECO, *later[s], "--stage", "shard", "--shard", str(s)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for s in (0, 1)
    ]  # fmt: skip
    assert [p.wait(timeout=120) for p in shards] == [0, 0]
    assert not (memory / "index_image" / "lists.ivfdata").exists()  # nothing swapped before the merge
    other = subprocess.run(
        [*RECO, *common[:3], "--stage", "merge", "--num_shards", "3"], capture_output=True, text=True
    )
    assert other.returncode == 1 and "num_shards: 2 -> 3" in other.stderr  # names what differs
    merged = subprocess.run(
        [*RECO, *later[1], "--stage", "merge"], check=True, capture_output=True, text=True
    )
    assert "stage merge done for image, text" in merged.stdout
    for modality in ("image", "text"):
        assert _files(memory / f"index_{modality}") == _files(reference / f"index_{modality}")
    assert not (memory / ".index_build").exists()
    manifest = json.loads((memory / "manifest.json").read_text())
    assert manifest["backend"]["class_path"].endswith("OnDiskIVFPQBackend")
    store = MemoryStore.open(memory, search_params={"nprobe": 16})
    assert isinstance(store.index("text"), OnDiskIVFPQBackend)
    query = np.asarray(store.text_embeddings[:3], dtype=np.float32)
    assert store.index("text").search(query, 1)[1][:, 0].tolist() == [0, 1, 2]


def test_reindexing_with_other_backends_and_wrong_stages(tmp_path):
    memory = _memory(tmp_path)
    with pytest.raises(RecoMemoryError, match="only 'ivfpq_ondisk' builds in stages"):
        index_memory(memory, "exact_mmap", stage="train")
    index_memory(memory, "exact_mmap")
    store = MemoryStore.open(memory)
    assert isinstance(store.index("image"), MappedExactBackend)
    assert json.loads((memory / "manifest.json").read_text())["backend"]["class_path"].endswith(
        "MappedExactBackend"
    )
    with pytest.raises(RecoMemoryError, match="unknown stage 'sharding'"):
        index_memory(memory, SPEC, stage="sharding")


def test_a_memory_built_or_imported_with_ivfpq_ondisk_resumes_a_killed_index_build(tmp_path, monkeypatch):
    from test_memory_interop import make_clip_retrieval

    monkeypatch.setattr(ondisk, "SHARD_ROWS", 8)  # 21 rows: 3 shards per modality
    spec = {"class_path": "ivfpq_ondisk", "init_args": {"nlist": 2, "m": 4, "nbits": 2}}
    src = make_clip_retrieval(tmp_path / "src")
    whole = import_embeddings(src, tmp_path / "whole", backbone="some/clip", backend=spec)

    real, calls = ShardedIndexBuild.build_shard, []

    def killed_in_shard_1_of_text(self, shard, progress=True):
        calls.append(shard)
        if len(calls) == 5:  # image: 0, 1, 2; text: 0, then killed in 1
            raise KeyboardInterrupt("killed")
        return real(self, shard, progress)

    monkeypatch.setattr(ShardedIndexBuild, "build_shard", killed_in_shard_1_of_text)
    with pytest.raises(KeyboardInterrupt):
        import_embeddings(src, tmp_path / "memory", backbone="some/clip", backend=spec)
    monkeypatch.setattr(ShardedIndexBuild, "build_shard", real)
    built = []
    monkeypatch.setattr(interop, "_copy_rows", lambda *a: pytest.fail("rows copied again"))

    def counted(self, shard, progress=True):
        if not self.shard_path(shard).is_file():
            built.append(shard)
        return real(self, shard, progress)

    monkeypatch.setattr(ShardedIndexBuild, "build_shard", counted)
    resumed = import_embeddings(src, tmp_path / "memory", backbone="some/clip", backend=spec)
    assert built == [1, 2]  # the image index was complete and text's shard 0 too: neither is built again
    for name in ("index_image", "index_text"):
        assert _files(resumed / name) == _files(whole / name)
    assert _files(resumed)["image_emb.npy"] == _files(whole)["image_emb.npy"]


def test_exact_mmap_scans_the_stores_rows_like_exact(rows):
    queries = _unit(70, seed=5)  # >= 64: exact's blocked path too
    exact, mapped = ExactBackend(DIM), MappedExactBackend(DIM)
    exact.build(np.asarray(rows, dtype=np.float32))
    mapped.build(rows)
    with pytest.raises(RecoMemoryError, match="call attach"):
        mapped.search(queries, 5)
    mapped.attach(rows)
    (s1, i1), (s2, i2) = exact.search(queries, 5), mapped.search(queries, 5)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2, rtol=1e-6)
    with pytest.raises(RecoMemoryError, match=r"needs the store's \[3000, 32\] rows"):
        mapped.attach(rows[:10])


def test_release_pages_unmaps_a_memmap_and_keeps_its_data(rows, monkeypatch):
    assert release_pages(rows) and release_pages(rows[5:9]) and release_pages(np.asarray(rows))
    assert not release_pages(np.zeros((3, 3)))
    queries = _unit(20, seed=6)
    candidates = np.random.default_rng(7).integers(0, N, size=(20, 50))
    monkeypatch.setattr("reco_lightning.memory.ivfpq._RELEASE_ROWS", 1)  # release after every block
    on_disk = rerank_exact(queries, candidates, rows, 5)
    in_ram = rerank_exact(queries, candidates, np.array(rows), 5)
    np.testing.assert_array_equal(on_disk[1], in_ram[1])
    np.testing.assert_array_equal(on_disk[0], in_ram[0])


def test_derived_ids_are_derived_id_of_each_key():
    keys = ["images/0001.jpg", "", "ünïcode/κλειδί", "a" * 300]
    assert derived_ids("import:key", keys).tolist() == [derived_id("import:key", k) for k in keys]
    assert derived_ids("ns", []).dtype == np.int64


def test_import_normalises_exactly_the_rows_off_unit_norm_by_more_than_the_tolerance(tmp_path):
    """The fp16 norm screen must not change which rows are normalised: float64 norms decide."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _unit(400, seed=8) * np.linspace(0.997, 1.003, 400, dtype=np.float32)[:, None]
    rows16 = rows.astype(np.float16)
    rows16[7] = np.float16(4000.0)  # a finite row whose fp16 norm overflows
    for folder in ("img_emb", "text_emb", "metadata"):
        (tmp_path / "src" / folder).mkdir(parents=True)
    np.save(tmp_path / "src" / "img_emb" / "img_emb_0.npy", rows16)
    np.save(tmp_path / "src" / "text_emb" / "text_emb_0.npy", _unit(400, seed=9).astype(np.float16))
    pq.write_table(pa.table({"caption": ["c"] * 400}), tmp_path / "src" / "metadata" / "metadata_0.parquet")
    memory = import_embeddings(tmp_path / "src", tmp_path / "memory", backbone="some/clip")
    norms = np.linalg.norm(rows16.astype(np.float64), axis=1)
    off = np.abs(norms - 1) > interop.NORM_TOLERANCE
    assert 100 < off.sum() < 300
    manifest = json.loads((memory / "manifest.json").read_text())
    assert manifest["normalised_rows"]["image"] == int(off.sum())
    stored = np.load(memory / "image_emb.npy")
    np.testing.assert_array_equal(stored[~off], rows16[~off])
    np.testing.assert_allclose(np.linalg.norm(stored[off].astype(np.float64), axis=1), 1, atol=2e-3)


def test_reco_cache_on_two_processes_reads_an_on_disk_memory_as_one_process_does(
    tiny_dir, tmp_path, monkeypatch
):
    """`reco cache` over 2 DDP ranks, each opening the on-disk memory (one mapped copy per node, see above)."""
    from reco_lightning.data.features import open_feature_cache

    store = MemoryStore.open(tiny_dir / "memory")
    memory = MemoryStore.write(
        tmp_path / "ondisk",
        store.image_embeddings,
        store.text_embeddings,
        store.ids,
        backend={"class_path": "ivfpq_ondisk", "init_args": {"nlist": 2, "m": 4, "nbits": 4, "nprobe": 2}},
        fingerprint=store.fingerprint,
        id_scheme=store.manifest["id_scheme"],
    )
    (tmp_path / "artifacts").mkdir()
    (tmp_path / "artifacts" / "tiny").symlink_to(tiny_dir)
    monkeypatch.chdir(tmp_path)
    config = Path(__file__).parents[1] / "configs" / "tiny.yaml"

    def cache(devices: int) -> Path:
        out = tmp_path / f"cache_{devices}"
        args = [
            *RECO, "cache", "--config", str(config), f"--model.memory={memory}",
            f"--data.init_args.feature_cache={out}", "--trainer.accelerator=cpu", f"--trainer.devices={devices}",
            "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path / 'runs'}",
            *(["--trainer.strategy=ddp"] if devices > 1 else []),
        ]  # fmt: skip
        done = subprocess.run(args, capture_output=True, text=True, timeout=300, start_new_session=True)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        return out

    one, two = cache(1), cache(2)
    for stage in ("train", "val"):
        a, b = open_feature_cache(one / stage), open_feature_cache(two / stage)
        for name in ("image_neighbours", "text_neighbours", "ids"):
            np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]))


def test_an_index_built_elsewhere_over_the_memorys_rows_is_adopted_after_checks(tmp_path, capsys):
    """What autofaiss's distributed mode (or any pipeline) builds over `reco memory export` plugs in."""
    import faiss

    from reco_lightning.cli import main
    from reco_lightning.memory.autotuned import AutofaissBackend

    memory = _memory(tmp_path)
    store = MemoryStore.open(memory)
    built = faiss.index_factory(DIM, "IVF8,Flat", faiss.METRIC_INNER_PRODUCT)
    text = np.asarray(store.text_embeddings, dtype=np.float32)
    built.train(text)
    built.add(text)
    faiss.write_index(built, str(tmp_path / "text.index"))
    faiss.write_index(faiss.IndexFlatIP(DIM), str(tmp_path / "empty.index"))

    with pytest.raises(SystemExit):
        main(["memory", "index", str(memory), "--text_index", str(tmp_path / "empty.index")])
    assert "empty.index indexes 0 vectors but memory" in capsys.readouterr().err
    main(["memory", "index", str(memory), "--text_index", str(tmp_path / "text.index")])
    assert "adopted text index as reco_lightning.memory.autotuned.AutofaissBackend" in capsys.readouterr().out
    adopted = MemoryStore.open(memory, search_params={"nprobe": 8})
    assert isinstance(adopted.index("text"), AutofaissBackend)
    assert adopted.index("text").search(text[:4], 1)[1][:, 0].tolist() == [0, 1, 2, 3]
    assert isinstance(adopted.index("image"), ExactBackend)  # the other modality is left as it was
    by_side = adopted.manifest["backend_by_modality"]  # and the manifest names each side's own index
    assert adopted.manifest["backend"] == by_side["text"]
    assert by_side["text"]["class_path"].endswith("AutofaissBackend")
    assert by_side["image"]["class_path"].endswith("ExactBackend")
    main(["memory", "index", str(memory), "--backend", "exact"])  # both sides alike again: one backend
    manifest = MemoryStore.open(memory).manifest
    assert "backend_by_modality" not in manifest and manifest["backend"]["class_path"].endswith(
        "ExactBackend"
    )


def test_reco_memory_tune_writes_the_fastest_setting_reaching_the_target(tmp_path, capsys, monkeypatch):
    from reco_lightning.cli import main
    from reco_lightning.memory import tuning

    memory = MemoryStore.write(tmp_path / "memory", _unit(N, 3), _unit(N, 4), backend=SPEC, train_size=None)
    with pytest.raises(RecoMemoryError, match="ExactBackend has no search settings"):
        tuning.tune_search(ExactBackend(DIM), _unit(20), 0.9)
    few = IVFPQBackend(DIM, nlist=4, m=8, rerank=0)  # every list probed already: one line, not a crash
    few.build(_unit(400, 5))
    with pytest.raises(RecoMemoryError, match="4 inverted lists, fewer than the 8 .* nothing to tune"):
        tuning.tune_search(few, _unit(400, 5), 0.9)
    main(["memory", "tune", str(memory), "--recall", "0.9", "--queries", "300", "--modality", "image"])
    assert "image: nprobe " in capsys.readouterr().out
    meta = json.loads((memory / "index_image" / "backend.json").read_text())
    tuned = meta["tuned"]
    assert tuned["reached"] and tuned["recall"] >= 0.9 and tuned["queries"] == 300
    assert (meta["init_args"]["nprobe"], meta["init_args"]["rerank"]) == (tuned["nprobe"], tuned["rerank"])
    store = MemoryStore.open(memory)
    assert (store.index("image").nprobe, store.index("image").rerank) == (tuned["nprobe"], tuned["rerank"])
    assert store.manifest["backend"]["tuned"] == tuned
    # the text side keeps its untuned settings, and the manifest says so: each side's spec while they differ
    by_side = store.manifest["backend_by_modality"]
    assert by_side["image"]["tuned"] == tuned and "tuned" not in by_side["text"]
    main(["memory", "tune", str(memory), "--recall", "0.9", "--queries", "300", "--modality", "text"])
    capsys.readouterr()
    text_tuned = json.loads((memory / "index_text" / "backend.json").read_text())["tuned"]
    by_side = MemoryStore.open(memory).manifest["backend_by_modality"]  # tuned apart: recalls differ
    assert (by_side["image"]["tuned"], by_side["text"]["tuned"]) == (tuned, text_tuned)

    monkeypatch.setattr(tuning, "RERANKS", (0,))  # PQ codes alone cannot reach it
    result = tuning.tune_search(store.index("text"), store.text_embeddings, target=0.99, n_queries=200)
    assert not result["reached"] and result["rerank"] == 0
    assert result["recall"] == max(m["recall"] for m in result["measured"])


def test_a_memmap_read_at_random_is_released_by_mapped_bytes_not_rows_read(tmp_path, monkeypatch):
    """Small memmaps stay mapped (re-faulting pages cost re-ranking 4/5 of its speed); a large one gives its
    pages back once the process maps ``step`` bytes more than after its last release."""
    from reco_lightning import arrays

    monkeypatch.setattr(arrays, "_mapped_floor", None)
    path = tmp_path / "rows.npy"
    np.save(path, np.ones((4096, 1024), dtype=np.float32))  # 16 MiB
    rows = np.load(path, mmap_mode="r")
    assert arrays.release_pages_over(rows, budget=64 << 20, step=1 << 20) is False  # fits the budget
    assert arrays.release_pages_over(rows, budget=1 << 20, step=8 << 20) is True  # first look: no floor yet
    assert arrays.release_pages_over(rows, budget=1 << 20, step=8 << 20) is False  # nothing mapped since
    float(np.asarray(rows[:3072]).sum())  # maps 12 MiB
    assert arrays.release_pages_over(rows, budget=1 << 20, step=8 << 20) is True
