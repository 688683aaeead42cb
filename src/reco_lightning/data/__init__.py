"""Data: streaming image-text pairs for training and memories, feature caches, evaluation sets."""

from reco_lightning.data.pairs import ImageTextDataModule, PairStream, open_source, read_pairs

__all__ = ["ImageTextDataModule", "PairStream", "open_source", "read_pairs"]
