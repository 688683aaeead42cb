"""Encode an image-text source into a memory: batched, chunked, resumable, atomic.

Encoding runs through ``Trainer.predict`` so it uses every device the Trainer is given. The source is cut
into fixed chunks of rows; each finished chunk is written atomically into a work directory next to the
target (``.<name>.partial``), so a killed build re-encodes only the chunk it was in when re-run with the
same arguments. The target directory appears, complete with manifest and indexes, only at the end.
A job rather than part of ``memory/``: it is the bridge from data (and Lightning) to the store, which
itself knows neither. ``precision`` is the Trainer's for the encoding pass (embeddings are stored fp16
whatever it is); ``num_workers`` defaults by where the encoder runs (:func:`default_num_workers`).
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from reco_lightning.atomic import replace_directory
from reco_lightning.data.collate import PairCollator
from reco_lightning.data.sources import open_source
from reco_lightning.encoders import FrozenEncoder
from reco_lightning.errors import ChunkedJobError, RecoMemoryError
from reco_lightning.jobs.chunked import assemble, clear_work, predict_in_chunks
from reco_lightning.memory.base import DEFAULT_TRAIN_SIZE, backend_from_spec, check_buildable
from reco_lightning.memory.store import finish_memory, write_metadata

__all__ = [
    "BAD_KEYS_KEPT",
    "MAX_DEFAULT_WORKERS",
    "EncoderModule",
    "bad_reason",
    "build_memory",
    "default_num_workers",
]


def bad_reason(why: str) -> str:
    """The kind of a bad sample's why, what a build's tally counts: the text before its first colon
    (``image not found: /x.jpg`` -> ``image not found``)."""
    return why.split(":", 1)[0]


#: Keys of bad samples recorded in the manifest (and printed by `reco memory build`), so a user can look
#: at a few of them; the count covers them all.
BAD_KEYS_KEPT = 5
#: Most DataLoader workers a device's process gets by default: image decoding rarely needs more to keep
#: one GPU's CLIP forward fed, and each worker is a process of its own (memory, start-up per chunk).
MAX_DEFAULT_WORKERS = 8


def default_num_workers(accelerator: Any = "auto", devices: Any = "auto", cpus: int | None = None) -> int:
    """DataLoader workers per device process of an encoding pass, for the Trainer's ``accelerator``/``devices``.

    On CPU (``accelerator="cpu"``, or ``"auto"`` without a GPU): 0. The CLIP forward is then the bottleneck
    by far (95% of an on-the-fly ViT-B/32 step, docs/benchmarks.md) and already uses every core; workers
    would only take cores from it. On GPUs (or another
    accelerator): ``min(8, cpus // devices)``, the node's CPUs (those this process may run on) shared by its
    device processes; ``devices`` as the Trainer takes it (a count, a list or "0,1" of ids, "auto" or -1 for
    every visible GPU).
    """
    accel = str(accelerator).lower()
    if accel in ("gpu", "cuda") or (accel == "auto" and torch.cuda.is_available()):
        visible = torch.cuda.device_count()
    elif accel == "mps" or (accel == "auto" and torch.backends.mps.is_available()):
        visible = 1
    elif accel in ("cpu", "auto"):
        return 0
    else:  # tpu, hpu, ...: the count comes from ``devices``
        visible = 1
    count = _device_count(devices, visible)
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(MAX_DEFAULT_WORKERS, cpus // max(1, count)))


def _device_count(devices: Any, visible: int) -> int:
    """How many devices of this node the Trainer runs on, from its ``devices`` argument."""
    if isinstance(devices, list | tuple):
        return len(devices)
    text = str(devices).strip().lower()
    if text in ("auto", "-1", "none", ""):
        return max(1, visible)
    if "," in text:  # "0,1" or "0,": device ids
        return len([part for part in text.strip("[]").split(",") if part.strip()])
    try:
        return max(1, int(text))
    except ValueError:
        return 1


class EncoderModule(pl.LightningModule):
    """Predict-only module: frozen CLIP embeddings (fp16) of each pair, with its position and metadata."""

    def __init__(self, backbone: str) -> None:
        super().__init__()
        self.backbone = FrozenEncoder(backbone)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        image, text = self.backbone.encode_batch(batch)  # [0, dim] each when every sample was bad
        return {
            "position": batch["position"].cpu(),
            "id": batch["id"].cpu(),
            "key": batch["key"],
            "caption": batch["caption"],
            "bad": len(batch["bad_keys"]),
            "bad_keys": tuple(batch["bad_keys"][:BAD_KEYS_KEPT]),  # a tuple: per chunk, not per row
            "bad_reasons": tuple(Counter(bad_reason(why) for why in batch["bad_why"]).items()),
            "image": image.half().cpu(),
            "text": text.half().cpu(),
        }


def build_memory(
    source: str | os.PathLike,
    out: str | os.PathLike,
    backbone: str,
    backend: str | dict[str, Any] = "exact",
    batch_size: int = 256,
    num_workers: int | None = None,
    chunk_size: int = 100_000,
    train_size: int | None = DEFAULT_TRAIN_SIZE,
    image_column: str = "filepath",
    caption_column: str = "caption",
    id_column: str | None = None,
    trainer_kwargs: dict[str, Any] | None = None,
    overwrite: bool = False,
    precision: str | None = None,
) -> Path:
    """Encode ``source`` (CSV/TSV, caption folder or webdataset shards) with ``backbone`` into ``out``.

    Re-running after an interruption resumes from the last finished chunk (with the same arguments:
    ``precision`` is one of them). ``train_size`` caps how many rows train an IVF/PQ quantiser. Bad samples
    are skipped and counted in the manifest's source field. ``precision``: the Trainer's for the encoding
    pass (``"32-true"``, ``"16-mixed"``, ``"bf16-mixed"``, ...; None: ``trainer_kwargs``' or Lightning's
    default, 32-true); the manifest records the one used. ``num_workers``: DataLoader workers per device;
    None: :func:`default_num_workers` of ``trainer_kwargs``' accelerator and devices.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise RecoMemoryError(f"memory {out} already exists: choose another --out or pass --overwrite")
    check_buildable(backend)  # before minutes of encoding
    pairs = open_source(source, image_column, caption_column, id_column)
    total = len(pairs)
    if total == 0:
        raise RecoMemoryError(f"{source} holds no pairs: nothing to put in the memory")
    work = out.parent / f".{out.name}.partial"
    trainer_kwargs = dict(trainer_kwargs or {})
    if precision is not None:
        trainer_kwargs["precision"] = precision
    if num_workers is None:
        num_workers = default_num_workers(
            trainer_kwargs.get("accelerator", "auto"), trainer_kwargs.get("devices", "auto")
        )
    module = EncoderModule(backbone)
    backend_from_spec(backend, int(module.backbone.dim))  # its settings against the dim, before encoding
    plan = {
        "source": str(Path(source).resolve())
        if isinstance(source, str | os.PathLike)
        else list(map(str, source)),
        "rows": total,
        "chunk_size": chunk_size,
        "fingerprint": module.backbone.fingerprint,
        "id_scheme": pairs.id_scheme,  # chunks hold ids: a resume must not mix two schemes
        "precision": str(trainer_kwargs.get("precision", "32-true")),  # nor two encodings' numerics
    }
    collator = PairCollator(module.backbone.preprocessor)
    try:
        files, trainer = predict_in_chunks(
            module, pairs, work, plan, collator, chunk_size, batch_size, num_workers, trainer_kwargs
        )
    except ChunkedJobError as err:  # a memory build that cannot go on is a memory error (same message)
        raise RecoMemoryError(str(err)) from err
    if trainer.global_rank == 0:
        _write_memory(
            work,
            files,
            module.backbone.fingerprint,
            backend,
            train_size,
            str(source),
            pairs.id_scheme,
            precision=str(trainer.precision),
        )
        replace_directory(work, out)
    trainer.strategy.barrier()
    return out


def _write_memory(
    work: Path,
    files: list[Path],
    fingerprint: dict[str, Any],
    backend: Any,
    train_size: int | None,
    source: str,
    id_scheme: str | None = None,
    precision: str | None = None,
) -> None:
    """Concatenate chunk files into the store's row-aligned arrays, then index; the manifest goes last."""
    dim = int(fingerprint["dim"])
    kept, rest = assemble(
        work,
        files,
        {
            "image_emb": ("image", np.float16, (dim,)),
            "text_emb": ("text", np.float16, (dim,)),
            "ids": ("id", np.int64, ()),
        },
    )
    bad, bad_keys = rest.get("bad", 0), list(rest.get("bad_keys", ())[:BAD_KEYS_KEPT])
    reasons: Counter[str] = Counter()
    for reason, count in rest.get("bad_reasons", ()):
        reasons[reason] += count
    ids = np.load(work / "ids.npy", mmap_mode="r")
    write_metadata(work / "metadata.parquet", np.asarray(ids), rest.get("caption", []), rest.get("key", []))
    del ids
    clear_work(work)
    finish_memory(
        work,
        backend,
        fingerprint,
        f"{source} ({kept} pairs, {bad} bad samples skipped)",
        train_size,
        extra={
            "bad_samples": bad,
            "bad_reasons": dict(reasons.most_common()),
            "bad_keys": bad_keys,
            "id_scheme": id_scheme,
            "precision": precision,
        },
    )
