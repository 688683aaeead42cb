"""The memory's vote beside the fusion: the whitened k-NN lookup carried as a second embedding block.

RECO's fusion refines a query with its neighbours; the training-free whitened lookup (the neighbours'
caption mean through the memory's caption covariance, :mod:`reco_lightning.whitening`) reads the same
neighbours another way and is the strongest training-free answer on the demo's stand-in backbones. Added
to the fusion as a second *score* (logits ``fused . prompt + W x vote . frozen prompt``) it helps both
protocols (docs/results.md, sessions 15-16); mixed into the fused vector it costs 5 to 13 points, because
the whitened vector is met by fused prompts that differ from the captions it was built from.

So the vote travels as its own block: a refined image is ``[fused, sqrt(W) x vote] / sqrt(1 + W)`` and a
refined text ``[fused, sqrt(W) x frozen] / sqrt(1 + W)`` (each block unit-norm, so the whole is too): their
inner product is exactly that sum of scores over ``1 + W``, so any cosine consumer (a zero-shot
classifier, a retrieval index, ``reco predict``'s files) gets it. The refined dimension doubles. A frozen
embedding joins the space as ``[x, sqrt(W) x]``: frozen-to-frozen similarities are unchanged, and a
frozen side meets a refined one as ``(fused . x + W x vote . x) / (1 + W)``.

Only the image side votes (a caption's neighbours are images: the text side's own vote, class prototypes
from the prompts' neighbours' images, lost 14 to 30 points on the demo, session 17); the text side's second
block is its frozen embedding, the space the vote was built to meet. With a temperature the caption mean
weighs each neighbour by a softmax of its cosine to the image (session 17: +0.2 open, +0.4 strict on the
demo's validation split).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from reco_lightning.memory.store import MemoryStore
from reco_lightning.pooling import pooled
from reco_lightning.whitening import MemoryWhitening

__all__ = ["MemoryVote"]


class MemoryVote:
    """The whitened lookup of a memory with weight ``weight``, and the two-block embeddings that carry it.

    Args:
        whitening: the memory's caption whitening (:meth:`of_memory` builds it).
        weight: W, the vote's weight against the fusion's score (> 0).
        temperature: None: the neighbours' captions are averaged uniformly; T > 0: with ``softmax(score /
            T)`` weights, so nearer neighbours count more (Tip-Adapter's sharpness).
    """

    def __init__(self, whitening: MemoryWhitening, weight: float, temperature: float | None = None) -> None:
        if not weight > 0:
            raise ValueError(f"a vote weight must be > 0 (0 turns the vote off), got {weight}")
        if temperature is not None and not temperature > 0:
            raise ValueError(f"a vote temperature must be > 0 (None: a plain mean), got {temperature}")
        self.whitening, self.weight = whitening, float(weight)
        self.temperature = None if temperature is None else float(temperature)

    @classmethod
    def of_memory(
        cls, memory: MemoryStore, weight: float, ridge: float, temperature: float | None = None
    ) -> MemoryVote:
        """The vote of ``memory``: its captions' whitening with ``ridge`` (a fraction of the largest
        eigenvalue), weighted ``weight``, its neighbours weighted by ``temperature``."""
        return cls(MemoryWhitening.of_memory(memory, ridge, "text"), weight, temperature)

    def image_block(self, captions: Tensor, mask: Tensor, scores: Tensor | None = None) -> Tensor:
        """[B, D] unit rows: the average of each image's valid neighbour ``captions`` [B, k, D] (``mask``
        [B, k]; with a temperature weighted by their search ``scores`` [B, k]) through the whitening; the
        lookup's vote. A query with no valid neighbour gets zeros."""
        mean = pooled(captions, mask, scores, self.temperature)
        voted = self.whitening(F.normalize(mean, dim=-1))
        return voted * mask.any(1, keepdim=True).to(voted.dtype)

    def join(self, first: Tensor, second: Tensor) -> Tensor:
        """[B, 2D]: ``[first, sqrt(W) x second] / sqrt(1 + W)`` of two [B, D] blocks (unit rows in, unit
        rows out)."""
        scale = 1.0 / math.sqrt(1.0 + self.weight)
        return torch.cat([first * scale, second * (math.sqrt(self.weight) * scale)], dim=-1)

    def lift(self, frozen: Tensor) -> Tensor:
        """[B, 2D]: a frozen embedding in the two-block space (``join(x, x)``): frozen-to-frozen similarities
        stay what they were."""
        return self.join(frozen, frozen)

    def __repr__(self) -> str:
        return (
            f"MemoryVote(weight={self.weight}, ridge={self.whitening.ridge}, temperature={self.temperature})"
        )
