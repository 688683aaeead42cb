"""Data: image-text pairs for training and memories, evaluation sets."""

from reco_lightning.data.pairs import ImageTextDataModule, ImageTextPairs, read_pairs

__all__ = ["ImageTextDataModule", "ImageTextPairs", "read_pairs"]
