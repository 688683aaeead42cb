"""IVF-PQ backend: the MemoryBackend contract, exact re-ranking, persistence and its error paths."""

from __future__ import annotations

import json
import math

import faiss
import numpy as np
import pytest

from helpers_benchmarks import clustered_queries, clustered_unit_vectors
from reco_lightning.errors import RecoMemoryError
from reco_lightning.memory import ivfpq as ivfpq_module
from reco_lightning.memory.base import MemoryBackend, backend_class
from reco_lightning.memory.ivfpq import IVFPQBackend, rerank_exact

DIM, N = 32, 4000


def _exact_top(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(q.astype(np.float64) @ x.astype(np.float64).T), axis=1, kind="stable")[:, :k]


def _recall(approx: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float((approx[:, :k, None] == truth[:, None, :]).any(axis=2).sum() / truth.size)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    x = clustered_unit_vectors(N, DIM, n_clusters=64, seed=3)
    q = clustered_queries(200, DIM, n_clusters=64, seed=3)
    return x, q


@pytest.fixture(scope="module")
def built(data) -> IVFPQBackend:
    backend = IVFPQBackend(DIM, nlist=32, m=8, nbits=8, nprobe=8, rerank=0)  # the PQ codes alone
    backend.build(data[0])
    return backend


def test_registered_under_short_name() -> None:
    assert backend_class("ivfpq") is IVFPQBackend
    assert IVFPQBackend(DIM, nlist=4, m=8).needs_training


def test_search_shapes_dtypes_and_order(built, data) -> None:
    scores, ids = built.search(data[1], 10)
    assert scores.shape == ids.shape == (len(data[1]), 10)
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    assert np.all(np.diff(scores, axis=1) <= 1e-6)
    assert ids.min() >= 0 and ids.max() < N


def test_recall_without_and_with_rerank(built, data) -> None:
    x, q = data
    truth = _exact_top(x, q, 10)
    plain = _recall(built.search(q, 10)[1], truth)
    reranked = IVFPQBackend(DIM, nlist=32, m=8, nbits=8, nprobe=8, rerank=100)
    reranked.index = built.index
    reranked.attach(x.astype(np.float16))
    exact_again = _recall(reranked.search(q, 10)[1], truth)
    assert 0.3 < plain < 0.97  # PQ scores alone are approximate ...
    assert exact_again >= 0.95  # ... and exact re-ranking of 100 candidates recovers nearly all of top-10
    assert exact_again > plain


def test_self_query_is_top1_with_rerank(data) -> None:
    x = data[0]
    backend = IVFPQBackend(DIM, nlist=32, m=8, nbits=8, nprobe=4, rerank=50)
    backend.build(x)
    backend.attach(x.astype(np.float16))
    scores, ids = backend.search(x[:300], 5)
    np.testing.assert_array_equal(ids[:, 0], np.arange(300))
    # re-ranked scores are the exact dot products with the fp16 store rows
    rows = x.astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(scores, np.einsum("bkd,bd->bk", rows[ids], x[:300]), rtol=1e-5, atol=1e-6)


def test_rerank_needs_attached_rows(data) -> None:
    backend = IVFPQBackend(DIM, nlist=32, m=8, nbits=8, rerank=20)
    backend.build(data[0])
    with pytest.raises(RecoMemoryError, match="attach"):
        backend.search(data[1][:2], 5)
    with pytest.raises(RecoMemoryError, match=r"shape \[n, 32\]"):
        backend.attach(np.zeros((N, DIM + 1), dtype=np.float16))
    with pytest.raises(RecoMemoryError, match="rows"):
        backend.attach(np.zeros((N - 1, DIM), dtype=np.float16))


def test_rerank_exact_is_blockwise_vectorised_and_puts_missing_last(monkeypatch) -> None:
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((50, 8)).astype(np.float16)
    queries = rng.standard_normal((7, 8)).astype(np.float32)
    candidates = rng.integers(0, 50, size=(7, 6))
    candidates[0, [1, 4]] = -1  # fewer candidates than asked for query 0
    candidates[1, :] = -1
    monkeypatch.setattr(ivfpq_module, "_RERANK_BLOCK_ELEMS", 2 * 6 * 8)  # 2 queries per block: 4 blocks
    scores, ids = rerank_exact(queries, candidates, rows, 5)
    for b in range(7):
        valid = candidates[b][candidates[b] >= 0]
        exact = rows[valid].astype(np.float32) @ queries[b]
        order = np.argsort(-exact, kind="stable")[:5]
        n_valid = len(order)
        np.testing.assert_array_equal(ids[b, :n_valid], valid[order])
        np.testing.assert_allclose(scores[b, :n_valid], exact[order], rtol=1e-5, atol=1e-6)
        assert np.all(ids[b, n_valid:] == -1) and np.all(np.isneginf(scores[b, n_valid:]))
    assert n_valid == 5 and np.all(ids[1] == -1)


def test_missing_neighbours_come_back_as_minus_one_with_and_without_rerank() -> None:
    x = clustered_unit_vectors(300, DIM, n_clusters=8, seed=5)
    for rerank in (0, 60):
        backend = IVFPQBackend(DIM, nlist=16, m=8, nbits=4, nprobe=1, rerank=rerank)
        backend.build(x)
        backend.attach(x)
        scores, ids = backend.search(x[:20], 120)  # one probed list holds far fewer than 120 vectors
        missing = ids < 0
        assert missing.any()
        assert np.all(np.isneginf(scores[missing])) and np.all(np.isfinite(scores[~missing]))
        # missing entries are a suffix of each row
        assert np.all(np.diff(missing.astype(int), axis=1) >= 0)


def test_save_load_round_trip_and_nbytes(built, data, tmp_path) -> None:
    built.save(tmp_path / "mem")
    meta = json.loads((tmp_path / "mem" / "backend.json").read_text())
    assert meta["init_args"] == {"nlist": 32, "m": 8, "nbits": 8, "nprobe": 8, "rerank": 0}
    assert meta["class_path"] == "reco_lightning.memory.ivfpq.IVFPQBackend"
    loaded = MemoryBackend.load(tmp_path / "mem")
    assert isinstance(loaded, IVFPQBackend) and loaded.ntotal == N
    for a, b in zip(built.search(data[1], 10), loaded.search(data[1], 10), strict=True):
        np.testing.assert_array_equal(a, b)
    # nbytes is the real serialised size: exactly what lands on disk, and at least codes + ids
    assert built.nbytes() == (tmp_path / "mem" / "index.faiss").stat().st_size
    assert built.nbytes() >= N * (8 + 8)
    assert built.nbytes() < N * DIM * 4  # smaller than an exact index


def test_load_overrides_search_time_args(built, data, tmp_path) -> None:
    built.save(tmp_path / "mem")
    loaded = MemoryBackend.load(tmp_path / "mem", nprobe=32, rerank=40)
    assert loaded.index.nprobe == 32 and loaded.nprobe == 32 and loaded.rerank == 40
    assert loaded.init_args()["nprobe"] == 32
    with pytest.raises(RecoMemoryError, match="attach"):
        loaded.search(data[1][:1], 3)
    plain = MemoryBackend.load(tmp_path / "mem", nprobe=32)
    probe_all = IVFPQBackend(DIM, nlist=32, m=8, nbits=8, nprobe=32, rerank=0)
    probe_all.index = faiss.clone_index(built.index)
    probe_all.index.nprobe = 32
    np.testing.assert_array_equal(plain.search(data[1], 10)[1], probe_all.search(data[1], 10)[1])
    assert not np.array_equal(plain.search(data[1], 10)[1], built.search(data[1], 10)[1])


def test_load_rejects_layout_mismatch_and_truncation(built, tmp_path) -> None:
    built.save(tmp_path / "mem")
    meta_path = tmp_path / "mem" / "backend.json"
    meta = json.loads(meta_path.read_text())
    meta["init_args"]["nlist"] = 64
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(RecoMemoryError, match="nlist"):
        MemoryBackend.load(tmp_path / "mem")

    built.save(tmp_path / "cut")
    index_path = tmp_path / "cut" / "index.faiss"
    index_path.write_bytes(index_path.read_bytes()[: index_path.stat().st_size // 2])
    with pytest.raises(RecoMemoryError, match="truncated or corrupt"):
        MemoryBackend.load(tmp_path / "cut")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"m": 7}, r"m=7 must divide dim=32"),
        ({"m": 0}, r"m=0 must divide"),
        ({"nlist": 0}, r"nlist=0"),
        ({"nbits": 0}, r"nbits=0"),
        ({"nbits": 17}, r"nbits=17"),
        ({"nprobe": 0}, r"nprobe=0"),
        ({"rerank": -1}, r"rerank=-1"),
    ],
)
def test_invalid_layout_is_a_one_line_error(kwargs, message) -> None:
    with pytest.raises(RecoMemoryError, match=message) as info:
        IVFPQBackend(DIM, **{"m": 8, **kwargs})
    assert "\n" not in str(info.value)


