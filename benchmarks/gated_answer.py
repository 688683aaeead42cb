"""What should a gated image become? Label-free answers from the added memory rows, against a ceiling.

    python benchmarks/gated_answer.py --root <the 9 demo roots> --out DIR

The strict protocol's novelty gate answers an image whose neighbours are mostly rows added after training
from those rows: the mean of their captions, classified against the frozen class prompts (the library's
``novelty.novel_answer``). On the demo's stand-in backbone that answer is bounded by a text tower that
never learned the unseen class names (docs/results.md, session 10). This script asks whether another
label-free use of the same rows does better, on each prepared root's frozen features (no training):

- ``caption mean, all neighbours (lookup)`` and ``caption mean, added neighbours (the library's)``, and
  the latter through the memory's caption covariance (``whitening.MemoryWhitening``, ridge 0.001 and 0.01:
  the demo's strict protocol sets 0.01);
- ``vote of the added neighbours' caption classes``: each added neighbour's caption classified against
  the prompts, then a majority vote (ties to the nearest), instead of one mean;
- ``... smoothed over the image graph``: the same, after each memory row's caption class is replaced once
  by the vote of its 10 nearest memory images' caption classes (label propagation, one step);
- ``class means of text-retrieved images``: each class prompt retrieves its 50 nearest memory captions;
  a class is the mean of their images and an image takes its nearest class mean (a support set built by
  text retrieval, as training-free adapters do);
- ``label vote over the added neighbours (reads labels)``: a ceiling for any answer from those rows;
- and on the prompt side, with the library's answer for images: a class prompt the same share rule gates
  (over its 10 nearest memory captions; the library keeps it frozen) replaced by its added neighbours'
  caption mean, or by the sum of both, so that a class meets its gated images in the same space.

For each answer: ``unseen``, the top-1 of the unseen classes' images when every one of them is answered so
(the answer's own quality); ``all`` and ``seen``, the top-1 of every image and of the seen ones when the
library's share rule gates (at least 0.9 of the 10 nearest memory images added; the base-rate check is
inert on these roots at k = 10, docs/results.md) and every other image keeps the frozen model's class (a
stand-in for the fusion, which keeps it on seen images: session 13). Added rows are the unseen classes'
(the strict protocol's memory_seen holds the others). Validation and test; writes gated_answer.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from fusion_ablations import DEFAULT_SEEN_CLASSES, features, neighbours, seen_of, unit
from reco_lightning.apps.demo.fashion_mnist import split_name
from reco_lightning.metrics import class_embeddings_from_prompt_embeddings
from reco_lightning.whitening import MemoryWhitening

K, SHARE, TEXT_DEPTH = 10, 0.9, 50
SPLITS = ("val", "test")


def vote(labels: torch.Tensor, counted: torch.Tensor, classes: int) -> torch.Tensor:
    """[B] the majority of ``labels`` [B, k] among the ``counted`` [B, k] ones (all where none is), ties to
    the nearest counted neighbour (rows are in score order)."""
    counted = torch.where(counted.any(1, keepdim=True), counted, torch.ones_like(counted))
    votes = (F.one_hot(labels, classes).float() * counted.unsqueeze(-1)).sum(1)
    first = counted.float().argmax(1)  # the nearest counted neighbour
    nearest = labels.gather(1, first.unsqueeze(1)).squeeze(1)
    return (votes + 1e-3 * F.one_hot(nearest, classes)).argmax(1)


def caption_mean(captions: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """[B, dim] the mean of the ``counted`` neighbours' captions (all where none is)."""
    counted = torch.where(counted.any(1, keepdim=True), counted, torch.ones_like(counted))
    return unit((captions * counted.unsqueeze(-1)).sum(1))


Answer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (images [B, dim], rows [B, K]) -> classes [B]


