"""Choose an IVF-PQ index's search-time settings for a recall target, measured on the memory itself.

The default rules (``ivfpq.default_nprobe``, ``default_rerank``) were read off tuning curves at 100k, 1M
and 10M rows of synthetic CLIP-like data (recall@10 ~0.96 at 20x exact's speed or more); a memory of
other data, or a recall target of its own, is better served by measuring. ``reco memory tune`` does: ``n_queries`` rows of the memory stand in for queries (each
row's own id is dropped from its results), their exact top-k comes from a scan of the rows, and a grid of
(nprobe, rerank) is searched from cheap to costly; the fastest setting that reaches the target is written to
the index's ``backend.json`` and the manifest, with what was measured. Search-time only: nothing is rebuilt,
and a model's ``memory_search_params`` still overrides it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from reco_lightning.arrays import release_pages
from reco_lightning.atomic import atomic_write_text
from reco_lightning.errors import RecoMemoryError
from reco_lightning.memory.base import recorded_spec
from reco_lightning.memory.exact import scan_topk
from reco_lightning.memory.ivfpq import IVFPQBackend
from reco_lightning.memory.store import MemoryStore, record_backend
from reco_lightning.types import MODALITIES

__all__ = ["NPROBES", "RERANKS", "tune_memory", "tune_search"]

#: Grids searched, cheapest first; values beyond the index (nprobe > nlist, rerank > N) are skipped.
NPROBES = (8, 16, 32, 64, 128, 256, 512)
RERANKS = (0, 50, 100, 200, 300, 500, 1000, 2000)


def tune_search(
    backend: IVFPQBackend,
    rows: np.ndarray,
    target: float = 0.98,
    k: int = 10,
    n_queries: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Set ``backend``'s nprobe and rerank to the fastest grid point whose recall@k on sampled rows >= target.

    ``rows``: the vectors the index holds, in its order (attached for re-ranking). Of the grid, only the
    frontier is measured (see below); when nothing reaches the target (the first nprobe at every rerank),
    the most accurate setting is kept and ``reached`` is False. Returns the choice and every measurement
    (recall, queries/s at a batch of ``n_queries``).
    """
    if not isinstance(backend, IVFPQBackend):
        raise RecoMemoryError(
            f"tuning sets nprobe and rerank of an IVF-PQ index; {type(backend).__name__} has no search settings"
        )
    if not 0 < target <= 1:
        raise RecoMemoryError(f"recall target {target} must be in (0, 1]")
    count = len(rows)
    if count <= k:
        raise RecoMemoryError(f"tuning needs more than k={k} rows, the memory has {count}")
    sample = np.sort(np.random.default_rng(seed).choice(count, min(n_queries, count), replace=False))
    queries = np.asarray(rows[sample], dtype=np.float32)
    release_pages(rows)
    truth = _without_self(scan_topk(queries, rows, k + 1)[1], sample, k)
    measured: list[dict[str, Any]] = []

    def measure(nprobe: int, rerank: int) -> bool:
        backend.set_search(nprobe=nprobe, rerank=rerank)
        start = time.perf_counter()
        found = backend.search(queries, k + 1)[1]
        seconds = time.perf_counter() - start
        recall = float((_without_self(found, sample, k)[:, :, None] == truth[:, None, :]).any(axis=2).mean())
        measured.append({"nprobe": nprobe, "rerank": rerank, "recall": recall, "qps": len(queries) / seconds})
        return recall >= target

    # More probes only find better candidates, so the rerank a target needs can only fall as nprobe grows:
    # the first nprobe climbs the rerank grid, each next one walks down from the last need, and the walk
    # stops at the first nprobe that lowers it no further (every larger one is slower for the same rerank).
    if backend.nlist < NPROBES[0]:  # every list is probed already: there is no nprobe to choose
        raise RecoMemoryError(
            f"the index has {backend.nlist} inverted lists, fewer than the {NPROBES[0]} the smallest nprobe "
            "probes: nothing to tune (search already scans every list; an exact backend suits a memory this small)"
        )
    reranks = [r for r in RERANKS if r <= count]
    need: int | None = None  # index into reranks of the least rerank reaching the target so far
    for nprobe in (p for p in NPROBES if p <= backend.nlist):
        if need is None:
            need = next((i for i, r in enumerate(reranks) if measure(nprobe, r)), None)
            continue
        lowered = need
        while lowered > 0 and measure(nprobe, reranks[lowered - 1]):
            lowered -= 1
        if lowered == need:
            break
        need = lowered
    reached = [m for m in measured if m["recall"] >= target]
    best = max(reached, key=lambda m: m["qps"]) if reached else max(measured, key=lambda m: m["recall"])
    backend.set_search(nprobe=best["nprobe"], rerank=best["rerank"])
    return {
        "target": target,
        "k": k,
        "queries": len(sample),
        "reached": bool(reached),
        "nprobe": best["nprobe"],
        "rerank": best["rerank"],
        "recall": best["recall"],
        "measured": measured,
    }


def _without_self(ids: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    """The first k ids of each row other than the query's own row id (a row is its own nearest neighbour)."""
    keep = ids != own[:, None]
    order = np.argsort(~keep, axis=1, kind="stable")  # kept ids first, in their order
    return np.take_along_axis(ids, order, axis=1)[:, :k]


def tune_memory(
    memory_dir: str | os.PathLike,
    target: float = 0.98,
    modalities: tuple[str, ...] = MODALITIES,
    k: int = 10,
    n_queries: int = 1000,
) -> dict[str, Any]:
    """Tune each modality's index of the memory (:func:`tune_search`) and record the choice on disk.

    ``backend.json`` gets the chosen nprobe and rerank as init_args (no longer ``derived``) and the
    measurement as ``tuned``; the manifest's backend spec follows.
    """
    root = Path(memory_dir)
    store = MemoryStore.open(root)
    done: dict[str, Any] = {}
    spec: dict[str, Any] = {}
    for modality in modalities:
        backend = store.index(modality)  # type: ignore[arg-type]
        result = tune_search(backend, store.embeddings(modality), target, k, n_queries)  # type: ignore[arg-type]
        path = root / f"index_{modality}" / "backend.json"
        meta = json.loads(path.read_text())
        meta["init_args"] = {
            **meta.get("init_args", {}),
            "nprobe": result["nprobe"],
            "rerank": result["rerank"],
        }
        derived = [name for name in meta.get("derived", []) if name not in ("nprobe", "rerank")]
        meta.pop("derived", None)
        if derived:
            meta["derived"] = derived
        meta["tuned"] = {key: value for key, value in result.items() if key != "measured"}
        atomic_write_text(path, json.dumps(meta, indent=2))
        spec = recorded_spec(path.parent)
        done[modality] = result
    record_backend(root, spec)
    return done
