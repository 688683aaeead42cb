"""Place faiss indexes on the rank's GPU when faiss was built with GPU support; warn once otherwise."""

from __future__ import annotations

import warnings

import faiss

__all__ = ["cloner_settings", "faiss_num_gpus", "index_to_cpu", "index_to_gpu"]

_warned = False


def faiss_num_gpus() -> int:
    """GPUs faiss can use (0 with faiss-cpu, whatever torch sees)."""
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def index_to_gpu(index: faiss.Index, device: int | None) -> faiss.Index:
    """Clone ``index`` onto GPU ``device``; keep it on CPU (one warning per process) when faiss has no GPU."""
    global _warned
    if device is None:
        return index
    if faiss_num_gpus() == 0:
        if not _warned:
            warnings.warn(
                "faiss has no GPU support here (faiss-cpu installed): memory search stays on CPU. "
                "Install faiss-gpu instead of faiss-cpu to search on GPU.",
                stacklevel=2,
            )
            _warned = True
        return index
    resources = faiss.StandardGpuResources()
    options = faiss.GpuClonerOptions()
    for name, value in cloner_settings(index).items():
        setattr(options, name, value)
    gpu_index = faiss.index_cpu_to_gpu(resources, int(device), index, options)
    gpu_index.reco_resources = resources  # keep the resources alive as long as the index
    return gpu_index


def cloner_settings(index: faiss.Index) -> dict[str, bool]:
    """``GpuClonerOptions`` fields for ``index``: fp16 only where the index is an approximation anyway.

    faiss's ``useFloat16`` stores a flat index's vectors in fp16 (the exact backend would no longer be
    exact) but, for IVF-PQ, only makes the PQ distance lookup tables fp16, which the codes' error already
    dwarfs. The coarse quantizer stays fp32 in every case, so the lists probed do not change.
    """
    return {"useFloat16": _has_ivfpq(index), "useFloat16CoarseQuantizer": False}


def _has_ivfpq(index: faiss.Index) -> bool:
    try:
        ivf = faiss.extract_index_ivf(index)  # looks through pre-transforms (OPQ) and wrappers
    except RuntimeError:  # no inverted lists: flat, HNSW, ...
        return False
    return isinstance(faiss.downcast_index(ivf), faiss.IndexIVFPQ)


def index_to_cpu(index: faiss.Index) -> faiss.Index:
    """A CPU copy of a GPU index (for saving or measuring); CPU indexes are returned as they are."""
    if hasattr(faiss, "index_gpu_to_cpu") and "Gpu" in type(index).__name__:
        return faiss.index_gpu_to_cpu(index)
    return index