def answers(data: dict, seen: tuple[int, ...]) -> dict[str, Answer]:
    """Each answer of the module docstring, as a function of the images and their K nearest memory rows."""
    mem_v, mem_t, mem_y = unit(data["mem_v"]), unit(data["mem_t"]), data["mem_y"]
    added = ~torch.isin(mem_y, torch.tensor(seen))
    classes = class_embeddings_from_prompt_embeddings(data["prompts"])
    count = len(classes)
    caption_class = (mem_t @ classes.t()).argmax(1)
    graph = neighbours(mem_v, mem_v, K + 1)[0][:, 1:]  # each row's nearest other memory images
    smoothed = vote(caption_class[graph], torch.ones_like(graph, dtype=torch.bool), count)
    prompts = unit(data["prompts"].reshape(-1, mem_t.shape[1]))
    retrieved = neighbours(prompts, mem_t, TEXT_DEPTH)[0].view(count, -1)
    means = unit(torch.stack([mem_v[r].mean(0) for r in retrieved]))
    found = neighbours(prompts, mem_t, K)[0]
    prompt_gated = (added[found].float().mean(1) >= SHARE).unsqueeze(1)
    theirs = caption_mean(mem_t[found], added[found])
    swapped = torch.where(prompt_gated, theirs, prompts).view_as(data["prompts"])
    summed = torch.where(prompt_gated, unit(prompts + theirs), prompts).view_as(data["prompts"])

    def by_mean(counted: Callable[[torch.Tensor], torch.Tensor], weights: torch.Tensor = classes) -> Answer:
        return lambda v, rows: (caption_mean(mem_t[rows], counted(rows)) @ weights.t()).argmax(1)

    def of_added(rows: torch.Tensor) -> torch.Tensor:
        return added[rows]

    def whitened(ridge: float) -> Answer:
        whitening = MemoryWhitening(mem_t, ridge)
        return lambda v, rows: (whitening(caption_mean(mem_t[rows], added[rows])) @ classes.t()).argmax(1)

    return {
        "caption mean, all neighbours (lookup)": by_mean(
            lambda rows: torch.ones_like(rows, dtype=torch.bool)
        ),
        "caption mean, added neighbours (the library's)": by_mean(of_added),
        "the same, whitened (ridge 0.001)": whitened(0.001),
        "the same, whitened (ridge 0.01)": whitened(0.01),
        "vote of the added neighbours' caption classes": lambda v, rows: vote(
            caption_class[rows], added[rows], count
        ),
        "... smoothed over the image graph": lambda v, rows: vote(smoothed[rows], added[rows], count),
        "class means of text-retrieved images": lambda v, rows: (v @ means.t()).argmax(1),
        "label vote over the added neighbours (reads labels)": lambda v, rows: vote(
            mem_y[rows], added[rows], count
        ),
        "the library's, gated prompts their added captions' mean": by_mean(
            of_added, class_embeddings_from_prompt_embeddings(swapped)
        ),
        "the library's, gated prompts plus that mean": by_mean(
            of_added, class_embeddings_from_prompt_embeddings(summed)
        ),
    }


def score(data: dict, seen: tuple[int, ...], split: str) -> dict[str, dict[str, float]]:
    """{answer: {"unseen", "all", "seen"}} in percent for one root's ``split`` (module docstring)."""
    v, y = unit(data[f"{split}_v"]), data[f"{split}_y"]
    rows = neighbours(v, unit(data["mem_v"]), K)[0]
    added = ~torch.isin(data["mem_y"], torch.tensor(seen))
    gated = added[rows].float().mean(1) >= SHARE
    frozen = (v @ class_embeddings_from_prompt_embeddings(data["prompts"]).t()).argmax(1)
    unseen = ~torch.isin(y, torch.tensor(seen))
    out = {}
    for name, answer in answers(data, seen).items():
        predicted = answer(v, rows)
        pipeline = torch.where(gated, predicted, frozen)
        out[name] = {
            "unseen": 100 * (predicted[unseen] == y[unseen]).float().mean().item(),
            "all": 100 * (pipeline == y).float().mean().item(),
            "seen": 100 * (pipeline[~unseen] == y[~unseen]).float().mean().item(),
        }
    out["frozen model (no memory)"] = {
        "unseen": 100 * (frozen[unseen] == y[unseen]).float().mean().item(),
        "all": 100 * (frozen == y).float().mean().item(),
        "seen": 100 * (frozen[~unseen] == y[~unseen]).float().mean().item(),
    }
    return out


def mean_of(results: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    return {
        name: {metric: round(statistics.fmean(r[name][metric] for r in results), 2) for metric in cells}
        for name, cells in results[0].items()
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--root", nargs="+", default=["artifacts/demo"], help="demo roots prepared by `reco demo`"
    )
    parser.add_argument("--out", default="bench_out")
    args = parser.parse_args(argv)
    per_root: dict[str, dict] = {}
    for root in args.root:
        data, seen = features(Path(root)), seen_of(Path(root), DEFAULT_SEEN_CLASSES)
        per_root[root] = {"split": split_name(seen), **{s: score(data, seen, s) for s in SPLITS}}
        print(f"{root} done", flush=True)
    groups: dict[str, list[str]] = {}
    for root, result in per_root.items():
        groups.setdefault(result["split"], []).append(root)
    summary = {
        s: {
            "mean": mean_of([per_root[r][s] for r in per_root]),
            **{g: mean_of([per_root[r][s] for r in roots]) for g, roots in groups.items()},
        }
        for s in SPLITS
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gated_answer.json").write_text(
        json.dumps({"roots": args.root, "summary": summary, "per_root": per_root}, indent=2)
    )
    for s in SPLITS:
        names = list(groups)
        header = " | ".join(f"{g}: unseen / all" for g in names)
        print(f"\n{s}, mean of each split's roots\n| answer | {header} |\n|---|" + "---:|" * len(names))
        for answer in summary[s]["mean"]:
            cells = " | ".join(
                f"{summary[s][g][answer]['unseen']:.1f} / {summary[s][g][answer]['all']:.1f}" for g in names
            )
            print(f"| {answer} | {cells} |")
    return summary


if __name__ == "__main__":
    main()
