"""The `reco` command: LightningCLI for fit/validate/test/predict, plus memory and setup commands.

reco fit --config configs/tiny.yaml
reco predict --config run.yaml --ckpt_path best.ckpt --data.init_args.predict pairs.csv --output_dir emb/
reco export --ckpt_path best.ckpt --out export/
reco memory build --source pairs.csv --out mem --backbone DIR [--backend ivfpq ...]
reco memory concat A B --out C
reco memory info DIR
reco prepare-tiny --out artifacts/tiny
reco calibrate --config run.yaml --parameter mix_alpha --dataset.name val --dataset.root DIR --out cal.json
reco demo [--protocol open|strict] [--split tops|shoes|look-alikes]

Errors of ours (a RecoError, or a ValueError/RuntimeError raised by this package's code, or a missing
file) print one line, ``reco: error: ...``, and exit with status 1; ``RECO_DEBUG=1`` shows the traceback.
From a shell, the known-harmless noise of Lightning and transformers is filtered (reco_lightning.console);
``RECO_DEBUG=1`` or ``--verbose`` shows everything.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Any, NoReturn

from jsonargparse import ArgumentParser
from pytorch_lightning.callbacks import BasePredictionWriter
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_only

from reco_lightning.console import quiet_console, verbose
from reco_lightning.data.datamodule import ImageTextDataModule
from reco_lightning.errors import MissingInputError, RecoError, RecoMemoryError
from reco_lightning.export import read_checkpoint
from reco_lightning.model import RecoModule
from reco_lightning.prediction import DEFAULT_PART_SIZE, EmbeddingWriter

__all__ = ["NoPredictionWriterError", "RecoCLI", "leave_process_group", "main"]


class SettingsError(RecoError, argparse.ArgumentError):
    """An option or config key the command's parser rejects (unknown, or of the wrong type)."""

    def __init__(self, message: str) -> None:
        super().__init__(None, _settings_message(message))


def _settings_message(message: str) -> str:
    """jsonargparse's message on one line; for a class's options (``data.init_args.*``), whose message lists
    every union member tried, the key and the option it did not accept."""
    lines = [line.strip(" -") for line in message.splitlines() if line.strip(" -")]
    if not lines:
        return "invalid settings"
    specific = next((line for line in lines if "is not accepted" in line), None)
    if lines[0].startswith("Parser key") and specific:
        return f"{lines[0].rstrip(':')}: {specific}"
    return "; ".join(line.rstrip(":") if i == 0 else line for i, line in enumerate(lines))


class _OneLineErrors:
    """A parser mixin: a rejected option raises :class:`SettingsError` (one line from ``reco``) instead of
    printing the whole usage text (80 lines for ``reco fit``) above the line that says what is wrong.
    Where jsonargparse itself asks for an exception (``exit_on_error`` off, while it tries alternatives) it
    gets its own, as before."""

    exit_on_error: bool

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if isinstance(ex, SettingsError):  # a subcommand's, passed up by its parent parser
            raise ex
        if not self.exit_on_error:
            super().error(message, ex)  # type: ignore[misc]
        raise SettingsError(message) from ex


class RecoArgumentParser(_OneLineErrors, LightningArgumentParser):
    """The parser of ``reco fit|validate|test|predict``."""


class CommandParser(_OneLineErrors, ArgumentParser):
    """The parser of the other ``reco`` commands (``memory``, ``export``, ``calibrate``, ``cache``)."""


class NoPredictionWriterError(RecoError, ValueError):
    """``reco predict`` with nothing to write its predictions: they would be computed and thrown away."""


# Settings that belong to the run, not to the trained weights: with --ckpt_path, LightningCLI would take
# them from the checkpoint's hyper-parameters and silently undo a backbone move or a memory swap asked for
# in the config. The run's value is used; the backbone is then checked against the checkpoint's.
INFERENCE_SETTINGS = (
    "backbone",
    "memory",
    "memory_search_params",
    "memory_device",
    "k",
    "refine_image",
    "refine_text",
    "vote_weight",  # the memory's vote: no trained weights, chosen per deployment (reco_lightning.vote)
    "vote_whiten",
    "vote_temperature",
)


