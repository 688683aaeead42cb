"""Place faiss indexes on the rank's GPU when faiss was built with GPU support; warn once otherwise."""

from __future__ import annotations

import warnings

import faiss

__all__ = ["faiss_num_gpus", "index_to_cpu", "index_to_gpu"]

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
    options.useFloat16 = True  # halves GPU memory for flat/IVF codes; scores stay within fp16 rounding
    gpu_index = faiss.index_cpu_to_gpu(resources, int(device), index, options)
    gpu_index.reco_resources = resources  # keep the resources alive as long as the index
    return gpu_index


def index_to_cpu(index: faiss.Index) -> faiss.Index:
    """A CPU copy of a GPU index (for saving or measuring); CPU indexes are returned as they are."""
    if hasattr(faiss, "index_gpu_to_cpu") and "Gpu" in type(index).__name__:
        return faiss.index_gpu_to_cpu(index)
    return index
