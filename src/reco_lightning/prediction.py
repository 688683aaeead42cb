"""`reco predict`'s output: :class:`EmbeddingWriter` writes the refined embeddings in clip-retrieval's layout.

``reco predict --output_dir DIR`` adds it (or list it under ``trainer.callbacks`` in a config). Each rank
writes its own parts, with no gather, every ``part_size`` rows and at its end::

    output_dir/
      img_emb/img_emb_RRRR_PPPPPP.npy           float16 [n, dim], unit rows (refined where the model refines images)
      text_emb/text_emb_RRRR_PPPPPP.npy         float16 [n, dim], unit rows (refined where it refines texts)
      metadata/metadata_RRRR_PPPPPP.parquet     one row per embedding row: image_path, caption, id, key, position
                                                (and image_gated / text_gated with a novelty gate: below)
      frozen/{img_emb,text_emb,metadata}/...    with write_frozen: the frozen CLIP embeddings, same parts and rows
      progress/rank_RRRR.json                   this rank's parts so far (after each part, and at its end) and the
                                                keys of its source pairs that could not be read, each with why (bad_keys)
      manifest.json                             the run's settings; rows, parts and bad samples once every rank
                                                has finished

``RRRR`` is the rank and ``PPPPPP`` the rank's part, zero-padded: clip-retrieval, autofaiss and
embedding-reader read the parts of a folder in sorted file-name order, and the names sort alike in every
folder, so row ``i`` of the concatenated ``img_emb`` parts, of the ``text_emb`` parts and of the
``metadata`` parts is one pair. A side the model does not refine (``refine_image``/``refine_text`` off) is
written frozen in the main folder, and the manifest says which sides are refined. A model with a novelty
gate (``known_memory``) adds a boolean column per refined side, ``image_gated`` / ``text_gated``: the rows
answered from the memory rows added after training instead of by the fusion (an image: the mean of its
added neighbours' captions; a caption: kept frozen); the finished manifest counts them (``gated``).
A model with a vote (``vote_weight`` > 0, :mod:`reco_lightning.vote`) writes its refined sides as two
blocks, ``[n, 2 dim]``; a side written frozen meets them after ``MemoryVote.lift``.

A part's files are each written to a temp name and renamed, its metadata file last: a part is complete iff
its metadata file exists. A re-run of the same command resumes: each rank keeps its complete parts,
removes what a killed run left of the next one, and has the data module skip the pairs those parts hold
(:meth:`reco_lightning.data.datamodule.ImageTextDataModule.skip_predict`); the predict stream yields a
rank's pairs in position order, so the result is the files of an uninterrupted run (the same rows; a row
whose retrieved neighbours tie exactly may keep other ones if its query batch differs in size, as a
memory's exact search breaks ties by batch size). A resume with other settings (world size, part size,
backbone, memory, k, refined sides, novelty gate, weights) is refused. The ranks exchange no data; they meet once, at
the end, so that ``reco predict`` returns when every rank is done and the manifest has the totals.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import BasePredictionWriter
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn

from reco_lightning.atomic import atomic_write_bytes, atomic_write_text
from reco_lightning.data.sources import open_source
from reco_lightning.errors import RecoError

__all__ = ["COLUMNS", "DEFAULT_PART_SIZE", "FORMAT", "EmbeddingExportError", "EmbeddingWriter"]

FORMAT = "reco-embeddings/1"
DEFAULT_PART_SIZE = 100_000  # rows per part file
#: the metadata columns, from the collated batch (clip-retrieval's ``image_path`` and ``caption`` first)
COLUMNS = ("image_path", "caption", "id", "key", "position")
_STRINGS = ("image_path", "caption", "key")
_RANK_DIGITS, _PART_DIGITS = 4, 6
_FOLDERS = {"img_emb": ".npy", "text_emb": ".npy", "metadata": ".parquet"}  # metadata last: the marker
_PART = re.compile(r"^(?:img_emb|text_emb|metadata)_(\d{4})_(\d{6})\.(?:npy|parquet)$")


class EmbeddingExportError(RecoError, RuntimeError):
    """An output folder that this run cannot resume (other settings, missing parts); the message says what to do."""


class EmbeddingWriter(BasePredictionWriter):
    """Writes ``predict_step``'s embeddings per rank, resumably, in clip-retrieval's layout (module docstring).

    Args:
        output_dir: the folder of ``img_emb/``, ``text_emb/``, ``metadata/`` (and ``frozen/``).
        part_size: rows per part file (the last part of each rank holds the rest).
        write_frozen: also write the frozen embeddings, in ``output_dir/frozen`` (same parts, same rows).
        keep_predictions: let Lightning keep every batch's outputs in RAM as well (what ``trainer.predict``
            returns); off by default, since ``reco predict`` has no trainer flag to turn that off.
    """

    def __init__(
        self,
        output_dir: str,
        part_size: int = DEFAULT_PART_SIZE,
        write_frozen: bool = False,
        keep_predictions: bool = False,
    ) -> None:
        super().__init__(write_interval="batch")
        if part_size < 1:
            raise ValueError(f"EmbeddingWriter part_size must be at least 1, got {part_size}")
        self.output_dir, self.part_size = Path(output_dir), int(part_size)
        self.write_frozen, self.keep_predictions = bool(write_frozen), bool(keep_predictions)
        self._reset(rank=0, world_size=1)

    def _reset(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size
        self._part_rows: list[int] = []  # rows of this rank's complete parts, in order
        self._last_position: int | None = None
        self._buffer: list[dict[str, Any]] = []
        self._buffered = 0
        self._plan: dict[str, Any] | None = None  # set once the run's settings are checked (see _begin)
        self._bad_keys: list[str] = []  # this rank's source pairs that could not be read (not exported)
        self._datamodule: Any = None

    # --- where things go --------------------------------------------------------------------------------
    def _roots(self) -> list[Path]:
        return [self.output_dir, self.output_dir / "frozen"] if self.write_frozen else [self.output_dir]

    def part_name(self, part: int) -> str:
        """``RRRR_PPPPPP``: rank then part, zero-padded, so that every folder sorts its parts alike."""
        if part >= 10**_PART_DIGITS:
            raise EmbeddingExportError(
                f"{self.output_dir}: rank {self.rank} would write more than {10**_PART_DIGITS - 1} parts: set a "
                f"larger part_size than {self.part_size}"
            )
        return f"{self.rank:0{_RANK_DIGITS}d}_{part:0{_PART_DIGITS}d}"

    def _path(self, root: Path, folder: str, name: str) -> Path:
        return root / folder / f"{folder}_{name}{_FOLDERS[folder]}"

    @property
    def manifest_path(self) -> Path:
        return self.output_dir / "manifest.json"

    def _progress_path(self, rank: int) -> Path:
        return self.output_dir / "progress" / f"rank_{rank:0{_RANK_DIGITS}d}.json"

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Ctrl-C: Lightning exits with status 1 after this; say that the rows written so far are kept."""
        if isinstance(exception, KeyboardInterrupt) and trainer.is_global_zero:
            sys.stderr.write(
                f"reco: interrupted; re-run the same command to resume ({self.output_dir}'s written rows are kept)\n"
            )

    # --- setup: resume point ----------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "predict":
            return
        if not self.keep_predictions:
            trainer.predict_loop.return_predictions = False  # the rows are on disk; do not hold them in RAM
        # our stream is not a sampler's: its rows' positions travel in the batch instead
        warnings.filterwarnings("ignore", message="Couldn't infer the batch indices fetched")
        self._reset(trainer.global_rank, trainer.world_size)
        manifest = self._read_manifest()
        if self._any_parts():
            if manifest is None:
                raise EmbeddingExportError(
                    f"{self.output_dir} holds embedding parts but no manifest.json, so this run cannot tell "
                    "whether they are its own: give another output_dir, or delete that folder to start over"
                )
            self._check(
                manifest.get("plan", {}),
                {
                    "world_size": self.world_size,
                    "part_size": self.part_size,
                    "write_frozen": self.write_frozen,
                },
            )
        for root in self._roots():
            for folder in _FOLDERS:
                (root / folder).mkdir(parents=True, exist_ok=True)
        self._read_own_parts()
        datamodule = self._datamodule = trainer.datamodule
        if hasattr(datamodule, "skip_predict"):
            datamodule.skip_predict(self._last_position)
        elif self._last_position is not None:
            raise EmbeddingExportError(
                f"{self.output_dir} holds {sum(self._part_rows)} rows of rank {self.rank}, but the predict data "
                "cannot skip them (it has no skip_predict, as ImageTextDataModule has): give another output_dir"
            )
        finished = manifest is not None and bool(manifest.get("complete"))
        if finished:
            # a finished export run again: nothing is re-read (Lightning would call the empty stream a mistake)
            warnings.filterwarnings("ignore", message="Total length of .* across ranks is zero")
        if self._part_rows:
            previous = self._progress_path(self.rank)  # bad samples before the resume point are not re-read
            if previous.is_file():
                self._bad_keys = list(json.loads(previous.read_text()).get("bad_keys", []))
            if not finished:
                rank_zero_info(
                    f"{self.output_dir}: resuming; rank {self.rank} has {sum(self._part_rows)} rows in "
                    f"{len(self._part_rows)} parts (through source position {self._last_position})"
                )
        else:
            self._progress_path(self.rank).unlink(missing_ok=True)

    def _read_manifest(self) -> dict[str, Any] | None:
        if not self.manifest_path.is_file():
            return None
        return json.loads(self.manifest_path.read_text())

    def _any_parts(self) -> bool:
        return any(_PART.match(p.name) for p in (self.output_dir / "metadata").glob("metadata_*.parquet"))

    def _read_own_parts(self) -> None:
        """This rank's complete parts (rows, last position); what a killed run left beyond them is removed."""
        import pyarrow.parquet as pq

        prefix = f"{self.rank:0{_RANK_DIGITS}d}_"
        done = sorted(
            int(m.group(2))
            for p in (self.output_dir / "metadata").glob(f"metadata_{prefix}*.parquet")
            if (m := _PART.match(p.name))
        )
        if done != list(range(len(done))):
            missing = sorted(set(range(done[-1] + 1)) - set(done))
            raise EmbeddingExportError(
                f"{self.output_dir}: rank {self.rank}'s parts {missing} are missing (deleted?) while later ones "
                "exist; delete that folder to start over"
            )
        for part in done:
            name = self.part_name(part)
            for root in self._roots():
                for folder in _FOLDERS:
                    if not self._path(root, folder, name).is_file():
                        raise EmbeddingExportError(
                            f"{self.output_dir}: part {name} has metadata but no "
                            f"{self._path(root, folder, name)} (deleted?); delete that folder to start over"
                        )
            self._part_rows.append(
                pq.ParquetFile(self._path(self.output_dir, "metadata", name)).metadata.num_rows
            )
        if done:
            last = self._path(self.output_dir, "metadata", self.part_name(done[-1]))
            positions = pq.read_table(last, columns=["position"]).column("position").to_pylist()
            self._last_position = max(positions) if positions else None
        for root in (self.output_dir, self.output_dir / "frozen"):  # the next part, half-written by a kill
            for folder in _FOLDERS:
                directory = root / folder
                if not directory.is_dir():
                    continue
                for path in directory.iterdir():
                    match = _PART.match(path.name)
                    own = match is not None and int(match.group(1)) == self.rank
                    if (own and int(match.group(2)) >= len(done)) or (
                        path.name.startswith(f".{folder}_{prefix}") and path.name.endswith(".tmp")
                    ):
                        path.unlink(missing_ok=True)

    # --- the run's settings -----------------------------------------------------------------------------
    def _plan_of(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """(what must match for a resume, what is only recorded) for this run."""
        hparams = getattr(pl_module, "hparams", {})
        backbone = getattr(getattr(pl_module, "backbone", None), "fingerprint", None)
        retriever = getattr(pl_module, "retriever", None)
        memory = getattr(retriever, "memory", None)
        weights = hashlib.sha256()
        for name, parameter in pl_module.named_parameters():
            if parameter.requires_grad:  # the trained part (RecoModule: the fusions and the temperature)
                weights.update(name.encode())
                weights.update(parameter.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        plan = {
            "world_size": self.world_size,
            "part_size": self.part_size,
            "write_frozen": self.write_frozen,
            "refined": {
                "image": bool(hparams.get("refine_image", True)),
                "text": bool(hparams.get("refine_text", True)),
            },
            "backbone": backbone.get("id") if isinstance(backbone, dict) else None,
            "memory": getattr(memory, "identity", None),
            "k": hparams.get("k"),
            "mask_retrieved": bool(hparams.get("mask_retrieved", False)),
            "weights_sha256": weights.hexdigest()[:16],
            "novelty": _novelty_plan(hparams, retriever),
            "vote": _vote_plan(retriever),
        }
        memory_path = getattr(memory, "path", None) or hparams.get("memory")
        data = getattr(getattr(trainer, "datamodule", None), "hparams", None) or {}
        source = data.get("predict") or data.get("train")
        if data.get("predict") is not None:  # the rows' source, by content: no other resumes these parts
            pairs = open_source(
                source,
                data.get("image_column", "filepath"),
                data.get("caption_column", "caption"),
                data.get("id_column"),
            )
            plan["source"] = pairs.fingerprint()
        info = {
            "backbone_fingerprint": backbone,
            "memory_path": None if memory_path is None else str(memory_path),
            "source": None if source is None else str(source),
        }
        return plan, info

    def _check(self, recorded: dict[str, Any], current: dict[str, Any]) -> None:
        differ = [key for key in current if recorded.get(key) != current[key]]
        if differ:
            changes = ", ".join(f"{key} {recorded.get(key)!r} -> {current[key]!r}" for key in differ)
            raise EmbeddingExportError(
                f"{self.output_dir} holds embeddings written with other settings ({changes}): re-run with the "
                "original settings to resume, or give another output_dir (or delete that folder) to start over"
            )

    def _begin(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check this run's settings against the parts on disk (weights are restored by now); record them."""
        if self._plan is not None:
            return
        plan, info = self._plan_of(trainer, pl_module)
        manifest = self._read_manifest()
        if manifest is not None and self._any_parts():
            self._check(manifest.get("plan", {}), plan)
        if manifest is not None and manifest.get(
            "complete"
        ):  # the same settings and source: nothing to write
            rank_zero_info(
                f"{self.output_dir}: already complete ({manifest.get('rows')} rows), nothing to redo; delete "
                "it or give another output_dir to export again"
            )
        if manifest is None or manifest.get("plan") != plan:  # else: left as it is (another rank may be done)
            layout = {
                folder: f"{folder}/{folder}_{{rank:0{_RANK_DIGITS}d}}_{{part:0{_PART_DIGITS}d}}{suffix}"
                for folder, suffix in _FOLDERS.items()
            }
            manifest = {
                "format": FORMAT,
                "complete": False,
                "plan": plan,
                **info,
                "layout": layout,
                "frozen": "frozen" if self.write_frozen else None,  # the same layout under it
                "columns": [*COLUMNS, *_gated_columns(plan)],
            }
            atomic_write_text(self.manifest_path, json.dumps(manifest, indent=2) + "\n")
        self._plan = plan

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._begin(trainer, pl_module)

    # --- rows -------------------------------------------------------------------------------------------
    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        rows = int(prediction["image_emb"].shape[0])
        if rows == 0:  # every sample of the batch was bad
            return
        assert self._plan is not None
        missing = [c for c in COLUMNS if c not in batch]
        if missing:
            raise EmbeddingExportError(
                f"EmbeddingWriter needs the batch's {missing} (ImageTextDataModule's predict batches carry them)"
            )
        chunk: dict[str, Any] = {}
        for side, key in (("image", "img_emb"), ("text", "text_emb")):
            frozen = prediction[f"{side}_emb"]
            if self._plan["refined"][side]:
                if f"{side}_emb_refined" not in prediction:
                    raise EmbeddingExportError(
                        f"the model refines {side}s but predict_step returned no {side}_emb_refined"
                    )
                chunk[key] = _unit_fp16(prediction[f"{side}_emb_refined"])
            else:
                chunk[key] = _unit_fp16(frozen)
            if self.write_frozen:
                chunk[f"frozen_{key}"] = _unit_fp16(frozen)
        for column in _gated_columns(self._plan):
            if column not in prediction:
                raise EmbeddingExportError(
                    f"the model has a novelty gate but predict_step returned no {column} (RecoModule's does)"
                )
            chunk[column] = prediction[column].detach().to("cpu", torch.bool).numpy()
        for column in COLUMNS:
            value = batch[column]
            value = value.tolist() if isinstance(value, torch.Tensor) else list(value)
            if len(value) != rows:
                raise EmbeddingExportError(
                    f"batch {column} has {len(value)} entries for {rows} embedding rows"
                )
            chunk[column] = value
        self._buffer.append(chunk)
        self._buffered += rows
        while self._buffered >= self.part_size:
            self._flush(self.part_size)

    def _flush(self, rows: int) -> None:
        """Write the first ``rows`` buffered rows as this rank's next part; keep the rest."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        joined = {
            key: np.concatenate([c[key] for c in self._buffer])
            if isinstance(self._buffer[0][key], np.ndarray)
            else [v for c in self._buffer for v in c[key]]
            for key in self._buffer[0]
        }
        part = {key: value[:rows] for key, value in joined.items()}
        rest = {key: value[rows:] for key, value in joined.items()}
        self._buffered -= rows
        self._buffer = [rest] if self._buffered else []

        name = self.part_name(len(self._part_rows))
        columns = {c: pa.array(part[c], type=pa.string() if c in _STRINGS else pa.int64()) for c in COLUMNS}
        columns.update({c: pa.array(part[c], type=pa.bool_()) for c in _gated_columns(self._plan)})
        table = pa.table(columns)
        sink = io.BytesIO()
        pq.write_table(table, sink)
        metadata = sink.getvalue()
        roots = [(self.output_dir, "")] + (
            [(self.output_dir / "frozen", "frozen_")] if self.write_frozen else []
        )
        for root, prefix in reversed(roots):  # the main metadata file last: it marks the part complete
            for folder in ("img_emb", "text_emb"):
                atomic_write_bytes(self._path(root, folder, name), _npy_bytes(part[prefix + folder]))
            atomic_write_bytes(self._path(root, "metadata", name), metadata)
        self._part_rows.append(rows)
        self._last_position = max(part["position"])
        self._write_progress(complete=False)

    def _write_progress(self, complete: bool) -> None:
        # the bad samples the data module set aside so far: all in batches read before this point, so a
        # killed run's resume re-reads only those after it (and a key read twice is listed once)
        if hasattr(self._datamodule, "pop_bad_samples"):
            self._bad_keys = list(
                dict.fromkeys([*self._bad_keys, *self._datamodule.pop_bad_samples("predict")])
            )
        progress = {
            "rank": self.rank,
            "world_size": self.world_size,
            "complete": complete,
            "rows": sum(self._part_rows),
            "rows_per_part": self._part_rows,
            "last_position": self._last_position,
            "bad_samples": len(self._bad_keys),
            "bad_keys": self._bad_keys,
        }
        path = self._progress_path(self.rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(progress) + "\n")

    # --- the end of this rank -----------------------------------------------------------------------------
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """After a successful predict (also one with nothing left to do on this rank): the last part, the
        rank's progress marked complete, then, once every rank is there, the manifest's totals.

        Every rank of a successful run gets here, so the ranks meet once (a rank done early would otherwise
        leave ``reco predict`` while the others still write). A failed or killed run never gets here: its
        buffered rows are dropped and redone on resume, so the parts stay those of an uninterrupted run.
        """
        if stage != "predict":
            return
        self._begin(trainer, pl_module)
        if self._buffered:
            self._flush(self._buffered)
        self._write_progress(complete=True)
        trainer.strategy.barrier("EmbeddingWriter")
        if trainer.global_rank == 0:
            self._finish_manifest()

    def _finish_manifest(self) -> None:
        """The totals of every rank's parts, from their progress files."""
        ranks, bad_keys = [], []
        for rank in range(self.world_size):
            path = self._progress_path(rank)
            progress = json.loads(path.read_text()) if path.is_file() else {}
            if not progress.get("complete"):
                raise EmbeddingExportError(
                    f"{self.output_dir}: rank {rank} ended without finishing its parts"
                )
            bad_keys.extend(progress.get("bad_keys", []))
            ranks.append(
                {
                    "rank": rank,
                    "rows": progress["rows"],
                    "rows_per_part": progress["rows_per_part"],
                    "bad_samples": progress.get("bad_samples", 0),
                }
            )
        manifest = self._read_manifest() or {}
        manifest.update(
            complete=True,
            rows=sum(r["rows"] for r in ranks),
            parts=sum(len(r["rows_per_part"]) for r in ranks),
            bad_samples=sum(r["bad_samples"] for r in ranks),
            ranks=ranks,
        )
        gated = self._count_gated(manifest.get("plan", {}))
        if gated:
            manifest["gated"] = gated
        atomic_write_text(self.manifest_path, json.dumps(manifest, indent=2) + "\n")
        rank_zero_info(f"{self.output_dir}: {manifest['rows']} rows in {manifest['parts']} parts per folder")
        if gated:
            counts = ", ".join(f"{n} {side}s" for side, n in gated.items())
            rank_zero_info(
                f"{self.output_dir}: the novelty gate answered {counts} of {manifest['rows']} rows from the memory "
                "rows added after training (metadata columns image_gated / text_gated)"
            )
        if manifest["bad_samples"]:
            first = bad_keys[:3]
            message = (
                f"{manifest['bad_samples']} source pairs could not be read (an image missing or unreadable, or "
                f"an empty caption; a key is a shard's member or a CSV's file:row, data rows from 0), e.g. "
                f"{', '.join(first)}; "
                "every key is in progress/rank_*.json (bad_keys). Relative image paths are read from the "
                "CSV's own folder"
            )
            if not manifest["rows"]:
                raise EmbeddingExportError(f"{self.output_dir}: nothing was written: {message}")
            rank_zero_warn(f"{self.output_dir}: {message}; the others are written")

    def _count_gated(self, plan: dict[str, Any]) -> dict[str, int]:
        """Rows per side that the novelty gate answered, over every rank's parts (their metadata columns)."""
        import pyarrow.parquet as pq

        columns = _gated_columns(plan)
        if not columns:
            return {}
        counts = dict.fromkeys(columns, 0)
        for path in sorted((self.output_dir / "metadata").glob("metadata_*.parquet")):
            if _PART.match(path.name):
                table = pq.read_table(path, columns=columns)
                for column in columns:
                    counts[column] += int(np.asarray(table.column(column).to_numpy(), dtype=bool).sum())
        return {column.removesuffix("_gated"): n for column, n in counts.items()}


def _novelty_plan(hparams: Any, retriever: Any) -> dict[str, Any] | None:
    """The novelty gate's settings, part of what a resume must match; None without a gate."""
    if getattr(retriever, "novelty", None) is None or hparams.get("mask_retrieved", False):
        return None
    return {
        "known_memory": hparams.get("known_memory"),
        "threshold": hparams.get("novelty_threshold"),
        "share_quantile": hparams.get("novelty_share_quantile"),
        "gap": hparams.get("novelty_gap"),
        "whiten": hparams.get("novelty_whiten"),
    }


def _vote_plan(retriever: Any) -> dict[str, float] | None:
    """The memory's vote (its weight, ridge and temperature: they set what the refined rows are and their
    width), part of what a resume must match; None without a vote."""
    vote = getattr(retriever, "vote", None)
    if vote is None:
        return None
    plan = {"weight": vote.weight, "whiten": vote.whitening.ridge}
    if vote.temperature is not None:  # absent for a plain mean: manifests written before it still match
        plan["temperature"] = vote.temperature
    return plan


def _gated_columns(plan: dict[str, Any]) -> list[str]:
    """The metadata's gate columns: one per refined side, with a novelty gate."""
    if not plan.get("novelty"):
        return []
    return [f"{side}_gated" for side in ("image", "text") if plan.get("refined", {}).get(side)]


def _unit_fp16(embeddings: torch.Tensor) -> np.ndarray:
    return F.normalize(embeddings.detach().float(), dim=-1).to("cpu", torch.float16).numpy()


def _npy_bytes(array: np.ndarray) -> bytes:
    sink = io.BytesIO()
    np.save(sink, np.ascontiguousarray(array))
    return sink.getvalue()
