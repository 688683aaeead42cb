"""Fusion training throughput: on-the-fly (CLIP + memory search each step) vs feature cache (neither).

    python benchmarks/train_throughput.py --out bench_out/            # vit_b32 and demo
    python benchmarks/train_throughput.py --models demo --out /tmp/b  # one model

One training step is what Lightning runs per batch: ``RecoModule.forward`` (the package's own code path),
the RECO loss, backward, and an AdamW step with the module's ``configure_optimizers`` parameter groups.

* on the fly: a batch of full-size backbone inputs (random pixels and token ids of CLIP's shapes) goes
  through the frozen CLIP (no grad), then exact search with self/near-duplicate exclusion in an in-RAM
  memory of N pairs (fp16 rows as on disk), then the fusion forward/backward;
* cached: a batch of the rows a feature cache yields (fp16 embeddings, ids, k neighbour rows per side);
  no CLIP and no search, only the gather of k memory rows per query and the fusion forward/backward.

Not timed in either mode: reading and decoding images / cache rows (the DataLoader's job, in workers).
Backbones carry random weights (the cost of a step does not depend on the weight values). Step times are
medians over the timed steps. The machine may be shared with other jobs, which stalls multi-threaded
small ops, so by default each (mode, batch size) first probes one step at 1 thread and at all cores and
keeps the faster (reported as ``threads``); the best step and the load average are in the JSON too.

FLOPs of a step are counted with ``torch.utils.flop_counter.FlopCounterMode`` and cross-checked with the
analytic count of :func:`analytic_cached_step_flops`. The achieved rate is compared with the machine's
float32 matmul rate measured in the same run: all cores on 2048/4096 squares before and after the models,
plus a 2048 matmul "adjacent" to every configuration (same threads, just before its timed steps).
``cached_fraction_of_matmul`` divides by the best of all of them (the strictest ceiling);
``cached_fraction_of_adjacent_matmul`` by the rate the machine gave at that moment.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from reco_lightning.atomic import atomic_write_text

__all__ = [
    "MODELS",
    "ModelSpec",
    "analytic_cached_step_flops",
    "main",
    "measure_matmul_gflops",
    "training_step",
]

SPEEDUP_TARGET = 10.0
MATMUL_FRACTION_TARGET = 0.30


@dataclass(frozen=True)
class ModelSpec:
    """A backbone architecture plus the batch sizes and memory size that reflect its real use."""

    key: str
    description: str
    memory_size: int
    on_the_fly_batch_sizes: tuple[int, ...]
    cached_batch_sizes: tuple[int, ...]
    k: int = 10
    fusion_heads: int = 8


MODELS: dict[str, ModelSpec] = {
    "vit_b32": ModelSpec(
        key="vit_b32",
        description="CLIP ViT-B/32 architecture (random weights): text 512x12 layers, vision 768x12, proj 512",
        memory_size=100_000,
        on_the_fly_batch_sizes=(32, 64),
        cached_batch_sizes=(32, 256, 1024),
        fusion_heads=8,  # the package default (RECO.md)
    ),
    "demo": ModelSpec(
        key="demo",
        description="the demo's stand-in CLIP (reco_lightning.apps.demo.recipe.BackboneRecipe defaults, random weights)",
        memory_size=30_000,  # the demo backbone's default memory split
        on_the_fly_batch_sizes=(32, 256),
        cached_batch_sizes=(32, 256, 1024),
        fusion_heads=4,  # width 64: 16 per head, as configs/tiny.yaml does for its small width
    ),
}


# --- machine ------------------------------------------------------------------------------------------
def measure_matmul_gflops(sizes: Sequence[int] = (2048, 4096), repeats: int = 3) -> dict[str, Any]:
    """Best-of-``repeats`` float32 square matmul rate with all torch threads: the ceiling a step can reach."""
    rates: dict[str, float] = {}
    generator = torch.Generator().manual_seed(0)
    for n in sizes:
        a = torch.randn(n, n, generator=generator)
        b = torch.randn(n, n, generator=generator)
        torch.matmul(a, b)  # warm-up: thread pool, allocator
        best = min(_timed(lambda a=a, b=b: torch.matmul(a, b)) for _ in range(repeats))
        rates[str(n)] = 2.0 * n**3 / best / 1e9
    return {"gflops": max(rates.values()), "by_size": rates, "threads": torch.get_num_threads()}


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# --- backbones ----------------------------------------------------------------------------------------
def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*torchvision.*")


def build_vit_b32(directory: Path, seed: int = 0) -> dict[str, Any]:
    """Save a randomly initialised CLIP of ViT-B/32's exact architecture (77 tokens, 49408-token vocab).

    The tokenizer only has to exist for ``from_pretrained``; the text tower keeps CLIP's vocabulary size so
    its embedding table has the real size, and the benchmark feeds random ids from that range.
    """
    from transformers import CLIPConfig, CLIPModel

    from reco_lightning.tiny_clip import build_clip_tokenizer, save_clip

    tokenizer = build_clip_tokenizer(["a photo of a dog.", "a cat on a mat."])
    text = {
        "vocab_size": 49408,
        "hidden_size": 512,
        "intermediate_size": 2048,
        "num_hidden_layers": 12,
        "num_attention_heads": 8,
        "max_position_embeddings": 77,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision = {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "image_size": 224,
        "patch_size": 32,
        "num_channels": 3,
    }
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=512))
    save_clip(directory, model, tokenizer)
    return {"source": "CLIPConfig(ViT-B/32)", "text": text, "vision": vision, "projection_dim": 512}


def build_demo(directory: Path, seed: int = 0) -> dict[str, Any]:
    """Save the demo backbone's architecture with random weights (the demo trains its own; timing only)."""
    from reco_lightning.apps.demo.recipe import BackboneRecipe
    from reco_lightning.tiny_clip import build_clip_tokenizer, new_clip, save_clip

    recipe = BackboneRecipe()
    tokenizer = build_clip_tokenizer(
        [t.replace("{c}", c) for t in recipe.caption_templates for c in recipe.classnames]
    )
    arch = recipe.architecture()
    save_clip(directory, new_clip(tokenizer, seed=seed, **arch), tokenizer)
    return {
        "source": "reco_lightning.apps.demo.recipe.BackboneRecipe() defaults",
        "vocab_size": len(tokenizer),
        **arch,
    }


