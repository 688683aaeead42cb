"""A resumed fit continues the epoch order an uninterrupted fit would have had, not epoch 0's again."""

import warnings

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from helpers_data import write_shards
from reco_lightning.data.datamodule import ImageTextDataModule
from reco_lightning.data.hooks import DataEpochHooks


class OrderRecorder(pl.LightningModule):
    """Records the pair ids of every training batch, per epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))
        self.orders: dict[int, list[int]] = {}

    def training_step(self, batch, batch_idx):
        self.orders.setdefault(self.current_epoch, []).extend(batch["id"].tolist())
        return self.weight.sum() * 0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def configure_callbacks(self):
        return [DataEpochHooks()]


def fit(shards, backbone, root, max_epochs, checkpoint=None, resume=None, workers=0):
    data = ImageTextDataModule(
        backbone, train=str(shards), batch_size=4, num_workers=workers, shuffle_buffer=6, id_column="id"
    )
    module = OrderRecorder()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pl.Trainer(
            accelerator="cpu",
            max_epochs=max_epochs,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=root,
            callbacks=[checkpoint] if checkpoint else [],
            enable_checkpointing=checkpoint is not None,
        ).fit(module, data, ckpt_path=resume)
    return module.orders


@pytest.mark.parametrize(
    "saved,workers",
    [("epoch-end", 0), ("mid-epoch", 0), ("last-batch-step", 0), ("mid-epoch", 1)],
    ids=["epoch-end", "mid-epoch", "last-batch-step", "mid-epoch-worker"],
)
def test_resumed_fit_continues_the_uninterrupted_epoch_order(tmp_path, tiny_backbone, saved, workers):
    shards = tmp_path / "shards"
    write_shards(shards, [5, 7, 4, 8])  # 24 pairs: 6 batches of 4
    steps = {"epoch-end": None, "mid-epoch": 3, "last-batch-step": 6}[saved]
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path / "ckpt",
        save_top_k=-1,
        every_n_train_steps=steps,
        every_n_epochs=None if steps else 1,
        filename="{epoch}-{step}",
    )
    reference = fit(shards, tiny_backbone, tmp_path / "a", 3, checkpoint=checkpoint, workers=workers)
    assert len({tuple(order) for order in reference.values()}) == 3, "each epoch has its own order"
    saved_at = sorted((tmp_path / "ckpt").glob("epoch=0-*.ckpt"))[-1]
    resumed = fit(shards, tiny_backbone, tmp_path / "b", 3, resume=str(saved_at), workers=workers)
    first = min(resumed)
    assert first >= 1 and resumed[first] == reference[first], f"resumed epoch {first} replayed another order"
    assert resumed[2] == reference[2]
