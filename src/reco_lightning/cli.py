"""The `reco` command: LightningCLI for fit/validate/test/predict, plus memory and setup commands.

reco fit --config configs/tiny.yaml
reco memory build --source pairs.csv --out mem --backbone DIR [--backend ivfpq ...]
reco memory concat A B --out C
reco memory info DIR
reco prepare-tiny --out artifacts/tiny
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from reco_lightning.data.pairs import ImageTextDataModule
from reco_lightning.model import RecoModule

__all__ = ["RecoCLI", "main"]


# Settings that belong to the run, not to the trained weights: with --ckpt_path, LightningCLI would take
# them from the checkpoint's hyper-parameters and silently undo a memory swap asked for in the config.
INFERENCE_SETTINGS = ("memory", "memory_search_params", "memory_device", "refine_image", "refine_text")


class RecoCLI(LightningCLI):
    """LightningCLI with the data module's backbone tied to the model's, and memory swap kept at test time."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.backbone", "data.init_args.backbone")

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        requested = {}
        if subcommand:
            model = self.config[subcommand].get("model")
            requested = {key: model.get(key) for key in INFERENCE_SETTINGS} if model is not None else {}
        super()._parse_ckpt_path()
        for key, value in requested.items():
            self.config[subcommand]["model"][key] = value


def lightning_main(args: Sequence[str] | None = None, run: bool = True) -> RecoCLI:
    return RecoCLI(
        RecoModule,
        ImageTextDataModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=list(args) if args is not None else None,
        run=run,
    )


def memory_main(args: Sequence[str]) -> None:
    from jsonargparse import ArgumentParser

    from reco_lightning.memory.build import build_memory
    from reco_lightning.memory.store import MemoryStore

    parser = ArgumentParser(prog="reco memory", description="Build, combine and inspect RECO memories.")
    commands = parser.add_subcommands()

    build = ArgumentParser(description="Encode an image-text source into a memory (resumable).")
    build.add_argument("--config", action="config")
    build.add_argument(
        "--source", required=True, help="CSV/TSV (filepath, caption) or image folder with .txt captions"
    )
    build.add_argument("--out", required=True, help="memory directory to create")
    build.add_argument("--backbone", required=True, help="CLIP hub name or local directory")
    build.add_argument(
        "--backend",
        type=Any,
        default="exact",
        help="'exact', 'ivfpq', 'autofaiss', a class path, or {class_path, init_args}",
    )
    build.add_argument("--batch_size", type=int, default=256)
    build.add_argument("--num_workers", type=int, default=0)
    build.add_argument("--chunk_size", type=int, default=100_000)
    build.add_argument("--train_size", type=int, default=200_000)
    build.add_argument("--image_column", default="filepath")
    build.add_argument("--caption_column", default="caption")
    build.add_argument("--id_column", type=str | None, default=None)
    build.add_argument("--accelerator", default="auto")
    build.add_argument("--devices", type=Any, default="auto")
    build.add_argument("--overwrite", type=bool, default=False)
    commands.add_subcommand("build", build)

    concat = ArgumentParser(description="Concatenate memories built with one backbone, without re-encoding.")
    concat.add_argument("paths", nargs="+")
    concat.add_argument("--out", required=True)
    concat.add_argument("--backend", type=Any, default=None)
    concat.add_argument("--overwrite", type=bool, default=False)
    commands.add_subcommand("concat", concat)

    info = ArgumentParser(description="Print a memory's manifest and sizes.")
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
        )
        print(f"memory written to {out}")
    elif sub == "concat":
        out = MemoryStore.concat(c.paths, c.out, backend=_plain(c.backend), overwrite=c.overwrite)
        print(f"memory written to {out}")
    else:
        store = MemoryStore.open(c.path)
        print(json.dumps({**store.manifest, "bytes": store.nbytes()}, indent=2))


def _plain(value: Any) -> Any:
    """jsonargparse Namespaces -> dicts, so backend specs reach the registry as plain data."""
    return value.as_dict() if hasattr(value, "as_dict") else value


def cache_main(args: Sequence[str]) -> None:
    """Build the feature caches a config's ``data.feature_cache`` points at (train and val), if not current."""
    from pathlib import Path

    from reco_lightning.data.features import (
        FeatureCacheError,
        build_feature_cache,
        cache_requirements,
        open_feature_cache,
    )

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
            open_feature_cache(out, cache_requirements(model, source))
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


def demo_main(args: Sequence[str]) -> None:
    from jsonargparse import ArgumentParser

    from reco_lightning.demo.fashion_mnist import (
        DEFAULT_ROOT,
        DEFAULT_SPLIT,
        DEMO_SPLITS,
        FashionMNISTError,
        resolve_split,
    )
    from reco_lightning.demo.pipeline import run_demo

    parser = ArgumentParser(
        prog="reco demo", description="The real-data demo (Fashion-MNIST, seen/unseen classes)."
    )
    parser.add_argument("--out", default="artifacts/demo", help="where data, backbone, memories and runs go")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--grid", type=bool, default=True, help="also train and test the other 3 search/fusion settings"
    )
    parser.add_argument("--limit", type=int | None, default=None, help="shrink every split (quick check)")
    parser.add_argument("--data_root", default=DEFAULT_ROOT, help="Fashion-MNIST idx files")
    parser.add_argument(
        "--split",
        default=DEFAULT_SPLIT,
        help=f"seen classes: one of {sorted(DEMO_SPLITS)} or comma-separated class names/ids",
    )
    parser.add_argument(
        "--calibrate",
        type=bool,
        default=True,
        help="set the retrieval weight on the validation split's seen classes (else the config's)",
    )
    cfg = parser.parse_args(list(args))
    try:
        seen = resolve_split(cfg.split)
        run_demo(
            cfg.out,
            seed=cfg.seed,
            grid=cfg.grid,
            limit=cfg.limit,
            data_root=cfg.data_root,
            seen_classes=seen,
            calibrate=cfg.calibrate,
        )
    except FashionMNISTError as err:
        raise SystemExit(f"reco demo: {err}") from None


def prepare_tiny_main(args: Sequence[str]) -> None:
    from jsonargparse import ArgumentParser

    from reco_lightning.tiny import prepare_tiny

    parser = ArgumentParser(
        prog="reco prepare-tiny", description="Create the tiny backbone, pairs and memory."
    )
    parser.add_argument("--out", default="artifacts/tiny")
    parser.add_argument("--n_train", type=int, default=256)
    parser.add_argument("--n_val", type=int, default=64)
    cfg = parser.parse_args(list(args))
    print(f"tiny setup ready in {prepare_tiny(cfg.out, cfg.n_train, cfg.n_val)}")


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the `reco` console script."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] == "memory":
        memory_main(argv[1:])
    elif argv and argv[0] == "demo":
        demo_main(argv[1:])
    elif argv and argv[0] == "cache":
        cache_main(argv[1:])
    elif argv and argv[0] == "prepare-tiny":
        prepare_tiny_main(argv[1:])
    else:
        lightning_main(None if args is None else argv)


if __name__ == "__main__":
    main()
