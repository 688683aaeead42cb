import dataclasses
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from reco_lightning.data.datamodule import ImageTextDataModule
from reco_lightning.errors import RecoMemoryError
from reco_lightning.fusion import FusionConfig
from reco_lightning.losses import LossConfig
from reco_lightning.memory import MemoryStore
from reco_lightning.model import BackboneMismatchError, RecoModule


def make(tiny_dir, **kwargs) -> RecoModule:
    defaults = {
        "backbone": str(tiny_dir / "clip"),
        "memory": str(tiny_dir / "memory"),
        "k": 4,
        "fusion_config": {"num_heads": 4},
    }
    return RecoModule(**{**defaults, **kwargs})


def datamodule(tiny_dir, batch_size=32):
    return ImageTextDataModule(
        str(tiny_dir / "clip"),
        train=str(tiny_dir / "train.csv"),
        val=str(tiny_dir / "val.csv"),
        batch_size=batch_size,
    )


def trainer(tmp_path, **kwargs):
    return pl.Trainer(
        **{
            "accelerator": "cpu",
            "max_steps": 3,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": tmp_path,
            **kwargs,
        }
    )


def test_only_fusion_and_temperature_train(tiny_dir):
    module = make(tiny_dir)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("image_fusion.", "text_fusion.", "criterion.")) for n in trainable)
    assert "criterion.log_scale" in trainable


def test_fit_updates_fusion_only_and_keeps_backbone_in_eval(tiny_dir, tmp_path):
    module = make(tiny_dir)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    seen_modes = []

    class Spy(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen_modes.append(pl_module.backbone.model.training)

    trainer(tmp_path, callbacks=[Spy()], enable_checkpointing=False).fit(module, datamodule(tiny_dir))
    after = dict(module.named_parameters())
    assert seen_modes and not any(seen_modes)
    assert all(torch.equal(before[n], after[n]) for n in before if n.startswith("backbone."))
    assert any(not torch.equal(before[n], after[n]) for n in before if n.startswith("image_fusion."))
    assert any(not torch.equal(before[n], after[n]) for n in before if n.startswith("text_fusion."))


def test_forward_shapes_and_training_exclusion(tiny_dir, monkeypatch):
    """Through training_step (and forward, which it runs): the neighbours each side's fusion reads never
    include the pair's own memory row, nor a near-copy of the pair (planted here under other ids), and text
    queries hand their pair's images to the retriever for that near-duplicate check."""
    module = make(tiny_dir)
    module.setup("fit")
    batch = next(iter(datamodule(tiny_dir, batch_size=8).train_dataloader()))
    full = module.require_retriever().memory
    v, t = module.embed(batch)
    noise = 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(0))
    copies = torch.nn.functional.normalize(v + noise, dim=-1)  # each pair again: near-same image, its caption
    module.set_memory(
        MemoryStore.from_arrays(
            torch.cat([torch.tensor(full.image_embeddings, dtype=torch.float32), copies]).numpy(),
            torch.cat([torch.tensor(full.text_embeddings, dtype=torch.float32), t]).numpy(),
            ids=torch.cat([torch.tensor(full.ids).long(), batch["id"].long() + 1_000_000]).numpy(),
            fingerprint=full.fingerprint,
        )
    )
    retriever, calls, fused = module.retriever, [], []

    class Spy:
        def __call__(self, query, modality, **kwargs):
            found = retriever(query, modality, **kwargs)
            calls.append((modality, kwargs, found))
            return found

        def __getattr__(self, name):
            return getattr(retriever, name)

    def read(fusion, args, kwargs, _output):  # what the fusion actually reads
        given = dict(zip(("query", "retrieved", "retrieved_mask"), args, strict=False)) | kwargs
        side = "image" if fusion is module.image_fusion else "text"
        fused.append((side, given["retrieved"], given.get("retrieved_mask")))

    hooks = [
        f.register_forward_hook(read, with_kwargs=True) for f in (module.image_fusion, module.text_fusion)
    ]
    module.retriever = Spy()
    monkeypatch.setattr(module, "log", lambda *args, **kwargs: None)  # no trainer attached
    out = module(batch, exclude_self=True)
    loss = module.training_step(batch, 0)
    for hook in hooks:
        hook.remove()
    assert out["v_bar"].shape == out["t_bar"].shape == (8, 32) and torch.isfinite(loss)
    assert [c[0] for c in calls] == [f[0] for f in fused] == ["image", "text"] * 2
    memory = retriever.memory
    memory_ids = torch.tensor(memory.ids).long()
    images = torch.nn.functional.normalize(torch.tensor(memory.image_embeddings, dtype=torch.float32), dim=-1)
    pair_images = torch.nn.functional.normalize(out["v"], dim=-1)
    threshold = module.hparams.near_duplicate_threshold
    for (side, kwargs, found), (_, retrieved, mask) in zip(calls, fused, strict=True):
        assert torch.equal(retrieved, found.embeddings) and torch.equal(mask, found.mask), (
            f"the {side} fusion read other neighbours than the retriever found"
        )
        rows = found.rows.clamp(min=0)
        assert found.mask.all(), f"{side} side: fewer than k neighbours survived exclusion"
        assert not (memory_ids[rows] == batch["id"][:, None]).any(), (
            f"{side} side: the fusion read the pair's own memory row"
        )
        cosine = torch.einsum("bkd,bd->bk", images[rows], pair_images)
        assert (cosine <= threshold).all(), (
            f"{side} side: the fusion read a near-copy of the pair's image (cosine {cosine.max():.4f})"
        )
        assert torch.equal(kwargs.get("exclude_ids"), batch["id"])
        if side == "text":
            assert torch.equal(kwargs["pair_images"], out["v"])


