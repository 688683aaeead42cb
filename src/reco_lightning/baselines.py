"""Training-free uses of the same neighbours RECO's fusion reads: what a trained fusion has to beat.

The paper never compared its fusion with a training-free mix of the same retrieved items; SuS-X,
Tip-Adapter and the k-NN literature show such mixes are strong. Both baselines here read exactly the
:class:`~reco_lightning.retrieval.Neighbours` a RecoModule's fusion would (same memory, k, search and
fusion modality, same exclusion), so a report row compares the fusion, nothing else.

- :func:`lookup`: the query's own embedding is dropped; it becomes the (mean or similarity-weighted)
  average of its neighbours' paired embeddings. Against frozen class prompts this is a k-NN vote of
  the neighbours' captions.
- :func:`mix`: ``normalize(query + alpha * mean of neighbours)``, RECO's untrained starting point with
  the retrieval weight ``alpha`` (calibrated on validation data, see :mod:`reco_lightning.calibration`).

The zero-shot evaluation's ``lookup_whitened`` row is :func:`lookup` through the memory's covariance
(:mod:`reco_lightning.whitening`): on the demo's stand-in backbones a far stronger vote (docs/results.md).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from reco_lightning.pooling import pooled
from reco_lightning.retrieval import Neighbours

__all__ = ["lookup", "mix", "neighbour_mean"]


def neighbour_mean(neighbours: Neighbours, temperature: float | None = None) -> Tensor:
    """[B, D] average of the valid neighbours' embeddings: uniform, or softmax(score / temperature)
    weighted (Tip-Adapter's sharpness); zeros for a query without valid neighbours."""
    return pooled(neighbours.embeddings, neighbours.mask, neighbours.scores, temperature)


def lookup(neighbours: Neighbours, temperature: float | None = None) -> Tensor:
    """The k-NN vote: the unit-norm average of the neighbours' paired embeddings (query dropped)."""
    return F.normalize(neighbour_mean(neighbours, temperature), dim=-1)


def mix(query: Tensor, neighbours: Neighbours, alpha: float) -> Tensor:
    """``normalize(query + alpha * mean of neighbours)``: the query kept, the memory mixed in."""
    if alpha < 0:
        raise ValueError(f"mix alpha is a weight >= 0, got {alpha}")
    return F.normalize(query + alpha * neighbour_mean(neighbours), dim=-1)