def test_too_few_training_vectors(data) -> None:
    backend = IVFPQBackend(DIM, nlist=64, m=8, nbits=8)
    with pytest.raises(RecoMemoryError, match=r"at least 256 vectors.*got 100.*lower nlist/nbits"):
        backend.train(data[0][:100])
    backend = IVFPQBackend(DIM, nlist=512, m=8, nbits=8)
    with pytest.raises(RecoMemoryError, match=r"at least 512 vectors"):
        backend.train(data[0][:400])


def test_add_before_train_and_bad_shapes(data) -> None:
    backend = IVFPQBackend(DIM, nlist=16, m=8)
    with pytest.raises(RecoMemoryError, match="not trained"):
        backend.add(data[0][:10])
    with pytest.raises(RecoMemoryError, match="shape"):
        backend.train(data[0][:, :16])


def test_empty_index_and_k_bounds(built, data) -> None:
    empty = IVFPQBackend(DIM, nlist=16, m=8)
    empty.train(data[0][:1000])
    assert empty.ntotal == 0
    with pytest.raises(RecoMemoryError, match="empty memory"):
        empty.search(data[1][:1], 1)
    with pytest.raises(RecoMemoryError, match=f"k={N + 1}"):
        built.search(data[1][:1], N + 1)
    with pytest.raises(RecoMemoryError, match="k=0"):
        built.search(data[1][:1], 0)


