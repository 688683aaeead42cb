"""Fast ablations of the fusion's training on the demo's frozen features (seconds per row, not minutes).

    python benchmarks/fusion_ablations.py --root artifacts/demo --out DIR [--rows NAME ...] [--seeds 1]

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
  ``strict`` (seen-class pairs and the seen-only memory in training).

Writes DIR/fusion_ablations.json (mean and std over seeds) and prints a table.
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
) -> torch.Tensor:
    """Rows of the k best keys per query; ``excluded(start, stop)`` -> bool [n, N] of candidates to drop."""
    rows = []
    for start in range(0, len(queries), chunk):
        scores = queries[start : start + chunk] @ keys.t()
        if excluded is not None:
            scores = scores.masked_fill(excluded(start, start + len(scores)), float("-inf"))
        rows.append(scores.topk(k, dim=1).indices)
    return torch.cat(rows)


def unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


def run(
    data: dict, recipe: Recipe, seed: int, seen: tuple[int, ...], split: str = "test"
) -> dict[str, float]:
    torch.manual_seed(seed)
    mem_v, mem_t, mem_y = data["mem_v"], data["mem_t"], data["mem_y"]
    rows = torch.arange(len(mem_y))
    if recipe.protocol == "strict":
        rows = rows[torch.isin(mem_y, torch.tensor(seen))]
    train_v, train_t = mem_v[rows], mem_t[rows]  # open: the memory's own pairs; strict: its seen pairs
    key_v, key_t = unit(train_v), unit(train_t)
    threshold, own = recipe.near_duplicate_threshold, torch.arange(len(rows))

    def excluded_by(reference: torch.Tensor):
        def excluded(start: int, stop: int) -> torch.Tensor:
            drop = reference[start:stop] @ reference.t() > threshold
            drop[torch.arange(stop - start), own[start:stop]] = True  # the pair's own row
            return drop

        return excluded

    image_rows = neighbours(train_v, train_v, recipe.k, excluded_by(key_v))
    by_text = key_t if recipe.near_duplicate_of == "query" else key_v
    text_rows = neighbours(train_t, train_t, recipe.k, excluded_by(by_text))
    options = FusionConfig(num_heads=4, dropout=0.1, residual=recipe.residual, retrieved_skip=recipe.skip)
    image_fusion, text_fusion = (
        FusionTransformer(train_v.shape[1], options),
        FusionTransformer(train_v.shape[1], options),
    )
    loss_fn = RecoContrastiveLoss(LossConfig(duplicate_threshold=recipe.duplicate_threshold))
    params = [*image_fusion.parameters(), *text_fusion.parameters(), *loss_fn.parameters()]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.05, betas=(0.9, 0.98))
    steps = recipe.epochs * (len(rows) // recipe.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(warmup_cosine, warmup_steps=10, total_steps=steps)
    )

    def fuse(fusion: FusionTransformer, query: torch.Tensor, retrieved: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(retrieved.shape[:2], dtype=torch.bool) if recipe.mask else None
        return fusion(query, retrieved, mask)

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
                fuse(image_fusion, dropped(v), train_t[image_rows[batch]]),
                fuse(text_fusion, dropped(t), train_v[text_rows[batch]]),
            )
            optimizer.zero_grad()
            out["loss"].backward()
            optimizer.step()
            scheduler.step()
            loss_fn.clamp_()
    image_fusion.eval(), text_fusion.eval()
    with torch.no_grad():  # test: the all-class memory, no exclusion
        prompts = data["prompts"].reshape(-1, mem_t.shape[1])
        refined = fuse(text_fusion, prompts, mem_v[neighbours(prompts, mem_t, recipe.k)])
        classes = class_embeddings_from_prompt_embeddings(refined.view_as(data["prompts"]))
        v = data[f"{split}_v"]
        scores = fuse(image_fusion, v, mem_t[neighbours(v, mem_v, recipe.k)]) @ classes.t()
    correct = (scores.argmax(1) == data[f"{split}_y"]).float()
    is_seen = torch.isin(data[f"{split}_y"], torch.tensor(seen))
    return {
        "seen": 100 * correct[is_seen].mean().item(),
        "unseen": 100 * correct[~is_seen].mean().item(),
        "all": 100 * correct.mean().item(),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", default="artifacts/demo", help="a demo root prepared by `reco demo`")
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument(
        "--split", default="test", choices=["test", "val"], help="evaluate on (choose designs on val)"
    )
    parser.add_argument("--seen", default=",".join(map(str, DEFAULT_SEEN_CLASSES)), help="seen class ids")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    seen = tuple(int(c) for c in args.seen.split(","))
    data = features(Path(args.root))
    results = {}
    for name in args.rows:
        start = time.time()
        runs = [run(data, replace(ROWS[name]), seed, seen, args.split) for seed in range(args.seeds)]
        results[name] = {
            metric: {
                "mean": round(statistics.fmean(r[metric] for r in runs), 2),
                "std": round(statistics.pstdev([r[metric] for r in runs]) if len(runs) > 1 else 0.0, 2),
            }
            for metric in ("seen", "unseen", "all")
        }
        results[name]["recipe"] = ROWS[name].__dict__
        m = results[name]
        print(
            f"{name:24s} seen {m['seen']['mean']:5.1f}  unseen {m['unseen']['mean']:5.1f}  "
            f"all {m['all']['mean']:5.1f}  ({time.time() - start:.0f} s)",
            flush=True,
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fusion_ablations.json").write_text(
        json.dumps({"root": args.root, "seeds": args.seeds, "split": args.split, "rows": results}, indent=2)
    )
    print("\n| row | seen | unseen | all |\n|---|---:|---:|---:|")
    for name, m in results.items():
        print(f"| {name} | {m['seen']['mean']:.1f} | {m['unseen']['mean']:.1f} | {m['all']['mean']:.1f} |")
    return results


if __name__ == "__main__":
    main()
