"""Image-text pairs from a CSV/TSV of (image path, caption) or a folder of images with sidecar captions.

Every pair carries an integer id (its row in the source, or an id column) so that a memory built from
the same source lets training exclude each pair's own row. Images go through the backbone's own
processor in the collator, so users get exactly the inputs CLIP was trained on.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageTextDataModule",
    "ImageTextPairs",
    "PairCollator",
    "PairRecord",
    "read_pairs",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass(frozen=True)
class PairRecord:
    id: int
    key: str
    image_path: str
    caption: str


def read_pairs(
    source: str | os.PathLike,
    image_column: str = "filepath",
    caption_column: str = "caption",
    id_column: str | None = None,
) -> list[PairRecord]:
    """List the pairs of a CSV/TSV file or an image folder with ``<stem>.txt`` captions beside each image.

    CSV paths may be relative to the CSV's own directory. Only paths and captions are held, not images.
    """
    source = Path(source)
    if source.is_dir():
        return _folder_pairs(source)
    if not source.is_file():
        raise FileNotFoundError(
            f"pair source {source} does not exist: give a CSV/TSV file or an image folder"
        )
    delimiter = "\t" if source.suffix.lower() in (".tsv", ".tab") else ","
    with source.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter)
        header = reader.fieldnames or []
        for column in (image_column, caption_column, id_column):
            if column is not None and column not in header:
                raise ValueError(
                    f"{source} has no column {column!r} (columns: {header}): set image_column/caption_column/id_column"
                )
        records = []
        for row_number, row in enumerate(reader):
            path = Path(row[image_column])
            if not path.is_absolute():
                path = source.parent / path
            pair_id = int(row[id_column]) if id_column else row_number
            records.append(PairRecord(pair_id, f"{source.name}:{row_number}", str(path), row[caption_column]))
    return records


def _folder_pairs(root: Path) -> list[PairRecord]:
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    records = []
    for image in images:
        caption_file = image.with_suffix(".txt")
        caption = caption_file.read_text(encoding="utf-8").strip() if caption_file.is_file() else ""
        records.append(PairRecord(len(records), str(image.relative_to(root)), str(image), caption))
    if not records:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
    return records


class ImageTextPairs(Dataset):
    """Lazily decodes images; a bad sample (unreadable image, empty caption) comes back as ``None``."""

    def __init__(self, records: Sequence[PairRecord]) -> None:
        self.records = list(records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        record = self.records[index]
        if not record.caption.strip():
            return None
        try:
            with Image.open(record.image_path) as img:
                image = img.convert("RGB")
        except (OSError, ValueError):
            return None
        return {"image": image, "caption": record.caption, "id": record.id, "key": record.key}


class PairCollator:
    """Turns samples into backbone inputs; drops ``None`` (bad) samples and counts them."""

    def __init__(self, processor: Any, max_text_length: int) -> None:
        self.processor, self.max_text_length = processor, max_text_length
        self.skipped = 0

    def __call__(self, samples: Sequence[dict[str, Any] | None]) -> dict[str, Tensor]:
        good = [s for s in samples if s is not None]
        self.skipped += len(samples) - len(good)
        if not good:  # every sample bad: an empty batch, which consumers skip
            return {"id": torch.zeros(0, dtype=torch.long)}
        text = self.processor.tokenizer(
            [s["caption"] for s in good],
            padding="max_length",
            truncation=True,
            max_length=self.max_text_length,
            return_tensors="pt",
        )
        return {
            "pixel_values": self.processor.image_processor([s["image"] for s in good], return_tensors="pt")[
                "pixel_values"
            ],
            "input_ids": text["input_ids"],
            "attention_mask": text["attention_mask"],
            "id": torch.tensor([s["id"] for s in good], dtype=torch.long),
        }


class ImageTextDataModule(pl.LightningDataModule):
    """Train/val/predict pairs for RecoModule from CSV/TSV files or caption folders.

    Args:
        backbone: the model's backbone (linked from ``model.backbone`` by the CLI) whose processor is used.
        train / val / predict: pair sources (CSV/TSV path or image folder); any may be None.
        batch_size: per-device batch size (the loss uses the global batch under DDP).
        num_workers: DataLoader workers per device.
        image_column / caption_column / id_column: CSV columns.
    """

    def __init__(
        self,
        backbone: str,
        train: str | None = None,
        val: str | None = None,
        predict: str | None = None,
        batch_size: int = 256,
        num_workers: int = 0,
        image_column: str = "filepath",
        caption_column: str = "caption",
        id_column: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self._collator: PairCollator | None = None

    @property
    def collator(self) -> PairCollator:
        if self._collator is None:
            from transformers import CLIPProcessor, CLIPTextConfig

            processor = CLIPProcessor.from_pretrained(self.hparams.backbone)
            max_len = CLIPTextConfig.from_pretrained(self.hparams.backbone).max_position_embeddings
            self._collator = PairCollator(processor, max_len)
        return self._collator

    def _loader(self, source: str | None, stage: str, shuffle: bool) -> DataLoader:
        if source is None:
            raise ValueError(
                f"data.{stage} is not set: give a CSV/TSV file or an image folder for the {stage} pairs"
            )
        hp = self.hparams
        dataset = ImageTextPairs(read_pairs(source, hp.image_column, hp.caption_column, hp.id_column))
        return DataLoader(
            dataset,
            batch_size=hp.batch_size,
            shuffle=shuffle,
            num_workers=hp.num_workers,
            collate_fn=self.collator,
            drop_last=shuffle and len(dataset) >= hp.batch_size,  # contrastive loss wants full batches
            persistent_workers=hp.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.hparams.train, "train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return [] if self.hparams.val is None else self._loader(self.hparams.val, "val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.hparams.val, "val", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.hparams.predict or self.hparams.train, "predict", shuffle=False)