def test_to_device_none_keeps_cpu_index(built, data) -> None:
    index = built.index
    built.to_device(None)
    assert built.index is index


# --- defaults derived from N -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("ntotal", "n_train", "nlist"),
    [
        (20_000, None, 512),  # 4*sqrt(N) = 566 -> 512
        (100_000, 100_000, 1024),  # 1265 -> 1024
        (200_000, 100_000, 2048),  # 1789 -> 2048; 100k / 39 = 2564 leaves room
        (1_000_000, 200_000, 4096),  # 4000 -> 4096 (`reco memory build`'s 200k sample)
        (1_000_000, 100_000, 2048),  # clipped: 4096 lists would get 24 training points each
        (10_000_000, 10_000_000, 16384),  # 12649 -> 16384
        (10_000_000, 200_000, 4096),  # clipped by the sample
        (4000, None, 64),  # 253 -> 256, clipped to 4000 / 39 = 102 -> 64
        (300, None, 4),
        (10, None, 1),
    ],
)
def test_default_nlist_follows_sqrt_n_and_the_training_size(ntotal, n_train, nlist) -> None:
    assert ivfpq_module.default_nlist(ntotal, n_train) == nlist


def test_default_rules_keep_enough_training_points_and_scale() -> None:
    for ntotal in (300, 1000, 5000, 20_000, 123_456, 10**6, 3 * 10**6, 10**7, 10**8):
        for n_train in (300, 20_000, 100_000, 200_000, ntotal):
            n_train = min(n_train, ntotal)
            nlist = ivfpq_module.default_nlist(ntotal, n_train)
            assert nlist & (nlist - 1) == 0  # a power of two
            assert nlist == 1 or n_train // nlist >= 39  # faiss's minimum of training points per centroid
            assert nlist <= 2 * 4 * math.sqrt(ntotal)
            nprobe = ivfpq_module.default_nprobe(nlist)
            assert 1 <= nprobe <= nlist and nprobe >= min(nlist, 16) and nprobe >= nlist // 256
    assert [ivfpq_module.default_nprobe(n) for n in (8, 512, 1024, 2048, 4096, 16384)] == [
        8,
        16,
        16,
        16,
        16,
        64,
    ]
    assert [ivfpq_module.default_rerank(n) for n in (1000, 100_000, 10**6, 10**7)] == [200, 200, 200, 200]


