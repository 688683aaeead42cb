"""How well can any label-free signal tell a new concept from a known one? (the novelty gate's ceiling)

    python benchmarks/gate_signals.py --root <the 9 demo roots> --out DIR

The strict protocol's novelty gate answers from the memory an image whose neighbours are mostly rows
added after training (docs/results.md). Its cost to what the backbone knows is the seen images it gates;
its gain the unseen ones. This script measures, on each prepared demo root's frozen features (no
training), how many unseen test images a signal gates at a fixed share of seen images gated (1.3% and
2.8%: the rates of the library's share 1.0 and 0.9 on these roots), for

- ``share of added, k``: the share of added rows among the k = 10 / 20 / 40 / 80 nearest memory images
  (the library reads k = 10; ties broken by the next-deeper share);
- ``logistic, 8 signals (reads labels)``: a logistic regression fit on the validation split's labels
  (seen or not) over the shares at k = 10 / 20 / 40, the score gap (best added row - best training row),
  the image's cosine to its neighbours' caption mean, the frozen model's top class probability and its
  summed probability on the seen classes, and the best neighbour's score: an upper bound for a gate
  learned from these signals, since it reads labels no gate has.

Writes gate_signals.json (means over roots, and per root); prints the means.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from fusion_ablations import DEFAULT_SEEN_CLASSES, features, neighbours, seen_of, unit
from reco_lightning.metrics import class_embeddings_from_prompt_embeddings

RATES = (1.3, 2.8)  # percent of seen test images gated
DEPTHS = (10, 20, 40, 80)


def signals(data: dict, seen: tuple[int, ...], split: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The label-free signals of each ``split`` image ({name: [B]}) and whether it is of an unseen class."""
    keys = unit(data["mem_v"])
    added = ~torch.isin(data["mem_y"], torch.tensor(seen))  # strict: the unseen classes' rows came later
    v = unit(data[f"{split}_v"])
    rows, scores = neighbours(v, keys, max(DEPTHS))
    known_rows, added_rows = torch.nonzero(~added).squeeze(1), torch.nonzero(added).squeeze(1)
    gap = neighbours(v, keys[added_rows], 1)[1][:, 0] - neighbours(v, keys[known_rows], 1)[1][:, 0]
    captions = unit(data["mem_t"])[rows[:, :10]]
    probability = (100 * v @ class_embeddings_from_prompt_embeddings(data["prompts"]).t()).softmax(1)
    out = {f"share {k}": added[rows[:, :k]].float().mean(1) for k in DEPTHS}
    out |= {
        "gap": gap,
        "caption agreement": (v * unit(captions.mean(1))).sum(-1),
        "top probability": probability.max(1).values,
        "seen probability": probability[:, list(seen)].sum(1),
        "best score": scores[:, 0],
    }
    return out, ~torch.isin(data[f"{split}_y"], torch.tensor(seen))


def unseen_gated(score: torch.Tensor, unseen: torch.Tensor, seen_rate: float) -> float:
    """Percent of unseen images above the threshold that gates ``seen_rate`` percent of the seen ones."""
    threshold = torch.quantile(score[~unseen], 1 - seen_rate / 100)
    return 100 * (score[unseen] > threshold).float().mean().item()


def logistic(columns: list[str], val: dict, val_unseen: torch.Tensor, test: dict) -> torch.Tensor:
    """Test scores of a logistic regression fit on the validation labels (standardised signals)."""
    x_val, x_test = (torch.stack([s[c] for c in columns], 1) for s in (val, test))
    mean, std = x_val.mean(0), x_val.std(0) + 1e-6
    weight, bias = torch.zeros(len(columns), requires_grad=True), torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=0.05)
    for _ in range(500):
        logits = (x_val - mean) / std @ weight + bias
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, val_unseen.float())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return ((x_test - mean) / std @ weight).detach()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--root", nargs="+", default=["artifacts/demo"], help="demo roots prepared by `reco demo`"
    )
    parser.add_argument("--out", default="bench_out")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    per_root: dict[str, dict[str, dict[str, float]]] = {}
    for root in args.root:
        data, seen = features(Path(root)), seen_of(Path(root), DEFAULT_SEEN_CLASSES)
        val, val_unseen = signals(data, seen, "val")
        test, unseen = signals(data, seen, "test")
        scores = {}
        for i, k in enumerate(DEPTHS):  # ties broken by the deeper shares
            deeper = sum(test[f"share {d}"] * 10.0 ** (-3 * (j + 1)) for j, d in enumerate(DEPTHS[i + 1 :]))
            scores[f"share of added, k {k}"] = test[f"share {k}"] + deeper
        columns = ["share 10", "share 20", "share 40", "gap", "caption agreement", "top probability"]
        columns += ["seen probability", "best score"]
        scores["logistic, 8 signals (reads labels)"] = logistic(columns, val, val_unseen, test)
        per_root[root] = {
            name: {str(rate): round(unseen_gated(s, unseen, rate), 2) for rate in RATES}
            for name, s in scores.items()
        }
        print(f"{root} done", flush=True)
    names = list(next(iter(per_root.values())))
    summary = {
        name: {str(r): round(statistics.fmean(v[name][str(r)] for v in per_root.values()), 2) for r in RATES}
        for name in names
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gate_signals.json").write_text(
        json.dumps({"roots": args.root, "mean": summary, "per_root": per_root}, indent=2)
    )
    header = " | ".join(f"unseen gated at {r}% seen" for r in RATES)
    print(f"\n| signal (test, mean of {len(args.root)} roots) | {header} |\n|---|" + "---:|" * len(RATES))
    for name, cells in summary.items():
        print(f"| {name} | " + " | ".join(f"{cells[str(r)]:.1f}" for r in RATES) + " |")
    return summary


if __name__ == "__main__":
    main()
