"""The exact backend's blocked GEMM search returns what faiss's flat search returns."""

import faiss
import numpy as np
import pytest

from reco_lightning.memory import exact as exact_module
from reco_lightning.memory.base import MemoryBackend
from reco_lightning.memory.exact import BLOCKED_MIN_BATCH, ExactBackend


def unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize(
    ("n", "k", "block", "query_block"), [(5003, 10, 1000, 4096), (70, 70, 32, 4096), (300, 5, 16_384, 20)]
)
def test_blocked_search_equals_faiss_flat(monkeypatch: pytest.MonkeyPatch, n, k, block, query_block):
    monkeypatch.setattr(exact_module, "BLOCK_ROWS", block)
    monkeypatch.setattr(exact_module, "BLOCK_QUERIES", query_block)
    backend = ExactBackend(24)
    backend.add(unit(n, 24, seed=0))
    queries = unit(BLOCKED_MIN_BATCH + 3, 24, seed=1)
    want_scores, want_ids = backend.index.search(queries, k)
    scores, ids = backend.search(queries, k)
    assert ids.dtype == np.int64 and scores.dtype == np.float32
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)


def test_small_batches_and_reloaded_indexes_agree(tmp_path):
    backend = ExactBackend(16)
    backend.add(unit(500, 16, seed=2))
    backend.save(tmp_path / "index")
    loaded = MemoryBackend.load(tmp_path / "index")
    assert type(loaded.index) is faiss.IndexFlatIP  # the reloaded index takes the blocked path too
    queries = unit(BLOCKED_MIN_BATCH, 16, seed=3)
    blocked = loaded.search(queries, 7)
    one_by_one = [loaded.search(q[None], 7) for q in queries]  # below the threshold: faiss
    np.testing.assert_array_equal(blocked[1], np.concatenate([ids for _, ids in one_by_one]))
    np.testing.assert_allclose(blocked[0], np.concatenate([s for s, _ in one_by_one]), atol=1e-5)


@pytest.mark.parametrize(("n", "k"), [(16384, 10), (16384, 1), (4096 + 7, 10), (64, 3), (5, 10)])
def test_two_level_block_topk_equals_topk(n, k):
    import torch

    from reco_lightning.memory.exact import block_topk

    scores = torch.randn(37, n, generator=torch.Generator().manual_seed(n + k))
    best, columns = block_topk(scores, k)
    ref_best, ref_columns = scores.topk(min(k, n), dim=1)
    assert torch.equal(best, ref_best) and torch.equal(columns, ref_columns)
    # the top scores packed into one group, the rest of that group's neighbours low: still found
    if n >= 64 + k:
        scores[:, 64 : 64 + k] = 10 + torch.arange(k, dtype=scores.dtype)
        assert set(block_topk(scores, k)[1][0].tolist()) == set(range(64, 64 + k))
