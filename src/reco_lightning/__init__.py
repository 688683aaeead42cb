"""reco_lightning: retrieval-enhanced contrastive vision-text models (RECO, ICLR 2024) in PyTorch Lightning.

``RecoModel`` is what a user loads after training (no Lightning needed); ``RecoModule`` is what trains.
Top-level names load on first use, so `import reco_lightning.memory` (a faiss-only tool) does not pay
for importing Lightning and transformers, and ``from reco_lightning import RecoModel`` never loads Lightning.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "FrozenCLIP": "reco_lightning.encoders",
    "FrozenEncoder": "reco_lightning.encoders",
    "FusionConfig": "reco_lightning.fusion",
    "FusionTransformer": "reco_lightning.fusion",
    "LossConfig": "reco_lightning.losses",
    "MemoryBackend": "reco_lightning.memory",
    "MemoryStore": "reco_lightning.memory",
    "RecoConfig": "reco_lightning.pretrained",
    "RecoContrastiveLoss": "reco_lightning.losses",
    "RecoModel": "reco_lightning.pretrained",
    "RecoModule": "reco_lightning.model",
    "ZeroShotClassifier": "reco_lightning.pretrained",
    "Retriever": "reco_lightning.retrieval",
    "ZeroShotEvaluation": "reco_lightning.evaluation",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'reco_lightning' has no attribute {name!r}")
