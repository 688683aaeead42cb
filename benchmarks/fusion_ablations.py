"""Fast ablations of the fusion's training on the demo's frozen features (seconds per row, not minutes).

    python benchmarks/fusion_ablations.py --root artifacts/demo [ROOT ...] --out DIR [--rows NAME ...] [--seeds 1]

`reco demo` trains through Lightning, the feature cache and the zero-shot callback; this script trains
the very same modules (FusionTransformer x 2, RecoContrastiveLoss, AdamW with warmup + cosine, batch 256)
on the demo's embeddings held in RAM, with exact search in torch, so one design choice can be changed at
a time and measured in seconds. It reads a prepared demo root (run `reco demo` first): its backbone
encodes the validation and test images and the class prompts once (cached in ROOT/ablation_features.pt),
the memory gives the training pairs and the retrieval rows. Top-1 (percent) on the test split (``--split val``:
the validation split, where design choices are made) for seen, unseen and all classes; rows:

- ``reco``: the demo's open protocol and recipe (5 epochs, lr 1e-3, skips at weight 1, duplicate captions
  as positives, near-duplicates = copies of the pair's image, cosine > 0.9999);
- ``control``: the same, every retrieved token masked (training without retrieval);
- ``exclude 0.99 images`` / ``exclude 0.99 by query``: near-duplicate thresholds of the earlier demo, on
  the pair's image only, or on the query's own modality (text queries then lose every same caption);
- ``duplicates as negatives`` (identical captions are negatives, as in plain InfoNCE),
- ``lr 3e-4``, ``plain fusion`` (no skips: the paper's design), ``10 epochs`` (reco and control),
  ``query dropout P`` (each training query zeroed with probability P: the fusion learns to answer from
  its neighbours alone), ``k 20`` (twice the neighbours in training and test),
  ``strict`` (seen-class pairs and the seen-only memory in training);
- directions that read the neighbours' search scores (cosine to the query, z-scored over the k):
  ``scores as tokens`` (a learned, zero-initialised map of each neighbour's score added to its token),
  ``query gate`` (the neighbours' skip weighted by a learned gate in (0, 2), starting at 1, of the
  scores' mean, max and spread, the neighbours' agreement and the query's cosine to their mean),
  ``similarity-weighted skip`` (the skip a softmax over the scores with a learned sharpness starting at 0,
  i.e. at the mean);
- ``a tenth of the pairs, 50 epochs`` and its control: trained on a random tenth of the memory's pairs
  (retrieving from them) for as many steps as the demo's recipe, tested with the whole memory.

Reference rows that read the test classes' labels (not zero-shot; what the frozen image embeddings can
give with supervision, so a bound on any fusion of them): ``k-NN label vote (labels)``, the majority
label of each test image's k nearest memory images, and ``MLP probe (labels)``, a 512-hidden MLP
trained 100 epochs on the memory's image embeddings and labels.

Several roots (``--root artifacts/demo artifacts/demo_seed1 ...``: one stand-in backbone each) and
``--seeds`` (training seeds) are pooled: mean and std over roots x seeds. Writes DIR/fusion_ablations.json
(with each run's numbers) and prints a table.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from reco_lightning.apps.demo.fashion_mnist import DEFAULT_SEEN_CLASSES
from reco_lightning.data.zeroshot import ImageFolderClassification, load_templates
from reco_lightning.encoders import FrozenCLIP
from reco_lightning.fusion import FusionConfig, FusionTransformer
from reco_lightning.losses import LossConfig, RecoContrastiveLoss
from reco_lightning.memory.store import MemoryStore
from reco_lightning.metrics import build_prompts, class_embeddings_from_prompt_embeddings
from reco_lightning.optim import warmup_cosine


@dataclass(frozen=True)
class Recipe:
    protocol: str = "open"
    epochs: int = 5
    lr: float = 1e-3
    skip: float = 1.0
    residual: bool = True
    duplicate_threshold: float | None = 0.9999
    near_duplicate_threshold: float = 0.9999
    near_duplicate_of: str = "image"
    mask: bool = False
    query_dropout: float = 0.0
    k: int = 10
    batch_size: int = 256
    scores: str = ""  # "" (the demo's fusion), "tokens", "gate" or "weighted": see ScoredFusion
    pair_fraction: float = 1.0  # train on this random fraction of the memory's pairs (and retrieve from it)


ROWS: dict[str, Recipe] = {
    "reco": Recipe(),
    "control": Recipe(mask=True),
    "exclude 0.99 images": Recipe(near_duplicate_threshold=0.99),
    "exclude 0.99 by query": Recipe(near_duplicate_threshold=0.99, near_duplicate_of="query"),
    "duplicates as negatives": Recipe(duplicate_threshold=None),
    "lr 3e-4": Recipe(lr=3e-4),
    "plain fusion": Recipe(skip=0.0, residual=False),
    "10 epochs": Recipe(epochs=10),
    "control, 10 epochs": Recipe(mask=True, epochs=10),
    "query dropout 0.25": Recipe(query_dropout=0.25),
    "query dropout 0.5": Recipe(query_dropout=0.5),
    "k 20": Recipe(k=20),
    "strict": Recipe(protocol="strict"),
    "control, strict": Recipe(protocol="strict", mask=True),
    "scores as tokens": Recipe(scores="tokens"),
    "query gate": Recipe(scores="gate"),
    "similarity-weighted skip": Recipe(scores="weighted"),
    "a tenth of the pairs, 50 epochs": Recipe(pair_fraction=0.1, epochs=50),
    "control, a tenth of the pairs, 50 epochs": Recipe(pair_fraction=0.1, epochs=50, mask=True),
}


@torch.no_grad()
def features(root: Path) -> dict:
    """Frozen embeddings of the demo root's test/val images, class prompts and memory (cached)."""
    path = root / "ablation_features.pt"
    if path.is_file():
        cached = torch.load(path)
        if "val_v" in cached:
            return cached
    clip = FrozenCLIP(str(root / "backbone"))

    def encode(folder: Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        data = ImageFolderClassification(str(folder))
        chunks, labels = [], []
        for start in range(0, len(data), 512):
            images, batch_labels = zip(
                *[data[i] for i in range(start, min(len(data), start + 512))], strict=True
            )
            chunks.append(clip.encode_images(clip.preprocess_images(list(images))))
            labels += batch_labels
        return torch.cat(chunks), torch.tensor(labels), data.classnames

    test_v, test_y, classes = encode(root / "test")
    val_v, val_y, _ = encode(root / "val")
    templates = load_templates("fashion_mnist")
    prompts = clip.encode_captions(build_prompts(classes, templates)).view(len(classes), len(templates), -1)
    memory = MemoryStore.open(root / "memory_all", load_indexes=False)
    with open(root / "pairs" / "memory.csv", newline="") as handle:
        label_of = {int(r["id"]): int(r["label"]) for r in csv.DictReader(handle)}
    result = {
        "test_v": test_v,
        "test_y": test_y,
        "val_v": val_v,
        "val_y": val_y,
        "prompts": prompts,
        "mem_v": torch.from_numpy(np.array(memory.embeddings("image"), dtype=np.float32)),
        "mem_t": torch.from_numpy(np.array(memory.embeddings("text"), dtype=np.float32)),
        "mem_y": torch.tensor([label_of[int(i)] for i in memory.ids]),
    }
    torch.save(result, path)
    return result


def neighbours(
    queries: torch.Tensor, keys: torch.Tensor, k: int, excluded=None, chunk: int = 2048
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [n, k] of the k best keys per query and their scores; ``excluded(start, stop)`` -> bool
    [n, N] of candidates to drop."""
    rows, values = [], []
    for start in range(0, len(queries), chunk):
        scores = queries[start : start + chunk] @ keys.t()
        if excluded is not None:
            scores = scores.masked_fill(excluded(start, start + len(scores)), float("-inf"))
        top = scores.topk(k, dim=1)
        rows.append(top.indices), values.append(top.values)
    return torch.cat(rows), torch.cat(values)


def unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


class ScoredFusion(FusionTransformer):
    """The demo's fusion (residual + neighbours' skip) reading the neighbours' search scores [B, k] too.

    ``mode``: "tokens" adds a learned map of each score to its token; "gate" scales the skip by a learned
    function of the query and its neighbours; "weighted" makes the skip a softmax over the scores. Every
    added map starts at zero, so each variant starts as the demo's fusion."""

    def __init__(self, dim: int, config: FusionConfig, mode: str) -> None:
        super().__init__(dim, replace(config, retrieved_skip=0.0))
        self.mode, self.skip = mode, config.retrieved_skip
        self.score_map = torch.nn.Linear(2, self.width)
        self.gate = torch.nn.Sequential(torch.nn.Linear(5, 32), torch.nn.GELU(), torch.nn.Linear(32, 1))
        self.sharpness = torch.nn.Parameter(torch.zeros(()))
        for layer in (self.score_map, self.gate[2]):
            torch.nn.init.zeros_(layer.weight), torch.nn.init.zeros_(layer.bias)

    def forward(
        self,
        query: torch.Tensor,
        retrieved: torch.Tensor,
        scores: torch.Tensor,
        retrieved_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        valid = torch.ones_like(scores) if retrieved_mask is None else retrieved_mask.to(scores.dtype)
        z = (scores - scores.mean(1, keepdim=True)) / (scores.std(1, keepdim=True) + 1e-3)
        tokens = self.tokens(query, retrieved)
        if self.mode == "tokens":
            features = torch.stack([z, 10 * (scores - 0.9)], -1)
            tokens = torch.cat([tokens[:, :1], tokens[:, 1:] + self.score_map(features)], 1)
        out = self.branch(tokens, retrieved_mask) + query
        logits = z * self.sharpness if self.mode == "weighted" else torch.zeros_like(z)
        weights = (logits - logits.max(1, keepdim=True).values).exp() * valid  # a softmax over valid ones
        weights = weights / weights.sum(1, keepdim=True).clamp(min=1e-12)
        mean = (weights.unsqueeze(-1) * retrieved).sum(1)
        gate = 1.0
        if self.mode == "gate":
            stats = [scores.mean(1), scores.max(1).values, 10 * scores.std(1)]
            stats += [unit(retrieved).mean(1).norm(dim=-1), (unit(query) * unit(mean)).sum(-1)]
            gate = 2 * torch.sigmoid(self.gate(torch.stack(stats, -1)))
        return unit(out + self.skip * gate * mean)


def run(
    data: dict, recipe: Recipe, seed: int, seen: tuple[int, ...], split: str = "test"
) -> dict[str, float]:
    torch.manual_seed(seed)
    mem_v, mem_t, mem_y = data["mem_v"], data["mem_t"], data["mem_y"]
    rows = torch.arange(len(mem_y))
    if recipe.protocol == "strict":
        rows = rows[torch.isin(mem_y, torch.tensor(seen))]
    if recipe.pair_fraction < 1:
        draw = torch.randperm(len(rows), generator=torch.Generator().manual_seed(1234 + seed))
        rows = rows[draw[: int(recipe.pair_fraction * len(rows))].sort().values]
    train_v, train_t = mem_v[rows], mem_t[rows]  # open: the memory's own pairs; strict: its seen pairs
    key_v, key_t = unit(train_v), unit(train_t)
    threshold, own = recipe.near_duplicate_threshold, torch.arange(len(rows))

    def excluded_by(reference: torch.Tensor):
        def excluded(start: int, stop: int) -> torch.Tensor:
            drop = reference[start:stop] @ reference.t() > threshold
            drop[torch.arange(stop - start), own[start:stop]] = True  # the pair's own row
            return drop

        return excluded

    image_rows, image_scores = neighbours(train_v, train_v, recipe.k, excluded_by(key_v))
    by_text = key_t if recipe.near_duplicate_of == "query" else key_v
    text_rows, text_scores = neighbours(train_t, train_t, recipe.k, excluded_by(by_text))
    options = FusionConfig(num_heads=4, dropout=0.1, residual=recipe.residual, retrieved_skip=recipe.skip)
    if recipe.scores:
        image_fusion, text_fusion = (ScoredFusion(train_v.shape[1], options, recipe.scores) for _ in "it")
    else:
        image_fusion, text_fusion = (FusionTransformer(train_v.shape[1], options) for _ in "it")
    loss_fn = RecoContrastiveLoss(LossConfig(duplicate_threshold=recipe.duplicate_threshold))
    params = [*image_fusion.parameters(), *text_fusion.parameters(), *loss_fn.parameters()]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.05, betas=(0.9, 0.98))
    steps = recipe.epochs * (len(rows) // recipe.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(warmup_cosine, warmup_steps=10, total_steps=steps)
    )

    def fuse(
        fusion: FusionTransformer, query: torch.Tensor, retrieved: torch.Tensor, scores: torch.Tensor
    ) -> torch.Tensor:
        mask = torch.zeros(retrieved.shape[:2], dtype=torch.bool) if recipe.mask else None
        return fusion(query, retrieved, scores, mask) if recipe.scores else fusion(query, retrieved, mask)

    def dropped(query: torch.Tensor) -> torch.Tensor:
        """Training only: zero each query with probability ``query_dropout`` (the fusion then answers from
        its neighbours alone, as it must for a concept the backbone cannot embed)."""
        if not recipe.query_dropout:
            return query
        return query * (torch.rand(len(query), 1) >= recipe.query_dropout).to(query.dtype)

    for _ in range(recipe.epochs):
        image_fusion.train(), text_fusion.train()
        order = torch.randperm(len(rows))
        for start in range(0, len(rows) - recipe.batch_size + 1, recipe.batch_size):
            batch = order[start : start + recipe.batch_size]
            v, t = train_v[batch], train_t[batch]
            out = loss_fn(
                v,
                t,
                fuse(image_fusion, dropped(v), train_t[image_rows[batch]], image_scores[batch]),
                fuse(text_fusion, dropped(t), train_v[text_rows[batch]], text_scores[batch]),
            )
            optimizer.zero_grad()
            out["loss"].backward()
            optimizer.step()
            scheduler.step()
            loss_fn.clamp_()
    image_fusion.eval(), text_fusion.eval()
    with torch.no_grad():  # test: the all-class memory, no exclusion
        prompts = data["prompts"].reshape(-1, mem_t.shape[1])
        rows, scores = neighbours(unit(prompts), unit(mem_t), recipe.k)
        refined = fuse(text_fusion, prompts, mem_v[rows], scores)
        classes = class_embeddings_from_prompt_embeddings(refined.view_as(data["prompts"]))
        v = data[f"{split}_v"]
        rows, scores = neighbours(unit(v), unit(mem_v), recipe.k)
        logits = fuse(image_fusion, v, mem_t[rows], scores) @ classes.t()
    return top1(logits.argmax(1), data[f"{split}_y"], seen)


def top1(predicted: torch.Tensor, labels: torch.Tensor, seen: tuple[int, ...]) -> dict[str, float]:
    """Top-1 in percent over the seen classes, the unseen ones and all."""
    correct = (predicted == labels).float()
    is_seen = torch.isin(labels, torch.tensor(seen))
    return {
        "seen": 100 * correct[is_seen].mean().item(),
        "unseen": 100 * correct[~is_seen].mean().item(),
        "all": 100 * correct.mean().item(),
    }


def label_vote(data: dict, seed: int, seen: tuple[int, ...], split: str = "test", k: int = 10) -> dict:
    """Reference (reads labels): the majority label of each image's k nearest memory images."""
    rows, _ = neighbours(unit(data[f"{split}_v"]), unit(data["mem_v"]), k)
    votes = F.one_hot(data["mem_y"][rows], int(data["mem_y"].max()) + 1).sum(1)
    return top1(votes.argmax(1), data[f"{split}_y"], seen)


def probe(
    data: dict, seed: int, seen: tuple[int, ...], split: str = "test", epochs: int = 100
) -> dict[str, float]:
    """Reference (reads labels): an MLP (512 hidden) trained on the memory's image embeddings and labels."""
    torch.manual_seed(seed)
    x, y = unit(data["mem_v"]), data["mem_y"]
    model = torch.nn.Sequential(
        torch.nn.Linear(x.shape[1], 512), torch.nn.GELU(), torch.nn.Linear(512, int(y.max()) + 1)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    for _ in range(epochs):
        for batch in torch.randperm(len(x)).split(256):
            loss = F.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return top1(model(unit(data[f"{split}_v"])).argmax(1), data[f"{split}_y"], seen)


REFERENCES = {"k-NN label vote (labels)": label_vote, "MLP probe (labels)": probe}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--root", nargs="+", default=["artifacts/demo"], help="demo roots prepared by `reco demo` (pooled)"
    )
    parser.add_argument("--out", default="bench_out")
    names = [*ROWS, *REFERENCES]
    parser.add_argument("--rows", nargs="+", default=names, choices=names)
    parser.add_argument("--seeds", type=int, default=1, help="training seeds per root")
    parser.add_argument(
        "--split", default="test", choices=["test", "val"], help="evaluate on (choose designs on val)"
    )
    parser.add_argument("--seen", default=",".join(map(str, DEFAULT_SEEN_CLASSES)), help="seen class ids")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    seen = tuple(int(c) for c in args.seen.split(","))
    datasets = {root: features(Path(root)) for root in args.root}
    results = {}
    for name in args.rows:
        start = time.time()
        runs = []
        for root, data in datasets.items():
            for seed in range(args.seeds):
                if name in REFERENCES:
                    numbers = REFERENCES[name](data, seed, seen, args.split)
                else:
                    numbers = run(data, ROWS[name], seed, seen, args.split)
                runs.append({"root": root, "seed": seed, **{m: round(v, 2) for m, v in numbers.items()}})
        results[name] = {
            metric: {
                "mean": round(statistics.fmean(r[metric] for r in runs), 2),
                "std": round(statistics.pstdev([r[metric] for r in runs]) if len(runs) > 1 else 0.0, 2),
            }
            for metric in ("seen", "unseen", "all")
        }
        results[name]["recipe"] = ROWS[name].__dict__ if name in ROWS else "reference: reads labels"
        results[name]["runs"] = runs
        m = results[name]
        print(
            f"{name:40s} seen {m['seen']['mean']:5.1f}  unseen {m['unseen']['mean']:5.1f}  "
            f"all {m['all']['mean']:5.1f}  ({time.time() - start:.0f} s)",
            flush=True,
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"roots": args.root, "seeds": args.seeds, "split": args.split, "rows": results}
    (out / "fusion_ablations.json").write_text(json.dumps(summary, indent=2))
    pooled = len(args.root) * args.seeds > 1
    print(
        f"\n| row ({len(args.root)} roots x {args.seeds} seeds) | seen | unseen | all |\n|---|---:|---:|---:|"
    )
    for name, m in results.items():
        cells = [
            f"{m[k]['mean']:.1f}" + (f" ± {m[k]['std']:.1f}" if pooled else "")
            for k in ("seen", "unseen", "all")
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")
    return results


if __name__ == "__main__":
    main()