def test_checkpoint_holds_fusion_not_backbone_and_round_trips(tiny_dir, tmp_path):
    module = make(tiny_dir)
    trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(module, datamodule(tiny_dir))
    path = tmp_path / "model.ckpt"
    trainer(tmp_path).strategy.connect(module)
    module.trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    assert not any(k.startswith("backbone.") for k in checkpoint["state_dict"])
    assert checkpoint["reco_backbone"]["id"] == module.backbone.fingerprint["id"]
    backbone_bytes = (tiny_dir / "clip" / "model.safetensors").stat().st_size
    fusion_bytes = sum(v.numel() * v.element_size() for v in checkpoint["state_dict"].values())
    assert fusion_bytes < backbone_bytes

    loaded = RecoModule.load_from_checkpoint(path)
    loaded.setup("test")
    batch = next(iter(datamodule(tiny_dir, batch_size=8).val_dataloader()))
    module.eval(), loaded.eval()
    a, b = module(batch), loaded(batch)
    assert torch.allclose(a["v_bar"], b["v_bar"], atol=1e-6) and torch.allclose(
        a["t_bar"], b["t_bar"], atol=1e-6
    )


def test_checkpoint_refuses_another_backbone(tiny_dir, tmp_path, other_backbone):
    module = make(tiny_dir)
    t = trainer(tmp_path)
    t.strategy.connect(module)
    t.save_checkpoint(tmp_path / "m.ckpt")
    with pytest.raises(BackboneMismatchError, match="set model.backbone to the checkpoint's backbone"):
        RecoModule.load_from_checkpoint(tmp_path / "m.ckpt", backbone=other_backbone, memory=None)


def test_memory_from_another_backbone_is_refused(tiny_dir, other_backbone):
    module = RecoModule(
        backbone=other_backbone, memory=str(tiny_dir / "memory"), k=4, fusion_config={"num_heads": 4}
    )
    with pytest.raises(RecoMemoryError, match="rebuild the memory with this backbone"):
        module.setup("fit")


def test_memory_swap_changes_only_the_knowledge(tiny_dir):
    module = make(tiny_dir).eval()
    module.setup("test")
    batch = next(iter(datamodule(tiny_dir, batch_size=8).val_dataloader()))
    first = module(batch)["v_bar"]
    full = MemoryStore.open(tiny_dir / "memory")
    half = MemoryStore.from_arrays(
        full.image_embeddings[:50], full.text_embeddings[:50], full.ids[:50], fingerprint=full.fingerprint
    )
    module.set_memory(half)
    assert int(module.retriever(first, "image").rows.max()) < 50
    assert not torch.allclose(module(batch)["v_bar"], first)


def test_missing_memory_is_a_clear_error(tiny_dir):
    module = make(tiny_dir, memory=None)
    module.setup("fit")
    with pytest.raises(RuntimeError, match="set model.memory"):
        module.refine(torch.zeros(1, 32), "image")


