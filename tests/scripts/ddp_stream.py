"""Run by test_pairs under `python`: a 2-process CPU DDP epoch over shards, recording what each rank saw.

Lightning's ddp launcher re-executes this script for rank 1, so it must be a real file.
"""

import faulthandler
import json
import os
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch

from reco_lightning.cli import leave_process_group
from reco_lightning.data.datamodule import ImageTextDataModule
from reco_lightning.data.hooks import DataEpochHooks
from reco_lightning.losses import gather_with_grad


class Recorder(pl.LightningModule):
    def __init__(self, out: str) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))
        self.out, self.ids, self.sizes, self.batches = out, [], [], 0

    def training_step(self, batch, batch_idx):
        self.batches += 1
        self.ids.extend(batch["id"].tolist())
        local = self.weight * torch.ones(len(batch["id"]), 1)
        gathered = gather_with_grad(local)  # a collective every step: uneven batch counts would hang here
        self.sizes.append(gathered.shape[0])
        return gathered.sum() * 0 + self.weight.sum() * 0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def configure_callbacks(self):
        return [DataEpochHooks()]

    def on_train_end(self):
        bad = self.trainer.callback_metrics.get("data/bad_samples_train")
        record = {
            "ids": self.ids,
            "batches": self.batches,
            "gathered_sizes": self.sizes,
            "bad_reported": float(bad) if bad is not None else None,
        }
        Path(self.out, f"rank{self.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    # a hung epoch prints each rank's Python stacks (both ranks run this file) before the test kills the
    # run at 240 s: where it hangs is then in the failure, not lost with the processes
    faulthandler.dump_traceback_later(180, exit=False)
    shards, backbone, out = sys.argv[1:4]
    data = ImageTextDataModule(backbone, train=shards, batch_size=4, num_workers=1, id_column="id")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=out,
        use_distributed_sampler=False,
    )
    trainer.fit(Recorder(out), data)
    leave_process_group()  # as `reco` does: gloo may abort a rank whose peer exits first
    # and, as the GPU check's DDP child does, skip finalisation, where gloo can still abort (pytorch#179291)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
