"""A query's retrieved neighbours pooled into one vector: the k-NN vote's average, written once.

The training-free lookup (:mod:`reco_lightning.baselines`) and the memory's vote beside the fusion
(:mod:`reco_lightning.vote`) both average a query's valid neighbours, uniformly or weighted by a softmax of
their search scores over a temperature (Tip-Adapter's sharpness: nearer neighbours count more). Tensors
only, below the retriever, so both read the same arithmetic without importing each other.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["pooled"]


def pooled(
    embeddings: Tensor, mask: Tensor, scores: Tensor | None = None, temperature: float | None = None
) -> Tensor:
    """[B, D]: the valid neighbours' ``embeddings`` [B, k, D] (``mask`` [B, k]) averaged uniformly, or with
    ``softmax(scores / temperature)`` weights over the valid ones; zeros for a query without valid
    neighbours."""
    valid = mask.to(embeddings.dtype)
    if temperature is None:
        weights = valid
    else:
        if not temperature > 0:
            raise ValueError(f"a neighbour temperature must be > 0 (None = plain mean), got {temperature}")
        if scores is None:
            raise ValueError("a neighbour temperature weighs the neighbours' search scores: pass scores")
        logits = (scores.to(embeddings.dtype) / temperature).masked_fill(~mask, float("-inf"))
        weights = torch.nan_to_num(torch.softmax(logits, dim=1)) * valid  # no valid neighbour: all zero
    total = weights.sum(1, keepdim=True).clamp(min=1e-12)
    return (weights.unsqueeze(-1) * embeddings).sum(1) / total
