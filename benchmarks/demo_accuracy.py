"""The demo over seeds, seen/unseen splits and both training protocols: every row of the comparison.

    python benchmarks/demo_accuracy.py --seeds 3 --out DIR [--splits tops shoes look-alikes]
                                       [--protocols open strict]

Each (split, seed) draws its own index sets and pre-trains its own stand-in backbone (cached, shared by
both protocols); each protocol then calibrates its weights on the validation split and trains RECO, the
control and (default protocol) the other three search/fusion settings and RECO trained with 10% of the
memory. Rows: ``clip`` (frozen), ``lookup``, ``lookup, whitened`` and ``mix`` (training-free, same
neighbours), ``control`` (same fusion and recipe, retrieval masked), ``reco`` (uni-search + cross-fusion,
with the memory's vote since session 16) and the others, with a vote ``control with the vote`` and ``reco
without the vote``, and (since session 7) the two label-reading references, ceilings rather than peers
(apps.demo.probes).

Writes DIR/demo_accuracy.json:
``{"default": {"protocol", "split"}, "seeds", "seconds", "protocols": {P: {"splits": {S: {ROW: {"seen":
{"mean", "std"}, "seen_only": ..., "unseen": ..., "all": ..., "seen_to_unseen": ...}}}, "calibration": {S: per-seed
weights}, "per_seed": {S: [rows of each seed]}}}}`` (top-1 in percent, population std over seeds), the
markdown table, a bar plot, and rewrites the results table of docs/results.md between its markers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from reco_lightning.apps.demo.fashion_mnist import DEFAULT_SPLIT, DEMO_SPLITS, resolve_split, split_name
from reco_lightning.apps.demo.pipeline import DEFAULT_PROTOCOL, PROTOCOLS, class_groups, run_demo
from reco_lightning.atomic import atomic_write_text

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results.md"
START, END = "<!-- demo-results:start -->", "<!-- demo-results:end -->"
#: per row; ``seen_only`` (seen images among the seen classes only) since session 7: older JSON lacks it
METRICS = ("seen", "seen_only", "unseen", "all", "seen_to_unseen")


def aggregate(per_seed: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    """{row: {metric: {"mean", "std"}}} over seeds (population std; 0 for one seed)."""
    out: dict[str, dict] = {}
    for row in per_seed[0]:
        out[row] = {}
        for metric in METRICS:
            values = [run[row][metric] for run in per_seed if metric in run.get(row, {})]
            if not values:
                continue
            std = statistics.pstdev(values) if len(values) > 1 else 0.0
            out[row][metric] = {"mean": round(statistics.fmean(values), 2), "std": round(std, 2)}
    return out


def table(result: dict) -> str:
    lines = [
        "| protocol | split (unseen classes; seeds) | row (mean ± std over seeds) "
        "| seen top-1 | seen-only top-1 | unseen top-1 | all top-1 | seen sent to unseen |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for protocol, body in result["protocols"].items():
        label_protocol = protocol + (" (default)" if protocol == result["default"]["protocol"] else "")
        for split, rows in body["splits"].items():
            unseen = ", ".join(class_groups(resolve_split(split))["unseen"])
            seeds = result.get("seeds_per_split", {}).get(protocol, {}).get(split, result["seeds"])
            label = f"{split} ({unseen}; {seeds} seed{'s' if seeds > 1 else ''})"
            for row, m in rows.items():
                cells = [f"{m[s]['mean']:.1f} ± {m[s]['std']:.1f}" if s in m else "-" for s in METRICS]
                lines.append(f"| {label_protocol} | {label} | {row} | " + " | ".join(cells) + " |")
                label_protocol, label = "", ""
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """All-class top-1 of every row, one panel per protocol, bars per split, error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    protocols = list(result["protocols"])
    fig, axes = plt.subplots(1, len(protocols), figsize=(7 * len(protocols), 4), squeeze=False)
    for ax, protocol in zip(axes[0], protocols, strict=True):
        splits = result["protocols"][protocol]["splits"]
        rows = list(next(iter(splits.values())))
        width = 0.8 / max(1, len(splits))
        for i, (split, values) in enumerate(splits.items()):
            xs = [j + i * width for j in range(len(rows))]
            means = [values[r]["all"]["mean"] if r in values else 0 for r in rows]
            stds = [values[r]["all"]["std"] if r in values else 0 for r in rows]
            ax.bar(xs, means, width, yerr=stds, label=split, capsize=2)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))])
        ax.set_xticklabels(rows, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("all-class top-1 (%)")
        ax.set_title(f"protocol {protocol}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def update_readme(text: str) -> None:
    page = RESULTS.read_text()
    if START not in page or END not in page:
        print(f"{RESULTS} has no {START} ... {END} markers; not updated")
        return
    head, rest = page.split(START, 1)
    _, tail = rest.split(END, 1)
    atomic_write_text(RESULTS, f"{head}{START}\n{text}{END}{tail}")


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
    parser.add_argument(
        "--no-readme", action="store_true", help="do not rewrite the table in docs/results.md"
    )
    parser.add_argument(
        "--splits",
        nargs="+",
        default=list(DEMO_SPLITS),
        help=f"splits to run: names among {list(DEMO_SPLITS)}, or comma-separated seen class names/ids",
    )
    parser.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=list(PROTOCOLS))
    parser.add_argument("--extra", nargs="*", default=[], help="extra `reco fit` arguments for every run")
    parser.add_argument(
        "--from-json", default=None, help="only re-render the table, plot and docs/results.md from a JSON"
    )
    parser.add_argument(
        "--collect",
        action="store_true",
        help="run nothing: aggregate the runs already in ARTIFACTS (demo_results_<protocol>.json of each root)",
    )
    args = parser.parse_args(argv)
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
        return _publish(result, Path(args.out), not args.no_readme)
    splits = [resolve_split(spec) for spec in args.splits]

    start = time.time()
    protocols: dict[str, dict] = {}
    for protocol in args.protocols:
        body: dict[str, dict] = {"splits": {}, "calibration": {}, "per_seed": {}}
        for seen in splits:
            name = split_name(seen)
            per_seed, weights = [], []
            for seed in range(args.seeds):
                suffix = ("" if name == DEFAULT_SPLIT else f"_{name}") + ("" if seed == 0 else f"_seed{seed}")
                root = Path(args.artifacts) / f"demo{suffix}"
                if args.collect:
                    saved = root / f"demo_results_{protocol}.json"
                    if not saved.is_file():
                        print(f"{saved} missing: {protocol}/{name} seed {seed} not run")
                        continue
                    run = json.loads(saved.read_text())
                else:
                    run = run_demo(
                        root,
                        seed=seed,
                        grid=protocol == DEFAULT_PROTOCOL,
                        limit=args.limit,
                        seen_classes=seen,
                        protocol=protocol,
                        memory_fraction=protocol == DEFAULT_PROTOCOL,
                        extra=args.extra,
                    )
                per_seed.append(run["top1"])
                weights.append({row: c["chosen"] for row, c in run["calibration"].items()})
            if not per_seed:
                continue
            body["splits"][name] = aggregate(per_seed)
            body["calibration"][name] = weights
            body["per_seed"][name] = per_seed
        if body["splits"]:  # --collect: a protocol with no run yet is left out
            protocols[protocol] = body
    default_split = (
        DEFAULT_SPLIT if any(split_name(s) == DEFAULT_SPLIT for s in splits) else split_name(splits[0])
    )
    default_protocol = DEFAULT_PROTOCOL if DEFAULT_PROTOCOL in protocols else next(iter(protocols))
    result = {
        "default": {"protocol": default_protocol, "split": default_split},
        "seeds": args.seeds,
        "seeds_per_split": {p: {sp: len(v) for sp, v in b["per_seed"].items()} for p, b in protocols.items()},
        "limit": args.limit,
        "seconds": round(time.time() - start, 1),
        "protocols": protocols,
    }
    return _publish(result, Path(args.out), not args.no_readme)


def _publish(result: dict, out: Path, readme: bool) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "demo_accuracy.json", json.dumps(result, indent=2))
    text = table(result)
    atomic_write_text(out / "demo_accuracy.md", text)
    plot(result, out / "demo_accuracy.png")
    print(text)
    if readme:
        update_readme(text)
    return result


if __name__ == "__main__":
    main()