class RecoCLI(LightningCLI):
    """LightningCLI with the data module's backbone tied to the model's, and the run's inference settings kept."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.backbone", "data.init_args.backbone")

    def _prepare_subcommand_parser(
        self, klass: type, subcommand: str, **kwargs: Any
    ) -> LightningArgumentParser:
        """Checkpoints load with ``weights_only=True`` (no pickle runs); ``reco predict`` takes its output folder."""
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if "weights_only" in self._subcommand_method_arguments[subcommand]:
            parser.set_defaults(weights_only=True)
        if "verbose" in self._subcommand_method_arguments[subcommand] and not verbose():
            # Lightning's metrics table truncates the zero-shot metric names: the evaluation's own report
            # (and after_test's line) say it readably; `--verbose true` brings the table back
            parser.set_defaults(verbose=False)
        if subcommand == "predict":
            parser.add_argument(
                "--output_dir",
                type=str | None,
                default=None,
                help="write the embeddings here, in clip-retrieval's layout (adds an EmbeddingWriter)",
            )
            parser.add_argument("--part_size", type=int, default=DEFAULT_PART_SIZE, help="rows per part file")
            parser.add_argument(
                "--write_frozen",
                type=bool,
                default=False,
                help="also write the frozen embeddings (output_dir/frozen)",
            )
        return parser

    def after_fit(self) -> None:
        """Name the checkpoint the run wrote: each run is a new ``version_N`` folder, so a path copied from
        the docs may be an older run's."""
        callback = self.trainer.checkpoint_callback
        if callback is None or not self.trainer.is_global_zero or not _ANNOUNCE_CHECKPOINT.get():
            return
        best, last = callback.best_model_path, callback.last_model_path
        if best and last and best != last:
            monitor = f" by {callback.monitor}" if callback.monitor else ""
            print(
                f"checkpoint: {last} (last; best{monitor}: {best}); share one: reco export --ckpt_path PATH --out DIR"
            )
        elif best or last:
            print(
                f"checkpoint: {best or last} (to share it: reco export --ckpt_path {best or last} --out DIR)"
            )

    def after_validate(self) -> None:
        self._print_metrics("validate")

    def after_test(self) -> None:
        self._print_metrics("test")

    def _print_metrics(self, stage: str) -> None:
        """One line of the run's own metrics (loss and such; the zero-shot ones are in its report)."""
        if self.config_init[stage].get("verbose") or not self.trainer.is_global_zero:
            return
        metrics = {
            k: float(v) for k, v in self.trainer.callback_metrics.items() if not k.startswith("zeroshot/")
        }
        if metrics:
            shown = ", ".join(f"{key} {value:.4g}" for key, value in sorted(metrics.items()))
            where = f" (logs: {self.trainer.log_dir})" if self.trainer.log_dir else ""
            print(f"{stage}: {shown}{where}")

    def before_predict(self) -> None:
        """Add the writer ``--output_dir`` asks for; refuse a run whose predictions nothing would write."""
        config = self.config_init["predict"]
        if config.get("output_dir"):
            self.trainer.callbacks.append(
                EmbeddingWriter(
                    config["output_dir"], part_size=config["part_size"], write_frozen=config["write_frozen"]
                )
            )
        if not any(isinstance(c, BasePredictionWriter) for c in self.trainer.callbacks):
            raise NoPredictionWriterError(
                "reco predict has nowhere to write its embeddings: add --output_dir DIR (clip-retrieval's layout), "
                "or a BasePredictionWriter under trainer.callbacks in the config"
            )

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and Path(ckpt_path).is_file():
            read_checkpoint(
                ckpt_path
            )  # one clear line for a pickle, a foreign or a broken file; never unpickled
        model = self.config[subcommand].get("model") if subcommand else None
        requested = {key: model.get(key) for key in INFERENCE_SETTINGS} if model is not None else {}
        super()._parse_ckpt_path()
        if not requested:
            return
        config = self.config[subcommand]
        for key, value in requested.items():
            if key == "backbone" and value is None:
                continue  # none given: the checkpoint's
            trained = config["model"].get(key)
            if trained != value:
                rank_zero_info(f"model.{key}={value!r} replaces the checkpoint's {trained!r}")
            config["model"][key] = value
        data = config.get("data")
        if data is not None and data.get("init_args") is not None and "backbone" in data["init_args"]:
            data["init_args"]["backbone"] = config["model"]["backbone"]  # the link ran before the ckpt merge

    def after_instantiate_classes(self) -> None:
        """Refuse a checkpoint trained on another backbone now, before any memory or data is opened."""
        super().after_instantiate_classes()
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and Path(ckpt_path).is_file() and isinstance(self.model, RecoModule):
            checkpoint = read_checkpoint(ckpt_path)
            # The module's own check (and message): the same one Lightning runs when it restores the weights.
            self.model.on_load_checkpoint(
                {"reco_backbone": checkpoint.get("reco_backbone"), "state_dict": {}}
            )


