"""reco_lightning: retrieval-enhanced contrastive vision-text models (RECO, ICLR 2024) in PyTorch Lightning."""

from reco_lightning.encoders import FrozenCLIP
from reco_lightning.fusion import FusionTransformer
from reco_lightning.losses import RecoContrastiveLoss
from reco_lightning.memory import MemoryBackend, MemoryStore
from reco_lightning.model import RecoModule
from reco_lightning.retrieval import Retriever

__all__ = [
    "FrozenCLIP",
    "FusionTransformer",
    "MemoryBackend",
    "MemoryStore",
    "RecoContrastiveLoss",
    "RecoModule",
    "Retriever",
]
__version__ = "0.1.0"
