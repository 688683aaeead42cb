"""The demo protocol over several seeds and seen/unseen splits: frozen stand-in CLIP vs RECO.

    python benchmarks/demo_accuracy.py --seeds 3 --out DIR [--splits tops,shoes,look-alikes]

Each (split, seed) draws its own index sets, pre-trains its own stand-in backbone (cached) and trains the
fusion of every search/fusion setting. Writes DIR/demo_accuracy.json: "clip", "reco" (uni-search +
cross-fusion) and "grid" (the other three) of the default split (the demo's), each with seen / unseen /
all as {"mean", "std"} in percent, and "splits" with the same for every split run, per-seed numbers
included. Prints the table and rewrites the README's results table between its markers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from reco_lightning.atomic import atomic_write_text
from reco_lightning.demo.fashion_mnist import DEFAULT_SPLIT, DEMO_SPLITS, resolve_split, split_name
from reco_lightning.demo.pipeline import GRID, class_groups, run_demo

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- demo-results:start -->", "<!-- demo-results:end -->"
HEADLINE = f"reco[{GRID[0][0]}-search,{GRID[0][1]}-fusion]"


def aggregate(per_seed: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """{setting: {split: {"mean", "std"}}} over seeds (population std over seeds; 0 for one seed)."""
    out: dict[str, dict] = {}
    for setting in per_seed[0]:
        out[setting] = {}
        for split in ("seen", "unseen", "all", "seen_to_unseen"):
            values = [run[setting][split] for run in per_seed]
            std = statistics.pstdev(values) if len(values) > 1 else 0.0
            out[setting][split] = {"mean": round(statistics.fmean(values), 2), "std": round(std, 2)}
    return out


def table(result: dict) -> str:
    lines = [
        f"| split (unseen classes) | model ({result['seeds']} seeds, mean ± std) "
        "| seen top-1 | unseen top-1 | all top-1 | seen sent to unseen |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, split in result["splits"].items():
        label = f"{name} ({', '.join(split['unseen_classes'])})"
        rows = [("clip (frozen stand-in)", split["clip"]), (f"RECO {HEADLINE}", split["reco"])]
        rows += [(f"RECO {setting}", value) for setting, value in split["grid"].items()]
        for model, m in rows:
            cells = [
                f"{m[s]['mean']:.1f} ± {m[s]['std']:.1f}" for s in ("seen", "unseen", "all", "seen_to_unseen")
            ]
            lines.append(f"| {label} | {model} | " + " | ".join(cells) + " |")
            label = ""
    return "\n".join(lines) + "\n"


def run_split(seen: tuple[int, ...], seeds: int, artifacts: str, limit: int | None) -> dict:
    """Every seed of one split; its {"clip", "reco", "grid"} statistics plus the per-seed rows."""
    name = split_name(seen)
    per_seed = []
    for seed in range(seeds):
        suffix = ("" if name == DEFAULT_SPLIT else f"_{name}") + ("" if seed == 0 else f"_seed{seed}")
        root = Path(artifacts) / f"demo{suffix}"
        per_seed.append(run_demo(root, seed=seed, grid=True, limit=limit, seen_classes=seen)["top1"])
    stats = aggregate(per_seed)
    return {
        "seen_classes": class_groups(seen)["seen"],
        "unseen_classes": class_groups(seen)["unseen"],
        "clip": stats["clip"],
        "reco": stats[HEADLINE],
        "grid": {setting: value for setting, value in stats.items() if setting not in ("clip", HEADLINE)},
        "per_seed": per_seed,
    }


def update_readme(text: str) -> None:
    readme = README.read_text()
    if START not in readme or END not in readme:
        print(f"README has no {START} ... {END} markers; not updated")
        return
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    atomic_write_text(README, f"{head}{START}\n{text}{END}{tail}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0, 1, ...)")
    parser.add_argument("--out", default="bench_out", help="directory for demo_accuracy.json")
    parser.add_argument(
        "--artifacts",
        default="artifacts",
        help="split S, seed N lives in ARTIFACTS/demo[_S][_seedN] (no suffix: default split, seed 0)",
    )
    parser.add_argument("--limit", type=int, default=None, help="shrink every split (smoke runs)")
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite the README table")
    parser.add_argument(
        "--splits",
        nargs="+",
        default=list(DEMO_SPLITS),
        help=f"splits to run: names among {list(DEMO_SPLITS)}, or comma-separated seen class names/ids",
    )
    args = parser.parse_args(argv)
    splits = [resolve_split(spec) for spec in args.splits]

    start = time.time()
    per_split = {split_name(seen): run_split(seen, args.seeds, args.artifacts, args.limit) for seen in splits}
    headline = DEFAULT_SPLIT if DEFAULT_SPLIT in per_split else next(iter(per_split))
    result = {
        "seeds": args.seeds,
        "limit": args.limit,
        "seconds": round(time.time() - start, 1),
        "split": headline,
        "clip": per_split[headline]["clip"],
        "reco": per_split[headline]["reco"],
        "grid": per_split[headline]["grid"],
        "splits": per_split,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "demo_accuracy.json", json.dumps(result, indent=2))
    text = table(result)
    atomic_write_text(out / "demo_accuracy.md", text)
    print(text)
    if not args.no_readme:
        update_readme(text)
    return result


if __name__ == "__main__":
    main()