def lightning_main(args: Sequence[str] | None = None, run: bool = True) -> RecoCLI:
    return RecoCLI(
        RecoModule,
        ImageTextDataModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=list(args) if args is not None else None,
        run=run,
        parser_class=RecoArgumentParser,
    )


def _modalities(choice: str) -> tuple[str, ...]:
    if choice not in ("image", "text", "both"):
        raise RecoMemoryError(f"--modality {choice!r}: use image, text or both")
    return ("image", "text") if choice == "both" else (choice,)


def memory_main(args: Sequence[str]) -> None:
    from reco_lightning.jobs.memory_build import build_memory
    from reco_lightning.memory.base import DEFAULT_TRAIN_SIZE
    from reco_lightning.memory.interop import export_memory, import_embeddings
    from reco_lightning.memory.reindex import adopt_index, index_memory
    from reco_lightning.memory.store import MemoryStore
    from reco_lightning.memory.tuning import tune_memory

    parser = CommandParser(prog="reco memory", description="Build, combine and inspect RECO memories.")
    commands = parser.add_subcommands()

    build = CommandParser(description="Encode an image-text source into a memory (resumable).")
    build.add_argument("--config", action="config")
    build.add_argument(
        "--source",
        required=True,
        help="CSV/TSV (filepath,caption[,id]), an image folder with .txt captions, a folder of webdataset "
        "shards or a brace pattern 'shards/{00000..00099}.tar'",
    )
    build.add_argument("--out", required=True, help="memory directory to create")
    build.add_argument("--backbone", required=True, help="CLIP hub name or local directory")
    build.add_argument(
        "--backend",
        type=Any,
        default="exact",
        help="a backend name (exact, exact_mmap, torch_exact, ivfpq, ivfpq_ondisk, autofaiss), a class path, "
        "or {class_path, init_args}, e.g. '{class_path: ivfpq, init_args: {m: 16}}'",
    )
    build.add_argument("--batch_size", type=int, default=256)
    build.add_argument(
        "--num_workers",
        type=int | None,
        default=None,
        help="DataLoader workers per device (default: 0 when encoding on CPU, else min(8, CPUs // devices))",
    )
    build.add_argument(
        "--precision",
        default="32-true",
        help="Trainer precision of the encoding pass: 32-true, 16-mixed, bf16-mixed, ... "
        "(embeddings are stored fp16 either way)",
    )
    build.add_argument("--chunk_size", type=int, default=100_000)
    build.add_argument("--train_size", type=int, default=DEFAULT_TRAIN_SIZE)
    build.add_argument("--image_column", default="filepath")
    build.add_argument("--caption_column", default="caption")
    build.add_argument("--id_column", type=str | None, default=None)
    build.add_argument("--accelerator", default="auto")
    build.add_argument("--devices", type=Any, default="auto")
    build.add_argument("--overwrite", type=bool, default=False)
    commands.add_subcommand("build", build)

    concat = CommandParser(description="Concatenate memories built with one backbone, without re-encoding.")
    concat.add_argument("paths", nargs="+")
    concat.add_argument("--out", required=True)
    concat.add_argument("--backend", type=Any, default=None)
    concat.add_argument("--overwrite", type=bool, default=False)
    commands.add_subcommand("concat", concat)

    imp = CommandParser(
        description="Make a memory from clip-retrieval embeddings (img_emb/, text_emb/, metadata/)."
    )
    imp.add_argument("src", help="folder of img_emb/, text_emb/ and metadata/ parts")
    imp.add_argument("--out", required=True, help="memory directory to create")
    imp.add_argument(
        "--backbone",
        required=True,
        help="the CLIP that encoded the embeddings (verified by re-encoding a sample, see --verify; else declared)",
    )
    imp.add_argument("--backend", type=Any, default="exact")
    imp.add_argument("--train_size", type=int, default=DEFAULT_TRAIN_SIZE)
    imp.add_argument(
        "--id_column", type=str | None, default=None, help="metadata column of unique integer ids"
    )
    imp.add_argument("--caption_column", default="caption")
    imp.add_argument("--key_column", type=str | None, default=None)
    imp.add_argument(
        "--verify",
        type=bool | None,
        default=None,
        help="re-encode a sample of captions (and images found) with the backbone and refuse rows that do not "
        "match; default: when the backbone is a local directory (true: also load a hub name; false: never)",
    )
    imp.add_argument("--image_root", type=str | None, default=None, help="where relative image keys live")
    imp.add_argument("--overwrite", type=bool, default=False)
    commands.add_subcommand("import", imp)

    export = CommandParser(description="Write a memory in clip-retrieval's layout (fp16 parts).")
    export.add_argument("memory")
    export.add_argument("--out", required=True)
    export.add_argument("--part_size", type=int, default=1_000_000)
    commands.add_subcommand("export", export)

    index = CommandParser(
        description="Re-index a memory's rows without re-encoding; 'ivfpq_ondisk' builds in stages and shards "
        "(train once, one process per shard, merge once)."
    )
    index.add_argument("memory")
    index.add_argument(
        "--backend",
        type=Any,
        default=None,
        help="default: 'ivfpq_ondisk' to build (shard / merge: the train stage's), 'autofaiss' (any faiss index) "
        "to adopt --image_index/--text_index",
    )
    index.add_argument("--stage", default="all", help="all | train | shard | merge")
    index.add_argument(
        "--shard",
        type=int | None,
        default=None,
        help="the shard this process builds (default: every missing one)",
    )
    index.add_argument(
        "--num_shards",
        type=int | None,
        default=None,
        help="default: one per 2M rows (shard / merge: the train stage's)",
    )
    index.add_argument("--modality", default="both", help="image | text | both")
    index.add_argument("--train_size", type=int, default=DEFAULT_TRAIN_SIZE)
    index.add_argument(
        "--image_index",
        type=str | None,
        default=None,
        help="adopt this faiss index file (built elsewhere over the memory's image rows, in order) instead",
    )
    index.add_argument("--text_index", type=str | None, default=None, help="the same for the text rows")
    commands.add_subcommand("index", index)

    tune = CommandParser(
        description="Set an IVF-PQ memory's nprobe and rerank to the fastest reaching a recall@k target, measured "
        "on its own rows against exact search (search-time only: nothing is rebuilt)."
    )
    tune.add_argument("memory")
    tune.add_argument("--recall", type=float, default=0.98, help="recall@k target")
    tune.add_argument("--k", type=int, default=10)
    tune.add_argument("--queries", type=int, default=1000, help="memory rows sampled as queries")
    tune.add_argument("--modality", default="both", help="image | text | both")
    commands.add_subcommand("tune", tune)

    info = CommandParser(description="Print a memory's manifest and sizes.")
    info.add_argument("path")
    commands.add_subcommand("info", info)

    cfg = parser.parse_args(list(args))
    sub = cfg.subcommand
    c = cfg[sub]
    if sub == "build":
        out = build_memory(
            c.source,
            c.out,
            backbone=c.backbone,
            backend=_plain(c.backend),
            batch_size=c.batch_size,
            num_workers=c.num_workers,
            chunk_size=c.chunk_size,
            train_size=c.train_size,
            image_column=c.image_column,
            caption_column=c.caption_column,
            id_column=c.id_column,
            trainer_kwargs={"accelerator": c.accelerator, "devices": c.devices},
            overwrite=c.overwrite,
            precision=c.precision,
        )
        if rank_zero_only.rank == 0:  # every rank of a multi-device build runs this command
            print(build_summary(out))
    elif sub == "concat":
        out = MemoryStore.concat(c.paths, c.out, backend=_plain(c.backend), overwrite=c.overwrite)
        print(f"memory written to {out}")
    elif sub == "import":
        out = import_embeddings(
            c.src,
            c.out,
            backbone=c.backbone,
            backend=_plain(c.backend),
            train_size=c.train_size,
            id_column=c.id_column,
            caption_column=c.caption_column,
            key_column=c.key_column,
            overwrite=c.overwrite,
            verify=c.verify,
            image_root=c.image_root,
        )
        manifest = json.loads((Path(out) / "manifest.json").read_text())
        fixed = manifest["normalised_rows"]
        print(
            f"memory written to {out}: {manifest['count']} rows from {manifest['imported_parts']} parts, "
            f"{fixed['image']} image and {fixed['text']} text rows normalised, backbone {c.backbone} "
            + (
                f"verified ({verified})"
                if (verified := manifest["fingerprint"].get("verified"))
                else "declared (not verified)"
            )
        )
    elif sub == "tune":
        results = tune_memory(
            c.memory, target=c.recall, modalities=_modalities(c.modality), k=c.k, n_queries=c.queries
        )
        for modality, r in results.items():
            status = "reached" if r["reached"] else "NOT reached (most accurate setting kept)"
            print(
                f"{modality}: nprobe {r['nprobe']}, rerank {r['rerank']}: recall@{r['k']} {r['recall']:.3f} on "
                f"{r['queries']} rows, target {r['target']} {status}"
            )
    elif sub == "index" and (c.image_index or c.text_index):
        files = {m: p for m, p in (("image", c.image_index), ("text", c.text_index)) if p}
        done = adopt_index(c.memory, files, backend=_plain(c.backend or "autofaiss"))
        print(
            f"memory {c.memory}: adopted {', '.join(done['adopted'])} index as {done['backend']['class_path']}"
        )
    elif sub == "index":
        done = index_memory(
            c.memory,
            backend=_plain(c.backend) if c.backend else None,  # shard / merge: the train stage's
            stage=c.stage,
            shard=c.shard,
            num_shards=c.num_shards,
            modalities=_modalities(c.modality),
            train_size=c.train_size,
        )
        shards = {m: len(s) for m, s in done.get("shards", {}).items()}
        print(
            f"memory {c.memory}: stage {done['stage']} done for {', '.join(done['modalities'])}"
            + (f" ({shards} shards built of {done['num_shards']})" if shards else "")
        )
    elif sub == "export":
        out = export_memory(c.memory, c.out, part_size=c.part_size)
        parts = len(list((Path(out) / "metadata").glob("metadata_*.parquet")))
        print(
            f"embeddings written to {out}: {len(MemoryStore.open(c.memory, load_indexes=False))} rows in {parts} parts"
        )
    else:
        store = MemoryStore.open(c.path)
        print(json.dumps({**store.manifest, "bytes": store.nbytes()}, indent=2))


