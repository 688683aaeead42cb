"""autofaiss backend: budget-driven build, recorded choice, persistence and its error paths.

Most tests force a cheap index key ("IVF16,Flat") so autofaiss only tunes nprobe; one lets it choose.
"""

from __future__ import annotations

import json
import logging
import sys

import faiss
import numpy as np
import pytest

from helpers_benchmarks import clustered_queries, clustered_unit_vectors
from reco_lightning.errors import RecoMemoryError
from reco_lightning.memory.autotuned import AutofaissBackend
from reco_lightning.memory.base import MemoryBackend, backend_class

pytest.importorskip("autofaiss")
pytestmark = pytest.mark.autofaiss  # runs in the autofaiss environment (make test: .venv-autofaiss)

DIM, N = 32, 2000


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    return (
        clustered_unit_vectors(N, DIM, n_clusters=32, seed=11),
        clustered_queries(50, DIM, n_clusters=32, seed=11),
    )


@pytest.fixture(scope="module")
def built(data) -> AutofaissBackend:
    backend = AutofaissBackend(DIM, max_index_query_time_ms=50.0, index_key="IVF16,Flat", nprobe=16)
    backend.build(data[0])
    return backend


def _exact_ids(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(q.astype(np.float64) @ x.astype(np.float64).T), axis=1, kind="stable")[:, :k]


def test_registered_under_short_name() -> None:
    assert backend_class("autofaiss") is AutofaissBackend


def test_build_search_and_exact_when_probing_every_list(built, data) -> None:
    x, q = data
    scores, ids = built.search(q, 10)
    assert scores.shape == ids.shape == (len(q), 10)
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    assert faiss.extract_index_ivf(built.index).nprobe == 16  # the nprobe override beat the tuned value
    np.testing.assert_array_equal(ids, _exact_ids(x, q, 10))  # IVF-Flat probing all 16 lists is exact
    np.testing.assert_array_equal(built.search(x[:20], 1)[1][:, 0], np.arange(20))


def test_choice_and_metrics_are_recorded_json_ready(built) -> None:
    args = built.init_args()
    assert args["index_key"] == "IVF16,Flat"
    assert args["index_param"].startswith("nprobe=")
    metrics = args["metrics"]
    assert metrics["nb vectors"] == N and metrics["vectors dimension"] == DIM
    assert metrics["size in bytes"] > 0 and metrics["avg_search_speed_ms"] > 0
    assert json.loads(json.dumps(args)) == args  # lands in backend.json / the manifest as is


def test_autofaiss_chooses_the_index_from_the_budget() -> None:
    x = clustered_unit_vectors(500, 16, n_clusters=8, seed=2)
    backend = AutofaissBackend(16, max_index_memory_usage="64M")
    backend.build(x)
    assert backend.index_key == "Flat"  # autofaiss's rule for fewer than 1000 vectors
    np.testing.assert_array_equal(backend.search(x[:5], 1)[1][:, 0], np.arange(5))


def test_save_load_round_trip_with_overrides(built, data, tmp_path) -> None:
    built.save(tmp_path / "mem")
    meta = json.loads((tmp_path / "mem" / "backend.json").read_text())
    assert meta["init_args"]["index_key"] == "IVF16,Flat" and meta["ntotal"] == N
    loaded = MemoryBackend.load(tmp_path / "mem")
    assert isinstance(loaded, AutofaissBackend)
    for a, b in zip(built.search(data[1], 10), loaded.search(data[1], 10), strict=True):
        np.testing.assert_array_equal(a, b)
    assert loaded.nbytes() == (tmp_path / "mem" / "index.faiss").stat().st_size
    assert faiss.extract_index_ivf(MemoryBackend.load(tmp_path / "mem", nprobe=2).index).nprobe == 2


def test_truncated_index_file_is_a_reco_error(built, tmp_path) -> None:
    built.save(tmp_path / "mem")
    path = tmp_path / "mem" / "index.faiss"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(RecoMemoryError, match="truncated or corrupt"):
        MemoryBackend.load(tmp_path / "mem")


def test_budget_too_small_names_the_budget() -> None:
    x = clustered_unit_vectors(10_000, 8, n_clusters=8, seed=0)  # >= 10k vectors: autofaiss must quantise
    backend = AutofaissBackend(8, max_index_memory_usage="1K")
    with pytest.raises(RecoMemoryError, match=r"max_index_memory_usage=1K for 10000 vectors of dim 8: raise"):
        backend.build(x)


def test_none_none_from_autofaiss_becomes_a_reco_error_with_its_reason(data) -> None:
    # a budget above the memory the machine has: autofaiss logs why and returns (None, None)
    backend = AutofaissBackend(DIM, max_index_memory_usage="1000T", index_key="Flat")
    with pytest.raises(RecoMemoryError, match=r"max_index_memory_usage=1000T.*autofaiss: .*memory"):
        backend.build(data[0])


def test_missing_autofaiss_names_the_extra(monkeypatch, data) -> None:
    monkeypatch.setitem(sys.modules, "autofaiss", None)  # makes `import autofaiss` raise ImportError
    backend = AutofaissBackend(DIM, index_key="Flat")
    with pytest.raises(RecoMemoryError, match=r"pip install 'reco-lightning\[autofaiss\]'"):
        backend.build(data[0])


def test_add_accumulates_until_first_use_then_goes_to_the_index(data) -> None:
    x, q = data
    backend = AutofaissBackend(DIM, index_key="Flat")
    backend.train(x[:100])  # no-op: autofaiss samples its own training set
    backend.add(x[:1200])
    backend.add(x[1200:1500])
    assert backend.index is None and backend.ntotal == 1500
    np.testing.assert_array_equal(backend.search(q, 5)[1], _exact_ids(x[:1500], q, 5))
    backend.add(x[1500:])
    assert backend.index.ntotal == N == backend.ntotal
    np.testing.assert_array_equal(backend.search(q, 5)[1], _exact_ids(x, q, 5))


def test_empty_backend_errors(tmp_path, data) -> None:
    backend = AutofaissBackend(DIM)
    with pytest.raises(RecoMemoryError, match="empty memory"):
        backend.search(data[1][:1], 1)
    with pytest.raises(RecoMemoryError, match="no vectors"):
        backend.save(tmp_path / "mem")
    with pytest.raises(RecoMemoryError, match="shape"):
        backend.add(np.zeros((3, DIM + 1), dtype=np.float32))


def test_k_bounds(built, data) -> None:
    with pytest.raises(RecoMemoryError, match=f"k={N + 1}"):
        built.search(data[1][:1], N + 1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_index_query_time_ms": 0}, "max_index_query_time_ms"),
        ({"min_nearest_neighbors_to_retrieve": 0}, "min_nearest_neighbors_to_retrieve"),
        ({"nprobe": 0}, "nprobe=0"),
    ],
)
def test_invalid_args(kwargs, message) -> None:
    with pytest.raises(RecoMemoryError, match=message):
        AutofaissBackend(DIM, **kwargs)


def test_nprobe_on_an_index_without_lists_warns(data) -> None:
    backend = AutofaissBackend(DIM, index_key="Flat", nprobe=4)
    with pytest.warns(UserWarning, match="nprobe=4 ignored"):
        backend.build(data[0][:300])


def test_build_leaves_the_applications_logging_alone(data) -> None:
    root = logging.getLogger()
    before = (root.level, list(root.handlers), logging.getLogger("autofaiss").level)
    AutofaissBackend(DIM, index_key="Flat").build(data[0][:300])
    assert (root.level, list(root.handlers), logging.getLogger("autofaiss").level) == before
