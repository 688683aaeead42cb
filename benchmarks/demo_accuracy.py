"""The demo protocol over several seeds: frozen stand-in CLIP vs RECO on seen / unseen / all classes.

    python benchmarks/demo_accuracy.py --seeds 3 --out DIR

Each seed draws its own splits, pre-trains its own stand-in backbone (cached per seed) and trains the
fusion of every search/fusion setting. Writes DIR/demo_accuracy.json ({"clip", "reco", "grid": {...}}
each with seen / unseen / all as {"mean", "std"} in percent, plus the per-seed numbers), prints the
table, and rewrites the README's results table between its markers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from reco_lightning.demo.pipeline import GRID, run_demo

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- demo-results:start -->", "<!-- demo-results:end -->"
HEADLINE = f"reco[{GRID[0][0]}-search,{GRID[0][1]}-fusion]"


def aggregate(per_seed: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """{setting: {split: {"mean", "std"}}} over seeds (population std over seeds; 0 for one seed)."""
    out: dict[str, dict] = {}
    for setting in per_seed[0]:
        out[setting] = {}
        for split in ("seen", "unseen", "all"):
            values = [run[setting][split] for run in per_seed]
            std = statistics.pstdev(values) if len(values) > 1 else 0.0
            out[setting][split] = {"mean": round(statistics.fmean(values), 2), "std": round(std, 2)}
    return out


def table(result: dict) -> str:
    rows = [("clip (frozen stand-in)", result["clip"]), (f"RECO {HEADLINE}", result["reco"])]
    rows += [(f"RECO {name}", value) for name, value in result["grid"].items()]
    lines = [
        f"| model ({result['seeds']} seeds, mean ± std) | seen top-1 | unseen top-1 | all top-1 |",
        "|---|---:|---:|---:|",
    ]
    for name, m in rows:
        cells = [f"{m[s]['mean']:.1f} ± {m[s]['std']:.1f}" for s in ("seen", "unseen", "all")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def update_readme(text: str) -> None:
    readme = README.read_text()
    if START not in readme or END not in readme:
        print(f"README has no {START} ... {END} markers; not updated")
        return
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{START}\n{text}{END}{tail}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0, 1, ...)")
    parser.add_argument("--out", default="bench_out", help="directory for demo_accuracy.json")
    parser.add_argument(
        "--artifacts", default="artifacts", help="seed N's demo lives in ARTIFACTS/demo[_seedN]"
    )
    parser.add_argument("--limit", type=int, default=None, help="shrink every split (smoke runs)")
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite the README table")
    args = parser.parse_args(argv)

    start = time.time()
    per_seed = []
    for seed in range(args.seeds):
        root = Path(args.artifacts) / ("demo" if seed == 0 else f"demo_seed{seed}")
        per_seed.append(run_demo(root, seed=seed, grid=True, limit=args.limit)["top1"])
    stats = aggregate(per_seed)
    result = {
        "seeds": args.seeds,
        "limit": args.limit,
        "seconds": round(time.time() - start, 1),
        "clip": stats["clip"],
        "reco": stats[HEADLINE],
        "grid": {name: value for name, value in stats.items() if name not in ("clip", HEADLINE)},
        "per_seed": per_seed,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(result, fh, indent=2)
    os.replace(tmp, out / "demo_accuracy.json")
    text = table(result)
    (out / "demo_accuracy.md").write_text(text)
    print(text)
    if not args.no_readme:
        update_readme(text)
    return result


if __name__ == "__main__":
    main()
