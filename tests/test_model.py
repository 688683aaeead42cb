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
    module = make(tiny_dir)
    module.setup("fit")
    batch = next(iter(datamodule(tiny_dir, batch_size=8).train_dataloader()))
    out = module(batch, exclude_self=True)
    assert out["v_bar"].shape == out["t_bar"].shape == (8, 32)
    neighbours = module.retriever(out["v"], "image", exclude_ids=batch["id"])
    own_rows = [int(torch.nonzero(torch.from_numpy(module.retriever.memory.ids) == i)) for i in batch["id"]]
    assert all(own not in rows for own, rows in zip(own_rows, neighbours.rows.tolist(), strict=True))


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