#: a build that could not read at least this share of its source says so (a wrong column or image root)
BAD_SHARE_WARNING = 0.1


def build_summary(out: str | os.PathLike) -> str:
    """One line on a finished build: where, how many rows, how many bad samples and the first of them; a
    warning when a large share of the source was unreadable (likely a wrong column or image folder)."""
    manifest = json.loads((Path(out) / "manifest.json").read_text())
    bad, keys = manifest.get("bad_samples", 0), manifest.get("bad_keys", [])
    kinds = ", ".join(f"{n} {reason}" for reason, n in manifest.get("bad_reasons", {}).items())
    details = [part for part in (kinds, f"first: {', '.join(map(str, keys))}" if keys else "") if part]
    first = f" ({'; '.join(details)})" if bad and details else ""
    line = f"memory written to {out}: {manifest['count']} rows, {bad} bad samples skipped{first}"
    share = bad / max(manifest["count"] + bad, 1)
    if share >= BAD_SHARE_WARNING:
        line += (
            f"; warning: {100 * share:.0f}% of the source could not be read (an image missing or unreadable, "
            "or an empty caption; relative image paths are read from the CSV's own folder)"
        )
    return line


def _plain(value: Any) -> Any:
    """jsonargparse Namespaces -> dicts, so backend specs reach the registry as plain data."""
    return value.as_dict() if hasattr(value, "as_dict") else value


