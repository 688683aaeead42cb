"""RecoModel: a trained RECO as a plain ``nn.Module`` that loads without Lightning and encodes for you.

The LightningModule (:class:`reco_lightning.model.RecoModule`) trains the fusions; this is what a user
picks up afterwards, in the conventions they already have in hand (Hugging Face's ``from_pretrained`` /
``save_pretrained``, open_clip's ``encode_image`` / ``encode_text``)::

    model = RecoModel.from_pretrained("export/", memory="memory/")
    image_emb = model.encode_image(["cat.jpg", "dog.jpg"])          # refined, unit-norm, [2, dim]
    text_emb = model.encode_text(["a photo of a cat"])
    print(model.classifier(["cat", "dog"]).predict(["cat.jpg"]))   # ['cat']

An export is a directory in the layout of huggingface_hub's ``ModelHubMixin``: ``model.safetensors`` (the
two fusions and the temperature, nothing else: the frozen backbone is loaded from where it lives),
``config.json`` (backbone name and fingerprint, the fusion and retrieval settings, the memory it was
trained with, calibrated weights) and a generated ``README.md`` model card. Loading reads only
safetensors and JSON: no pickle is ever unpickled.

Refinement itself (:func:`refine_embeddings`) and attaching a memory (:func:`open_retriever`) are written
once here and used by the LightningModule too, so what ``reco predict`` writes and what
:meth:`RecoModel.encode_image` returns are the same numbers.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple, overload

import torch
from torch import Tensor, nn

from reco_lightning.atomic import replace_directory
from reco_lightning.encoders import FrozenEncoder
from reco_lightning.errors import MissingInputError, RecoError
from reco_lightning.fusion import FusionConfig, FusionTransformer
from reco_lightning.memory.store import MemoryStore, check_fingerprint
from reco_lightning.novelty import (
    GapCheck,
    NoveltyGate,
    ShareCheck,
    known_rows,
    novel_answer,
    novel_queries,
)
from reco_lightning.retrieval import Choice, Neighbours, Retriever
from reco_lightning.types import Modality
from reco_lightning.vote import MemoryVote
from reco_lightning.whitening import MemoryWhitening

__all__ = [
    "CONFIG_NAME",
    "FORMAT",
    "WEIGHTS_NAME",
    "BackboneMismatchError",
    "ExportError",
    "ImageLoadError",
    "RecoConfig",
    "RecoModel",
    "Refined",
    "ZeroShotClassifier",
    "gated_queries",
    "open_retriever",
    "refine_and_gate",
    "refine_embeddings",
]

FORMAT = "reco-lightning/1"
CONFIG_NAME, WEIGHTS_NAME, CARD_NAME = "config.json", "model.safetensors", "README.md"
LOGIT_SCALE = "logit_scale"


class BackboneMismatchError(RecoError, RuntimeError):
    """Fusion weights trained on another backbone's embedding space."""


class ExportError(RecoError, ValueError):
    """An export directory (or a checkpoint to export) that cannot be read; the message says what to do."""


class ImageLoadError(RecoError, OSError):
    """An image given to :meth:`RecoModel.encode_image` that cannot be read; ``path`` names it."""

    def __init__(self, message: str, path: str) -> None:
        super().__init__(message)
        self.path = path


