"""Encode an image-text source into a memory: batched, chunked, resumable, atomic.

Encoding runs through ``Trainer.predict`` so it uses every device the Trainer is given. The source is cut
into fixed chunks of rows; each finished chunk is written atomically into a work directory next to the
target (``.<name>.partial``), so a killed build re-encodes only the chunk it was in when re-run with the
same arguments. The target directory appears, complete with manifest and indexes, only at the end.
This is the one module under ``memory/`` that uses Lightning: it is the bridge from data to store.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from reco_lightning.atomic import replace_directory
from reco_lightning.chunked import clear_work, iter_chunks, predict_in_chunks
from reco_lightning.data.pairs import PairCollator, open_source
from reco_lightning.encoders import FrozenCLIP
from reco_lightning.memory.base import RecoMemoryError
from reco_lightning.memory.store import finish_memory, write_metadata

__all__ = ["BAD_KEYS_KEPT", "EncoderModule", "build_memory"]

#: Keys of bad samples recorded in the manifest (and printed by `reco memory build`), so a user can look
#: at a few of them; the count covers them all.
BAD_KEYS_KEPT = 5


class EncoderModule(pl.LightningModule):
    """Predict-only module: frozen CLIP embeddings (fp16) of each pair, with its position and metadata."""

    def __init__(self, backbone: str) -> None:
        super().__init__()
        self.backbone = FrozenCLIP(backbone)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        if "pixel_values" in batch:
            image = self.backbone.encode_images(batch["pixel_values"]).half().cpu()
            text = self.backbone.encode_texts(batch["input_ids"], batch["attention_mask"]).half().cpu()
        else:  # every sample of the batch was bad
            image = text = torch.zeros(0, self.backbone.dim, dtype=torch.float16)
        return {
            "position": batch["position"].cpu(),
            "id": batch["id"].cpu(),
            "key": batch["key"],
            "caption": batch["caption"],
            "bad": len(batch["bad_keys"]),
            "bad_keys": tuple(batch["bad_keys"][:BAD_KEYS_KEPT]),  # a tuple: per chunk, not per row
            "image": image,
            "text": text,
        }


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
    """Encode ``source`` (CSV/TSV, caption folder or webdataset shards) with ``backbone`` into ``out``.

    Re-running after an interruption resumes from the last finished chunk. ``train_size`` caps how many
    rows train an IVF/PQ quantiser. Bad samples are skipped and counted in the manifest's source field.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise RecoMemoryError(f"memory {out} already exists: choose another --out or pass --overwrite")
    pairs = open_source(source, image_column, caption_column, id_column)
    total = len(pairs)
    if total == 0:
        raise RecoMemoryError(f"{source} holds no pairs: nothing to put in the memory")
    work = out.parent / f".{out.name}.partial"
    module = EncoderModule(backbone)
    plan = {
        "source": str(Path(source).resolve())
        if isinstance(source, str | os.PathLike)
        else list(map(str, source)),
        "rows": total,
        "chunk_size": chunk_size,
        "fingerprint": module.backbone.fingerprint,
        "id_scheme": pairs.id_scheme,  # chunks hold ids: a resume must not mix two schemes
    }
    collator = PairCollator(module.backbone.processor, module.backbone.max_text_length)
    files, trainer = predict_in_chunks(
        module, pairs, work, plan, collator, chunk_size, batch_size, num_workers, trainer_kwargs
    )
    if trainer.global_rank == 0:
        _assemble(work, files, module.backbone.fingerprint, backend, train_size, str(source), pairs.id_scheme)
        replace_directory(work, out)
    trainer.strategy.barrier()
    return out


def _assemble(
    work: Path,
    files: list[Path],
    fingerprint: dict[str, Any],
    backend: Any,
    train_size: int | None,
    source: str,
    id_scheme: str | None = None,
) -> None:
    """Concatenate chunk files into the store's row-aligned arrays, then index; the manifest goes last."""
    counts, bad, bad_keys = [], 0, []
    for chunk in iter_chunks(files):
        counts.append(len(chunk["id"]))
        bad += chunk["bad"]
        bad_keys.extend(chunk.get("bad_keys", ())[: BAD_KEYS_KEPT - len(bad_keys)])
    kept, dim = sum(counts), int(fingerprint["dim"])
    image = np.lib.format.open_memmap(work / "image_emb.npy", mode="w+", dtype=np.float16, shape=(kept, dim))
    text = np.lib.format.open_memmap(work / "text_emb.npy", mode="w+", dtype=np.float16, shape=(kept, dim))
    ids = np.lib.format.open_memmap(work / "ids.npy", mode="w+", dtype=np.int64, shape=(kept,))
    captions: list[str] = []
    keys: list[str] = []
    start = 0
    for chunk in iter_chunks(files):
        n = len(chunk["id"])
        image[start : start + n] = chunk["image"].numpy()
        text[start : start + n] = chunk["text"].numpy()
        ids[start : start + n] = chunk["id"].numpy()
        captions.extend(chunk["caption"])
        keys.extend(chunk["key"])
        start += n
    for array in (image, text, ids):
        array.flush()
    write_metadata(work / "metadata.parquet", np.asarray(ids), captions, keys)
    del image, text, ids
    clear_work(work)
    finish_memory(
        work,
        backend,
        fingerprint,
        f"{source} ({kept} pairs, {bad} bad samples skipped)",
        train_size,
        extra={"bad_samples": bad, "bad_keys": bad_keys, "id_scheme": id_scheme},
    )