def _flat(items: Sequence[Any]) -> list[Any]:
    """An option given as words (``--values 0 0.5``), as a list (``--values [0, 0.5]``), or as both."""
    return [x for item in items for x in (item if isinstance(item, list) else [item])]


def export_main(args: Sequence[str]) -> None:
    """`reco export`: a checkpoint -> model.safetensors + config.json + README.md model card."""
    from reco_lightning.export import export_checkpoint

    parser = CommandParser(
        prog="reco export",
        description="Write a trained RECO as a shareable export (safetensors + JSON + model card) that "
        "RecoModel.from_pretrained loads without Lightning or pickle.",
    )
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint written by `reco fit`")
    parser.add_argument("--out", required=True, help="the export directory (replaced atomically)")
    parser.add_argument(
        "--backbone",
        type=str | None,
        default=None,
        help="where the backbone is now, if it moved since training",
    )
    parser.add_argument(
        "--report",
        type=str | None,
        default=None,
        help="zeroshot_report.json for the model card (default: the run's, beside the checkpoint)",
    )
    parser.add_argument(
        "--calibration",
        type=list[str] | str,
        nargs="*",
        default=[],
        help="outputs of `reco calibrate` to record in config.json (one or more files)",
    )
    cfg = parser.parse_args(list(args))
    out = export_checkpoint(
        cfg.ckpt_path,
        cfg.out,
        backbone=cfg.backbone,
        report=cfg.report,
        calibrations=_flat(cfg.calibration),
    )
    print(f"export written to {out}: RecoModel.from_pretrained({str(out)!r}, memory=...) loads it")