BUILDERS: dict[str, Callable[[Path, int], dict[str, Any]]] = {"vit_b32": build_vit_b32, "demo": build_demo}


# --- memory and batches -------------------------------------------------------------------------------
def _unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    """CLIP-like synthetic rows (see benchmarks/synthetic.py)."""
    from synthetic import clustered_unit_vectors

    return np.asarray(clustered_unit_vectors(n, dim, seed=seed), dtype=np.float32)


def build_memory(n: int, dim: int, seed: int = 0, backend: str = "exact"):
    """An in-RAM memory of ``n`` pairs searched by ``backend`` (its package defaults), rows stored fp16 as a
    memory on disk holds them."""
    from reco_lightning.memory.store import MemoryStore

    image = _unit_vectors(n, dim, seed).astype(np.float16)
    text = _unit_vectors(n, dim, seed + 1).astype(np.float16)
    return MemoryStore.from_arrays(image, text, np.arange(n, dtype=np.int64), backend=backend)


def step_shares(phases: dict[str, float]) -> dict[str, float]:
    """Where one step's time goes, as fractions of it: the index search, the rest of retrieval (exclusion,
    gather), the fusion's forward, the frozen backbone's forward, and the rest (loss, backward, optimiser)."""
    total = phases["total_without_index_search"]
    search = phases.get("index_search", 0.0)
    shares = {
        "search": search,
        "retrieval_rest": max(0.0, phases["retrieve"] - search),
        "fusion_forward": phases["fusion_forward"],
        "backbone": phases["clip_embed"],
    }
    shares["loss_backward_optimizer"] = max(0.0, total - sum(shares.values()))
    return {name: value / total for name, value in shares.items()}


def on_the_fly_batch(batch_size: int, config: Any, memory_size: int, seed: int) -> dict[str, Tensor]:
    """What the collator yields: CLIP-normalised-range pixels, full-length token ids, ids in the memory."""
    g = torch.Generator().manual_seed(seed)
    vision, text = config.vision_config, config.text_config
    size, length = vision.image_size, text.max_position_embeddings
    return {
        "pixel_values": torch.randn(batch_size, vision.num_channels, size, size, generator=g),
        "input_ids": torch.randint(2, text.vocab_size, (batch_size, length), generator=g),
        "attention_mask": torch.ones(batch_size, length, dtype=torch.long),
        "id": torch.randint(0, memory_size, (batch_size,), generator=g),
    }


