"""The real-data demo, end to end: `reco demo` (the README's main job).

Protocol (Fashion-MNIST, 10 classes; 5 "seen", 5 "unseen"):

1. A stand-in CLIP is pre-trained on seen-class images only (demo/backbone.py): it does not know the
   unseen classes, like CLIP and the rare entities of the paper.
2. A memory of image-text pairs of ALL classes is encoded from train images the backbone never saw.
3. RECO's fusion is trained on seen-class pairs of that memory split, retrieving from the seen-only
   memory (its own row excluded), with ``reco fit --config configs/demo.yaml`` from a feature cache.
4. The trained model is tested on the official test split with the full memory swapped in, next to
   the frozen backbone: top-1 on seen, unseen and all classes. The 2x2 search/fusion grid is trained
   and tested the same way.

Every step is cached on disk and skipped when its output is already there.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from reco_lightning.atomic import atomic_write_text
from reco_lightning.demo.backbone import RECIPE_FILENAME, BackboneRecipe, ensure_backbone
from reco_lightning.demo.fashion_mnist import (
    DEFAULT_ROOT,
    DEFAULT_SEEN_CLASSES,
    FASHION_MNIST_CLASSES,
    load_fashion_mnist,
    make_splits,
    split_name,
    write_image_folder,
    write_pairs,
)

__all__ = [
    "GRID",
    "DemoLayout",
    "class_groups",
    "discard_if_protocol_changed",
    "prepare_demo",
    "run_config",
    "run_demo",
    "summarise",
]

CONFIG = Path(__file__).resolve().parents[3] / "configs" / "demo.yaml"
# (search, fusion); the first is the paper's best and the demo's headline "reco"
GRID = (("uni", "cross"), ("uni", "uni"), ("cross", "cross"), ("cross", "uni"))


@dataclass(frozen=True)
class DemoLayout:
    """Where every artifact of one demo run lives (paths are what configs/demo.yaml expects)."""

    root: Path

    @property
    def backbone(self) -> Path:
        return self.root / "backbone"

    @property
    def memory_all(self) -> Path:
        return self.root / "memory_all"

    @property
    def memory_seen(self) -> Path:
        return self.root / "memory_seen"

    @property
    def protocol(self) -> Path:
        return self.root / "protocol.json"

    @property
    def fusion_train(self) -> Path:
        return self.root / "pairs" / "fusion_train.csv"

    @property
    def val(self) -> Path:
        return self.root / "val"

    @property
    def test(self) -> Path:
        return self.root / "test"

    def run_dir(self, search: str, fusion: str) -> Path:
        return self.root / "runs" / f"{search}-search_{fusion}-fusion"


def prepare_demo(
    root: str | os.PathLike = "artifacts/demo",
    data_root: str = DEFAULT_ROOT,
    seed: int = 0,
    val_per_class: int = 200,
    limit: int | None = None,
    seen_classes: tuple[int, ...] = DEFAULT_SEEN_CLASSES,
) -> DemoLayout:
    """Data files, backbone and both memories, each built only if missing.

    ``seed`` selects the splits and the backbone (seed 0 is the default demo). ``limit`` shrinks every
    split for a quick run (the CI test); the protocol stays the same.
    """
    from reco_lightning.memory.build import build_memory
    from reco_lightning.memory.store import MemoryStore

    layout = DemoLayout(Path(root))
    images, labels = load_fashion_mnist(data_root, "train")
    test_images, test_labels = load_fashion_mnist(data_root, "test")
    sizes = {"backbone_size": 15_000, "memory_size": 25_000}
    if limit is not None:
        sizes = {"backbone_size": min(limit, 15_000), "memory_size": min(limit, 25_000)}
        keep = np.random.default_rng(seed).permutation(len(test_labels))[: max(limit // 4, 200)]
        test_images, test_labels = test_images[np.sort(keep)], test_labels[np.sort(keep)]
        val_per_class = min(val_per_class, 20)
    splits = make_splits(labels, seen_classes, seed=seed, **sizes)
    write_pairs(images, labels, splits.memory, layout.root / "pairs", "memory", caption_seed=seed)
    write_pairs(images, labels, splits.fusion_train, layout.root / "pairs", "fusion_train", caption_seed=seed)
    # validation images: train images in neither the backbone's nor the memory's split
    used = np.zeros(len(labels), dtype=bool)
    used[splits.backbone], used[splits.memory] = True, True
    rng = np.random.default_rng(seed + 1)
    val_rows = np.concatenate(
        [
            rng.permutation(np.flatnonzero(~used & (labels == c)))[:val_per_class]
            for c in range(len(FASHION_MNIST_CLASSES))
        ]
    )
    write_image_folder(images[val_rows], labels[val_rows], layout.val, progress=False)
    write_pairs(images, labels, val_rows, layout.root / "pairs", "val", caption_seed=seed)
    write_image_folder(test_images, test_labels, layout.test, progress=False)

    steps = {"steps": 400} if limit is not None else {}  # a shorter pre-training for the small slice
    recipe = BackboneRecipe(
        data_root=data_root,
        seen_classes=tuple(seen_classes),
        split_seed=seed,
        seed=seed,
        backbone_size=sizes["backbone_size"],
        **steps,
    )
    ensure_backbone(layout.backbone, recipe)

    protocol = {
        "seed": seed,
        "seen_classes": sorted(int(c) for c in seen_classes),
        "limit": limit,
        "backbone": json.loads((layout.backbone / RECIPE_FILENAME).read_text()),
        **sizes,
    }
    discard_if_protocol_changed(layout, protocol)
    trainer = {"accelerator": "cpu", "devices": 1}
    if not (layout.memory_all / "manifest.json").is_file():
        build_memory(
            layout.root / "pairs" / "memory.csv",
            layout.memory_all,
            str(layout.backbone),
            batch_size=512,
            id_column="id",
            trainer_kwargs=trainer,
            overwrite=True,
        )
    if not (layout.memory_seen / "manifest.json").is_file():
        memory = MemoryStore.open(layout.memory_all, load_indexes=False)
        seen_rows = np.flatnonzero(np.isin(labels[np.asarray(memory.ids)], seen_classes))
        memory.select(seen_rows, layout.memory_seen, overwrite=True)
    return layout


def discard_if_protocol_changed(layout: DemoLayout, protocol: dict[str, Any]) -> bool:
    """Delete the memories and feature caches of a root prepared under another protocol; True if it did.

    The memories depend on the split and the backbone, not only on their own files: a root reused with
    another seed, split, size or backbone recipe must not silently serve the old memory. The new protocol
    is recorded (``protocol.json``) before anything is rebuilt, so an interrupted memory build resumes
    under it instead of starting over.
    """
    recorded = json.loads(layout.protocol.read_text()) if layout.protocol.is_file() else None
    if recorded == protocol:
        return False
    for stale in (layout.memory_all, layout.memory_seen, layout.root / "cache"):
        shutil.rmtree(stale, ignore_errors=True)
    layout.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(layout.protocol, json.dumps(protocol, indent=2) + "\n")
    return True


def class_groups(seen_classes: tuple[int, ...]) -> dict[str, list[str]]:
    """The evaluation's ``class_groups`` for a split: seen and unseen class names in label order."""
    return {
        "seen": [FASHION_MNIST_CLASSES[c] for c in sorted(seen_classes)],
        "unseen": [n for c, n in enumerate(FASHION_MNIST_CLASSES) if c not in seen_classes],
    }


