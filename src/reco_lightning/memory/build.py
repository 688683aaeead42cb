"""Encode an image-text source into a memory: batched, chunked, resumable, atomic.

Encoding runs through ``Trainer.predict`` so it uses every device the Trainer is given. The source is cut
into fixed chunks of rows; each finished chunk is written atomically into a work directory next to the
target (``.<name>.partial``), so a killed build re-encodes only the chunk it was in when re-run with the
same arguments. The target directory appears, complete with manifest and indexes, only at the end.
This is the one module under ``memory/`` that uses Lightning: it is the bridge from data to store.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Subset

from reco_lightning.data.pairs import ImageTextPairs, PairCollator, read_pairs
from reco_lightning.encoders import FrozenCLIP
from reco_lightning.memory.base import RecoMemoryError, atomic_write_text
from reco_lightning.memory.store import finish_memory, replace_directory, write_metadata

__all__ = ["EncoderModule", "build_memory"]


class EncoderModule(pl.LightningModule):
    """Predict-only module: frozen CLIP embeddings (fp16) of each pair, tagged with its dataset index."""

    def __init__(self, backbone: str) -> None:
        super().__init__()
        self.backbone = FrozenCLIP(backbone)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        if batch["index"].numel() == 0:
            empty = torch.zeros(0, self.backbone.dim, dtype=torch.float16)
            return {"index": batch["index"].cpu(), "image": empty, "text": empty}
        return {
            "index": batch["index"].cpu(),
            "image": self.backbone.encode_images(batch["pixel_values"]).half().cpu(),
            "text": self.backbone.encode_texts(batch["input_ids"], batch["attention_mask"]).half().cpu(),
        }


class _IndexedPairs(ImageTextPairs):
    def __getitem__(self, index: int) -> dict[str, Any] | None:
        sample = super().__getitem__(index)
        if sample is not None:
            sample["index"] = index
        return sample


class _IndexedCollator(PairCollator):
    def __call__(self, samples):  # type: ignore[override]
        batch = super().__call__(samples)
        batch["index"] = torch.tensor([s["index"] for s in samples if s is not None], dtype=torch.long)
        return batch


class _RankWriter(BasePredictionWriter):
    """Each rank writes its share of a chunk; rank 0 merges them by dataset index."""

    def __init__(self, directory: Path) -> None:
        super().__init__(write_interval="epoch")
        self.directory = directory

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        parts = [p for p in predictions if p["index"].numel()]
        out = {
            key: (torch.cat([p[key] for p in parts]).numpy() if parts else np.zeros((0,), np.int64))
            for key in ("index", "image", "text")
        }
        path = self.directory / f"rank{trainer.global_rank}.npz"
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **out)
        os.replace(tmp, path)


def build_memory(
    source: str | os.PathLike,
    out: str | os.PathLike,
    backbone: str,
    backend: str | dict[str, Any] = "exact",
    batch_size: int = 256,
    num_workers: int = 0,
    chunk_size: int = 100_000,
    train_size: int | None = 200_000,
    image_column: str = "filepath",
    caption_column: str = "caption",
    id_column: str | None = None,
    trainer_kwargs: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Encode ``source`` (CSV/TSV or caption folder) with ``backbone`` into the memory directory ``out``.

    Re-running after an interruption resumes from the last finished chunk. ``train_size`` caps how many
    rows train an IVF/PQ quantiser. Bad samples are skipped and counted in the manifest's source field.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise RecoMemoryError(f"memory {out} already exists: choose another --out or pass --overwrite")
    records = read_pairs(source, image_column, caption_column, id_column)
    if not records:
        raise RecoMemoryError(f"{source} holds no pairs: nothing to put in the memory")
    work = out.parent / f".{out.name}.partial"
    chunks_dir = work / "chunks"
    chunks_dir.mkdir(parents=True, exist_ok=True)
    module = EncoderModule(backbone)
    plan = {
        "source": str(Path(source).resolve()),
        "rows": len(records),
        "chunk_size": chunk_size,
        "fingerprint": module.backbone.fingerprint,
    }
    plan_path = work / "build.json"
    if plan_path.is_file():
        previous = json.loads(plan_path.read_text())
        if previous != plan:
            raise RecoMemoryError(
                f"{work} holds an interrupted build with other settings ({_diff(previous, plan)}): delete {work} "
                "to start over, or resume with the original arguments"
            )
    else:
        atomic_write_text(plan_path, json.dumps(plan, indent=2))

    dataset = _IndexedPairs(records)
    trainer = pl.Trainer(
        **{
            "logger": False,
            "enable_checkpointing": False,
            "enable_model_summary": False,
            "accelerator": "auto",
            "devices": "auto",
            **(trainer_kwargs or {}),
        }
    )
    n_chunks = (len(records) + chunk_size - 1) // chunk_size
    for chunk in range(n_chunks):
        final = chunks_dir / f"{chunk:06d}.npz"
        if final.is_file():
            continue
        rank_dir = chunks_dir / f"{chunk:06d}.ranks"
        shutil.rmtree(rank_dir, ignore_errors=True)
        rank_dir.mkdir()
        rows = range(chunk * chunk_size, min(len(records), (chunk + 1) * chunk_size))
        collator = _IndexedCollator(module.backbone.processor, module.backbone.max_text_length)
        loader = DataLoader(
            Subset(dataset, rows), batch_size=batch_size, num_workers=num_workers, collate_fn=collator
        )
        trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, _RankWriter)] + [
            _RankWriter(rank_dir)
        ]
        trainer.predict(module, loader, return_predictions=False)
        if trainer.global_rank == 0:
            _merge_ranks(rank_dir, final)
        trainer.strategy.barrier()

    if trainer.global_rank == 0:
        _assemble(work, records, n_chunks, module.backbone.fingerprint, backend, train_size, str(source))
        replace_directory(work, out)
    trainer.strategy.barrier()
    return out


def _merge_ranks(rank_dir: Path, final: Path) -> None:
    parts = [np.load(p) for p in sorted(rank_dir.glob("rank*.npz"))]
    index = np.concatenate([p["index"] for p in parts])
    image = np.concatenate([p["image"].reshape(len(p["index"]), -1) for p in parts])
    text = np.concatenate([p["text"].reshape(len(p["index"]), -1) for p in parts])
    index, first = np.unique(index, return_index=True)  # DistributedSampler pads ranks with repeats
    tmp = final.with_name(final.stem + ".tmp.npz")
    np.savez(tmp, index=index, image=image[first], text=text[first])
    os.replace(tmp, final)
    shutil.rmtree(rank_dir)


def _assemble(work, records, n_chunks, fingerprint, backend, train_size, source) -> None:
    """Concatenate chunk files into the store's row-aligned arrays, then index; the manifest goes last."""
    chunk_files = [work / "chunks" / f"{c:06d}.npz" for c in range(n_chunks)]
    counts = [len(np.load(f)["index"]) for f in chunk_files]
    total, dim = sum(counts), int(fingerprint["dim"])
    skipped = len(records) - total
    image = np.lib.format.open_memmap(work / "image_emb.npy", mode="w+", dtype=np.float16, shape=(total, dim))
    text = np.lib.format.open_memmap(work / "text_emb.npy", mode="w+", dtype=np.float16, shape=(total, dim))
    kept: list[int] = []
    start = 0
    for f, n in zip(chunk_files, counts, strict=True):
        part = np.load(f)
        image[start : start + n], text[start : start + n] = part["image"], part["text"]
        kept.extend(part["index"].tolist())
        start += n
    image.flush(), text.flush()
    del image, text
    kept_records = [records[i] for i in kept]
    ids = np.array([r.id for r in kept_records], dtype=np.int64)
    np.save(work / "ids.npy", ids)
    write_metadata(
        work / "metadata.parquet", ids, [r.caption for r in kept_records], [r.key for r in kept_records]
    )
    shutil.rmtree(work / "chunks")
    finish_memory(
        work, backend, fingerprint, f"{source} ({total} pairs, {skipped} bad samples skipped)", train_size
    )


def _diff(a: dict[str, Any], b: dict[str, Any]) -> str:
    return ", ".join(
        f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
    )
