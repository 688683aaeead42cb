"""RecoModule: a frozen dual encoder + two fusion transformers + the RECO loss, as a LightningModule.

Only the fusion modules and the temperature train. Checkpoints therefore hold those weights plus the
backbone's fingerprint, never the frozen backbone's weights: a checkpoint is a few MB whatever the
backbone, and loading it beside a different backbone fails loudly instead of producing silently wrong
embeddings. What a user keeps afterwards is :meth:`RecoModule.to_pretrained`'s
:class:`~reco_lightning.pretrained.RecoModel` (``reco export`` writes it): refinement and memory attachment
are that module's functions, so training, ``reco predict`` and the inference model compute alike.
"""

from __future__ import annotations

from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from reco_lightning.data.hooks import DataEpochHooks
from reco_lightning.encoders import FrozenEncoder
from reco_lightning.fusion import FusionConfig, FusionTransformer
from reco_lightning.losses import LossConfig, RecoContrastiveLoss
from reco_lightning.memory.store import MemoryStore
from reco_lightning.optim import warmup_cosine
from reco_lightning.pretrained import (
    DEFAULT_CONFIG,
    BackboneMismatchError,
    RecoConfig,
    RecoModel,
    Refined,
    open_retriever,
    refine_and_gate,
)
from reco_lightning.retrieval import Choice, NearDuplicateOf, Neighbours, Retriever
from reco_lightning.types import Modality

__all__ = ["BackboneMismatchError", "RecoModule"]

BACKBONE_PREFIX = "backbone."
DEFAULT_LOSS = LossConfig()  # frozen: safe as a shared default
D = DEFAULT_CONFIG  # the inference settings' defaults are RecoConfig's (defined once)