#: Retrieval weights tried by :func:`calibrate_retrieved_skip` (the demo config's ``fusion_retrieved_skip``).
CALIBRATION_WEIGHTS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def calibrate_retrieved_skip(
    layout: DemoLayout,
    search: str,
    fusion: str,
    seen_classes: tuple[int, ...] = DEFAULT_SEEN_CLASSES,
    weights: tuple[float, ...] = CALIBRATION_WEIGHTS,
    tolerance: float = 0.5,
) -> dict[str, Any]:
    """Pick ``fusion_retrieved_skip``: the largest weight that costs seen classes at most ``tolerance``
    points of validation top-1 (0 when every weight costs more).

    Why: the skip decides how far neighbours pull a query. A fusion trained on a few seen concepts cannot
    learn that trade-off (its training memory never disagrees with the query), and at weight 1 neighbours
    of a newly reachable concept outvote seen images' own image-text match (see fusion.py). So the weight
    is set the way one deploys a memory: on held-out images of the concepts the model already knows (the
    validation split's seen classes; never a test image, never an unseen-class label), with the deployment
    memory (all classes) attached, keep the most retrieval that costs those images at most ``tolerance``
    points (0.5: a margin for the noise of a 1,000-image validation set under the 1-point target). It is measured
    on the untrained fusion, which is exactly "query + weight x mean of neighbours" (the learned branch
    starts at zero), so no training run is needed per weight.
    """
    import yaml

    from reco_lightning.callbacks import ClassificationSet, ZeroShotEvaluation
    from reco_lightning.model import RecoModule

    config = yaml.safe_load(run_config(layout, seen_classes).read_text())
    model_args = {**config["model"], "memory": str(layout.memory_all), "search": search, "fusion": fusion}
    model = RecoModule(**model_args)
    model.setup("validate")
    val_seen = ClassificationSet(
        "calibration",
        str(layout.val),
        templates="fashion_mnist",
        class_groups={"seen": class_groups(seen_classes)["seen"]},
    )

    def seen_top1_of(setting: str) -> float:
        report, _ = ZeroShotEvaluation(classification=[val_seen], settings=[setting]).evaluate(model)
        return report.rows[0].metrics["top1_seen"]

    clip_seen = seen_top1_of("clip")
    seen_top1: dict[float, float] = {}
    for weight in weights:
        for side in (model.image_fusion, model.text_fusion):
            side.retrieved_skip = float(weight)
        seen_top1[weight] = seen_top1_of("reco")
    allowed = [w for w in weights if seen_top1[w] >= clip_seen - tolerance]
    chosen = max(allowed) if allowed else 0.0
    return {"clip_seen": clip_seen, "reco_seen": seen_top1, "tolerance": tolerance, "chosen": chosen}


