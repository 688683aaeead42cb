"""GPU placement options, checked without a GPU: the exact backend must stay exact once cloned."""

import types

import faiss
import numpy as np
import pytest

from reco_lightning.memory import ExactBackend, IVFPQBackend
from reco_lightning.memory import gpu as gpu_module
from reco_lightning.memory.gpu import cloner_settings

DIM = 16


@pytest.mark.parametrize(
    ("key", "fp16"),
    [
        ("Flat", False),
        ("IVF16,Flat", False),
        ("IVF16,SQ8", False),
        ("IVF16,PQ4", True),
        ("OPQ4,IVF16,PQ4", True),  # autofaiss's kind: the IVF-PQ sits behind a pre-transform
    ],
)
def test_fp16_only_for_indexes_that_are_approximate_anyway(key, fp16):
    index = faiss.index_factory(DIM, key, faiss.METRIC_INNER_PRODUCT)
    assert cloner_settings(index) == {"useFloat16": fp16, "useFloat16CoarseQuantizer": False}


@pytest.fixture()
def fake_gpu_faiss(monkeypatch):
    """faiss as if built with one GPU: records the cloner options each index is cloned with."""
    cloned = []

    def index_cpu_to_gpu(resources, device, index, options):
        cloned.append((device, vars(options).copy()))
        return types.SimpleNamespace(cpu=index)

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1, raising=False)
    monkeypatch.setattr(faiss, "StandardGpuResources", types.SimpleNamespace, raising=False)
    monkeypatch.setattr(
        faiss, "GpuClonerOptions", lambda: types.SimpleNamespace(useFloat16=True), raising=False
    )
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", index_cpu_to_gpu, raising=False)
    assert gpu_module.faiss_num_gpus() == 1
    return cloned


def test_exact_backend_is_cloned_in_fp32_and_ivfpq_with_fp16_tables(fake_gpu_faiss):
    rows = np.random.default_rng(0).normal(size=(2000, DIM)).astype(np.float32)
    exact = ExactBackend(DIM)
    exact.build(rows)
    exact.to_device(0)
    approx = IVFPQBackend(DIM, nlist=8, m=4, nbits=4)
    approx.build(rows)
    approx.to_device(1)
    assert fake_gpu_faiss == [
        (0, {"useFloat16": False, "useFloat16CoarseQuantizer": False}),
        (1, {"useFloat16": True, "useFloat16CoarseQuantizer": False}),
    ]
