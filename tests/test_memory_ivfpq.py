"""IVF-PQ backend: the MemoryBackend contract, exact re-ranking, persistence and its error paths."""

from __future__ import annotations

import json

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
    backend = IVFPQBackend(DIM, nlist=32, m=8, nbits=8, nprobe=8)
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
    probe_all = IVFPQBackend(DIM, nlist=32, m=8, nbits=8, nprobe=32)
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