def run_config(layout: DemoLayout, seen_classes: tuple[int, ...] = DEFAULT_SEEN_CLASSES) -> Path:
    """configs/demo.yaml with every ``artifacts/demo`` path rooted at this run's directory and the
    evaluation's class groups set to this run's split.

    For the default root and split this is configs/demo.yaml itself; other runs (other seeds or splits, the
    CI slice) get their own copy, so no path or group in the file points at another run.
    """
    import yaml

    text = CONFIG.read_text()
    default_root = layout.root.resolve() == (Path.cwd() / "artifacts" / "demo").resolve()
    config = yaml.safe_load(text.replace("artifacts/demo/", f"{layout.root}/"))
    groups = class_groups(tuple(seen_classes))
    same_groups = True
    for callback in config.get("trainer", {}).get("callbacks", []):
        for dataset in callback.get("init_args", {}).get("classification", []):
            if "class_groups" in dataset:
                same_groups &= dataset["class_groups"] == groups
                dataset["class_groups"] = {name: list(names) for name, names in groups.items()}
    if default_root and same_groups:
        return CONFIG
    path = layout.root / "demo.yaml"
    layout.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, yaml.safe_dump(config, sort_keys=False))
    return path


def _cli_args(
    layout: DemoLayout,
    search: str,
    fusion: str,
    seed: int,
    extra: list[str],
    seen_classes: tuple[int, ...] = DEFAULT_SEEN_CLASSES,
) -> list[str]:
    return [
        "--config", str(run_config(layout, seen_classes)),
        f"--seed_everything={seed}",
        f"--model.search={search}",
        f"--model.fusion={fusion}",
        f"--data.init_args.feature_cache={layout.root / 'cache' / search}",
        f"--trainer.default_root_dir={layout.run_dir(search, fusion)}",
        *extra,
    ]  # fmt: skip


def train_and_test(
    layout: DemoLayout,
    search: str,
    fusion: str,
    seed: int = 0,
    extra: list[str] | None = None,
    seen_classes: tuple[int, ...] = DEFAULT_SEEN_CLASSES,
    calibrate: bool = True,
) -> dict:
    """`reco cache` + `reco fit` + `reco test` (full memory swapped in) for one grid setting; returns the
    test report, with the :func:`calibrate_retrieved_skip` result under "calibration" when it ran.

    Calibration is skipped when ``calibrate`` is False or ``extra`` sets ``--model.fusion_retrieved_skip``.
    """
    from reco_lightning.cli import main

    extra = list(extra or [])
    run_dir = layout.run_dir(search, fusion)
    shutil.rmtree(run_dir, ignore_errors=True)
    calibration = None
    if calibrate and not any(a.startswith("--model.fusion_retrieved_skip") for a in extra):
        calibration = calibrate_retrieved_skip(layout, search, fusion, seen_classes)
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "calibration.json", json.dumps(calibration, indent=2) + "\n")
        extra = [f"--model.fusion_retrieved_skip={calibration['chosen']}", *extra]
    args = _cli_args(layout, search, fusion, seed, extra, seen_classes)
    main(["cache", *args])
    main(["fit", *args])
    best = sorted(run_dir.rglob("best*.ckpt")) or sorted(run_dir.rglob("last.ckpt"))
    test_dir = run_dir / "test"
    main(
        [
            "test",
            *args,
            f"--model.memory={layout.memory_all}",
            f"--ckpt_path={best[0]}",
            f"--trainer.default_root_dir={test_dir}",
        ]
    )
    report = json.loads(next(test_dir.rglob("zeroshot_report.json")).read_text())
    if calibration is not None:
        report["calibration"] = calibration
    return report


