"""FrozenCLIP: a Hugging Face CLIP used as a fixed feature extractor.

RECO never trains the backbone, so this wrapper pins it in eval mode without gradients and exposes only
what the rest of the package needs: L2-normalised projected embeddings, the backbone's own
preprocessing, and a fingerprint that memories and feature caches record so that embeddings from two
different backbones are never mixed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reco_lightning.errors import MissingInputError

__all__ = ["FrozenCLIP", "backbone_fingerprint", "projected_embedding", "tokenize_captions"]


def projected_embedding(output: Any, kind: str) -> Tensor:
    """transformers 4.x returns the projected embedding as a tensor; 5.x wraps it in an output object."""
    if isinstance(output, Tensor):
        return output
    for name in ("pooler_output", f"{kind}_embeds"):
        value = getattr(output, name, None)
        if isinstance(value, Tensor):
            return value
    raise TypeError(f"cannot find the projected {kind} embedding in {type(output).__name__}")


def tokenize_captions(tokenizer: Any, texts: Sequence[str], max_length: int) -> dict[str, Tensor]:
    """CLIP text inputs for ``texts``: padded to ``max_length`` (truncated beyond it), as tensors.

    The one tokenizer call of the package: the training collator and :meth:`FrozenCLIP.tokenize` both use
    it, so captions seen in training and prompts encoded at evaluation get exactly the same inputs.
    """
    encoded = tokenizer(
        list(texts),
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def backbone_fingerprint(model: nn.Module, name_or_path: str) -> dict[str, Any]:
    """Identity of a CLIP backbone: its config and its projection weights, hashed.

    Hashing the projection heads (small, and different for any two trained checkpoints) identifies the
    weights without reading the whole model, and stays valid when a local directory is moved.
    """
    config = model.config.to_dict()
    for volatile in ("transformers_version", "_name_or_path", "_commit_hash", "torch_dtype", "dtype"):
        config.pop(volatile, None)
        for sub in ("text_config", "vision_config"):
            if isinstance(config.get(sub), dict):
                config[sub].pop(volatile, None)
    config_sha = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]
    weights = hashlib.sha256()
    for name in ("visual_projection.weight", "text_projection.weight", "logit_scale"):
        tensor = dict(model.named_parameters()).get(name)
        if tensor is not None:
            weights.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    weights_sha = weights.hexdigest()[:16]
    dim = int(model.config.projection_dim)
    identity = hashlib.sha256(f"{config_sha}:{weights_sha}:{dim}".encode()).hexdigest()[:16]
    return {
        "name_or_path": str(name_or_path),
        "config_sha": config_sha,
        "weights_sha": weights_sha,
        "dim": dim,
        "id": identity,
    }


def _local_path(name_or_path: str) -> bool:
    """Whether ``name_or_path`` can only be a local directory: hub ids are ``name`` or ``org/name``."""
    return (
        name_or_path.startswith((".", "/", "~"))
        or name_or_path.count("/") > 1
        or (os.sep != "/" and os.sep in name_or_path)
    )


class FrozenCLIP(nn.Module):
    """A transformers CLIPModel + CLIPProcessor, frozen; outputs unit-norm projected embeddings.

    ``name_or_path`` is a hub name (``openai/clip-vit-base-patch32``) or a local directory written by
    ``save_pretrained``; both go through ``from_pretrained``.
    """

    def __init__(self, name_or_path: str | os.PathLike, max_text_length: int | None = None) -> None:
        super().__init__()
        from transformers import CLIPModel, CLIPProcessor
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.name_or_path = str(name_or_path)
        if _local_path(self.name_or_path) and not os.path.isdir(self.name_or_path):
            raise MissingInputError(
                f"CLIP backbone directory {self.name_or_path!r} does not exist (from {os.getcwd()}): point "
                "model.backbone at a directory written by save_pretrained, or at a hub name such as "
                "'openai/clip-vit-base-patch32'",
                self.name_or_path,
            )
        try:
            self.model = CLIPModel.from_pretrained(self.name_or_path)
            self.processor = CLIPProcessor.from_pretrained(self.name_or_path)
        except OSError as err:
            raise FileNotFoundError(
                f"cannot load CLIP backbone {self.name_or_path!r}: {str(err).splitlines()[0]} "
                "(give a hub name reachable from here or a directory written by save_pretrained)"
            ) from err
        self.model.requires_grad_(False)
        self.model.eval()
        limit = self.model.config.text_config.max_position_embeddings
        self.max_text_length = min(max_text_length or limit, limit)
        self.fingerprint = backbone_fingerprint(self.model, self.name_or_path)

    @property
    def dim(self) -> int:
        return int(self.fingerprint["dim"])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def train(self, mode: bool = True) -> FrozenCLIP:
        """Stay in eval mode whatever Lightning asks: dropout/norm statistics of a frozen model must not move."""
        return super().train(False)

    # --- preprocessing: the backbone's own processor, so users get exactly CLIP's inputs -------------
    def preprocess_images(self, images: Sequence[Any]) -> Tensor:
        return self.processor.image_processor(list(images), return_tensors="pt")["pixel_values"]

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        return tokenize_captions(self.processor.tokenizer, texts, self.max_text_length)

    # --- embeddings ----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixel_values: Tensor) -> Tensor:
        pixel_values = pixel_values.to(self.device, dtype=next(self.model.parameters()).dtype)
        out = self.model.get_image_features(pixel_values=pixel_values)
        return F.normalize(projected_embedding(out, "image").float(), dim=-1)

    @torch.no_grad()
    def encode_texts(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        out = self.model.get_text_features(
            input_ids=input_ids.to(self.device),
            attention_mask=None if attention_mask is None else attention_mask.to(self.device),
        )
        return F.normalize(projected_embedding(out, "text").float(), dim=-1)

    @torch.no_grad()
    def encode_captions(self, texts: Sequence[str]) -> Tensor:
        """Tokenize and encode raw strings (class prompts, queries)."""
        return self.encode_texts(**self.tokenize(texts))

    def encode_batch(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """Frozen ``(v, t)`` [B, dim] of a collated batch of pairs (``pixel_values``, ``input_ids``, ``attention_mask``).

        A batch whose samples were all bad carries no inputs: both are then an empty [0, dim] tensor on the
        backbone's device, so ranks with nothing to encode still step in sync. Memory builds, feature caches
        and RecoModule all encode pairs through here.
        """
        if "pixel_values" not in batch:  # every sample of this rank's batch was bad
            empty = torch.zeros(0, self.dim, device=self.device)
            return empty, empty
        v = self.encode_images(batch["pixel_values"])
        t = self.encode_texts(batch["input_ids"], batch.get("attention_mask"))
        return v, t
