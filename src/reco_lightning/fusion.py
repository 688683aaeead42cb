"""The fusion model: one shallow transformer that refines an embedding with its retrieved neighbours.

It reads the token sequence [query, r_1 .. r_k] (the r_i are embeddings of the other modality under
cross-modal fusion) and outputs the refined, L2-normalised embedding at the query position. It is the
only trained part of RECO, and it knows nothing about how the neighbours were found.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FusionConfig", "FusionTransformer"]


def _query_only(layer: nn.TransformerEncoderLayer, tokens: Tensor, padding: Tensor | None) -> Tensor:
    """The pre-LN ``layer``'s output at the query token only [B, W]: the same numbers as running the
    whole layer and taking position 0, without the feed-forward and attention outputs of the k retrieved
    positions that nothing reads (the last layer is the only layer in the paper's fusion)."""
    normed = layer.norm1(tokens)
    attended = layer.self_attn(normed[:, :1], normed, normed, key_padding_mask=padding, need_weights=False)[0]
    hidden = tokens[:, :1] + layer.dropout1(attended)
    feed = layer.linear2(layer.dropout(layer.activation(layer.linear1(layer.norm2(hidden)))))
    return (hidden + layer.dropout2(feed))[:, 0]


@dataclass(frozen=True)
class FusionConfig:
    """The options of a FusionTransformer, defined once (RecoModule takes one for both sides).

    Args:
        width: transformer width; ``None`` uses the backbone's dim (the paper's choice); otherwise linear
            projections map in and out.
        num_layers: encoder layers (paper: 1).
        num_heads: attention heads; must divide ``width``.
        mlp_ratio: hidden size of the feed-forward block relative to ``width``.
        dropout: dropout in attention and feed-forward.
        residual: add the original query embedding to the output before normalising, so an untrained
            or uninformative memory starts from the frozen embedding instead of noise.
        retrieved_skip: weight of the mean of the (valid) retrieved embeddings added to the output
            (0 = off). With either skip on, the transformer branch starts at zero (final LayerNorm gain
            0), so the fusion starts as "query + weight x mean of neighbours" and learns corrections. Off
            in the paper's design; it matters when the fusion is trained on few concepts: learned maps are
            then only fitted on the directions of those concepts, and the skip carries retrieved
            information about unseen concepts through unchanged. The weight sets how far neighbours can
            pull a query: uni-modal similarities (caption to caption, image to image) are much larger than
            cross-modal ones, so at weight 1 a few neighbours of another concept can outvote the query's
            own image-text match.
    """

    width: int | None = None
    num_layers: int = 1
    num_heads: int = 8
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    residual: bool = False
    retrieved_skip: float = 0.0

    def __post_init__(self) -> None:
        if self.retrieved_skip < 0:
            raise ValueError(f"retrieved_skip is a weight >= 0 (0 = off), got {self.retrieved_skip}")

    @classmethod
    def coerce(cls, value: FusionConfig | Mapping[str, Any] | None) -> FusionConfig:
        """A FusionConfig from itself, a mapping (checkpoint hparams, YAML) or None (the defaults)."""
        if value is None:
            return cls()
        return value if isinstance(value, cls) else cls(**dict(value))


class FusionTransformer(nn.Module):
    """Pre-LN transformer encoder over [query, k retrieved], output at the query token.

    ``dim`` is the backbone's embedding dim (input and output); everything else is ``config``.
    """

    QUERY, RETRIEVED = 0, 1

    def __init__(self, dim: int, config: FusionConfig | None = None) -> None:
        super().__init__()
        config = FusionConfig.coerce(config)
        width = config.width or dim
        if width % config.num_heads:
            raise ValueError(
                f"fusion width {width} is not divisible by num_heads={config.num_heads}: change either"
            )
        self.config, self.dim, self.width = config, dim, width
        self.proj_in = nn.Identity() if width == dim else nn.Linear(dim, width)
        self.type_embedding = nn.Embedding(2, width)
        layer = nn.TransformerEncoderLayer(
            d_model=width,
            nhead=config.num_heads,
            dim_feedforward=int(width * config.mlp_ratio),
            dropout=config.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=config.num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.proj_out = nn.Identity() if width == dim else nn.Linear(width, dim)
        nn.init.normal_(self.type_embedding.weight, std=0.02)
        if config.residual or config.retrieved_skip:
            nn.init.zeros_(self.norm.weight)  # the learned branch starts silent; the skips carry the signal
            if isinstance(self.proj_out, nn.Linear):
                nn.init.zeros_(self.proj_out.bias)  # or its random bias would leak into the silent start

    def tokens(self, query: Tensor, retrieved: Tensor) -> Tensor:
        """The input sequence [B, 1 + k, width]: [query, retrieved] projected, plus their type embeddings."""
        if query.ndim != 2 or retrieved.ndim != 3 or retrieved.shape[0] != query.shape[0]:
            raise ValueError(
                f"expected query [B, D] and retrieved [B, k, D], got {tuple(query.shape)} and {tuple(retrieved.shape)}"
            )
        tokens = self.proj_in(torch.cat([query.unsqueeze(1), retrieved.to(query.dtype)], dim=1))
        types = torch.full(tokens.shape[1:2], self.RETRIEVED, dtype=torch.long, device=tokens.device)
        types[0] = self.QUERY
        return tokens + self.type_embedding(types)

    def branch(self, tokens: Tensor, retrieved_mask: Tensor | None = None) -> Tensor:
        """The learned branch [B, D]: the encoder over ``tokens``, read at the query, normed and projected
        out (before skips and normalisation; separate so variants can change the tokens or the skips)."""
        padding = None
        if retrieved_mask is not None:
            padding = F.pad(~retrieved_mask.bool(), (1, 0), value=False)  # True = ignore; query never ignored
        for layer in self.encoder.layers[:-1]:
            tokens = layer(tokens, src_key_padding_mask=padding)
        return self.proj_out(self.norm(_query_only(self.encoder.layers[-1], tokens, padding)))

    def forward(self, query: Tensor, retrieved: Tensor, retrieved_mask: Tensor | None = None) -> Tensor:
        """Refine ``query`` [B, D] with ``retrieved`` [B, k, D].

        ``retrieved_mask`` [B, k] is True for valid neighbours; invalid ones (fewer than k left after
        excluding self and near-duplicates) are not attended to. The query always is.
        """
        out = self.branch(self.tokens(query, retrieved), retrieved_mask)
        if self.config.residual:
            out = out + query
        if self.config.retrieved_skip:
            weights = torch.ones(retrieved.shape[:2], device=retrieved.device, dtype=retrieved.dtype)
            if retrieved_mask is not None:
                weights = weights * retrieved_mask.to(retrieved.dtype)
            mean = (weights.unsqueeze(-1) * retrieved).sum(1) / weights.sum(1, keepdim=True).clamp(min=1.0)
            out = out + self.config.retrieved_skip * mean
        return F.normalize(out, dim=-1)