def test_defaults_resolve_when_trained_and_are_recorded(data, tmp_path) -> None:
    x, q = data
    backend = IVFPQBackend(DIM, m=8)
    assert (backend.nlist, backend.nprobe, backend.rerank, backend.ntotal) == (None, None, None, 0)
    assert backend.min_train_size() == 256  # a derived nlist never needs more than the PQ's 2**nbits
    backend.build(x)
    assert (backend.nlist, backend.nprobe, backend.rerank) == (64, 16, 200)  # N = 4000: see above
    assert backend.index.nlist == 64 and backend.index.nprobe == 16 and backend.min_train_size() == 256
    backend.attach(x.astype(np.float16))
    backend.save(tmp_path / "mem")
    meta = json.loads((tmp_path / "mem" / "backend.json").read_text())
    assert meta["init_args"] == {"nlist": 64, "m": 8, "nbits": 8, "nprobe": 16, "rerank": 200}
    loaded = MemoryBackend.load(tmp_path / "mem")
    assert loaded.init_args() == backend.init_args()
    loaded.attach(x.astype(np.float16))
    np.testing.assert_array_equal(loaded.search(q, 10)[1], backend.search(q, 10)[1])
    # search-time overrides still apply to a derived layout, and None asks for the rule again
    narrow = MemoryBackend.load(tmp_path / "mem", nprobe=1, rerank=0)
    assert narrow.index.nprobe == 1 and narrow.init_args()["rerank"] == 0
    assert not np.array_equal(narrow.search(q, 10)[1], backend.search(q, 10)[1])  # no rows needed at rerank 0
    again = MemoryBackend.load(tmp_path / "mem", nprobe=None, rerank=None)
    assert (again.nprobe, again.rerank, again.index.nprobe) == (16, 200, 16)


def test_derived_nlist_uses_the_training_sample_and_the_planned_total(data) -> None:
    x = data[0]
    sampled = IVFPQBackend(DIM, m=8)
    sampled.build(x, train_size=1000)  # N = 4000 wants 64 lists; 1000 / 39 = 25 allows 16
    assert sampled.nlist == 16 and sampled.nprobe == 16 and sampled.ntotal == N
    chunked = IVFPQBackend(DIM, m=8)  # train on a sample, add in chunks (how the benchmark fills one)
    chunked.train(x[:3000], ntotal=1_000_000)  # 1M would want 4096 lists: the 3000-row sample allows 64
    assert chunked.nlist == 64 and chunked.rerank == 200
    alone = IVFPQBackend(DIM, m=8)
    alone.train(x[:300])  # without ntotal the sample is everything: N = 300
    assert (alone.nlist, alone.nprobe, alone.rerank) == (4, 4, 200)
    with pytest.raises(RecoMemoryError, match=r"at least 256 vectors \(nlist=derived"):
        IVFPQBackend(DIM, m=8).train(x[:200])


