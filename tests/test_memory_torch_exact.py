"""torch_exact: a memory searched by torch matmul + top-k (the GPU path without faiss), as a registered backend."""

import numpy as np

from reco_lightning.memory import MemoryStore
from reco_lightning.memory.base import backend_class
from reco_lightning.memory.torch_exact import TorchExactBackend, exact_topk

FP = {"name_or_path": "clip-a", "config_sha": "c", "weights_sha": "w", "dim": 16, "id": "a"}


def unit(n, d=16, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_a_torch_exact_memory_finds_what_exact_finds_after_a_reopen(tmp_path):
    image, text = unit(300), unit(300, seed=1)
    kwargs = {"ids": np.arange(300), "captions": [f"c{i}" for i in range(300)], "fingerprint": FP}
    exact = MemoryStore.open(MemoryStore.write(tmp_path / "exact", image, text, backend="exact", **kwargs))
    path = MemoryStore.write(tmp_path / "torch", image, text, backend="torch_exact", **kwargs)
    store = MemoryStore.open(path, search_params={"dtype": "float32"})
    assert backend_class("torch_exact") is TorchExactBackend
    assert isinstance(store.index("text"), TorchExactBackend)
    queries = unit(20, seed=2)
    for modality in ("image", "text"):
        scores, rows = store.index(modality).search(queries, 5)
        ref_scores, ref_rows = exact.index(modality).search(queries, 5)
        np.testing.assert_array_equal(rows, ref_rows)
        np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    assert MemoryStore.open(path).index("image").ntotal == 300


def test_blocked_topk_equals_one_block():
    import torch

    rows, queries = torch.from_numpy(unit(1000)), torch.from_numpy(unit(7, seed=3))
    full_scores, full_ids = exact_topk(queries, rows, 10)
    block_scores, block_ids = exact_topk(queries, rows, 10, block_elements=7 * 64)  # 16 blocks of 64 rows
    torch.testing.assert_close(block_scores, full_scores)
    assert torch.equal(block_ids, full_ids)


def test_a_device_torch_cannot_use_is_one_line_when_the_memory_opens(tmp_path, monkeypatch):
    import pytest
    import torch

    from reco_lightning.errors import RecoMemoryError

    image = unit(30)
    kwargs = {"ids": np.arange(30), "captions": [f"c{i}" for i in range(30)], "fingerprint": FP}
    path = MemoryStore.write(tmp_path / "torch", image, image, backend="torch_exact", **kwargs)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RecoMemoryError, match="torch_exact device 'cuda': torch sees no CUDA device here"):
        MemoryStore.open(path, search_params={"device": "cuda"})
    with pytest.raises(RecoMemoryError, match="torch_exact device 'gpu' is not a torch device"):
        MemoryStore.open(path, search_params={"device": "gpu"})