def cached_batch(batch_size: int, dim: int, k: int, memory_size: int, seed: int) -> dict[str, Tensor]:
    """What ``CachedPairs`` yields: fp16 unit embeddings, ids and k valid memory rows per side."""
    g = torch.Generator().manual_seed(seed)

    def emb() -> Tensor:
        return F.normalize(torch.randn(batch_size, dim, generator=g), dim=-1).half()

    return {
        "image_emb": emb(),
        "text_emb": emb(),
        "id": torch.randint(0, memory_size, (batch_size,), generator=g),
        "image_neighbours": torch.randint(0, memory_size, (batch_size, k), generator=g),
        "text_neighbours": torch.randint(0, memory_size, (batch_size, k), generator=g),
    }


# --- the step -----------------------------------------------------------------------------------------
def training_step(module: Any, optimizer: torch.optim.Optimizer, batch: dict[str, Tensor]) -> Tensor:
    """Forward (the module's own path: embed, retrieve or gather, fuse) + loss + backward + AdamW step.

    Mirrors ``RecoModule._shared_step`` minus ``self.log`` (which needs a Trainer); the LR scheduler's
    scalar update is left out.
    """
    out = module(batch, exclude_self=True)
    loss = module.criterion(out["v"], out["t"], out["v_bar"], out["t_bar"])["loss"]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def thread_candidates(requested: int) -> list[int]:
    """``requested`` threads, or (0 = auto) both one thread and all cores, to be probed per configuration."""
    cores = os.cpu_count() or 1
    return [requested] if requested > 0 else sorted({1, cores})


def time_steps(
    step: Callable[[dict[str, Tensor]], Any],
    batches: Sequence[dict[str, Tensor]],
    warmup: int,
    steps: int,
    label: str,
    threads: Sequence[int],
    min_seconds: float = 0.0,
    max_steps: int = 50,
) -> dict[str, Any]:
    """Time at least ``steps`` steps (and ``min_seconds``) after ``warmup`` untimed ones, batches cycled.

    Why probe threads: on a machine shared with other jobs, a multi-threaded op waits at its barrier for
    a descheduled thread, and small ops slow down several-fold (measured here: a W=64 fusion step took
    0.4 s on one thread and 1.1-2.9 s on two while other jobs ran). With several candidates, untimed
    probe steps alternate between them (three rounds when a step is short, one otherwise) and the
    count with the fastest probe is used for the timed steps; probe times are reported.
    """
    torch.set_num_threads(max(threads))
    for i in range(warmup):
        step(batches[i % len(batches)])
    probe: dict[str, float] = {}
    if len(threads) > 1:
        rounds = 1
        while rounds <= 3:
            for n in threads:
                torch.set_num_threads(n)
                probe[str(n)] = min(probe.get(str(n), math.inf), _timed(lambda: step(batches[0])))
            if rounds == 1 and max(probe.values()) > 1.0:
                break  # long steps: one round says enough and more would cost minutes
            rounds += 1
    chosen = min(threads, key=lambda n: probe.get(str(n), 0.0))
    torch.set_num_threads(chosen)
    adjacent = measure_matmul_gflops((2048,), repeats=2)["gflops"]  # what the machine gives right now
    times: list[float] = []
    while len(times) < max(1, steps) or (sum(times) < min_seconds and len(times) < max_steps):
        batch = batches[len(times) % len(batches)]
        times.append(_timed(lambda batch=batch: step(batch)))
        if len(times) <= steps or len(times) % 10 == 0:
            print(f"  {label}: step {len(times)} {times[-1]:.3f}s ({chosen} threads)", flush=True)
    batch_size = len(batches[0]["id"])
    median = statistics.median(times)
    return {
        "batch_size": batch_size,
        "threads": chosen,
        "thread_probe_s": probe,
        "steps_timed": len(times),
        "step_s_median": median,
        "step_s_best": min(times),
        "step_s_all": times,
        "samples_per_s": batch_size / median,
        "samples_per_s_best_step": batch_size / min(times),
        "matmul_gflops_adjacent": adjacent,
    }