def test_explicit_values_are_kept(data, tmp_path) -> None:
    backend = IVFPQBackend(DIM, nlist=32, m=8, nbits=8, nprobe=4, rerank=7)
    backend.build(data[0], train_size=500)
    assert backend.init_args() == {"nlist": 32, "m": 8, "nbits": 8, "nprobe": 4, "rerank": 7}
    assert backend.index.nlist == 32 and backend.index.nprobe == 4
    partial = IVFPQBackend(DIM, nlist=32, m=8)  # explicit nlist: nprobe follows it at once, rerank N
    assert (partial.nprobe, partial.rerank) == (16, None)
    partial.build(data[0])
    assert partial.init_args() == {"nlist": 32, "m": 8, "nbits": 8, "nprobe": 16, "rerank": 200}


def test_store_manifest_records_the_resolved_defaults(data, tmp_path) -> None:
    from reco_lightning.memory.store import MemoryStore

    x = data[0]
    path = MemoryStore.write(
        tmp_path / "mem", x, x[::-1].copy(), backend={"class_path": "ivfpq", "init_args": {"m": 8}}
    )
    store = MemoryStore.open(path)
    expected = {"nlist": 64, "m": 8, "nbits": 8, "nprobe": 16, "rerank": 200}
    assert store.manifest["backend"]["init_args"] == expected
    for modality in ("image", "text"):
        assert store.index(modality).init_args() == expected


def test_recall_at_defaults_on_clip_like_data() -> None:
    """The package defaults alone (only the dimension given) reach recall@10 >= 0.95 against brute force."""
    dim = 64
    x = clustered_unit_vectors(20_000, dim, seed=1)
    q = clustered_queries(300, dim, seed=1)
    backend = IVFPQBackend(dim, m=16)  # m=16: 4 dims per code byte, as m=64 is at d=256 (d=512: 8)
    backend.build(x)
    backend.attach(x.astype(np.float16))
    assert (backend.nlist, backend.nprobe, backend.rerank) == (512, 16, 200)
    recall = _recall(backend.search(q, 10)[1], _exact_top(x, q, 10))
    assert recall >= 0.95, recall
    backend.rerank = 0  # the PQ codes alone: what the old default (rerank=0) gave
    assert _recall(backend.search(q, 10)[1], _exact_top(x, q, 10)) < 0.8


def test_reindexed_subset_derives_its_own_defaults(data, tmp_path) -> None:
    from reco_lightning.memory.store import MemoryStore

    x = data[0]
    path = MemoryStore.write(tmp_path / "mem", x, x, backend={"class_path": "ivfpq", "init_args": {"m": 8}})
    store = MemoryStore.open(path)
    assert store.manifest["backend"]["derived"] == ["nlist", "nprobe", "rerank"]
    subset = MemoryStore.open(store.select(np.arange(1000), tmp_path / "subset"))
    # 1000 rows: 4*sqrt(1000) = 126 -> 128 lists, clipped to 1000 / 39 = 25 -> 16, not the 4000-row memory's 64
    assert subset.manifest["backend"]["init_args"] == {
        "nlist": 16,
        "m": 8,
        "nbits": 8,
        "nprobe": 16,
        "rerank": 200,
    }
    pinned = {"class_path": "ivfpq", "init_args": {"nlist": 8, "m": 8, "nprobe": 2, "rerank": 5}}
    fixed = MemoryStore.open(MemoryStore.write(tmp_path / "fixed", x, x, backend=pinned))
    assert "derived" not in fixed.manifest["backend"]
    again = MemoryStore.open(fixed.select(np.arange(1000), tmp_path / "fixed_subset"))
    assert again.manifest["backend"]["init_args"] == {
        "nlist": 8,
        "m": 8,
        "nbits": 8,
        "nprobe": 2,
        "rerank": 5,
    }
