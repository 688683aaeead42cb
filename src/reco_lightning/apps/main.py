"""The `reco` console script: the library's commands (reco_lightning.cli) plus the apps built on it.

The apps (the real-data demo and the tiny setup) sit on top of the library and register their
subcommands here, so nothing in the library imports them.
"""

from __future__ import annotations

from collections.abc import Sequence

from reco_lightning import cli

__all__ = ["APP_COMMANDS", "main"]


def demo_main(args: Sequence[str]) -> None:
    from reco_lightning.apps.demo.fashion_mnist import (
        DEFAULT_ROOT,
        DEFAULT_SPLIT,
        DEMO_SPLITS,
        FashionMNISTError,
        resolve_split,
    )
    from reco_lightning.apps.demo.pipeline import DEFAULT_PROTOCOL, PROTOCOLS, run_demo

    parser = cli.CommandParser(
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
        "--protocol",
        default=DEFAULT_PROTOCOL,
        choices=sorted(PROTOCOLS),
        help="open: train on the memory's own pairs (the paper's); strict: seen-class pairs and memory only",
    )
    parser.add_argument(
        "--calibrate",
        type=bool,
        default=True,
        help="set mix_alpha and the retrieval weights on the validation split by the protocol's rule",
    )
    parser.add_argument(
        "--memory_fraction",
        type=bool,
        default=True,
        help="also train with 10%% of the memory and test with all of it (open protocol)",
    )
    parser.add_argument(
        "--backbone",
        type=dict,
        default={},
        help='overrides of the stand-in CLIP\'s recipe (BackboneRecipe), e.g. {"width": 128}: another '
        "backbone, so the memories are rebuilt; use another --out to keep the default demo's",
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
            protocol=cfg.protocol,
            memory_fraction=cfg.memory_fraction,
            backbone=cfg.backbone,
        )
    except FashionMNISTError as err:
        raise SystemExit(f"reco demo: {err}") from None


def prepare_tiny_main(args: Sequence[str]) -> None:
    from reco_lightning.apps.tiny import prepare_tiny

    parser = cli.CommandParser(
        prog="reco prepare-tiny", description="Create the tiny backbone, pairs and memory."
    )
    parser.add_argument("--out", default="artifacts/tiny")
    parser.add_argument("--n_train", type=int, default=256)
    parser.add_argument("--n_val", type=int, default=64)
    parser.add_argument(
        "--family", default="clip", choices=["clip", "siglip", "siglip2"], help="the tiny backbone's family"
    )
    cfg = parser.parse_args(list(args))
    print(f"tiny setup ready in {prepare_tiny(cfg.out, cfg.n_train, cfg.n_val, family=cfg.family)}")


#: subcommands of the apps, added to the library's (reco_lightning.cli.COMMANDS)
APP_COMMANDS = {"demo": demo_main, "prepare-tiny": prepare_tiny_main}
#: default output folders of the apps -> the command that fills them (named when an input there is missing)
APP_MAKERS = {"artifacts/tiny": "reco prepare-tiny --out artifacts/tiny", "artifacts/demo": "reco demo"}


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the `reco` console script (see :func:`reco_lightning.cli.main`)."""
    cli.main(args, APP_COMMANDS, APP_MAKERS)


if __name__ == "__main__":
    main()