def summarise(
    reports: dict[tuple[str, str], dict], dataset: str = "fashion_mnist_test"
) -> dict[str, dict[str, float]]:
    """{"clip": {...}, "reco[uni-search,cross-fusion]": {...}, ...}: seen / unseen / all top-1, the
    percent of seen-class images predicted as an unseen class, and each RECO row's calibrated
    ``retrieved_skip`` when it was calibrated."""
    rows: dict[str, dict[str, float]] = {}
    for (search, fusion), report in reports.items():
        for row in report["rows"]:
            if row["dataset"] != dataset:
                continue
            m = {
                "seen": row["metrics"]["top1_seen"],
                "unseen": row["metrics"]["top1_unseen"],
                "all": row["metrics"]["top1"],
                "seen_to_unseen": row["metrics"]["seen_to_unseen"],
            }
            if row["setting"] == "clip":
                rows.setdefault("clip", m)
            elif row["setting"] == "reco":
                if "calibration" in report:
                    m["retrieved_skip"] = report["calibration"]["chosen"]
                rows[f"reco[{search}-search,{fusion}-fusion]"] = m
    return rows


def format_table(rows: dict[str, dict[str, float]]) -> str:
    lines = [
        "| model | seen top-1 | unseen top-1 | all top-1 | seen images sent to an unseen class "
        "| retrieval weight |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, m in rows.items():
        weight = f"{m['retrieved_skip']:.1f}" if "retrieved_skip" in m else "-"
        lines.append(
            f"| {name} | {m['seen']:.2f} | {m['unseen']:.2f} | {m['all']:.2f} | {m['seen_to_unseen']:.2f} "
            f"| {weight} |"
        )
    return "\n".join(lines) + "\n"


def run_demo(
    root: str | os.PathLike = "artifacts/demo",
    seed: int = 0,
    grid: bool = True,
    limit: int | None = None,
    data_root: str = DEFAULT_ROOT,
    extra: list[str] | None = None,
    seen_classes: tuple[int, ...] = DEFAULT_SEEN_CLASSES,
    calibrate: bool = True,
) -> dict[str, Any]:
    """Prepare, then train and test the paper's setting (and the grid); print and save the summary.

    ``calibrate``: set each setting's retrieval weight with :func:`calibrate_retrieved_skip` (otherwise
    the config's ``fusion_retrieved_skip``)."""
    start = time.time()
    seen_classes = tuple(sorted(seen_classes))
    layout = prepare_demo(root, data_root=data_root, seed=seed, limit=limit, seen_classes=seen_classes)
    settings = GRID if grid else GRID[:1]
    reports = {
        setting: train_and_test(
            layout, *setting, seed=seed, extra=extra, seen_classes=seen_classes, calibrate=calibrate
        )
        for setting in settings
    }
    rows = summarise(reports)
    result = {
        "seed": seed,
        "limit": limit,
        "split": split_name(seen_classes),
        "seen_classes": class_groups(seen_classes)["seen"],
        "seconds": round(time.time() - start, 1),
        "top1": rows,
    }
    table = format_table(rows)
    atomic_write_text(layout.root / "demo_results.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(layout.root / "demo_results.md", table)
    print(
        f"\nRECO demo (Fashion-MNIST test split; split {result['split']!r}, unseen classes "
        f"{class_groups(seen_classes)['unseen']} absent from the backbone's pre-training), "
        f"{result['seconds']:.0f} s:\n{table}"
    )
    return result
