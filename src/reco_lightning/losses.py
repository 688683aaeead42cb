"""RECO's contrastive loss over the global batch.

L = NCE(v_bar, t_bar) + NCE(v_bar, t) + NCE(v, t_bar): the mixed terms keep refined embeddings in the
frozen space, so either side can be refined or left alone at inference.

Under DDP every rank gathers all ranks' embeddings with gradients and computes the loss of its own rows
against the global batch (B_local x B_global logits, as open_clip's local loss). The gather's backward
sums the gradient from every rank's share and DDP then averages over ranks, so parameters receive exactly
the gradient of the single-process loss on the concatenated batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LossConfig",
    "RecoContrastiveLoss",
    "gather_rows",
    "gather_with_grad",
    "info_nce",
    "local_info_nce",
]


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


def _world() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def gather_rows(*tensors: Tensor) -> tuple[list[Tensor], int, int]:
    """Every rank's rows of each tensor, concatenated in rank order with autograd to every rank's input.

    Returns (gathered tensors, this rank's first row in them, world size). Ranks may hold different
    numbers of rows (bad samples are dropped per rank): rows are padded to the largest count for the
    collective and the padding is removed again.
    """
    world = _world()
    if world == 1:
        return list(tensors), 0, 1
    count = torch.tensor([tensors[0].shape[0]], device=tensors[0].device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    largest = max(sizes)
    gathered = []
    for x in tensors:
        padded = _AllGatherWithGrad.apply(F.pad(x, (0, 0, 0, largest - x.shape[0])))
        parts = padded.split(largest, dim=0)
        gathered.append(torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)], dim=0))
    return gathered, sum(sizes[: dist.get_rank()]), world


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from all ranks in rank order, keeping the autograd graph to every rank's input."""
    return gather_rows(x)[0][0]


def _targets(positives: Tensor) -> Tensor:
    """Row-normalised soft targets: each row spreads its mass uniformly over its positives."""
    positives = positives.float()
    return positives / positives.sum(dim=1, keepdim=True)


def info_nce(a: Tensor, b: Tensor, logit_scale: Tensor, positives: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE (the CLIP loss): row i of ``a`` matches row i of ``b``.

    ``positives`` [N, N] (bool, symmetric, diagonal True) marks further matching pairs, e.g. pairs with
    the same caption: each row's target then spreads uniformly over its positives, in both directions.
    """
    return local_info_nce(a, b, a, b, logit_scale, 0, positives)


def local_info_nce(
    a_local: Tensor,
    b_local: Tensor,
    a_global: Tensor,
    b_global: Tensor,
    logit_scale: Tensor,
    offset: int,
    positives: Tensor | None = None,
) -> Tensor:
    """This rank's share of the global symmetric InfoNCE: its rows against every rank's columns.

    ``a_local``/``b_local`` are rows ``offset .. offset + n`` of ``a_global``/``b_global``; ``positives``
    [n, N] marks, for each local row, its matching global columns (default: the diagonal). Returns the
    sum of this rank's per-row losses divided by the global row count, so the ranks' values add up to
    the single-process loss on the concatenated batch while each rank holds n x N logits, not N x N (as
    open_clip's local loss).
    """
    n, total = a_local.shape[0], a_global.shape[0]
    if positives is None:
        targets = torch.arange(offset, offset + n, device=a_local.device)  # class indices: the diagonal
    else:
        targets = _targets(positives)
    image_to_text = F.cross_entropy(logit_scale * a_local @ b_global.t(), targets, reduction="sum")
    text_to_image = F.cross_entropy(logit_scale * b_local @ a_global.t(), targets, reduction="sum")
    return 0.5 * (image_to_text + text_to_image) / total


@dataclass(frozen=True)
class LossConfig:
    """The options of RecoContrastiveLoss, defined once (RecoModule takes one).

    Args:
        init_temperature: initial softmax temperature (CLIP: 0.07).
        max_logit_scale: upper bound on 1/temperature, as in CLIP, for stability.
        learn_temperature: train the temperature (the paper's setting) or keep it fixed.
        mixed_terms: include NCE(v_bar, t) and NCE(v, t_bar); off trains only refined-vs-refined.
        duplicate_threshold: pairs whose frozen text embeddings have cosine >= this are positives of
            each other rather than negatives (datasets with many identical captions, such as captions
            made from class names). None: plain InfoNCE, as in the paper.
    """

    init_temperature: float = 0.07
    max_logit_scale: float = 100.0
    learn_temperature: bool = True
    mixed_terms: bool = True
    duplicate_threshold: float | None = None

    @classmethod
    def coerce(cls, value: LossConfig | Mapping[str, Any] | None) -> LossConfig:
        """A LossConfig from itself, a mapping (checkpoint hparams, YAML) or None (the defaults)."""
        if value is None:
            return cls()
        return value if isinstance(value, cls) else cls(**dict(value))


class RecoContrastiveLoss(nn.Module):
    """The three-term RECO loss with a learnable temperature (CLIP init 1/0.07, capped at 100).

    All options are ``config`` (see LossConfig).
    """

    def __init__(self, config: LossConfig | None = None) -> None:
        super().__init__()
        config = LossConfig.coerce(config)
        self.config = config
        self.log_scale = nn.Parameter(
            torch.tensor(math.log(1.0 / config.init_temperature)), requires_grad=config.learn_temperature
        )
        self.max_log_scale = math.log(config.max_logit_scale)

    @property
    def logit_scale(self) -> Tensor:
        """1 / temperature. Not clamped here: a clamp in forward has zero gradient above the cap, so an
        overshooting optimiser step would freeze the temperature; :meth:`clamp_` caps it after each step."""
        return self.log_scale.exp()

    @torch.no_grad()
    def clamp_(self) -> None:
        """Cap 1/temperature at ``max_logit_scale`` in place (call after every optimiser step, as CLIP)."""
        self.log_scale.clamp_(max=self.max_log_scale)

    def positives(self, t_local: Tensor, t_global: Tensor, offset: int) -> Tensor | None:
        """[n, N] matching columns of each local row: itself, plus (with ``duplicate_threshold``) every
        pair whose frozen text embedding is that similar to its own."""
        if self.config.duplicate_threshold is None:
            return None
        # renormalised: identical captions stored in fp16 must compare at 1, not at |t|^2 ~ 1 - 1e-4
        same = (
            F.normalize(t_local, dim=-1) @ F.normalize(t_global, dim=-1).t()
            >= self.config.duplicate_threshold
        )
        rows = torch.arange(t_local.shape[0], device=t_local.device)
        same[rows, rows + offset] = True
        return same

    def forward(self, v: Tensor, t: Tensor, v_bar: Tensor, t_bar: Tensor) -> dict[str, Tensor]:
        """Local [B, D] embeddings in; this rank's share of the global-batch loss out (plus its parts).

        Each rank computes the loss of its own rows against the global batch (B_local x B_global logits)
        scaled by the world size, so that after DDP averages the gradients over ranks the parameters get
        exactly the gradient of the single-process loss on the concatenated batch. The mean of the ranks'
        values is that loss (log with ``sync_dist``).
        """
        (v_all, t_all, v_bar_all, t_bar_all), offset, world = gather_rows(v, t, v_bar, t_bar)
        scale = self.logit_scale
        if (
            v_all.shape[0] == 0
        ):  # every sample of the global batch was bad: a zero loss that still backpropagates
            zero = scale * 0.0 + v_bar.sum() * 0.0 + t_bar.sum() * 0.0
            return {"loss": zero, "refined": zero}
        positives = self.positives(t.detach(), t_all.detach(), offset)

        def nce(a: Tensor, b: Tensor, a_all: Tensor, b_all: Tensor) -> Tensor:
            return world * local_info_nce(a, b, a_all, b_all, scale, offset, positives)

        parts = {"refined": nce(v_bar, t_bar, v_bar_all, t_bar_all)}
        if self.config.mixed_terms:
            parts["refined_image"] = nce(v_bar, t, v_bar_all, t_all)
            parts["refined_text"] = nce(v, t_bar, v_all, t_bar_all)
        parts["loss"] = sum(parts.values())
        return parts