def cache_main(args: Sequence[str]) -> None:
    """Build the feature caches a config's ``data.feature_cache`` points at (train and val), if not current."""
    from pathlib import Path

    from reco_lightning.data.features import FeatureCacheError, open_feature_cache
    from reco_lightning.jobs.feature_cache import build_feature_cache, cache_requirements

    cli = lightning_main(args, run=False)
    model, data = cli.model, cli.datamodule
    root = data.hparams.feature_cache
    if not root:
        raise SystemExit("reco cache: set data.init_args.feature_cache to the directory the caches go to")
    model.setup("predict")
    trainer_kwargs = {"accelerator": cli.trainer.accelerator, "devices": cli.trainer.num_devices}
    for stage in ("train", "val"):
        source = data.hparams[stage]
        if source is None:
            continue
        out = Path(root) / stage
        try:
            columns = {key: data.hparams[key] for key in ("image_column", "caption_column", "id_column")}
            open_feature_cache(out, cache_requirements(model, source, **columns))
            print(f"{stage} feature cache {out} is current")
            continue
        except FeatureCacheError:
            pass
        build_feature_cache(
            model,
            source,
            out,
            batch_size=data.hparams.batch_size,
            num_workers=data.hparams.num_workers,
            image_column=data.hparams.image_column,
            caption_column=data.hparams.caption_column,
            id_column=data.hparams.id_column,
            trainer_kwargs={
                **trainer_kwargs,
                "enable_progress_bar": cli.trainer.progress_bar_callback is not None,
            },
        )
        print(f"{stage} feature cache written to {out}")


