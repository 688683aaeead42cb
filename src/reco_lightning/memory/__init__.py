"""External memories of image-text pairs: the store on disk and the k-NN backends that search it."""

from reco_lightning.memory.autotuned import AutofaissBackend
from reco_lightning.memory.base import (
    BACKENDS,
    MemoryBackend,
    RecoMemoryError,
    backend_class,
    register_backend,
)
from reco_lightning.memory.exact import ExactBackend
from reco_lightning.memory.ivfpq import IVFPQBackend
from reco_lightning.memory.store import MODALITIES, MemoryStore

__all__ = [
    "BACKENDS",
    "MODALITIES",
    "AutofaissBackend",
    "ExactBackend",
    "IVFPQBackend",
    "MemoryBackend",
    "MemoryStore",
    "RecoMemoryError",
    "backend_class",
    "register_backend",
]
