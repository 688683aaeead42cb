"""RECO's contrastive loss over the global batch.

L = NCE(v_bar, t_bar) + NCE(v_bar, t) + NCE(v, t_bar): the mixed terms keep refined embeddings in the
frozen space, so either side can be refined or left alone at inference.

Under DDP every rank gathers all ranks' embeddings with gradients and computes the same global loss.
The gather's backward sums the gradient from every rank's copy of the loss and DDP then averages over
ranks, so parameters receive exactly the gradient of the single-process loss on the concatenated batch.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["RecoContrastiveLoss", "gather_with_grad", "info_nce"]


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather of equal-sized tensors whose backward hands each rank the summed gradient of its rows.

    Every rank's loss reads every rank's rows, so the gradient of the summed losses with respect to this
    rank's rows is the all-reduced (summed) gradient of the gathered tensor, sliced to those rows. (Our own
    Function: ``torch.distributed.nn.functional.all_gather`` is deprecated for a private module.)
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from all ranks in rank order, keeping the autograd graph to every rank's input.

    Ranks may hold different numbers of rows (bad samples are dropped per rank): rows are padded to the
    largest count for the collective and the padding is removed again.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    count = torch.tensor([x.shape[0]], device=x.device)
    counts = [torch.zeros_like(count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    largest = max(sizes)
    gathered = _AllGatherWithGrad.apply(F.pad(x, (0, 0, 0, largest - x.shape[0])))
    parts = gathered.split(largest, dim=0)
    return torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)], dim=0)


def info_nce(a: Tensor, b: Tensor, logit_scale: Tensor, positives: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE (the CLIP loss): row i of ``a`` matches row i of ``b``.

    ``positives`` [N, N] (bool, diagonal True) marks further matching pairs, e.g. pairs with the same
    caption: the target then spreads uniformly over them instead of calling them negatives.
    """
    logits = logit_scale * a @ b.t()
    if positives is None:
        labels = torch.arange(a.shape[0], device=a.device)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
    targets = positives.float() / positives.float().sum(dim=1, keepdim=True)
    return 0.5 * (
        F.cross_entropy(logits, targets)
        + F.cross_entropy(logits.t(), targets.t() / targets.t().sum(1, keepdim=True))
    )


class RecoContrastiveLoss(nn.Module):
    """The three-term RECO loss with a learnable temperature (CLIP init 1/0.07, capped at 100).

    Args:
        init_temperature: initial softmax temperature.
        max_logit_scale: upper bound on 1/temperature, as in CLIP, for stability.
        learn_temperature: train the temperature (the paper's setting) or keep it fixed.
        mixed_terms: include NCE(v_bar, t) and NCE(v, t_bar); off trains only refined-vs-refined.
        duplicate_threshold: pairs whose frozen text embeddings have cosine >= this are positives of
            each other rather than negatives (datasets with many identical captions, such as captions
            made from class names). None: plain InfoNCE, as in the paper.
    """

    def __init__(
        self,
        init_temperature: float = 0.07,
        max_logit_scale: float = 100.0,
        learn_temperature: bool = True,
        mixed_terms: bool = True,
        duplicate_threshold: float | None = None,
    ) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(
            torch.tensor(math.log(1.0 / init_temperature)), requires_grad=learn_temperature
        )
        self.max_log_scale = math.log(max_logit_scale)
        self.mixed_terms, self.duplicate_threshold = mixed_terms, duplicate_threshold

    @property
    def logit_scale(self) -> Tensor:
        return self.log_scale.clamp(max=self.max_log_scale).exp()

    def forward(self, v: Tensor, t: Tensor, v_bar: Tensor, t_bar: Tensor) -> dict[str, Tensor]:
        """Local [B, D] embeddings in, global-batch loss out (plus its parts, for logging)."""
        v, t, v_bar, t_bar = (gather_with_grad(x) for x in (v, t, v_bar, t_bar))
        scale = self.logit_scale
        if v.shape[0] == 0:  # every sample of the global batch was bad: a zero loss that still backpropagates
            zero = scale * 0.0 + v_bar.sum() * 0.0 + t_bar.sum() * 0.0
            return {"loss": zero, "refined": zero}
        positives = None
        if self.duplicate_threshold is not None:
            positives = (t @ t.t() >= self.duplicate_threshold) | torch.eye(
                t.shape[0], dtype=torch.bool, device=t.device
            )
        parts = {"refined": info_nce(v_bar, t_bar, scale, positives)}
        if self.mixed_terms:
            parts["refined_image"] = info_nce(v_bar, t, scale, positives)
            parts["refined_text"] = info_nce(v, t_bar, scale, positives)
        parts["loss"] = sum(parts.values())
        return parts