def calibrate_main(args: Sequence[str]) -> None:
    """`reco calibrate`: sweep mix_alpha or fusion_config.retrieved_skip on a validation classification set."""
    from reco_lightning.atomic import atomic_write_text
    from reco_lightning.calibration import DEFAULT_VALUES, PARAMETERS, calibrate, leakage_threshold_of
    from reco_lightning.evaluation import ClassificationSet

    parser = CommandParser(
        prog="reco calibrate",
        description="Pick a retrieval weight on validation data (never test data) by a stated rule; "
        "prints and writes the choice. The model section of a `reco fit` config (with --ckpt_path: the "
        "trained fusion), its memory and its ZeroShotEvaluation's leakage guard are used.",
    )
    parser.add_argument("--config", required=True, help="a `reco fit` config; its model section is used")
    parser.add_argument("--ckpt_path", default=None, help="trained fusion weights (default: untrained)")
    parser.add_argument("--memory", default=None, help="memory to calibrate with (default: the config's)")
    parser.add_argument("--parameter", required=True, choices=sorted(PARAMETERS))
    parser.add_argument(
        "--values",
        type=float | list[float],
        nargs="+",
        default=list(DEFAULT_VALUES),
        help="the weights tried: 0 0.5 1 (or a list, [0, 0.5, 1])",
    )
    parser.add_argument("--rule", default="max", choices=["max", "keep"])
    parser.add_argument("--metric", default="top1", help="top1, top5, mean_per_class_recall or top1_<group>")
    parser.add_argument("--tolerance", type=float, default=0.5, help="points the 'keep' rule may lose")
    parser.add_argument("--dataset", type=ClassificationSet, required=True, help="the validation set")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--out", required=True, help="JSON file the sweep and the choice go to")
    cfg = parser.parse_args(list(args))

    import yaml

    from reco_lightning.model import RecoModule

    config = yaml.safe_load(Path(cfg.config).read_text()) or {}
    model_args = dict(config.get("model") or {})
    if cfg.memory:
        model_args["memory"] = cfg.memory
    if cfg.ckpt_path:
        model = RecoModule.load_from_checkpoint(
            cfg.ckpt_path, map_location="cpu", weights_only=True, **model_args
        )
    else:
        model = RecoModule(**model_args)
    model.setup("validate")
    dataset = cfg.dataset if isinstance(cfg.dataset, ClassificationSet) else ClassificationSet(**cfg.dataset)
    result = calibrate(
        model,
        dataset,
        cfg.parameter,
        values=_flat(cfg["values"]),  # Namespace.values is a method
        rule=cfg.rule,
        metric=cfg.metric,
        tolerance=cfg.tolerance,
        batch_size=cfg.batch_size,
        leakage_threshold=leakage_threshold_of(config),
    )
    atomic_write_text(Path(cfg.out), json.dumps(result, indent=2) + "\n")
    sweep = ", ".join(f"{value:g}: {score:.2f}" for value, score in result["values"].items())
    print(
        f"{cfg.parameter} = {result['chosen']:g} (rule {cfg.rule} on {dataset.name} {cfg.metric}; frozen "
        f"{result['clip']:.2f}; {sweep}); written to {cfg.out}"
    )


#: whether ``reco fit`` names the checkpoint it wrote: for a person at the console, not for a pipeline
#: (``reco demo``) driving several fits through :func:`main`
_ANNOUNCE_CHECKPOINT: ContextVar[bool] = ContextVar("announce_checkpoint", default=False)


def main(
    args: Sequence[str] | None = None,
    commands: Mapping[str, Callable[[Sequence[str]], None]] | None = None,
    makers: Mapping[str, str] | None = None,
    announce: bool | None = None,
) -> None:
    """Run one `reco` command: our errors as one line on stderr, exit status 1.

    ``commands`` adds subcommands to the library's own (:data:`COMMANDS`): the apps on top of the
    library (``reco demo``, ``reco prepare-tiny``) register theirs this way, so the library never
    imports them. ``makers``: path prefix -> the command that creates what lies under it; a missing input
    under such a prefix names that command. ``announce``: ``reco fit`` ends with a ``checkpoint: PATH``
    line (default: only as the console script).
    """
    if args is None:  # the console script: a person reads this (library calls and tests see every message)
        _take_verbose_flag(sys.argv)
        quiet_console()
    announcing = _ANNOUNCE_CHECKPOINT.set(args is None if announce is None else announce)
    try:
        _dispatch(args, {**COMMANDS, **(commands or {})})
        if args is None:  # this process is the command's: its ranks end their process group together
            leave_process_group()
    except Exception as err:
        if not is_user_error(err) or os.environ.get("RECO_DEBUG", "") not in ("", "0"):
            raise
        message = one_line(err)
        if isinstance(err, SettingsError):
            message += _help_hint(sys.argv[1:] if args is None else args, message)
        if isinstance(err, MissingInputError):
            maker = next((cmd for prefix, cmd in (makers or {}).items() if _under(err.path, prefix)), None)
            message += f"; it is made by `{maker}`: run that first" if maker else ""
        sys.stderr.write(f"reco: error: {message} (RECO_DEBUG=1 shows the traceback)\n")
        raise SystemExit(1) from None
    except KeyboardInterrupt:  # Ctrl-C: what was kept, not a traceback
        if os.environ.get("RECO_DEBUG", "") not in ("", "0"):
            raise
        sys.stderr.write(f"reco: interrupted{_resume_hint(sys.argv[1:] if args is None else args)}\n")
        raise SystemExit(130) from None
    finally:
        _ANNOUNCE_CHECKPOINT.reset(announcing)