class RecoModule(pl.LightningModule):
    """Retrieval-enhanced CLIP.

    Args:
        backbone: hub name or local directory of a transformers dual encoder (CLIP, SigLIP, SigLIP 2), frozen.
        memory: directory of a memory built with this backbone (`reco memory build`); swap it freely
            after training. ``None`` means it is attached in code with :meth:`set_memory`.
        memory_search_params, memory_device, k, search, fusion, fusion_config, refine_image, refine_text,
            mask_retrieved, known_memory, novelty_threshold, novelty_share_quantile, novelty_gap,
            novelty_whiten, vote_weight, vote_whiten, vote_temperature: the inference settings, documented once in
            :class:`~reco_lightning.pretrained.RecoConfig` (their defaults are its).
        near_duplicate_threshold: training excludes memory items at least this similar to the pair.
        near_duplicate_of: "image" (compare candidates' images with the pair's image, for both sides) or
            "query" (compare with the query in its own modality); see Retriever.
        exclusion_margin: extra candidates searched during training so k survive exclusion.
        loss_config: the contrastive loss (options: LossConfig in losses.py).
        lr / weight_decay / warmup_steps / min_lr_ratio / betas: AdamW with linear warmup then cosine decay
            to ``min_lr_ratio * lr`` over the run's total steps.

    ``mask_retrieved`` is the paper's "training without retrieval" control: every retrieved token is
    masked, in training and at inference, so the same fusion and recipe learn from the pairs alone. A
    gain of RECO counts only where it beats this control.
    """

    def __init__(
        self,
        backbone: str,
        memory: str | None = None,
        memory_search_params: dict[str, Any] | None = D.memory_search_params,
        memory_device: str = D.memory_device,
        k: int = D.k,
        search: Choice = D.search,
        fusion: Choice = D.fusion,
        near_duplicate_threshold: float = 0.95,
        near_duplicate_of: NearDuplicateOf = "image",
        exclusion_margin: int = 16,
        fusion_config: FusionConfig = D.fusion_config,
        loss_config: LossConfig = DEFAULT_LOSS,
        lr: float = 1e-4,
        weight_decay: float = 0.05,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.98),
        refine_image: bool = D.refine_image,
        refine_text: bool = D.refine_text,
        mask_retrieved: bool = D.mask_retrieved,
        known_memory: str | None = D.known_memory,
        novelty_threshold: float = D.novelty_threshold,
        novelty_share_quantile: float | None = D.novelty_share_quantile,
        novelty_gap: float | None = D.novelty_gap,
        novelty_whiten: float | None = D.novelty_whiten,
        vote_weight: float = D.vote_weight,
        vote_whiten: float = D.vote_whiten,
        vote_temperature: float | None = D.vote_temperature,
    ) -> None:
        super().__init__()
        fusion_config, loss_config = FusionConfig.coerce(fusion_config), LossConfig.coerce(loss_config)
        self.save_hyperparameters()
        # plain dicts in hparams: hparams.yaml stays readable and checkpoints load without our classes
        self.hparams["fusion_config"], self.hparams["loss_config"] = (
            asdict(fusion_config),
            asdict(loss_config),
        )
        self.backbone = FrozenEncoder(backbone)
        self.image_fusion = FusionTransformer(self.backbone.dim, fusion_config)
        self.text_fusion = FusionTransformer(self.backbone.dim, fusion_config)
        self.criterion = RecoContrastiveLoss(loss_config)
        self.retriever: Retriever | None = None

    # --- memory ---------------------------------------------------------------------------------------
    def set_memory(self, memory: MemoryStore | str | Path) -> None:
        """Attach (or swap) the memory; it must come from this module's backbone."""
        hp = self.hparams
        # Lightning calls setup() before it moves the module to the rank's device: place the memory by
        # where the trainer will run, not by where the module is now
        device = self._trainer.strategy.root_device if self._trainer is not None else self.device
        self.retriever = open_retriever(
            self.backbone,
            memory,
            self.inference_config(),
            device,
            near_duplicate_threshold=hp.near_duplicate_threshold,
            near_duplicate_of=hp.get("near_duplicate_of", "image"),
            exclusion_margin=hp.exclusion_margin,
        )

    def inference_config(self) -> RecoConfig:
        """The settings this module refines with, as the inference model holds them."""
        return RecoConfig.from_mapping(self.hparams)

    def to_pretrained(self, info: dict[str, Any] | None = None) -> RecoModel:
        """The trained RECO as a plain :class:`RecoModel` (what ``reco export`` saves): it shares this
        module's backbone, copies the fusions and the temperature, and keeps the attached memory."""
        model = RecoModel(
            self.backbone,
            self.inference_config(),
            logit_scale=float(self.criterion.logit_scale.detach()),
            info=info,
        )
        model.image_fusion.load_state_dict(self.image_fusion.state_dict())
        model.text_fusion.load_state_dict(self.text_fusion.state_dict())
        model.to(self.device)
        model.retriever = self.retriever
        return model

    def setup(self, stage: str) -> None:
        if self.retriever is None and self.hparams.memory:
            self.set_memory(self.hparams.memory)
        datamodule = getattr(self._trainer, "datamodule", None)
        if hasattr(datamodule, "expect"):  # tell the data what to check against us (it never reads the model)
            memory = self.retriever.memory if self.retriever is not None else None
            datamodule.expect(
                self.cache_requirements() if memory is not None else None,
                memory_id_scheme=memory.manifest.get("id_scheme") if memory is not None else None,
                memory=str(memory.path or "(in RAM)") if memory is not None else None,
            )

    def cache_requirements(self) -> dict[str, Any]:
        """The model's side of a feature cache's requirements, as plain values (see
        ``data.features.feature_requirements``): a cache built with other values is stale for this model."""
        retriever = self.require_retriever()
        hp = self.hparams
        indexes = getattr(retriever.memory, "indexes", None) or {}
        # the search settings the memory's indexes actually run with (overrides applied), per modality; a
        # memory opened without indexes: what the model asks for is all there is
        search = {name: index.spec() for name, index in sorted(indexes.items())} or {
            "memory_search_params": dict(hp.get("memory_search_params") or {})
        }
        return {
            "backbone": self.backbone.fingerprint["id"],
            "memory": retriever.memory.identity,
            "memory_search": search,
            "k": int(hp.k),
            "search": hp.search,
            "near_duplicate_threshold": float(hp.near_duplicate_threshold),
            "near_duplicate_of": retriever.near_duplicate_of,
            "exclusion_margin": int(hp.exclusion_margin),
        }

    def require_retriever(self) -> Retriever:
        """The memory's retriever, or a one-line error saying how to attach a memory."""
        if self.retriever is None:
            raise RuntimeError(
                "RecoModule has no memory: set model.memory to a memory directory (build one with "
                "`reco memory build`) or call set_memory()"
            )
        return self.retriever

    # --- forward --------------------------------------------------------------------------------------
    def embed(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Frozen (v, t) for a batch: precomputed features when the batch carries them, else CLIP forward."""
        if "image_emb" in batch:
            return batch["image_emb"].float(), batch["text_emb"].float()
        return self.backbone.encode_batch(batch)

    def refine(
        self,
        embeddings: Tensor,
        modality: Modality,
        exclude_ids: Tensor | None = None,
        k: int | None = None,
        rows: Tensor | None = None,
        pair_images: Tensor | None = None,
    ) -> Tensor:
        """RECO-refined embeddings of one modality (retrieve, then fuse).

        ``k`` overrides the trained k; ``rows`` [B, k] are neighbour rows found already (a feature
        cache, or an evaluation sharing one search between settings), which replace the search (exclusion
        was applied when they were found); ``pair_images``: the
        frozen images of text queries' pairs, for near-duplicate exclusion in training.
        """
        return self.refine_and_gate(embeddings, modality, exclude_ids, k, rows, pair_images).embeddings

    def refine_and_gate(
        self,
        embeddings: Tensor,
        modality: Modality,
        exclude_ids: Tensor | None = None,
        k: int | None = None,
        rows: Tensor | None = None,
        pair_images: Tensor | None = None,
        vote: bool = False,
    ) -> Refined:
        """:meth:`refine` with the novelty gate's decision per query (``gated`` None without a gate): the
        queries answered from the memory rows added after training (``known_memory``). ``vote``
        (inference, never training): carry the memory's vote as a second block (``vote_weight`` > 0)."""
        fusion = self.image_fusion if modality == "image" else self.text_fusion
        return refine_and_gate(
            fusion,
            self.retriever,
            embeddings,
            modality,
            mask_retrieved=self.hparams.get("mask_retrieved", False),
            exclude_ids=exclude_ids,
            k=k,
            rows=rows,
            pair_images=pair_images,
            vote=vote,
        )

    def neighbours(
        self,
        embeddings: Tensor,
        modality: Modality,
        exclude_ids: Tensor | None = None,
        k: int | None = None,
        pair_images: Tensor | None = None,
        leak_threshold: float | None = None,
        leak_images: Tensor | None = None,
    ) -> Neighbours:
        """The retrieved items the fusion reads (also what the training-free baselines vote with);
        ``leak_threshold`` / ``leak_images``: the evaluation leakage guard (see Retriever)."""
        return self.require_retriever()(
            embeddings,
            modality,
            exclude_ids=exclude_ids,
            k=k,
            pair_images=pair_images,
            leak_threshold=leak_threshold,
            leak_images=leak_images,
        )

    def forward(self, batch: dict[str, Tensor], exclude_self: bool = False) -> dict[str, Tensor]:
        """Frozen and refined embeddings of a batch of pairs (raw inputs or feature-cache rows)."""
        v, t = self.embed(batch)
        ids = batch.get("id") if exclude_self else None
        return {
            "v": v,
            "t": t,
            "v_bar": self.refine(v, "image", ids, rows=batch.get("image_neighbours")),
            "t_bar": self.refine(t, "text", ids, rows=batch.get("text_neighbours"), pair_images=v),
        }

    # --- steps ----------------------------------------------------------------------------------------
    def _shared_step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        out = self(batch, exclude_self=True)
        losses = self.criterion(out["v"], out["t"], out["v_bar"], out["t_bar"])
        batch_size = out["v"].shape[0]
        on_step = stage == "train"
        for name, value in losses.items():
            self.log(
                f"{stage}/{name}",
                value,
                batch_size=batch_size,
                on_step=on_step,
                on_epoch=not on_step,
                prog_bar=name == "loss",
                sync_dist=True,  # each rank holds its share of the global loss; the mean over ranks is it
            )
        if stage == "train":
            self.log("train/temperature", 1.0 / self.criterion.logit_scale, batch_size=batch_size)
        return losses["loss"]

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train")

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.criterion.clamp_()  # after the optimiser step: the cap must not zero the temperature's gradient

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "test")

    def configure_callbacks(self) -> list[pl.Callback]:
        return [DataEpochHooks()]

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Embeddings for downstream use: frozen and, per refine_image/refine_text, refined (with a vote,
        ``vote_weight`` > 0: two blocks, twice the backbone's dimension); with a novelty gate,
        ``image_gated`` / ``text_gated`` [B] bool mark the rows answered from the memory added after
        training."""
        v, t = self.embed(batch)
        out = {"image_emb": v, "text_emb": t}
        for side, frozen, on in (
            ("image", v, self.hparams.refine_image),
            ("text", t, self.hparams.refine_text),
        ):
            if on:
                refined = self.refine_and_gate(frozen, side, vote=True)
                out[f"{side}_emb_refined"] = refined.embeddings
                if refined.gated is not None:
                    out[f"{side}_gated"] = refined.gated
        if "id" in batch:
            out["id"] = batch["id"]
        return out

    # --- optimisation ---------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            # norms, biases, type embeddings and the temperature are not weight-decayed (CLIP recipe)
            (no_decay if param.ndim < 2 or "type_embedding" in name else decay).append(param)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr,
            betas=tuple(hp.betas),
        )
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1
        warmup = min(hp.warmup_steps, max(0, total - 1))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            partial(warmup_cosine, warmup_steps=warmup, total_steps=total, min_ratio=hp.min_lr_ratio),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- checkpoints: trainable state + backbone identity, never the frozen weights -------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(BACKBONE_PREFIX)]:
            del state[key]
        checkpoint["reco_backbone"] = dict(self.backbone.fingerprint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        found = checkpoint.get("reco_backbone")
        expected = self.backbone.fingerprint
        if found is None:
            raise BackboneMismatchError(
                "checkpoint records no backbone fingerprint: it was not written by RecoModule"
            )
        if found.get("id") != expected["id"]:
            raise BackboneMismatchError(
                f"checkpoint was trained on backbone {found.get('name_or_path')!r} (id {found.get('id')}, dim "
                f"{found.get('dim')}) but this model loads {expected['name_or_path']!r} (id {expected['id']}, dim "
                f"{expected['dim']}): set model.backbone to the checkpoint's backbone"
            )
        state = checkpoint["state_dict"]
        for key, value in self.backbone.state_dict(prefix=BACKBONE_PREFIX).items():
            state.setdefault(key, value)