def test_schedule_warms_up_then_decays(tiny_dir, tmp_path):
    module = make(tiny_dir, warmup_steps=2, lr=1e-3)
    lrs = []

    class Lr(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer(tmp_path, max_steps=6, callbacks=[Lr()], enable_checkpointing=False, limit_val_batches=0).fit(
        module, datamodule(tiny_dir, batch_size=16)
    )
    assert lrs[0] == pytest.approx(5e-4) and lrs[1] == pytest.approx(1e-3)
    assert lrs[2] > lrs[3] > lrs[4] > lrs[5]


# Each option of a component's config -> (a non-default value, a check of its effect on the built
# component). Set alone, so each check sees that option only.
FUSION_PROBES = {
    "width": (16, lambda f: f.width == 16 and f.proj_in.out_features == 16),
    "num_layers": (2, lambda f: len(f.encoder.layers) == 2),
    "num_heads": (2, lambda f: f.encoder.layers[0].self_attn.num_heads == 2),
    "mlp_ratio": (2.0, lambda f: f.encoder.layers[0].linear1.out_features == 2 * f.width),
    "dropout": (0.2, lambda f: f.encoder.layers[0].dropout.p == 0.2),
    # the learned branch starts silent with a skip on: the output is the skip alone
    "residual": (
        True,
        lambda f: torch.allclose(f(*_probe_inputs(f)), F.normalize(_probe_inputs(f)[0], dim=-1)),
    ),
    "retrieved_skip": (
        0.7,
        lambda f: torch.allclose(f(*_probe_inputs(f)), F.normalize(_probe_inputs(f)[1].mean(1), dim=-1)),
    ),
}


def _capped(loss) -> float:
    with torch.no_grad():
        loss.log_scale.fill_(9.0)
    loss.clamp_()
    return loss.logit_scale.item()


def _loss_parts(loss) -> set:
    v = F.normalize(torch.randn(4, 8), dim=-1)
    return set(loss(v, v, v, v))


LOSS_PROBES = {
    "init_temperature": (0.05, lambda c: c.logit_scale.item() == pytest.approx(20.0)),
    "max_logit_scale": (50.0, lambda c: _capped(c) == pytest.approx(50.0)),
    "learn_temperature": (False, lambda c: not c.log_scale.requires_grad),
    "mixed_terms": (False, lambda c: _loss_parts(c) == {"loss", "refined"}),
    "duplicate_threshold": (
        0.93,
        lambda c: (p := c.positives(torch.ones(2, 4), torch.ones(2, 4), 0)) is not None and p.all(),
    ),
}


def _probe_inputs(fusion):
    generator = torch.Generator().manual_seed(0)
    dim = fusion.dim
    return torch.randn(3, dim, generator=generator), torch.randn(3, 4, dim, generator=generator)


@pytest.mark.parametrize(
    ("config_cls", "probes", "attribute"),
    [(FusionConfig, FUSION_PROBES, "image_fusion"), (FusionConfig, FUSION_PROBES, "text_fusion"),
     (LossConfig, LOSS_PROBES, "criterion")],
)  # fmt: skip
def test_every_documented_option_reaches_its_component(tiny_dir, config_cls, probes, attribute):
    """Every option of FusionConfig / LossConfig, set through RecoModule (as YAML does, by name), acts
    in the component that uses it (duplicate_threshold was once accepted, saved in hparams and never handed
    to the loss). A new option fails here until it is probed, documented in its class and in docs/configuration.md."""
    options = [field.name for field in dataclasses.fields(config_cls)]
    assert sorted(probes) == sorted(options)
    readme = (Path(__file__).parents[1] / "docs" / "configuration.md").read_text()
    for name in options:
        assert f"{name}:" in config_cls.__doc__, f"{config_cls.__name__}.{name} is not documented"
        assert f"`{name}`" in readme, (
            f"{config_cls.__name__}.{name} is missing from the config reference (docs/configuration.md)"
        )
    key = "fusion_config" if config_cls is FusionConfig else "loss_config"
    for name, (value, acts) in probes.items():
        module = make(tiny_dir, **{key: {name: value}})
        component = getattr(module, attribute)
        assert getattr(component.config, name) == value and module.hparams[key][name] == value
        assert acts(component), f"{key}.{name}={value} did not act on {attribute}"
        # the defaults do not pass the check (or it could not fail)
        assert not acts(getattr(make(tiny_dir), attribute)), f"the {name} check cannot fail"


def test_retrieval_options_reach_the_retriever(tiny_dir):
    module = make(
        tiny_dir, k=3, search="cross", fusion="uni", near_duplicate_threshold=0.9, exclusion_margin=5
    )
    module.setup("fit")
    retriever = module.require_retriever()
    assert (retriever.k, retriever.search, retriever.fusion) == (3, "cross", "uni")
    assert (retriever.near_duplicate_threshold, retriever.exclusion_margin) == (0.9, 5)


def test_novelty_options_reach_the_retriever_and_the_training_memory_leaves_refine_unchanged(
    tiny_dir, tmp_path
):
    """``known_memory`` marks the attached memory's rows added after training; with the memory the module
    trains with, none is, and refine is exactly the ungated one (the gate is inert in training)."""
    gated = make(tiny_dir, known_memory=str(tiny_dir / "memory"), novelty_threshold=0.3)
    gated.setup("fit")
    plain = make(tiny_dir)
    plain.setup("fit")
    plain.load_state_dict(gated.state_dict())
    retriever = gated.require_retriever()
    assert retriever.novelty is not None and not retriever.novelty.added.any()
    assert retriever.novelty.threshold == 0.3
    # the defaults' second condition: the base-rate check, not the score gap (which opens the training memory)
    assert retriever.novelty.share is not None and retriever.novelty.share.quantile == 0.95
    assert retriever.novelty.gap is None
    assert gated.inference_config().novelty_threshold == 0.3
    assert gated.to_pretrained().config.known_memory == str(tiny_dir / "memory")
    queries = F.normalize(torch.randn(5, gated.backbone.dim), dim=-1)
    for modality in ("image", "text"):
        assert torch.equal(gated.refine(queries, modality), plain.refine(queries, modality))
    assert plain.require_retriever().novelty is None


def test_temperature_is_capped_after_each_training_step(tiny_dir, tmp_path):
    module = make(tiny_dir)
    with torch.no_grad():
        module.criterion.log_scale.fill_(6.0)  # 1/temperature ~ 403, above the cap of 100
    trainer(tmp_path, max_steps=1, enable_checkpointing=False, num_sanity_val_steps=0).fit(
        module, datamodule(tiny_dir)
    )
    assert module.criterion.logit_scale.item() <= 100.0 + 1e-3
