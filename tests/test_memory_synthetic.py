"""Synthetic CLIP-like vectors: the statistics the docstring promises, determinism and held-out queries."""

from __future__ import annotations

import numpy as np
import pytest

from helpers_benchmarks import clustered_queries, clustered_unit_vectors

N, DIM = 20_000, 64  # N > one generation chunk, so chunk boundaries are exercised


@pytest.fixture(scope="module")
def rows() -> tuple[np.ndarray, np.ndarray]:
    return clustered_unit_vectors(N, DIM, n_clusters=256, seed=4, return_labels=True)


def test_shape_dtype_and_unit_norm(rows) -> None:
    x, labels = rows
    assert x.shape == (N, DIM) and x.dtype == np.float32
    assert labels.shape == (N,) and labels.min() >= 0 and labels.max() < 256
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)


def test_anisotropic_like_clip(rows) -> None:
    x, _ = rows
    pairs = np.random.default_rng(0).integers(0, N, size=(5000, 2))
    cos = np.einsum("nd,nd->n", x[pairs[:, 0]], x[pairs[:, 1]])
    assert 0.2 < cos.mean() < 0.5  # shared mean direction; uniform unit vectors would give ~0
    uniform = np.random.default_rng(0).standard_normal((2, 5000, DIM))
    uniform /= np.linalg.norm(uniform, axis=2, keepdims=True)
    assert abs(np.einsum("nd,nd->n", uniform[0], uniform[1]).mean()) < 0.05


def test_clusters_are_zipf_sized_and_tighter_than_the_population(rows) -> None:
    x, labels = rows
    sizes = np.sort(np.bincount(labels, minlength=256))[::-1]
    assert sizes[0] > 20 * np.median(sizes)  # heavy-tailed, unlike equal-sized clusters
    assert sizes[0] / N == pytest.approx(1 / np.sum(1 / np.arange(1, 257)), rel=0.1)  # Zipf, exponent 1
    big = np.flatnonzero(labels == np.argmax(np.bincount(labels)))[:500]
    within = (x[big] @ x[big].T)[np.triu_indices(len(big), 1)].mean()
    pairs = np.random.default_rng(1).integers(0, N, size=(5000, 2))
    between = np.einsum("nd,nd->n", x[pairs[:, 0]], x[pairs[:, 1]]).mean()
    assert within > between + 0.2


def test_deterministic_per_seed() -> None:
    a = clustered_unit_vectors(1000, 16, n_clusters=8, seed=1)
    np.testing.assert_array_equal(a, clustered_unit_vectors(1000, 16, n_clusters=8, seed=1))
    assert not np.array_equal(a, clustered_unit_vectors(1000, 16, n_clusters=8, seed=2))


def test_queries_are_held_out_from_the_same_distribution(rows) -> None:
    x, _ = rows
    q, q_labels = clustered_queries(500, DIM, n_clusters=256, seed=4, return_labels=True)
    assert q.dtype == np.float32 and q.shape == (500, DIM)
    sims = q @ x.T
    assert sims.max() < 0.999  # never a copy of a database row
    top1 = sims.max(axis=1)
    assert np.median(top1) > 0.8  # but close neighbours exist, as for real CLIP queries
    # same distribution: same mean-direction share and the same clusters, by similar frequencies
    assert abs(sims.mean() - (x[:500] @ x.T).mean()) < 0.02
    assert np.corrcoef(np.bincount(q_labels, minlength=256), np.bincount(rows[1], minlength=256))[0, 1] > 0.8


def test_energy_shares_shape_the_statistics() -> None:
    iso = clustered_unit_vectors(2000, 32, n_clusters=16, seed=0, mean_share=0.0, cluster_share=0.0)
    pairs = np.random.default_rng(0).integers(0, 2000, size=(3000, 2))
    assert abs(np.einsum("nd,nd->n", iso[pairs[:, 0]], iso[pairs[:, 1]]).mean()) < 0.05
    with pytest.raises(ValueError, match="shares"):
        clustered_unit_vectors(10, 8, mean_share=-1.0)
    with pytest.raises(ValueError, match="dim"):
        clustered_queries(10, 0)


def test_autofaiss_without_its_environment_is_refused_before_any_work(tmp_path, tiny_dir):
    """The core environment (numpy 2, faiss 1.15) cannot build autofaiss indexes: one line naming the
    extra, before a single pair is encoded (in the autofaiss environment this builds, see test_memory_autotuned)."""
    import importlib.util

    import faiss

    from reco_lightning.errors import RecoMemoryError
    from reco_lightning.jobs.memory_build import build_memory
    from reco_lightning.memory.base import check_buildable

    version = tuple(int(p) for p in faiss.__version__.split(".")[:2])
    if importlib.util.find_spec("autofaiss") is not None and version < (1, 14):
        pytest.skip("autofaiss can build here (its own environment)")
    with pytest.raises(RecoMemoryError, match=r"reco-lightning\[autofaiss\]"):
        check_buildable("autofaiss")
    with pytest.raises(RecoMemoryError, match=r"reco-lightning\[autofaiss\]"):
        build_memory(
            tiny_dir / "val.csv", tmp_path / "mem", backbone=str(tiny_dir / "clip"), backend="autofaiss"
        )
    assert not (tmp_path / ".mem.partial").exists()
    check_buildable({"class_path": "ivfpq", "init_args": {}})  # other backends are not affected
