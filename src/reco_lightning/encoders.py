"""The frozen backbone: any transformers dual encoder (CLIP, SigLIP, SigLIP 2) as a fixed feature extractor.

RECO never trains the backbone, so :class:`FrozenEncoder` pins it in eval mode without gradients and
exposes only what the rest of the package needs: L2-normalised embeddings of the shared image-text space,
the family's own preprocessing (:class:`Preprocessor`), and a fingerprint that memories, feature caches,
checkpoints and exports record so that embeddings from two different backbones are never mixed.

A family (:data:`FAMILIES`) is what differs between dual encoders: the config's ``model_type``, where the
embedding dim lives, which head weights identify a checkpoint, and whether the text tower reads an
attention mask (SigLIP was trained on max-length padding without one).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reco_lightning.errors import MissingInputError, RecoError

__all__ = [
    "FAMILIES",
    "IMAGE_INPUT_KEYS",
    "BackboneFamily",
    "FrozenCLIP",
    "FrozenEncoder",
    "Preprocessor",
    "UnsupportedBackboneError",
    "backbone_fingerprint",
    "family_of",
    "projected_embedding",
    "tokenize_captions",
]

#: the image-side model inputs an image processor may produce (SigLIP 2's NaFlex adds the last two)
IMAGE_INPUT_KEYS = ("pixel_values", "pixel_attention_mask", "spatial_shapes")


class UnsupportedBackboneError(RecoError, ValueError):
    """A checkpoint that is not a dual encoder of a supported family."""


@dataclass(frozen=True)
class BackboneFamily:
    """What the package needs to know about one family of dual encoders.

    Args:
        name: the family's name, recorded in fingerprints.
        model_types: the ``model_type`` values of its ``config.json``.
        dim: the shared embedding dim, from the model's config.
        fingerprint_parameters: whether a named parameter is hashed into the fingerprint (the heads:
            small, and different for any two trained checkpoints).
        text_attention_mask: whether the text tower is given the attention mask (False: max-length
            padding is part of the input, as in the family's training).
    """

    name: str
    model_types: tuple[str, ...]
    dim: Callable[[Any], int]
    fingerprint_parameters: Callable[[str], bool]
    text_attention_mask: bool = True


_CLIP_HEADS = ("visual_projection.weight", "text_projection.weight", "logit_scale")


def _siglip_like(name: str) -> BackboneFamily:
    """SigLIP and SigLIP 2: no projection layer; each tower's ``head`` maps to the vision width, which both
    share; the text tower reads max-length padding without a mask."""
    return BackboneFamily(
        name,
        (name,),
        dim=lambda config: int(config.vision_config.hidden_size),
        fingerprint_parameters=lambda param: ".head." in param or param in ("logit_scale", "logit_bias"),
        text_attention_mask=False,
    )


FAMILIES: dict[str, BackboneFamily] = {
    family.name: family
    for family in (
        # OpenAI CLIP and LAION/OpenCLIP checkpoints in transformers format are all model_type "clip"
        BackboneFamily(
            "clip",
            ("clip",),
            dim=lambda config: int(config.projection_dim),
            fingerprint_parameters=lambda name: name in _CLIP_HEADS,
        ),
        _siglip_like("siglip"),
        _siglip_like("siglip2"),
    )
}


def family_of(config: Any, name_or_path: str = "") -> BackboneFamily:
    """The family of a loaded transformers config, or a one-line error naming the supported ones."""
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    raise UnsupportedBackboneError(
        f"backbone {name_or_path!r} is a {model_type!r} model: use a dual encoder of a supported family "
        f"({', '.join(FAMILIES)}), e.g. openai/clip-vit-base-patch32 or google/siglip-base-patch16-224"
    )


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
    """Text inputs for ``texts``: padded to ``max_length`` (truncated beyond it), as tensors.

    The one tokenizer call of the package: the training collator and :meth:`FrozenEncoder.tokenize` both
    use it, so captions seen in training and prompts encoded at evaluation get exactly the same inputs.
    Max-length padding is also what SigLIP was trained with.
    """
    encoded = tokenizer(
        list(texts),
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
        return_attention_mask=True,
    )
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def _text_limit(config: Any) -> int:
    return int(config.text_config.max_position_embeddings)


class Preprocessor:
    """A backbone's own image processor and tokenizer, as one picklable object (DataLoader workers use it).

    ``images(list)`` gives the image inputs (``pixel_values``, and for SigLIP 2 its patch mask and
    shapes); ``tokenize(texts)`` the text inputs, padded to ``max_text_length``.
    """

    def __init__(self, image_processor: Any, tokenizer: Any, max_text_length: int) -> None:
        self.image_processor, self.tokenizer = image_processor, tokenizer
        self.max_text_length = int(max_text_length)

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike, max_text_length: int | None = None
    ) -> Preprocessor:
        """The preprocessing saved beside a backbone (hub name or ``save_pretrained`` directory)."""
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

        name = str(name_or_path)
        config = AutoConfig.from_pretrained(name)
        family_of(config, name)
        limit = _text_limit(config)
        return cls(
            AutoImageProcessor.from_pretrained(name),
            AutoTokenizer.from_pretrained(name),
            min(max_text_length or limit, limit),
        )

    def images(self, images: Sequence[Any]) -> dict[str, Tensor]:
        """The image inputs of ``images`` (PIL images or arrays), keys among :data:`IMAGE_INPUT_KEYS`."""
        out = self.image_processor(list(images), return_tensors="pt")
        return {key: out[key] for key in IMAGE_INPUT_KEYS if key in out}

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        return tokenize_captions(self.tokenizer, texts, self.max_text_length)


def backbone_fingerprint(
    model: nn.Module, name_or_path: str, family: BackboneFamily | None = None
) -> dict[str, Any]:
    """Identity of a backbone: its config and its head weights, hashed.

    Hashing the heads (small, and different for any two trained checkpoints) identifies the weights
    without reading the whole model, and stays valid when a local directory is moved. The id of a CLIP
    is computed as before families existed, so memories and checkpoints built then still match.
    """
    family = family or family_of(model.config, name_or_path)
    config = model.config.to_dict()
    for volatile in ("transformers_version", "_name_or_path", "_commit_hash", "torch_dtype", "dtype"):
        config.pop(volatile, None)
        for sub in ("text_config", "vision_config"):
            if isinstance(config.get(sub), dict):
                config[sub].pop(volatile, None)
    config_sha = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]
    weights = hashlib.sha256()
    parameters = dict(model.named_parameters())
    names = (
        _CLIP_HEADS
        if family.name == "clip"
        else sorted(n for n in parameters if family.fingerprint_parameters(n))
    )
    for name in names:
        tensor = parameters.get(name)
        if tensor is not None:
            if family.name != "clip":
                weights.update(name.encode())
            weights.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    weights_sha = weights.hexdigest()[:16]
    dim = family.dim(model.config)
    key = f"{config_sha}:{weights_sha}:{dim}" + ("" if family.name == "clip" else f":{family.name}")
    return {
        "name_or_path": str(name_or_path),
        "family": family.name,
        "config_sha": config_sha,
        "weights_sha": weights_sha,
        "dim": dim,
        "id": hashlib.sha256(key.encode()).hexdigest()[:16],
    }


def _local_path(name_or_path: str) -> bool:
    """Whether ``name_or_path`` can only be a local directory: hub ids are ``name`` or ``org/name``."""
    return (
        name_or_path.startswith((".", "/", "~"))
        or name_or_path.count("/") > 1
        or (os.sep != "/" and os.sep in name_or_path)
    )


class FrozenEncoder(nn.Module):
    """A transformers dual encoder (CLIP, SigLIP, SigLIP 2) and its preprocessing, frozen; outputs unit-norm
    embeddings of the shared space.

    ``name_or_path`` is a hub name (``openai/clip-vit-base-patch32``, ``google/siglip-base-patch16-224``)
    or a local directory written by ``save_pretrained``; both go through ``from_pretrained``.
    """

    def __init__(self, name_or_path: str | os.PathLike, max_text_length: int | None = None) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.name_or_path = str(name_or_path)
        if _local_path(self.name_or_path) and not os.path.isdir(self.name_or_path):
            raise MissingInputError(
                f"backbone directory {self.name_or_path!r} does not exist (from {os.getcwd()}): point "
                "model.backbone at a directory written by save_pretrained, or at a hub name such as "
                "'openai/clip-vit-base-patch32'",
                self.name_or_path,
            )
        try:
            config = AutoConfig.from_pretrained(self.name_or_path)
            self.family = family_of(config, self.name_or_path)
            self.model = AutoModel.from_pretrained(self.name_or_path)
            self.preprocessor = Preprocessor.from_pretrained(self.name_or_path, max_text_length)
        except (OSError, ValueError) as err:
            if isinstance(err, UnsupportedBackboneError):
                raise
            raise FileNotFoundError(
                f"cannot load backbone {self.name_or_path!r}: {str(err).splitlines()[0]} "
                "(give a hub name reachable from here or a directory written by save_pretrained)"
            ) from err
        self.model.requires_grad_(False)
        self.model.eval()
        self.max_text_length = self.preprocessor.max_text_length
        self.fingerprint = backbone_fingerprint(self.model, self.name_or_path, self.family)

    @property
    def dim(self) -> int:
        return int(self.fingerprint["dim"])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def train(self, mode: bool = True) -> FrozenEncoder:
        """Stay in eval mode whatever Lightning asks: dropout/norm statistics of a frozen model must not move."""
        return super().train(False)

    # --- preprocessing: the backbone's own, so users get exactly the family's inputs -----------------
    def preprocess_images(self, images: Sequence[Any]) -> dict[str, Tensor]:
        return self.preprocessor.images(images)

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        return self.preprocessor.tokenize(texts)

    # --- embeddings ----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, inputs: Tensor | Mapping[str, Tensor]) -> Tensor:
        """Unit-norm image embeddings [B, dim] of preprocessed images: ``pixel_values`` alone, or the
        mapping :meth:`preprocess_images` returns (SigLIP 2 needs its patch mask and shapes too)."""
        inputs = {"pixel_values": inputs} if isinstance(inputs, Tensor) else dict(inputs)
        kwargs = {key: inputs[key].to(self.device) for key in IMAGE_INPUT_KEYS if key in inputs}
        kwargs["pixel_values"] = kwargs["pixel_values"].to(self.dtype)
        out = self.model.get_image_features(**kwargs)
        return F.normalize(projected_embedding(out, "image").float(), dim=-1)

    @torch.no_grad()
    def encode_texts(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        mask = attention_mask if self.family.text_attention_mask else None
        out = self.model.get_text_features(
            input_ids=input_ids.to(self.device),
            attention_mask=None if mask is None else mask.to(self.device),
        )
        return F.normalize(projected_embedding(out, "text").float(), dim=-1)

    @torch.no_grad()
    def encode_captions(self, texts: Sequence[str]) -> Tensor:
        """Tokenize and encode raw strings (class prompts, queries)."""
        return self.encode_texts(**self.tokenize(texts))

    def encode_batch(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """Frozen ``(v, t)`` [B, dim] of a collated batch of pairs (image inputs, ``input_ids``, ``attention_mask``).

        A batch whose samples were all bad carries no inputs: both are then an empty [0, dim] tensor on the
        backbone's device, so ranks with nothing to encode still step in sync. Memory builds, feature caches
        and RecoModule all encode pairs through here.
        """
        if "pixel_values" not in batch:  # every sample of this rank's batch was bad
            empty = torch.zeros(0, self.dim, device=self.device)
            return empty, empty
        v = self.encode_images({key: batch[key] for key in IMAGE_INPUT_KEYS if key in batch})
        t = self.encode_texts(batch["input_ids"], batch.get("attention_mask"))
        return v, t


#: the name this class had when only CLIP was supported (kept: configs and user code import it)
FrozenCLIP = FrozenEncoder
