"""DataEpochHooks: the per-epoch duties of streamed data that Lightning does not do for an IterableDataset.

A Lightning callback on the data side (RecoModule adds it itself, in configure_callbacks): it only talks
to the datamodule's ``set_epoch`` / ``train_epoch`` / ``pop_bad_samples``, never to the model.
"""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_warn

__all__ = ["DataEpochHooks"]


class DataEpochHooks(pl.Callback):
    """Per-epoch duties of streaming data that Lightning does not do for an IterableDataset.

    At train epoch start the stream is reshuffled for the new epoch; at each epoch end the bad samples
    every rank skipped are counted (logged as ``data/bad_samples_<stage>``), reported with their keys and why,
    and listed in full in ``bad_samples_<stage>_epoch<N>.txt`` next to the logs. RecoModule adds this
    callback itself.
    """

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Lightning builds the first training iterator before any epoch hook, and on a resume it only
        settles which epoch runs afterwards (a mid-epoch checkpoint moves it on): rebuild that iterator
        when it was built for another epoch, so a resumed run does not replay an earlier epoch's order."""
        datamodule = trainer.datamodule
        epoch = trainer.fit_loop.epoch_progress.current.processed  # what Lightning gives samplers
        if getattr(datamodule, "train_epoch", None) in (None, epoch):
            return
        datamodule.set_epoch(epoch)
        fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
        if fetcher is not None:
            iter(fetcher)  # what FitLoop.setup_data does: a new iterator (and prefetch) over the loader

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        datamodule = trainer.datamodule
        if hasattr(datamodule, "set_epoch"):
            datamodule.set_epoch(trainer.current_epoch)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._report(trainer, pl_module, "train")

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._report(trainer, pl_module, "validate")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._report(trainer, pl_module, "test")

    def _report(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        datamodule = trainer.datamodule
        if not hasattr(datamodule, "pop_bad_samples"):
            return
        keys = datamodule.pop_bad_samples(stage)
        if trainer.world_size > 1:
            import torch.distributed as dist

            gathered: list[list[str]] = [[] for _ in range(trainer.world_size)]
            dist.all_gather_object(gathered, keys)
            keys = [k for part in gathered for k in part]
        pl_module.log(f"data/bad_samples_{stage}", float(len(keys)), sync_dist=False)
        directory = Path(trainer.log_dir or trainer.default_root_dir)  # every rank asks: log_dir broadcasts
        if keys and trainer.is_global_zero:
            directory.mkdir(parents=True, exist_ok=True)
            listing = directory / f"bad_samples_{stage}_epoch{trainer.current_epoch}.txt"
            listing.write_text("\n".join(keys) + "\n")
            shown = ", ".join(keys[:10]) + (" ..." if len(keys) > 10 else "")
            rank_zero_warn(
                f"{stage} epoch {trainer.current_epoch}: skipped {len(keys)} bad samples ({shown}); all in {listing}"
            )
