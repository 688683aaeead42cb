import pytest
import pytorch_lightning as pl
import torch

from reco_lightning.data.pairs import ImageTextDataModule
from reco_lightning.memory import MemoryStore, RecoMemoryError
from reco_lightning.model import BackboneMismatchError, RecoModule


def make(tiny_dir, **kwargs) -> RecoModule:
    defaults = {
        "backbone": str(tiny_dir / "clip"),
        "memory": str(tiny_dir / "memory"),
        "k": 4,
        "fusion_heads": 4,
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


def test_forward_shapes_and_training_exclusion(tiny_dir):
    """Through forward (what training_step runs): both sides exclude the pair's own row, and text queries
    hand their pair's images to the retriever for near-duplicate exclusion."""
    module = make(tiny_dir)
    module.setup("fit")
    batch = next(iter(datamodule(tiny_dir, batch_size=8).train_dataloader()))
    retriever = module.retriever
    calls = []

    class Spy:
        def __call__(self, query, modality, **kwargs):
            found = retriever(query, modality, **kwargs)
            calls.append((modality, kwargs, found.rows))
            return found

    module.retriever = Spy()
    out = module(batch, exclude_self=True)
    assert out["v_bar"].shape == out["t_bar"].shape == (8, 32)
    assert [c[0] for c in calls] == ["image", "text"]
    memory_ids = torch.from_numpy(retriever.memory.ids)
    for modality, kwargs, rows in calls:
        assert torch.equal(kwargs["exclude_ids"], batch["id"])
        found_ids = torch.where(rows >= 0, memory_ids[rows.clamp(min=0)], -1)
        assert not (found_ids == batch["id"][:, None]).any(), f"{modality} side retrieved its own pair"
    assert torch.equal(calls[1][1]["pair_images"], out["v"])


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
    module = RecoModule(backbone=other_backbone, memory=str(tiny_dir / "memory"), k=4, fusion_heads=4)
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


def test_every_component_option_reaches_its_component(tiny_dir):
    """Each RecoModule option is stored where it acts (duplicate_threshold was once accepted, saved in
    hparams and never handed to the loss)."""
    module = make(
        tiny_dir,
        k=3,
        search="cross",
        fusion="uni",
        near_duplicate_threshold=0.9,
        exclusion_margin=5,
        fusion_width=16,
        fusion_layers=2,
        fusion_heads=2,
        fusion_mlp_ratio=2.0,
        fusion_dropout=0.2,
        fusion_residual=True,
        fusion_retrieved_skip=0.7,
        init_temperature=0.05,
        learn_temperature=False,
        mixed_loss_terms=False,
        duplicate_threshold=0.93,
    )
    module.setup("fit")
    retriever = module.require_retriever()
    assert (retriever.k, retriever.search, retriever.fusion) == (3, "cross", "uni")
    assert (retriever.near_duplicate_threshold, retriever.exclusion_margin) == (0.9, 5)
    for fusion in (module.image_fusion, module.text_fusion):
        assert fusion.width == 16 and len(fusion.encoder.layers) == 2
        layer = fusion.encoder.layers[0]
        assert layer.self_attn.num_heads == 2 and layer.linear1.out_features == 32
        assert layer.dropout.p == 0.2
        assert fusion.residual and fusion.retrieved_skip == 0.7
    criterion = module.criterion
    assert criterion.logit_scale.item() == pytest.approx(20.0)
    assert not criterion.log_scale.requires_grad
    assert criterion.mixed_terms is False
    assert criterion.duplicate_threshold == 0.93


def test_temperature_is_capped_after_each_training_step(tiny_dir, tmp_path):
    module = make(tiny_dir)
    with torch.no_grad():
        module.criterion.log_scale.fill_(6.0)  # 1/temperature ~ 403, above the cap of 100
    trainer(tmp_path, max_steps=1, enable_checkpointing=False, num_sanity_val_steps=0).fit(
        module, datamodule(tiny_dir)
    )
    assert module.criterion.logit_scale.item() <= 100.0 + 1e-3
