"""Names shared by every layer: the two modalities of an image-text pair.

Apart so that the retriever, the model and the memory store can all say ``Modality`` without the upper
layers importing the store for a type, and without the store knowing anything above it.
"""

from __future__ import annotations

from typing import Literal

__all__ = ["MODALITIES", "Modality"]

Modality = Literal["image", "text"]
MODALITIES: tuple[Modality, Modality] = ("image", "text")
