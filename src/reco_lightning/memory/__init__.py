"""External memories of image-text pairs: the store on disk and the k-NN backends that search it."""

from reco_lightning.memory.autotuned import AutofaissBackend
from reco_lightning.memory.base import BACKENDS, MemoryBackend, backend_class, register_backend
from reco_lightning.memory.exact import ExactBackend, MappedExactBackend
from reco_lightning.memory.ivfpq import IVFPQBackend
from reco_lightning.memory.ondisk import OnDiskIVFPQBackend
from reco_lightning.memory.store import MemoryStore
from reco_lightning.memory.torch_exact import TorchExactBackend

__all__ = [
    "BACKENDS",
    "AutofaissBackend",
    "ExactBackend",
    "IVFPQBackend",
    "MappedExactBackend",
    "MemoryBackend",
    "MemoryStore",
    "OnDiskIVFPQBackend",
    "TorchExactBackend",
    "backend_class",
    "register_backend",
]