def leave_process_group(timeout_s: float = 300.0) -> None:
    """End the torch.distributed group a DDP run left behind, every rank at once, in a process that ends.

    Lightning destroys only NCCL groups at exit. A gloo group left to the interpreter's exit can abort a
    rank (SIGABRT, exit -6, after a successful run) when its peer exits first and closes their connection,
    so each rank waits for the others (at most ``timeout_s``: a rank that failed is named, not waited for
    forever), then destroys the group. No-op outside a gloo group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo":
        dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout_s))
        dist.destroy_process_group()


def _help_hint(argv: Sequence[str], message: str) -> str:
    """Where to read the options a rejected setting belongs to: the command words before the first option."""
    words = list(itertools.takewhile(lambda word: not word.startswith("-"), argv))
    if "invalid choice" in message or not words:
        return "; `reco --help` lists the commands"
    return f"; `reco {' '.join(words)} --help` lists the options"


#: commands whose re-run resumes an interrupted one (command words -> what it keeps)
_RESUMABLE = {
    ("memory", "build"): "its finished chunks",
    ("memory", "import"): "its copied parts",
    ("memory", "export"): "its written parts",
    ("memory", "index"): "an ivfpq_ondisk index's finished shards",
    ("predict",): "its written rows",
    ("cache",): "the caches' finished chunks",
}


def _resume_hint(argv: Sequence[str]) -> str:
    """For a resumable command: re-running it resumes (and what it keeps)."""
    words = tuple(itertools.takewhile(lambda word: not word.startswith("-"), argv))
    kept = next((what for command, what in _RESUMABLE.items() if words[: len(command)] == command), None)
    return f"; re-run the same command to resume ({kept} are kept)" if kept else ""


def _take_verbose_flag(argv: list[str]) -> None:
    """A bare ``--verbose`` is ours (show every message): removed from ``argv`` and passed on as RECO_VERBOSE,
    which the DDP ranks Lightning starts from ``sys.argv`` inherit. ``--verbose true|false`` is Lightning's
    own option of ``reco test`` / ``reco validate`` (its metrics table) and is left alone."""
    for i, token in enumerate(argv[1:], 1):
        following = argv[i + 1].lower() if i + 1 < len(argv) else ""
        if token == "--verbose" and following not in ("true", "false", "1", "0", "yes", "no"):
            del argv[i]
            os.environ["RECO_VERBOSE"] = "1"
            return


def _under(path: str, prefix: str) -> bool:
    return Path(path).resolve().is_relative_to(Path(prefix).resolve())


_PACKAGE_DIR = Path(__file__).resolve().parent


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` carries a message written for the user rather than a bug's traceback.

    Those are every RecoError, a missing or unreadable path, and a ValueError/RuntimeError raised by a
    ``raise`` in this package (its message was written for the user). The same types raised inside a
    library keep their traceback: they are more likely a bug than bad input.
    """
    if isinstance(err, RecoError | FileNotFoundError | PermissionError):
        return True
    if not isinstance(err, ValueError | RuntimeError):
        return False
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(_PACKAGE_DIR)


def one_line(err: BaseException) -> str:
    """The error's message on one line (multi-line messages joined with '; ')."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return "; ".join(lines) or type(err).__name__


def _dispatch(args: Sequence[str] | None, commands: Mapping[str, Callable[[Sequence[str]], None]]) -> None:
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in commands:
        commands[argv[0]](argv[1:])
    elif argv[:1] in (["-h"], ["--help"]):  # Lightning's help lists its four; say what else there is
        try:
            lightning_main(None if args is None else argv)
        finally:
            print(f"\nmore commands: {', '.join(sorted(commands))} (reco COMMAND --help)")
    else:
        lightning_main(None if args is None else argv)


#: subcommands beside LightningCLI's fit/validate/test/predict: name -> function of the remaining argv
COMMANDS: dict[str, Callable[[Sequence[str]], None]] = {
    "memory": memory_main,
    "export": export_main,
    "calibrate": calibrate_main,
    "cache": cache_main,
}


if __name__ == "__main__":
    main()
