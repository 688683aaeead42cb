"""The novelty gate's trade-off, per split: what the share threshold gives the new concepts (all-class
top-1) against what it costs the backbone's own classes (seen-only top-1), with issue 21's two targets.

    python benchmarks/fusion_ablations.py --split both --root <the 9 demo roots> --out DIR --rows \\
        'clip (frozen)' lookup 'mix, strict rule on seen-only' 'control, strict' \\
        'strict, calibrated on seen-only' 'strict, calibrated on seen-only, added-memory gate 0.5, share quantile 0.95' ...
    python benchmarks/gate_frontier.py --json DIR/fusion_ablations.json --out DIR

Reads a fusion_ablations JSON (no training here), groups its runs by split (each root's protocol.json),
averages over the seeds, and for every gated row (``added-memory gate S, share quantile 0.95``: the
library's default rule at share S) and the ungated strict fusion prints seen-only and all-class top-1
next to the targets: all-class >= max(lookup, mix, control) + 3, seen-only >= clip - 1, each from the
same JSON's rows. Writes gate_frontier_<split>.json and .png (one panel per split; <split>: the JSON's,
val or test).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

from fusion_ablations import seen_of
from reco_lightning.apps.demo.fashion_mnist import DEFAULT_SEEN_CLASSES, split_name

GATED = re.compile(r"^strict, calibrated on seen-only, added-memory gate ([0-9.]+), share quantile 0\.95$")
UNGATED = "strict, calibrated on seen-only"
PEERS = ("lookup", "mix, strict rule on seen-only", "control, strict")
FROZEN = "clip (frozen)"


def by_split(rows: dict) -> dict[str, dict[str, dict[str, float]]]:
    """{split: {row: {"seen_only": mean, "all": mean}}} over each split's roots and seeds."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, row in rows.items():
        groups: dict[str, list[dict]] = {}
        for run in row["runs"]:
            split = split_name(seen_of(Path(run["root"]), DEFAULT_SEEN_CLASSES))
            groups.setdefault(split, []).append(run)
        for split, runs in groups.items():
            out.setdefault(split, {})[name] = {
                m: round(statistics.fmean(r[m] for r in runs), 2) for m in ("seen_only", "all")
            }
    return out


def frontier(rows: dict) -> dict[str, dict]:
    """Per split: the targets and the points (share -> seen-only, all-class; "none": the ungated fusion)."""
    result = {}
    for split, means in by_split(rows).items():
        missing = [r for r in (*PEERS, FROZEN) if r not in means]
        if missing:
            raise SystemExit(f"the JSON lacks rows {missing} for split {split}: run them with the gated rows")
        points = {"none": means[UNGATED]} if UNGATED in means else {}
        for name, m in means.items():
            match = GATED.match(name)
            if match:
                points[match.group(1)] = m
        result[split] = {
            "target_all": round(max(means[r]["all"] for r in PEERS) + 3, 2),
            "target_seen_only": round(means[FROZEN]["seen_only"] - 1, 2),
            "points": dict(sorted(points.items())),
        }
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(result), figsize=(4.5 * len(result), 4), squeeze=False)
    for ax, (split, body) in zip(axes[0], result.items(), strict=True):
        shares = [s for s in body["points"] if s != "none"]
        xs = [body["points"][s]["seen_only"] for s in shares]
        ys = [body["points"][s]["all"] for s in shares]
        ax.plot(xs, ys, "o-", label="gate at share S")
        labels: dict[tuple[float, float], list[str]] = {}  # shares that gate the same queries share a point
        for s, x, y in zip(shares, xs, ys, strict=True):
            labels.setdefault((x, y), []).append(s)
        for (x, y), names in labels.items():
            text = names[0] if len(names) == 1 else f"{names[0]}-{names[-1]}"
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if "none" in body["points"]:
            p = body["points"]["none"]
            ax.plot([p["seen_only"]], [p["all"]], "s", label="no gate")
        ax.axhline(body["target_all"], color="grey", ls="--", lw=1, label="target: all-class")
        ax.axvline(body["target_seen_only"], color="grey", ls=":", lw=1, label="target: seen-only")
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.set_xlabel("seen-only top-1 (%)")
        ax.set_ylabel("all-class top-1 (%)")
        ax.set_title(f"strict, {split}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", required=True, help="a fusion_ablations.json with the rows above")
    parser.add_argument("--out", default="bench_out")
    args = parser.parse_args(argv)
    source = json.loads(Path(args.json).read_text())
    result = frontier(source["rows"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"gate_frontier_{source['split']}"
    (out / f"{stem}.json").write_text(json.dumps({"source": args.json, "splits": result}, indent=2))
    plot(result, out / f"{stem}.png")
    print(
        f"{source['split']} split; targets: all-class >= max(lookup, mix, control) + 3, seen-only >= clip - 1"
    )
    print(
        "| split | gate share | seen-only top-1 | all-class top-1 | both targets |\n|---|---:|---:|---:|---|"
    )
    for split, body in result.items():
        for share, p in body["points"].items():
            both = p["all"] >= body["target_all"] and p["seen_only"] >= body["target_seen_only"]
            print(
                f"| {split} (targets {body['target_seen_only']:.1f} / {body['target_all']:.1f}) | {share} | "
                f"{p['seen_only']:.1f} | {p['all']:.1f} | {'yes' if both else 'no'} |"
            )
    return result


if __name__ == "__main__":
    main()