@dataclass(frozen=True)
class RecoConfig:
    """The settings a trained RECO runs with, defined once: :class:`RecoModel` holds them and
    :class:`~reco_lightning.model.RecoModule` takes its defaults from here.

    Args:
        k: neighbours retrieved per query.
        search: "uni" (same-modality search, the paper's best) or "cross".
        fusion: "cross" (fuse the other modality of the found pairs, the paper's best) or "uni".
        fusion_config: the FusionTransformer of each side (options: FusionConfig).
        refine_image / refine_text: which sides are refined when nothing else is asked.
        mask_retrieved: the "training without retrieval" control: every retrieved token is masked.
        memory_search_params: search-time backend overrides, e.g. ``{"nprobe": 64, "rerank": 100}``.
        memory_device: "auto" puts the indexes on the model's GPU when faiss has GPUs, "cpu" keeps them.
        known_memory: the memory directory the fusion was trained with. Given, rows of the attached memory
            whose pair ids it lacks count as added after training, and a query with at least
            ``novelty_threshold`` of its neighbours added bypasses the fusion (an image becomes the mean of
            its added neighbours' captions, a text keeps its frozen embedding; see
            :mod:`reco_lightning.novelty`). None (the default): every query is fused.
        novelty_threshold: that share, in (0, 1]. 0.9 (9 of the default 10 neighbours) was chosen on the
            validation split of 9 stand-in backbones: the best all-class top-1 that keeps seen-only top-1
            within a point of the frozen model (0.7 is 1.5 points better all-class and 2.2 worse seen-only).
        novelty_share_quantile: with ``known_memory``, a query is gated only if its share of added
            neighbours also exceeds this quantile of the share the memory's training rows see
            (:class:`~reco_lightning.novelty.ShareCheck`: a memory grown with more rows of the known
            concepts raises that base rate and is spared); None: no such check. 0.95 (the default since
            session 11) spared a memory grown tenfold with the same concepts entirely, where the gap check
            cost it 2.6 points, and gave the strict protocol 0.6 more (validation, 9 stand-in backbones).
        novelty_gap: with ``known_memory``, a query is gated only if its best added row also beats its best
            row of the training memory by more than this quantile of that gap for the training memory's
            rows (:class:`~reco_lightning.novelty.GapCheck`, the default of sessions 9-10: also spares a
            memory grown with more rows of one known concept, at a cost to new concepts that look like
            known ones); None (the default): no such check.
        novelty_whiten: with ``known_memory``, a gated image's answer (its added neighbours' caption mean)
            is mapped through the attached memory's caption covariance, regularised by this fraction of its
            largest eigenvalue, before it meets the class prompts
            (:class:`~reco_lightning.whitening.MemoryWhitening`): directions all captions share count for
            less than those that tell concepts apart. None (the default): the plain caption mean. The
            demo's strict protocol set 0.01 (sessions 14-15), chosen on its validation split (+2.3 all-class over 9 stand-in
            backbones, a sharp optimum: 0.003 and 0.03 gain 0.4 and 0.2, 0.001 and 0.1 lose 5 and 6;
            docs/results.md): tune it on held-out data for another backbone.
        vote_weight: W > 0: at inference every refined embedding also carries the memory's vote, the
            whitened k-NN lookup of its neighbours' captions, as a second block (:mod:`reco_lightning.vote`):
            a refined image is ``[fused, sqrt(W) x vote] / sqrt(1 + W)``, a refined text ``[fused, sqrt(W)
            x frozen] / sqrt(1 + W)``, so their cosine is the fusion's plus W times the vote's score, over
            1 + W. The refined dimension doubles (``RecoModel.embedding_dim``). Training never votes.
            0 (the default): no vote, refined embeddings have the backbone's dimension. The demo's
            protocols set it from their validation split (docs/results.md); tune it on held-out data.
        vote_whiten: the vote's whitening ridge (a fraction of the caption covariance's largest eigenvalue;
            0.001 on the demo's validation split, as the evaluation's ``lookup_whiten``).
        vote_temperature: None (the default): the vote averages the neighbours' captions uniformly; T > 0:
            with ``softmax(cosine / T)`` weights, the cosine of the image with each neighbour it was searched
            against (recomputed exactly from the memory, whatever the index). The demo sets 0.003, chosen
            on its validation split (docs/results.md, session 17).
    """

    k: int = 10
    search: Choice = "uni"
    fusion: Choice = "cross"
    fusion_config: FusionConfig = field(default_factory=FusionConfig)
    refine_image: bool = True
    refine_text: bool = True
    mask_retrieved: bool = False
    memory_search_params: dict[str, Any] | None = None
    memory_device: str = "auto"
    known_memory: str | None = None
    novelty_threshold: float = 0.9
    novelty_share_quantile: float | None = 0.95
    novelty_gap: float | None = None
    novelty_whiten: float | None = None
    vote_weight: float = 0.0
    vote_whiten: float = 1e-3
    vote_temperature: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "fusion_config", FusionConfig.coerce(self.fusion_config))
        for name in ("search", "fusion"):
            if getattr(self, name) not in ("uni", "cross"):
                raise ValueError(f"{name} must be 'uni' or 'cross', got {getattr(self, name)!r}")
        if int(self.k) < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if not 0.0 < float(self.novelty_threshold) <= 1.0:
            raise ValueError(
                f"novelty_threshold is a share of the neighbours in (0, 1], got {self.novelty_threshold}"
            )
        if self.known_memory is not None:
            object.__setattr__(self, "known_memory", str(self.known_memory))
        for name in ("novelty_share_quantile", "novelty_gap"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= float(value) < 1.0:
                raise ValueError(f"{name} is a quantile in [0, 1) or None, got {value}")
        if self.novelty_whiten is not None and not float(self.novelty_whiten) > 0.0:
            raise ValueError(f"novelty_whiten is a ridge > 0 or None, got {self.novelty_whiten}")
        if not float(self.vote_weight) >= 0.0:
            raise ValueError(f"vote_weight is a weight >= 0 (0: no vote), got {self.vote_weight}")
        if not float(self.vote_whiten) > 0.0:
            raise ValueError(f"vote_whiten is a ridge > 0, got {self.vote_whiten}")
        if self.vote_temperature is not None and not float(self.vote_temperature) > 0.0:
            raise ValueError(
                f"vote_temperature is a temperature > 0 or None (a plain mean), got {self.vote_temperature}"
            )

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RecoConfig:
        """The settings among ``values`` (checkpoint hparams, config.json); other keys are ignored. A None
        is kept where the setting may be None (``novelty_gap=None`` turns a check off; it must not come
        back as the default) and dropped elsewhere."""
        names = {f.name for f in fields(cls)}
        nullable = {f.name for f in fields(cls) if "None" in str(f.type)}
        return cls(**{k: v for k, v in values.items() if k in names and (v is not None or k in nullable)})

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["fusion_config"] = asdict(self.fusion_config)
        return out


DEFAULT_CONFIG = RecoConfig()


# --- the two operations the trainer and the inference model share ---------------------------------------
def open_retriever(
    backbone: FrozenEncoder,
    memory: MemoryStore | str | os.PathLike,
    config: RecoConfig,
    device: torch.device,
    **retriever_kwargs: Any,
) -> Retriever:
    """A :class:`Retriever` over ``memory`` (opened if a path), refused if it comes from another backbone."""
    if not isinstance(memory, MemoryStore):
        memory = MemoryStore.open(
            memory, expected_fingerprint=backbone.fingerprint, search_params=config.memory_search_params
        )
    elif memory.fingerprint is not None:
        check_fingerprint(memory.fingerprint, backbone.fingerprint, f"memory {memory.path or '(in RAM)'}")
    if memory.dim != backbone.dim:
        raise ValueError(
            f"memory dim {memory.dim} != backbone dim {backbone.dim}: use a memory built with this backbone"
        )
    if config.memory_device == "auto" and device.type == "cuda":
        memory.to_device(device.index or 0)
    novelty = None
    if config.known_memory is not None:
        known, gap, share = known_rows(memory.ids, config.known_memory), None, None
        if config.novelty_share_quantile is not None:
            share = ShareCheck(memory, known, config.novelty_share_quantile, config.k)
        if config.novelty_gap is not None:
            training = MemoryStore.open(
                config.known_memory,
                expected_fingerprint=backbone.fingerprint,
                search_params=config.memory_search_params,
            )
            gap = GapCheck(memory, known, training, config.novelty_gap, config.k)
        whitening = None
        if config.novelty_whiten is not None:
            whitening = MemoryWhitening.of_memory(memory, config.novelty_whiten)
        novelty = NoveltyGate(~known, config.novelty_threshold, gap, share, whitening)
    vote = None
    if config.vote_weight > 0:
        vote = MemoryVote.of_memory(memory, config.vote_weight, config.vote_whiten, config.vote_temperature)
    return Retriever(
        memory,
        k=config.k,
        search=config.search,
        fusion=config.fusion,
        novelty=novelty,
        vote=vote,
        **retriever_kwargs,
    )


class Refined(NamedTuple):
    """Refined embeddings and which of them the novelty gate answered from the memory added after training."""

    embeddings: Tensor  # [B, dim]
    gated: Tensor | None  # [B] bool; None without a gate (``known_memory`` unset) or without retrieval


def refine_embeddings(
    fusion: FusionTransformer,
    retriever: Retriever | None,
    embeddings: Tensor,
    modality: Modality,
    *,
    mask_retrieved: bool = False,
    exclude_ids: Tensor | None = None,
    k: int | None = None,
    rows: Tensor | None = None,
    pair_images: Tensor | None = None,
    vote: bool = False,
) -> Tensor:
    """RECO-refined embeddings of one modality: retrieve, then fuse (:func:`refine_and_gate`'s embeddings).

    ``rows`` [B, k] are neighbour rows found already (a feature cache, or an evaluation sharing one
    search between settings) and replace the search; ``exclude_ids`` / ``pair_images``: training's
    exclusion of a pair's own row and its near-duplicates; ``k`` overrides the trained k. A retriever
    with a novelty gate (``known_memory``) lets queries whose neighbours were mostly added after training
    bypass the fusion (:mod:`reco_lightning.novelty`). ``vote`` (inference): with a retriever that has a
    vote (``vote_weight``), the result carries it as a second block (:mod:`reco_lightning.vote`).
    """
    return refine_and_gate(
        fusion,
        retriever,
        embeddings,
        modality,
        mask_retrieved=mask_retrieved,
        exclude_ids=exclude_ids,
        k=k,
        rows=rows,
        pair_images=pair_images,
        vote=vote,
    ).embeddings


def refine_and_gate(
    fusion: FusionTransformer,
    retriever: Retriever | None,
    embeddings: Tensor,
    modality: Modality,
    *,
    mask_retrieved: bool = False,
    exclude_ids: Tensor | None = None,
    k: int | None = None,
    rows: Tensor | None = None,
    pair_images: Tensor | None = None,
    vote: bool = False,
) -> Refined:
    """:func:`refine_embeddings` (same arguments), with the novelty gate's decision for each query: what a
    report or an export needs to say how often the memory was trusted, without deciding twice."""
    voter = retriever.vote if vote and retriever is not None else None
    if embeddings.shape[0] == 0 or mask_retrieved:
        # mask_retrieved: one masked token stands for the k retrieved ones (the fusion reads nothing).
        # No rows on this rank: still run the fusion once so every parameter joins the backward pass
        # (DDP waits for all of them), and return its 0-row slice.
        count = max(1, embeddings.shape[0])
        query = embeddings if embeddings.shape[0] else embeddings.new_zeros(1, embeddings.shape[1])
        blank = embeddings.new_zeros(count, 1, embeddings.shape[1])
        mask = torch.zeros(count, 1, dtype=torch.bool, device=embeddings.device)
        fused = fusion(query, blank, mask)[: embeddings.shape[0]]
        gated = None
        if not mask_retrieved and retriever is not None and retriever.novelty is not None:
            gated = torch.zeros(0, dtype=torch.bool, device=embeddings.device)
        if voter is None:
            return Refined(fused, gated)
        if embeddings.shape[0] == 0:
            return Refined(voter.lift(fused), gated)
        # the control with a vote: the fusion read nothing, the vote reads the memory
        neighbours = _neighbours(retriever, embeddings, modality, rows, exclude_ids, k, pair_images)
        captions = _captions(retriever, embeddings, modality, neighbours)
        return Refined(_with_vote(voter, retriever, embeddings, modality, fused, captions), gated)
    if retriever is None:
        raise RuntimeError(
            "no memory is attached, so nothing can be retrieved: set model.memory (in a config) to a memory "
            "directory, pass RecoModel.from_pretrained(..., memory=PATH), or call set_memory(PATH); build one "
            "with `reco memory build`"
        )
    neighbours = _neighbours(retriever, embeddings, modality, rows, exclude_ids, k, pair_images)
    fused = fusion(embeddings, neighbours.embeddings, neighbours.mask)
    novel = gated_queries(retriever, embeddings, modality, neighbours)
    answering = novel is not None and bool(novel.any())
    if not answering and voter is None:
        return Refined(fused, novel)
    captions = _captions(retriever, embeddings, modality, neighbours)  # once, for the answer and the vote
    if answering:
        whitening = None if retriever.novelty is None else retriever.novelty.whitening
        fused = novel_answer(
            fused,
            embeddings,
            modality,
            neighbours.added,
            neighbours.mask,
            captions.embeddings,
            novel,
            whitening,
        )
    if voter is not None:
        fused = _with_vote(voter, retriever, embeddings, modality, fused, captions)
    return Refined(fused, novel)


def _neighbours(
    retriever: Retriever,
    embeddings: Tensor,
    modality: Modality,
    rows: Tensor | None,
    exclude_ids: Tensor | None,
    k: int | None,
    pair_images: Tensor | None,
) -> Neighbours:
    """The neighbours of ``embeddings``: gathered from ``rows`` found already, else searched."""
    if rows is not None:
        return retriever.gather(rows, modality, embeddings.device)
    return retriever(embeddings, modality, exclude_ids=exclude_ids, k=k, pair_images=pair_images)


def _captions(
    retriever: Retriever, embeddings: Tensor, modality: Modality, neighbours: Neighbours
) -> Neighbours:
    """The neighbours as what they carry, captions for image queries (an image's lookup reads them)."""
    if modality == "image" and retriever.fusion == "uni":  # neighbours are images: the lookup needs captions
        return retriever.gather(neighbours.rows, "text", embeddings.device)  # uni fusion: a text's own
    return neighbours


def _with_vote(
    voter: MemoryVote,
    retriever: Retriever,
    embeddings: Tensor,
    modality: Modality,
    refined: Tensor,
    captions: Neighbours,
) -> Tensor:
    """[B, 2D]: ``refined`` joined by the vote block (an image's whitened lookup of its neighbours'
    ``captions``, weighted by their exact search scores under a vote temperature; a text's frozen self)."""
    if modality == "text":
        return voter.join(refined, embeddings)
    scores = None
    if voter.temperature is not None:  # rows may come from a cache or a shared search: scores recomputed
        scores = retriever.scores_of(embeddings, modality, captions.rows)
    return voter.join(refined, voter.image_block(captions.embeddings, captions.mask, scores))


def gated_queries(
    retriever: Retriever, embeddings: Tensor, modality: Modality, neighbours: Neighbours
) -> Tensor | None:
    """[B] bool: the queries the retriever's novelty gate answers from the rows added after training
    (:mod:`reco_lightning.novelty`), given their ``neighbours``; None without a gate (``known_memory``
    unset). What :func:`refine_and_gate` decides."""
    gate = retriever.novelty
    if gate is None or neighbours.added is None:
        return None
    if not bool(neighbours.added.any()):
        return torch.zeros(len(embeddings), dtype=torch.bool, device=embeddings.device)
    searched, added, mask = retriever.searched_modality(modality), neighbours.added, neighbours.mask

    def check(candidates: Tensor) -> Tensor:
        """The gate's further conditions for the queries whose share passed (each given must hold)."""
        holds = torch.ones(len(candidates), dtype=torch.bool, device=embeddings.device)
        if gate.share is not None:
            holds &= gate.share(modality, searched, added[candidates], mask[candidates]).to(holds.device)
        if gate.gap is not None and bool(holds.any()):
            holds &= gate.gap(
                embeddings[candidates], modality, searched, neighbours.rows[candidates], added[candidates]
            ).to(holds.device)
        return holds

    return novel_queries(added, mask, gate.threshold, check)


# --- the inference model ---------------------------------------------------------------------------------
ImageInput = str | os.PathLike | Any  # a path, a PIL image or an array the backbone's processor takes
OnError = Literal["raise", "skip"]


class RecoModel(nn.Module):
    """A frozen backbone, the two trained fusions and (once attached) a memory: RECO at inference.

    Build it with :meth:`from_pretrained` (an export directory or hub repo) or
    :meth:`RecoModule.to_pretrained` (a module in hand); save it with :meth:`save_pretrained`.

    Args:
        backbone: a loaded :class:`FrozenEncoder`, or its hub name / directory.
        config: the settings (:class:`RecoConfig`).
        logit_scale: the trained temperature's inverse (scales cosine similarities into logits).
        info: what the export records beside the settings (memory trained with, calibration, provenance).
    """

    def __init__(
        self,
        backbone: FrozenEncoder | str | os.PathLike,
        config: RecoConfig = DEFAULT_CONFIG,
        logit_scale: float = 1.0 / 0.07,
        info: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone if isinstance(backbone, FrozenEncoder) else FrozenEncoder(backbone)
        self.config = config
        self.image_fusion = FusionTransformer(self.backbone.dim, config.fusion_config)
        self.text_fusion = FusionTransformer(self.backbone.dim, config.fusion_config)
        self.register_buffer(LOGIT_SCALE, torch.tensor(float(logit_scale)))
        self.info: dict[str, Any] = dict(info or {})
        self.retriever: Retriever | None = None
        self.eval()

    # --- memory ---------------------------------------------------------------------------------------
    def set_memory(self, memory: MemoryStore | str | os.PathLike | None) -> RecoModel:
        """Attach (or swap, or with None detach) the memory; it must come from this model's backbone."""
        self.retriever = (
            None if memory is None else open_retriever(self.backbone, memory, self.config, self.device)
        )
        return self

    @property
    def memory(self) -> MemoryStore | None:
        return None if self.retriever is None else self.retriever.memory

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    @property
    def dim(self) -> int:
        """The backbone's dimension: frozen embeddings' (refined ones: :attr:`embedding_dim`)."""
        return self.backbone.dim

    @property
    def embedding_dim(self) -> int:
        """The refined embeddings' dimension: twice the backbone's when the attached memory votes
        (``vote_weight`` > 0: :mod:`reco_lightning.vote`), else the backbone's."""
        return self.dim * (2 if self.vote is not None else 1)

    @property
    def vote(self) -> MemoryVote | None:
        """The attached memory's vote (``vote_weight`` > 0 and a memory attached), else None."""
        return None if self.retriever is None else self.retriever.vote

    def train(self, mode: bool = True) -> RecoModel:
        """Inference only: the model stays in eval mode (train the fusions with RecoModule)."""
        return super().train(False)

    # --- refinement of embeddings in hand -------------------------------------------------------------
    @overload
    def refine(
        self,
        embeddings: Tensor,
        modality: Modality,
        k: int | None = None,
        return_gated: Literal[False] = False,
    ) -> Tensor: ...
    @overload
    def refine(
        self, embeddings: Tensor, modality: Modality, k: int | None = None, *, return_gated: Literal[True]
    ) -> Refined: ...
    @torch.inference_mode()
    def refine(
        self, embeddings: Tensor, modality: Modality, k: int | None = None, return_gated: bool = False
    ) -> Tensor | Refined:
        """Refine frozen, unit-norm embeddings [B, dim] of ``modality`` with the attached memory; [B,
        2 dim] with a vote (:attr:`embedding_dim`).

        ``return_gated``: a :class:`Refined` (embeddings, gated), ``gated`` [B] bool marking the queries the
        novelty gate answered from the memory rows added after training (all False without a gate)."""
        fusion = self.image_fusion if modality == "image" else self.text_fusion
        embeddings = embeddings.to(self.device, torch.float32)
        refined = refine_and_gate(
            fusion,
            self.retriever,
            embeddings,
            modality,
            mask_retrieved=self.config.mask_retrieved,
            k=k,
            vote=True,
        )
        if not return_gated:
            return refined.embeddings
        gated = refined.gated
        if gated is None:
            gated = torch.zeros(len(embeddings), dtype=torch.bool, device=embeddings.device)
        return Refined(refined.embeddings, gated)

    # --- encoding raw inputs --------------------------------------------------------------------------
    @overload
    def encode_image(
        self,
        images: Sequence[ImageInput] | Tensor,
        refine: bool | None = None,
        batch_size: int = 64,
        progress: bool | None = None,
        on_error: OnError = "raise",
        return_gated: Literal[False] = False,
    ) -> Tensor: ...
    @overload
    def encode_image(
        self,
        images: Sequence[ImageInput] | Tensor,
        refine: bool | None = None,
        batch_size: int = 64,
        progress: bool | None = None,
        on_error: OnError = "raise",
        *,
        return_gated: Literal[True],
    ) -> Refined: ...
    def encode_image(
        self,
        images: Sequence[ImageInput] | Tensor,
        refine: bool | None = None,
        batch_size: int = 64,
        progress: bool | None = None,
        on_error: OnError = "raise",
        return_gated: bool = False,
    ) -> Tensor | Refined:
        """Unit-norm image embeddings [N, dim] (float32, on the CPU) of paths, PIL images or pixel tensors
        ([N, 2 dim] refined with a vote: :attr:`embedding_dim`).

        ``refine``: refine with the memory (default: the side's trained setting, ``config.refine_image``);
        False gives the frozen backbone's embeddings. ``on_error="skip"``: an unreadable image gets a row
        of NaN (rows stay aligned with the inputs) and one warning names every such file; "raise": the
        first one is an :class:`ImageLoadError` naming it. ``return_gated``: a :class:`Refined`
        (embeddings, gated), ``gated`` [N] bool: the images answered from the memory rows added after
        training (``known_memory``) instead of by the fusion; False where not refined or not read.
        """
        refine = self.config.refine_image if refine is None else bool(refine)
        count = int(images.shape[0]) if isinstance(images, Tensor) else len(images)
        out = torch.full((count, self.embedding_dim if refine else self.dim), float("nan"))
        gated = torch.zeros(count, dtype=torch.bool)
        failed: list[str] = []
        for start in self._batches(count, batch_size, progress, "encoding images"):
            chunk = images[start : start + batch_size]
            if isinstance(chunk, Tensor):
                inputs, good = {"pixel_values": chunk}, list(range(chunk.shape[0]))
            else:
                loaded, good = [], []
                for i, item in enumerate(chunk):
                    try:
                        loaded.append(_load_image(item))
                        good.append(i)
                    except ImageLoadError as err:
                        if on_error == "raise":
                            raise
                        failed.append(err.path)
                if not loaded:
                    continue
                inputs = self.backbone.preprocess_images(loaded)
            with self._autocast():
                frozen = self.backbone.encode_images(inputs)
            rows = [start + i for i in good]
            if refine:
                refined = self.refine(frozen, "image", return_gated=True)
                out[rows], gated[rows] = refined.embeddings.float().cpu(), refined.gated.cpu()
            else:
                out[rows] = frozen.float().cpu()
        if failed:
            warnings.warn(
                f"{len(failed)} image(s) could not be read; their rows are NaN: {', '.join(failed)}",
                stacklevel=2,
            )
        return Refined(out, gated) if return_gated else out

    @overload
    def encode_text(
        self,
        captions: Sequence[str],
        refine: bool | None = None,
        batch_size: int = 256,
        progress: bool | None = None,
        return_gated: Literal[False] = False,
    ) -> Tensor: ...
    @overload
    def encode_text(
        self,
        captions: Sequence[str],
        refine: bool | None = None,
        batch_size: int = 256,
        progress: bool | None = None,
        *,
        return_gated: Literal[True],
    ) -> Refined: ...
    def encode_text(
        self,
        captions: Sequence[str],
        refine: bool | None = None,
        batch_size: int = 256,
        progress: bool | None = None,
        return_gated: bool = False,
    ) -> Tensor | Refined:
        """Unit-norm text embeddings [N, dim] (float32, on the CPU) of ``captions`` ([N, 2 dim] refined with
        a vote: :attr:`embedding_dim`).

        ``refine``: refine with the memory (default: ``config.refine_text``); False: the frozen backbone's.
        ``return_gated``: a :class:`Refined` (embeddings, gated), ``gated`` [N] bool: the captions the novelty
        gate kept frozen because their neighbours were mostly added after training (a concept the fusion
        never saw); False where not refined.
        """
        if isinstance(captions, str):
            raise TypeError("encode_text takes a list of captions; wrap a single one in a list")
        refine = self.config.refine_text if refine is None else bool(refine)
        out = torch.empty(len(captions), self.embedding_dim if refine else self.dim)
        gated = torch.zeros(len(captions), dtype=torch.bool)
        for start in self._batches(len(captions), batch_size, progress, "encoding captions"):
            with self._autocast():
                frozen = self.backbone.encode_captions(list(captions[start : start + batch_size]))
            rows = slice(start, start + len(frozen))
            if refine:
                refined = self.refine(frozen, "text", return_gated=True)
                out[rows], gated[rows] = refined.embeddings.float().cpu(), refined.gated.cpu()
            else:
                out[rows] = frozen.float().cpu()
        return Refined(out, gated) if return_gated else out

    def classifier(
        self,
        classnames: Sequence[str],
        templates: str | os.PathLike | Sequence[str] = "clip_generic",
        refine: bool | None = None,
        batch_size: int = 256,
    ) -> ZeroShotClassifier:
        """A zero-shot classifier over ``classnames``: each class is the mean of its prompts' embeddings
        (``templates``: a shipped template set's name, a file, or a list of strings with ``{c}`` where the class name goes), refined as
        ``refine`` says (default: ``config.refine_text``), as the package's evaluation builds it (with a
        vote, each block averaged on its own)."""
        from reco_lightning.data.zeroshot import load_templates
        from reco_lightning.metrics import build_class_embeddings

        if isinstance(templates, str | os.PathLike):
            templates = load_templates(templates)
        refine = self.config.refine_text if refine is None else bool(refine)
        weights = build_class_embeddings(
            list(classnames),
            list(templates),
            lambda prompts: self.encode_text(prompts, refine=refine, batch_size=batch_size, progress=False),
            batch_size,
            blocks=2 if refine and self.vote is not None else 1,
        )
        return ZeroShotClassifier(self, list(classnames), weights)

    def _batches(self, count: int, batch_size: int, progress: bool | None, desc: str) -> Any:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        starts = range(0, count, batch_size)
        show = len(starts) > 1 if progress is None else progress
        if not show:
            return starts
        from tqdm.auto import tqdm

        return tqdm(starts, desc=desc, unit="batch")

    def _autocast(self) -> Any:
        """bf16 (else fp16) autocast of the backbone on a GPU; nothing on the CPU (embeddings are float32)."""
        import contextlib

        if self.device.type != "cuda":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)

    # --- export ---------------------------------------------------------------------------------------
    def trained_state(self) -> dict[str, Tensor]:
        """What an export stores: the fusions and the temperature (never the frozen backbone)."""
        state = {f"image_fusion.{k}": v for k, v in self.image_fusion.state_dict().items()}
        state.update({f"text_fusion.{k}": v for k, v in self.text_fusion.state_dict().items()})
        state[LOGIT_SCALE] = self.logit_scale
        return {key: value.detach().to("cpu").contiguous() for key, value in state.items()}

    def export_config(self) -> dict[str, Any]:
        """config.json: the format, backbone, settings and what else the export records."""
        return {
            "format": FORMAT,
            "backbone": dict(self.backbone.fingerprint),
            **self.config.to_json(),
            "logit_scale": float(self.logit_scale),
            **{key: value for key, value in self.info.items() if key not in ("format", "backbone")},
        }

    def save_pretrained(self, directory: str | os.PathLike, report: Mapping[str, Any] | None = None) -> Path:
        """Write ``model.safetensors``, ``config.json`` and a ``README.md`` model card into ``directory``,
        atomically (a reader sees the old export or the new one, never a mix). ``report``: a
        ``zeroshot_report.json`` whose table the card shows."""
        from safetensors.torch import save_file

        from reco_lightning.model_card import model_card

        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
        try:
            config = self.export_config()
            config["exported"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
            save_file(self.trained_state(), str(tmp / WEIGHTS_NAME), metadata={"format": FORMAT})
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            (tmp / CARD_NAME).write_text(model_card(config, report))
            replace_directory(tmp, directory)
        finally:
            if tmp.exists():
                import shutil

                shutil.rmtree(tmp)
        return directory

    def push_to_hub(self, repo_id: str, private: bool | None = None, token: str | None = None) -> str:
        """Upload an export to the Hugging Face Hub (``huggingface_hub`` login needed; not tested here)."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id=repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_pretrained(Path(tmp) / "export")
            return str(api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model"))

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        memory: MemoryStore | str | os.PathLike | None = None,
        backbone: FrozenEncoder | str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        **overrides: Any,
    ) -> RecoModel:
        """Load an export directory (or a hub repo holding one), reading only safetensors and JSON.

        ``memory``: the memory to retrieve from (any built with the same backbone; None: attach one later
        with :meth:`set_memory`). ``backbone``: where the backbone is now, if not where the export says;
        its fingerprint must match the recorded one. ``overrides``: settings to change (``k``,
        ``memory_search_params``, ``refine_image``, ...).
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = _export_directory(path)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for needed in (config_path, weights_path):
            if not needed.is_file():
                raise ExportError(
                    f"{directory} has no {needed.name}: give a directory written by save_pretrained or "
                    "`reco export`"
                )
        try:
            recorded = json.loads(config_path.read_text())
        except json.JSONDecodeError as err:
            raise ExportError(f"{config_path} is not valid JSON ({err}): re-export the model") from err
        if recorded.get("format") != FORMAT:
            raise ExportError(
                f"{config_path} has format {recorded.get('format')!r}, not {FORMAT!r}: it was not written by "
                "reco-lightning's save_pretrained / `reco export` (or by another version)"
            )
        unknown = set(overrides) - {f.name for f in fields(RecoConfig)}
        if unknown:
            raise TypeError(f"unknown RecoModel setting(s) {sorted(unknown)}: use fields of RecoConfig")
        config = replace(RecoConfig.from_mapping(recorded), **overrides)
        fingerprint = recorded["backbone"]
        try:
            encoder = (
                backbone
                if isinstance(backbone, FrozenEncoder)
                else FrozenEncoder(backbone or fingerprint["name_or_path"])
            )
        except MissingInputError as err:
            if backbone is not None:
                raise
            raise ExportError(
                f"{directory}'s backbone {fingerprint['name_or_path']!r} (where it was at export) does not "
                "exist here: pass from_pretrained(..., backbone=PATH) where that backbone is now"
            ) from err
        if encoder.fingerprint["id"] != fingerprint.get("id"):
            raise BackboneMismatchError(
                f"{directory} was trained on backbone {fingerprint.get('name_or_path')!r} (id "
                f"{fingerprint.get('id')}, dim {fingerprint.get('dim')}) but {encoder.name_or_path!r} is another "
                f"(id {encoder.fingerprint['id']}, dim {encoder.dim}): pass backbone= the one it was trained on"
            )
        info = {key: value for key, value in recorded.items() if key not in RecoConfig.__dataclass_fields__}
        model = cls(encoder, config, logit_scale=float(recorded.get("logit_scale", 1.0 / 0.07)), info=info)
        try:
            state = load_file(str(weights_path))
        except (SafetensorError, OSError) as err:
            raise ExportError(
                f"{weights_path} is not a readable safetensors file ({err}): re-export"
            ) from err
        missing = set(model.trained_state()) - set(state)
        extra = set(state) - set(model.trained_state())
        if missing or extra:
            raise ExportError(
                f"{weights_path} does not match its config.json (missing {sorted(missing)[:3]}, unexpected "
                f"{sorted(extra)[:3]}): re-export the model"
            )
        model.load_state_dict(state, strict=False)  # the keys were checked: only the backbone is left out
        if device is not None:
            model.to(device)
        if memory is not None:
            model.set_memory(memory)
        return model

    def extra_repr(self) -> str:
        memory = self.memory
        where = "none" if memory is None else f"{memory.path or '(in RAM)'} ({len(memory)} pairs)"
        return (
            f"backbone={self.backbone.name_or_path!r} ({self.backbone.fingerprint.get('family')}), k={self.config.k}, "
            f"search={self.config.search}, fusion={self.config.fusion}, memory={where}"
        )


class ZeroShotClassifier:
    """Class embeddings [C, dim] of a :class:`RecoModel`, and the images-to-classes step that uses them."""

    def __init__(self, model: RecoModel, classnames: list[str], weights: Tensor) -> None:
        self.model, self.classnames, self.weights = model, classnames, weights.float().cpu()

    def logits(
        self, images: Sequence[ImageInput] | Tensor, refine: bool | None = None, **kwargs: Any
    ) -> Tensor:
        """Scaled cosine similarities [N, C] of images (or image embeddings [N, dim]) to the classes; with
        a vote, a frozen side (images or classes) meets a refined one lifted into the vote's space."""
        embeddings, weights = self._embeddings(images, refine, **kwargs), self.weights
        vote = self.model.vote
        if vote is not None and embeddings.shape[1] != weights.shape[1]:
            if embeddings.shape[1] == self.model.dim:
                embeddings = vote.lift(embeddings)
            else:
                weights = vote.lift(weights)
        return float(self.model.logit_scale) * embeddings @ weights.t()

    def predict(
        self, images: Sequence[ImageInput] | Tensor, refine: bool | None = None, **kwargs: Any
    ) -> list[str]:
        """The best class name of each image (or image embedding)."""
        return [self.classnames[i] for i in self.logits(images, refine, **kwargs).argmax(dim=1).tolist()]

    def _embeddings(
        self, images: Sequence[ImageInput] | Tensor, refine: bool | None, **kwargs: Any
    ) -> Tensor:
        if isinstance(images, Tensor) and images.ndim == 2 and images.shape[1] in self._widths():
            return images.float().cpu()  # embeddings already
        return self.model.encode_image(images, refine=refine, **kwargs)

    def _widths(self) -> tuple[int, ...]:
        """The embedding widths this classifier takes: the backbone's, and the vote's two blocks."""
        return (self.model.dim, self.model.embedding_dim)


def _load_image(item: ImageInput) -> Any:
    """A PIL RGB image from a path (or an image object as it is), as the training stream decodes them."""
    if not isinstance(item, str | os.PathLike):
        return item
    from reco_lightning.data.stream import load_rgb

    try:
        return load_rgb(os.fspath(item))
    except Exception as err:  # PIL raises many types for one unreadable file
        raise ImageLoadError(
            f"cannot read image {os.fspath(item)!r}: {err} (give an existing image file, or on_error='skip')",
            os.fspath(item),
        ) from err


def _export_directory(path: str | os.PathLike) -> Path:
    """A local export directory, or the snapshot of a hub repo (a ``name`` or ``org/name`` that is not a
    local path) downloaded through huggingface_hub."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    text = os.fspath(path)
    if local.is_file():
        raise ExportError(
            f"{text!r} is a file, not an export directory: for a checkpoint of `reco fit`, write its export "
            f"first (reco export --ckpt_path {text} --out DIR) and load DIR"
        )
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or local.suffix:
        raise ExportError(
            f"export directory {text!r} does not exist: give a directory written by `reco export`"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=text, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, CARD_NAME]))
    except Exception as err:  # offline, unknown repo, no access
        raise ExportError(
            f"{text!r} is not a local directory and could not be fetched from the hub ({type(err).__name__}): "
            "give an export directory"
        ) from err