@contextmanager
def _phase(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


def phase_breakdown(
    module: Any, optimizer: torch.optim.Optimizer, batch: dict[str, Tensor]
) -> dict[str, float]:
    """Seconds per phase of one step, calling the same pieces ``RecoModule.refine`` calls, in order.

    ``retrieve`` is ``Retriever.__call__`` (search + exclusion + gather) on the fly and
    ``Retriever.gather`` with cached rows; ``index_search`` re-times the bare faiss search of the same
    queries (k + exclusion_margin candidates) to split it out of ``retrieve``.
    """
    t: dict[str, float] = {}
    retriever = module.retriever
    with _phase(t, "clip_embed"):
        v, tx = module.embed(batch)
    ids = batch["id"]
    refined = {}
    for modality, emb in (("image", v), ("text", tx)):
        fusion = module.image_fusion if modality == "image" else module.text_fusion
        rows = batch.get(f"{modality}_neighbours")
        with _phase(t, "retrieve"):
            if rows is not None:
                neighbours = retriever.gather(rows, modality, emb.device)
            else:
                neighbours = retriever(emb, modality, exclude_ids=ids, pair_images=v)
        with _phase(t, "fusion_forward"):
            refined[modality] = fusion(emb, neighbours.embeddings, neighbours.mask)
        if rows is None:
            fetch = min(len(retriever.memory), retriever.k + retriever.exclusion_margin)
            q = emb.detach().float().numpy()
            index = retriever.memory.index(retriever.searched_modality(modality))
            with _phase(t, "index_search"):
                index.search(q, fetch)
    with _phase(t, "loss_forward"):
        loss = module.criterion(v, tx, refined["image"], refined["text"])["loss"]
    with _phase(t, "backward"):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
    with _phase(t, "optimizer_step"):
        optimizer.step()
    t["total_without_index_search"] = sum(s for name, s in t.items() if name != "index_search")
    return t


def profile_top_ops(step: Callable[[], Any], top: int = 12) -> list[dict[str, Any]]:
    """The ops that take a step's time (torch.profiler, self CPU time, forward and backward together)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [
        {
            "op": e.key,
            "self_s": e.self_cpu_time_total / 1e6,
            "share": e.self_cpu_time_total / total,
            "calls": int(e.count),
        }
        for e in events[:top]
    ]


def count_flops(step: Callable[[], Any]) -> dict[str, Any]:
    """FLOPs of one step per torch op (FlopCounterMode; CPU flash attention and faiss are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return {"total": int(counter.get_total_flops()), "by_op": by_op}


def analytic_cached_step_flops(
    batch: int,
    k: int,
    dim: int,
    width: int | None = None,
    mlp_ratio: float = 4.0,
    layers: int = 1,
    mixed_terms: bool = True,
) -> dict[str, float]:
    """FLOPs of one cached training step (a multiply-add = 2 FLOPs), by part.

    Per side, the fusion encoder reads L = k + 1 tokens of width W (hidden H = W * mlp_ratio):

    * every layer but the last, forward: linear 2 * B * L * (4 W^2 + 2 W H) (q, k, v, out projections +
      MLP) and attention 2 * 2 * B * L^2 * W (Q K^T and A V);
    * the last layer runs only the query position (only its output is read; keys and values still need
      every token): linear 2 * B * (2 W^2 L + 2 W^2 + 2 W H), attention 2 * 2 * B * L * W;
    * optional in/out projections when W != D: 2 B L D W + 2 B W D;
    * backward = 2 x forward (input and weight gradients; inputs need gradients down to the first layer
      because the learned type embedding is added to them), so x3 in total.

    ``fusion_linear_all_tokens`` is the linear count if the last layer ran every token (what a stock
    ``nn.TransformerEncoder`` does), to size the saving.

    Loss: each InfoNCE term has one [B, D] x [D, B] logits matmul (2 B^2 D); backward needs two matmuls
    for NCE(v_bar, t_bar) and one for each mixed term (v and t are frozen): (3 + 2 + 1 + 1) * 2 B^2 D.
    Layer norms, GELU, softmax and AdamW are elementwise (O(B L W) or O(params)) and left out.
    """
    w = width or dim
    hidden = int(w * mlp_ratio)
    seq = k + 1
    per_layer = 2 * batch * seq * (4 * w * w + 2 * w * hidden)
    query_only_last = 2 * batch * (2 * w * w * seq + 2 * w * w + 2 * w * hidden)
    linear = per_layer * (layers - 1) + query_only_last
    attention = 2 * 2 * batch * seq * w * (seq * (layers - 1) + 1)
    projections = 0 if w == dim else 2 * batch * seq * dim * w + 2 * batch * w * dim
    fusion = 2 * 3 * (linear + attention + projections)  # two sides, forward + backward
    loss_matmuls = (3 + 2 + 1 + 1) if mixed_terms else (1 + 2)
    loss = loss_matmuls * 2 * batch * batch * dim
    return {
        "fusion_linear": float(2 * 3 * (linear + projections)),
        "fusion_linear_all_tokens": float(2 * 3 * (per_layer * layers + projections)),
        "fusion_attention": float(2 * 3 * attention),
        "loss": float(loss),
        "total": float(fusion + loss),
        "total_without_attention": float(fusion + loss - 2 * 3 * attention),
    }


def clip_forward_flops(config: Any, batch: int) -> float:
    """Analytic FLOPs of the frozen CLIP forward (both towers, full-length text), for a cross-check."""
    v, t = config.vision_config, config.text_config
    patches = (v.image_size // v.patch_size) ** 2
    vision = (
        2
        * batch
        * (patches + 1)
        * v.num_hidden_layers
        * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size)
        + 2 * 2 * batch * (patches + 1) ** 2 * v.hidden_size * v.num_hidden_layers
    )
    vision += 2 * batch * patches * v.num_channels * v.patch_size**2 * v.hidden_size  # patch embedding
    length = t.max_position_embeddings
    text = (
        2
        * batch
        * length
        * t.num_hidden_layers
        * (4 * t.hidden_size**2 + 2 * t.hidden_size * t.intermediate_size)
        + 2 * 2 * batch * length**2 * t.hidden_size * t.num_hidden_layers
    )
    projection = 2 * batch * config.projection_dim * (v.hidden_size + t.hidden_size)
    return float(vision + text + projection)


# --- one model ----------------------------------------------------------------------------------------
def run_model(spec: ModelSpec, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Build the backbone and memory, then time both modes at every batch size of ``spec``."""
    from reco_lightning.fusion import FusionConfig
    from reco_lightning.model import RecoModule

    print(f"[{spec.key}] building backbone ({spec.description})", flush=True)
    backbone_dir = work / f"clip_{spec.key}"
    config_info = BUILDERS[spec.key](backbone_dir, args.seed)
    module = RecoModule(
        backbone=str(backbone_dir), k=spec.k, fusion_config=FusionConfig(num_heads=spec.fusion_heads)
    )
    config, dim, k, n = module.backbone.model.config, module.backbone.dim, spec.k, spec.memory_size
    print(f"[{spec.key}] memory of {n} pairs x {dim} ({args.memory_backend} search)", flush=True)
    start = time.perf_counter()
    memory = build_memory(n, dim, args.seed, args.memory_backend)
    module.set_memory(memory)
    memory_build_s = time.perf_counter() - start
    module.train()
    optimizer = module.configure_optimizers()["optimizer"]

    def step(batch: dict[str, Tensor]) -> Tensor:
        return training_step(module, optimizer, batch)

    threads = thread_candidates(args.threads)
    otf_batches: dict[int, list[dict[str, Tensor]]] = {}
    on_the_fly: dict[str, Any] = {}
    for b in spec.on_the_fly_batch_sizes:
        otf_batches[b] = [on_the_fly_batch(b, config, n, args.seed + i) for i in range(2)]
        on_the_fly[str(b)] = time_steps(
            step,
            otf_batches[b],
            args.warmup,
            args.steps,
            f"[{spec.key}] on-the-fly B={b}",
            threads,
            args.min_seconds,
        )
    cached_batches: dict[int, list[dict[str, Tensor]]] = {}
    cached: dict[str, Any] = {}
    for b in sorted({*spec.cached_batch_sizes, *spec.on_the_fly_batch_sizes}):
        cached_batches[b] = [cached_batch(b, dim, k, n, args.seed + i) for i in range(2)]
        cached[str(b)] = time_steps(
            step,
            cached_batches[b],
            args.warmup,
            args.steps,
            f"[{spec.key}] cached B={b}",
            threads,
            args.min_seconds,
        )

    best_otf = max(on_the_fly.values(), key=lambda r: r["samples_per_s"])
    best_cached = max((cached[str(b)] for b in spec.cached_batch_sizes), key=lambda r: r["samples_per_s"])
    b_otf, b_cached = best_otf["batch_size"], best_cached["batch_size"]

    print(f"[{spec.key}] counting FLOPs and timing phases", flush=True)
    torch.set_num_threads(best_cached["threads"])
    cached_counted = count_flops(lambda: step(cached_batches[b_cached][0]))
    cached_phases = phase_breakdown(module, optimizer, cached_batches[b_cached][0])
    cached_profile = profile_top_ops(lambda: step(cached_batches[b_cached][0])) if args.profile else []
    torch.set_num_threads(best_otf["threads"])
    otf_counted = count_flops(lambda: step(otf_batches[b_otf][0]))
    otf_phases = phase_breakdown(module, optimizer, otf_batches[b_otf][0])
    fusion, loss = module.image_fusion.config, module.criterion.config
    analytic = analytic_cached_step_flops(
        b_cached, k, dim, fusion.width, fusion.mlp_ratio, fusion.num_layers, loss.mixed_terms
    )
    breakdown = {
        "on_the_fly": {"batch_size": b_otf, "threads": best_otf["threads"], **otf_phases},
        "cached": {"batch_size": b_cached, "threads": best_cached["threads"], **cached_phases},
    }
    shares = {"on_the_fly": step_shares(otf_phases), "cached": step_shares(cached_phases)}
    matmul = args.matmul_gflops
    cached_gflops = cached_counted["total"] / best_cached["step_s_median"] / 1e9
    otf_gflops = otf_counted["total"] / best_otf["step_s_median"] / 1e9
    same_b = cached[str(b_otf)]
    result = {
        "description": spec.description,
        "config": config_info,
        "dim": dim,
        "k": k,
        "fusion": {
            "width": module.image_fusion.width,
            "layers": fusion.num_layers,
            "heads": fusion.num_heads,
            "mlp_ratio": fusion.mlp_ratio,
            "trainable_parameters": sum(p.numel() for p in module.trainable_parameters()),
        },
        "memory_size": n,
        "memory_build_s": memory_build_s,
        # the backend as built (class and resolved init args: nlist, nprobe, ...); until session 10 this
        # said "exact (faiss IndexFlatIP)" whatever the backend, as the 1M IVF-PQ JSON still does
        "search": {
            "backend": memory.manifest["backend"],
            "candidates": "k + exclusion_margin, self + near-duplicate exclusion",
        },
        "on_the_fly_batch_size": b_otf,
        "on_the_fly_samples_per_s": best_otf["samples_per_s"],
        "cached_batch_size": b_cached,
        "cached_samples_per_s": best_cached["samples_per_s"],
        "speedup": best_cached["samples_per_s"] / best_otf["samples_per_s"],
        "speedup_definition": (
            f"cached samples/s at B={b_cached} over on-the-fly samples/s at B={b_otf} "
            "(each mode's fastest measured batch size; median step times)"
        ),
        "cached_samples_per_s_at_on_the_fly_batch_size": same_b["samples_per_s"],
        "speedup_same_batch_size": same_b["samples_per_s"] / best_otf["samples_per_s"],
        "cached_flops_per_step": cached_counted["total"],
        "cached_flops_per_step_analytic": analytic,
        "cached_flops_counter_vs_analytic": cached_counted["total"] / analytic["total_without_attention"],
        "cached_flops_by_op": cached_counted["by_op"],
        "cached_gflops": cached_gflops,
        "cached_gflops_analytic": analytic["total"] / best_cached["step_s_median"] / 1e9,
        "cached_fraction_of_matmul": cached_gflops / matmul,
        "cached_fraction_of_adjacent_matmul": cached_gflops / best_cached["matmul_gflops_adjacent"],
        "cached_threads": best_cached["threads"],
        "on_the_fly_threads": best_otf["threads"],
        "cached_flops_per_sample": cached_counted["total"] / b_cached,
        "on_the_fly_flops_per_step_torch": otf_counted["total"],
        "on_the_fly_clip_forward_flops_analytic": clip_forward_flops(config, b_otf),
        "on_the_fly_search_flops_analytic": float(2 * 2 * b_otf * n * dim),
        "on_the_fly_gflops_torch_ops": otf_gflops,
        "on_the_fly_fraction_of_matmul": otf_gflops / matmul,
        "flop_notes": (
            "FlopCounterMode counts matmuls/convolutions; the CPU flash-attention kernel and the faiss "
            "search are not counted (their analytic shares are given)"
        ),
        "on_the_fly": on_the_fly,
        "cached": cached,
        "breakdown_s": breakdown,
        "step_shares": shares,
        "memory_backend": args.memory_backend,
        "cached_profile_top_ops": cached_profile,
        "targets": {
            f"speedup_ge_{SPEEDUP_TARGET:g}x": best_cached["samples_per_s"] / best_otf["samples_per_s"]
            >= SPEEDUP_TARGET,
            f"cached_ge_{MATMUL_FRACTION_TARGET:.0%}_of_matmul": cached_gflops / matmul
            >= MATMUL_FRACTION_TARGET,
            f"cached_ge_{MATMUL_FRACTION_TARGET:.0%}_of_adjacent_matmul": cached_gflops
            / best_cached["matmul_gflops_adjacent"]
            >= MATMUL_FRACTION_TARGET,
        },
    }
    return result


# --- report -------------------------------------------------------------------------------------------
def markdown(report: dict[str, Any]) -> str:
    """Headline table, per-batch-size table and phase breakdown, in markdown."""
    lines = [
        f"Fusion training throughput ({report['machine']['cpu_count']} cores; float32 matmul "
        f"{report['matmul_gflops']:.1f} GFLOP/s, best rate measured in the run; 1-min load average before/after "
        f"{report['machine']['load_average_1min_before_after'][0]:.1f}/"
        f"{report['machine']['load_average_1min_before_after'][1]:.1f})",
        "",
        "| model | on-the-fly B | on-the-fly samples/s | cached B | cached samples/s | speedup | "
        "cached @ on-the-fly B (samples/s, speedup) | cached GFLOP/s | cached / matmul | "
        "cached / adjacent matmul |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in report["models"]:
        r = report[key]
        lines.append(
            f"| {key} | {r['on_the_fly_batch_size']} | {r['on_the_fly_samples_per_s']:.2f} | "
            f"{r['cached_batch_size']} | {r['cached_samples_per_s']:.1f} | {r['speedup']:.1f}x | "
            f"{r['cached_samples_per_s_at_on_the_fly_batch_size']:.1f}, {r['speedup_same_batch_size']:.1f}x | "
            f"{r['cached_gflops']:.1f} | {r['cached_fraction_of_matmul']:.0%} | "
            f"{r['cached_fraction_of_adjacent_matmul']:.0%} |"
        )
    lines += [
        "",
        "| model | mode | B | threads | step s (median) | samples/s | samples/s (best step) | "
        "adjacent matmul GFLOP/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key in report["models"]:
        for mode in ("on_the_fly", "cached"):
            for r in report[key][mode].values():
                lines.append(
                    f"| {key} | {mode} | {r['batch_size']} | {r['threads']} | {r['step_s_median']:.3f} | "
                    f"{r['samples_per_s']:.2f} | {r['samples_per_s_best_step']:.2f} | "
                    f"{r['matmul_gflops_adjacent']:.1f} |"
                )
    phases = ("clip_embed", "retrieve", "index_search", "fusion_forward", "loss_forward", "backward")
    phases += ("optimizer_step",)
    lines += [
        "",
        "Where one step's time goes (s; `index_search` is the bare faiss part of `retrieve`):",
        "",
        "| model | mode | B | " + " | ".join(phases) + " |",
        "|---|---|---|" + "---|" * len(phases),
    ]
    for key in report["models"]:
        for mode, b in report[key]["breakdown_s"].items():
            cells = " | ".join(f"{b[p]:.3f}" if p in b else "-" for p in phases)
            lines.append(f"| {key} | {mode} | {b['batch_size']} | {cells} |")
    share_names = ("search", "retrieval_rest", "fusion_forward", "backbone", "loss_backward_optimizer")
    lines += [
        "",
        "Share of one step (retrieval latency apart from model latency: `search` is the index search alone):",
        "",
        "| model | memory | mode | " + " | ".join(share_names) + " |",
        "|---|---|---|" + "---:|" * len(share_names),
    ]
    for key in report["models"]:
        entry = report[key]
        memory = f"{entry['memory_backend']}, N = {entry['memory_size']:,}"
        for mode, shares in entry["step_shares"].items():
            cells = " | ".join(f"{shares[name]:.1%}" for name in share_names)
            lines.append(f"| {key} | {memory} | {mode} | {cells} |")
    for key in report["models"]:
        ops = report[key].get("cached_profile_top_ops") or []
        if ops:
            lines += [
                "",
                f"{key}: top ops of one cached step (B={report[key]['cached_batch_size']}, torch.profiler "
                "self CPU time):",
                "",
                "| op | self s | share | calls |",
                "|---|---|---|---|",
            ]
            lines += [f"| {o['op']} | {o['self_s']:.3f} | {o['share']:.1%} | {o['calls']} |" for o in ops]
    return "\n".join(lines) + "\n"


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench_out"), help="directory for the .json and .md")
    p.add_argument("--models", default="vit_b32,demo", help=f"comma list from {sorted(MODELS)}")
    p.add_argument("--memory-size", type=int, default=0, help="memory pairs N (0: per-model default)")
    p.add_argument(
        "--memory-backend", default="exact", help="memory backend (package defaults): exact, ivfpq, ..."
    )
    p.add_argument(
        "--on-the-fly-batch-sizes", default="", help="comma list (default: per model, e.g. 32,64 for vit_b32)"
    )
    p.add_argument(
        "--cached-batch-sizes", default="", help="comma list (default: per model, e.g. 32,256,1024)"
    )
    p.add_argument(
        "--steps", type=int, default=3, help="at least this many timed steps per (mode, batch size)"
    )
    p.add_argument(
        "--min-seconds",
        type=float,
        default=3.0,
        help="keep timing short steps until this many seconds (up to 50 steps): steadier medians",
    )
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (allocator, thread pools)")
    p.add_argument("--matmul-sizes", default="2048,4096", help="square matmul sizes for the machine's peak")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads for the steps; 0 (default): probe 1 and all cores per configuration, keep the faster",
    )
    p.add_argument(
        "--no-profile", dest="profile", action="store_false", help="skip the torch.profiler op table"
    )
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, write ``train_throughput.{json,md}`` into ``--out`` and return the report."""
    args = _parse(argv)
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    unknown = set(keys) - set(MODELS)
    if unknown:
        raise SystemExit(f"unknown model(s) {sorted(unknown)}: choose from {sorted(MODELS)}")
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet_transformers()
    args.out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    if load_before[0] > 0.5 * (os.cpu_count() or 1):
        print(
            f"warning: load average {load_before[0]:.1f} on {os.cpu_count()} cores: other processes compete "
            "for the CPU and multi-threaded small ops stall; timings will be pessimistic",
            flush=True,
        )
    print("measuring float32 matmul rate", flush=True)
    matmul_before = measure_matmul_gflops(_ints(args.matmul_sizes))
    args.matmul_gflops = matmul_before["gflops"]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="reco-throughput-") as tmp:
        for key in keys:
            spec = MODELS[key]
            spec = replace(
                spec,
                memory_size=args.memory_size or spec.memory_size,
                on_the_fly_batch_sizes=_ints(args.on_the_fly_batch_sizes) or spec.on_the_fly_batch_sizes,
                cached_batch_sizes=_ints(args.cached_batch_sizes) or spec.cached_batch_sizes,
            )
            results[key] = (spec, run_model(spec, args, Path(tmp)))
    torch.set_num_threads(threads)
    matmul_after = measure_matmul_gflops(_ints(args.matmul_sizes))
    adjacent = [
        r["matmul_gflops_adjacent"]
        for _, result in results.values()
        for mode in ("on_the_fly", "cached")
        for r in result[mode].values()
    ]
    # the ceiling: the best rate the machine delivered at any point of the run, all-core or adjacent
    matmul = max(matmul_before["gflops"], matmul_after["gflops"], *adjacent)
    report: dict[str, Any] = {
        "matmul_gflops": matmul,
        "matmul": {
            "before": matmul_before,
            "after": matmul_after,
            "adjacent_max": max(adjacent),
            "used": "best of before, after and every adjacent measurement",
        },
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads_for_matmul": threads,
            "step_threads": "probed per configuration (1 or all cores)"
            if args.threads == 0
            else args.threads,
            "torch": torch.__version__,
            "python": sys.version.split()[0],
            "processor": platform.processor() or platform.machine(),
            "load_average_1min_before_after": [load_before[0], os.getloadavg()[0]],
        },
        "settings": {
            "min_steps": args.steps,
            "min_seconds": args.min_seconds,
            "warmup": args.warmup,
            "seed": args.seed,
        },
        "models": keys,
    }
    for key, (spec, result) in results.items():
        # fractions against the best matmul of the run (the before-rate was used while running)
        result["cached_fraction_of_matmul"] = result["cached_gflops"] / matmul
        result["on_the_fly_fraction_of_matmul"] = result["on_the_fly_gflops_torch_ops"] / matmul
        result["targets"][f"cached_ge_{MATMUL_FRACTION_TARGET:.0%}_of_matmul"] = (
            result["cached_fraction_of_matmul"] >= MATMUL_FRACTION_TARGET
        )
        result["spec"] = asdict(spec)
        report[key] = result
    text = markdown(report)
    atomic_write_text(args.out / "train_throughput.json", json.dumps(report, indent=2))
    atomic_write_text(args.out / "train_throughput.md", text)
    print(text)
    return report


if __name__ == "__main__":
    main()
