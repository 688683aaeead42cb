"""One-command GPU check: training throughput, memory search, DDP and GPU = CPU, as one table and a JSON.

    python benchmarks/gpu_check.py --out bench_out/gpu_check          # full sizes (cuda if visible)
    python benchmarks/gpu_check.py --tiny --out /tmp/gpu_check        # tiny sizes, same code (CPU: ~15 s)

Why one script: a lent GPU machine is short-lived (minutes), offline, and runs its own torch / transformers
/ Lightning without faiss, so everything to measure there has to run as one prepared command that says
plainly what it could not do. On such a machine (the wheels it lacks are brought along, see
``benchmarks/gpu_wheels.sh``; ``dist/`` is git-ignored, so carry ``dist/gpu_wheels``):

    bash benchmarks/gpu_wheels.sh download dist/gpu_wheels                      # here, online
    bash benchmarks/gpu_wheels.sh install dist/gpu_wheels /tmp/reco_site && \\
        PYTHONPATH=/tmp/reco_site python3 benchmarks/gpu_check.py --out "$OUT/gpu_check"  # there

Rows (every row runs or says ``skipped: reason`` / ``error: ...``; no number is filled in otherwise):

* training pairs/s through ``RecoModule``'s own forward, the RECO loss, backward and AdamW, with the
  model and trainer settings of ``configs/vit-b32.yaml`` (k, search/fusion, exclusion, fusion and loss
  configs, lr, per-device batch, bf16-mixed as autocast) on a randomly initialised CLIP of ViT-B/32's
  architecture: on the fly (pixels and tokens through the frozen CLIP, then memory search with exclusion)
  and from a feature cache (precomputed embeddings and neighbour rows); each phase's share of a step
  (``train_throughput.step_shares``) and peak GPU memory. The memory is searched by
  ``TorchExactBackend`` on the training device (faiss-gpu cannot be brought along, see the wheels script);
  a batch that does not fit is halved and the row says so;
* memory search over N = 1M x 512 synthetic CLIP-like rows (``synthetic.clustered_unit_vectors``):
  recall@10 against a float64 exact search, and queries/s at batch 1024 and batch 1, for torch exact
  search on the device (float32 and float16 rows), faiss's GPU flat index (where faiss has GPUs), faiss's
  CPU flat index (with the torch / faiss ratio) and the package's ``exact`` backend on CPU;
* refined embeddings on the device equal CPU ones (same weights, inputs and neighbour rows): float32 on
  both within 1e-4, bf16-mixed on the device against float32 on CPU within 2e-2 (a few bf16 ulps at 1.0);
* DDP over every visible GPU for a few steps (a Lightning ``Trainer``, strategy ddp, in a child process);
  ``--tiny`` on CPU runs it on 2 gloo processes so the same code is exercised.

Without faiss the check still runs: ``reco_lightning.memory``'s ``__init__`` imports every backend, faiss
ones included, so :func:`import_reco` then registers that package without running its ``__init__`` (its
faiss-free modules, ``base``, ``store`` and ``torch_exact``, import as usual) and the faiss rows say why
they were skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["FULL", "ROWS", "TINY", "Sizes", "import_reco", "main", "markdown_table"]

HERE = Path(__file__).resolve()
CONFIG = HERE.parents[1] / "configs" / "vit-b32.yaml"
TORCH_EXACT = "reco_lightning.memory.torch_exact.TorchExactBackend"
K_RECALL = 10
FP32_ATOL, BF16_ATOL = 1e-4, 2e-2
Autocast = Callable[[], contextlib.AbstractContextManager]

#: Row keys in table order, with their labels.
ROWS: dict[str, str] = {
    "train_on_the_fly": "train, on the fly (CLIP + search + fusion)",
    "train_cached": "train, from a feature cache",
    "search_torch_exact": "search: torch exact, float32 rows, on the device",
    "search_torch_exact_fp16": "search: torch exact, float16 rows, on the device",
    "search_faiss_gpu": "search: faiss GPU flat (package `exact` on GPU)",
    "search_faiss_cpu": "search: faiss CPU flat (bare IndexFlatIP)",
    "search_package_exact_cpu": "search: package `exact` backend on CPU",
    "gpu_matches_cpu": "refined embeddings: device = CPU",
    "ddp": "DDP, every visible device",
}


@dataclass(frozen=True)
class Sizes:
    """What one mode runs; the tiny mode changes sizes only, never the code path."""

    backbone: str  # "vit_b32" (ViT-B/32 architecture) or "tiny"
    memory_size: int  # rows of the searched memory and of the training memory
    queries: int  # search queries, searched as one batch
    batch1_queries: int  # of them, searched one at a time
    batch_size: int | None  # per-device training batch; None: the config's
    warmup: int
    steps: int
    phase_repeats: int  # steps timed phase by phase (synchronised), averaged
    equivalence_batch: int
    ddp_memory_size: int
    ddp_steps: int
    search_min_seconds: float  # repeat a batched search until this long (at least twice)
    budget_s: float  # rows that would start later are skipped


FULL = Sizes("vit_b32", 1_000_000, 1024, 32, None, 3, 10, 2, 16, 100_000, 5, 1.0, 450.0)
TINY = Sizes("tiny", 2_000, 64, 4, 8, 1, 2, 1, 4, 500, 2, 0.0, 120.0)


class Skipped(Exception):
    """A row that cannot run here; its message is the reason shown in the table."""


# --- imports --------------------------------------------------------------------------------------------
def import_reco() -> dict[str, Any]:
    """Import ``reco_lightning.memory`` normally; without faiss (or psutil), register the package from its
    folder without running its ``__init__`` so the faiss-free modules (and RecoModule) still import.

    Returns what happened, for the report. Once ``reco_lightning/memory/__init__.py`` imports its backends
    lazily, the fallback is never taken.
    """
    info: dict[str, Any] = {}
    try:
        import faiss

        info["faiss"] = getattr(faiss, "__version__", "unknown")
    except ImportError as err:
        info["faiss"] = f"not importable: {err}"
    try:
        importlib.import_module("reco_lightning.memory")
        info["memory_package"] = "imported"
    except ModuleNotFoundError as err:
        for name in [n for n in sys.modules if n.startswith("reco_lightning.memory")]:
            del sys.modules[name]
        parent = importlib.import_module("reco_lightning")
        spec = importlib.util.spec_from_loader("reco_lightning.memory", loader=None, is_package=True)
        spec.submodule_search_locations = [str(Path(parent.__file__).parent / "memory")]
        package = importlib.util.module_from_spec(spec)
        sys.modules["reco_lightning.memory"] = package
        parent.memory = package
        info["memory_package"] = f"__init__ bypassed ({err}): faiss backends unavailable"
    return info


def faiss_module() -> Any:
    """faiss, or Skipped with the reason."""
    try:
        import faiss
    except ImportError as err:
        raise Skipped(f"faiss not importable ({err})") from err
    return faiss


# --- small helpers --------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, fn: Callable[[], Any]) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _autocast(device: torch.device, precision: str) -> Autocast:
    """What Lightning's ``precision`` does to a step's forward: bf16-mixed is bf16 autocast."""
    if precision.startswith("bf16"):
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision in ("32", "32-true"):
        return contextlib.nullcontext
    raise ValueError(f"precision {precision!r}: this check runs bf16-mixed or 32-true")


def _peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _oom_errors() -> tuple[type[BaseException], ...]:
    return tuple({getattr(torch, "OutOfMemoryError", MemoryError), torch.cuda.OutOfMemoryError})


def _to(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {name: value.to(device, non_blocking=True) for name, value in batch.items()}


def _quiet() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def load_config(path: Path) -> dict[str, Any]:
    """The model settings, precision and per-device batch of a training config (``configs/vit-b32.yaml``)."""
    import yaml

    raw = yaml.safe_load(path.read_text())
    model = {k: v for k, v in raw["model"].items() if k not in ("backbone", "memory")}
    return {
        "path": str(path),
        "model": model,
        "precision": str(raw["trainer"].get("precision", "32-true")),
        "batch_size": int(raw["data"]["init_args"]["batch_size"]),
        "seed": int(raw.get("seed_everything", 0)),
    }


# --- shared state: data, backbone, memory, module --------------------------------------------------------
class Context:
    """What several rows share, built on first use (a failure shows in every row that needed it)."""

    def __init__(self, args: argparse.Namespace, sizes: Sizes, device: torch.device, work: Path) -> None:
        self.args, self.sizes, self.device, self.work = args, sizes, device, work
        self.config = load_config(args.config)
        self.precision = args.precision or self.config["precision"]
        self.seed = args.seed
        self.results: dict[str, dict[str, Any]] = {}
        self._cache: dict[str, Any] = {}

    def once(self, name: str, build: Callable[[], Any]) -> Any:
        if name not in self._cache:
            self._cache[name] = build()
        return self._cache[name]

    def dim(self) -> int:
        return 512 if self.sizes.backbone == "vit_b32" else 32

    def search_data(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Memory rows (float32), queries, and the queries' float64 exact top-10 (computed on the device)."""

        def build() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            from reco_lightning.memory.torch_exact import TorchExactBackend
            from synthetic import clustered_queries, clustered_unit_vectors

            rows = np.asarray(clustered_unit_vectors(self.sizes.memory_size, self.dim(), seed=self.seed))
            queries = np.asarray(clustered_queries(self.sizes.queries, self.dim(), seed=self.seed))
            truth = TorchExactBackend(self.dim(), device=str(self.device), dtype="float64")
            truth.add(rows)
            ids = truth.search(queries, K_RECALL)[1]
            del truth
            _free(self.device)
            return rows.astype(np.float32, copy=False), queries.astype(np.float32, copy=False), ids

        return self.once("search_data", build)

    def backbone_dir(self) -> Path:
        def build() -> Path:
            directory = self.work / f"clip_{self.sizes.backbone}"
            if self.sizes.backbone == "vit_b32":
                from train_throughput import build_vit_b32

                build_vit_b32(directory, self.seed)
            else:
                from reco_lightning.tiny_clip import save_tiny_clip

                captions = [f"a photo of a {w} thing" for w in ("red", "blue", "small", "large", "round")]
                save_tiny_clip(directory, captions, seed=self.seed, embed_dim=32, text_width=32)
            return directory

        return self.once("backbone_dir", build)

    def memory_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Image rows = the search benchmark's rows; text rows drawn from the same distribution."""

        def build() -> tuple[np.ndarray, np.ndarray]:
            from synthetic import clustered_unit_vectors

            rows = self.search_data()[0]
            text = clustered_unit_vectors(self.sizes.memory_size, self.dim(), seed=self.seed + 1)
            return rows.astype(np.float16), np.asarray(text).astype(np.float16)

        return self.once("memory_arrays", build)

    def module(self) -> tuple[Any, torch.optim.Optimizer]:
        """RecoModule with the config's settings on the device, its memory searched by torch_exact there."""

        def build() -> tuple[Any, torch.optim.Optimizer]:
            from reco_lightning.memory.store import MemoryStore
            from reco_lightning.model import RecoModule

            torch.manual_seed(self.seed)
            module = RecoModule(backbone=str(self.backbone_dir()), **self.config["model"])
            if module.backbone.dim != self.dim():
                raise ValueError(f"backbone dim {module.backbone.dim} != memory dim {self.dim()}")
            image, text = self.memory_arrays()
            memory = MemoryStore.from_arrays(
                image,
                text,
                np.arange(len(image), dtype=np.int64),
                backend={"class_path": TORCH_EXACT, "init_args": {"dtype": "float32"}},
                fingerprint=module.backbone.fingerprint,
            )
            module.to(self.device)
            module.set_memory(memory)  # memory_device "auto": the rows move to this GPU
            module.train()
            return module, module.configure_optimizers()["optimizer"]

        return self.once("module", build)

    def release(self) -> None:
        """Drop the module and memories (before DDP, whose rank 0 shares GPU 0 with this process)."""
        for name in ("module", "memory_arrays", "search_data"):
            self._cache.pop(name, None)
        _free(self.device)


# --- training rows --------------------------------------------------------------------------------------
def _train_step(
    module: Any, optimizer: torch.optim.Optimizer, batch: dict[str, Tensor], autocast: Autocast
) -> Tensor:
    """``RecoModule._shared_step`` without ``self.log`` (needs a Trainer), then what Lightning does next:
    backward outside autocast, the AdamW step, and the module's ``on_train_batch_end`` temperature clamp."""
    with autocast():
        out = module(batch, exclude_self=True)
        loss = module.criterion(out["v"], out["t"], out["v_bar"], out["t_bar"])["loss"]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    module.criterion.clamp_()
    return loss.detach()


@contextlib.contextmanager
def _phase(timings: dict[str, float], name: str, device: torch.device) -> Iterator[None]:
    _sync(device)
    start = time.perf_counter()
    yield
    _sync(device)
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


def phase_times(
    module: Any,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, Tensor],
    autocast: Autocast,
    device: torch.device,
) -> dict[str, float]:
    """Seconds per phase of one step, synchronising the device around each, in ``RecoModule.refine``'s
    order; the keys of ``train_throughput.phase_breakdown`` (which is CPU-only: no sync, no autocast)."""
    t: dict[str, float] = {}
    retriever = module.retriever
    with autocast():
        with _phase(t, "clip_embed", device):
            v, tx = module.embed(batch)
        ids, refined = batch["id"], {}
        for modality, emb in (("image", v), ("text", tx)):
            fusion = module.image_fusion if modality == "image" else module.text_fusion
            rows = batch.get(f"{modality}_neighbours")
            with _phase(t, "retrieve", device):
                if rows is not None:
                    neighbours = retriever.gather(rows, modality, emb.device)
                else:
                    neighbours = retriever(emb, modality, exclude_ids=ids, pair_images=v)
            with _phase(t, "fusion_forward", device):
                refined[modality] = fusion(emb, neighbours.embeddings, neighbours.mask)
            if rows is None:  # the bare index search of the same queries, re-timed
                fetch = min(len(retriever.memory), retriever.k + retriever.exclusion_margin)
                q = emb.detach().float().cpu().numpy()
                index = retriever.memory.index(retriever.searched_modality(modality))
                with _phase(t, "index_search", device):
                    index.search(q, fetch)
        with _phase(t, "loss_forward", device):
            loss = module.criterion(v, tx, refined["image"], refined["text"])["loss"]
    with _phase(t, "backward", device):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
    with _phase(t, "optimizer_step", device):
        optimizer.step()
        module.criterion.clamp_()
    t["total_without_index_search"] = sum(s for name, s in t.items() if name != "index_search")
    return t


def _measure_training(
    module: Any, optimizer: torch.optim.Optimizer, batches: list[dict[str, Tensor]], ctx: Context
) -> tuple[list[float], list[dict[str, float]], float | None]:
    """Step times after warm-up, phase timings of a few more steps, and the peak device memory of all."""
    device, sizes = ctx.device, ctx.sizes
    autocast = _autocast(device, ctx.precision)
    _reset_peak(device)
    for i in range(sizes.warmup):
        _train_step(module, optimizer, batches[i % 2], autocast)
    times = [
        _timed(device, lambda b=batches[i % 2]: _train_step(module, optimizer, b, autocast))
        for i in range(sizes.steps)
    ]
    phases = [
        phase_times(module, optimizer, batches[0], autocast, device) for _ in range(sizes.phase_repeats)
    ]
    return times, phases, _peak_mib(device)


def train_row(ctx: Context, mode: str) -> dict[str, Any]:
    """Pairs/s of training steps in ``mode`` ("on_the_fly" or "cached"), phase shares and peak memory."""
    from train_throughput import cached_batch, on_the_fly_batch, step_shares

    module, optimizer = ctx.module()
    device, sizes = ctx.device, ctx.sizes
    n, dim, k = len(module.retriever.memory), module.backbone.dim, module.hparams.k
    wanted = sizes.batch_size or ctx.config["batch_size"]
    batch_size, reduced = wanted, []
    while True:
        try:
            if mode == "on_the_fly":
                config = module.backbone.model.config
                batches = [on_the_fly_batch(batch_size, config, n, ctx.seed + i) for i in range(2)]
            else:
                batches = [cached_batch(batch_size, dim, k, n, ctx.seed + i) for i in range(2)]
            times, phases, peak = _measure_training(module, optimizer, [_to(b, device) for b in batches], ctx)
            break
        except _oom_errors():
            if batch_size <= 8:
                raise
        # out of the except block, so the failed step's tensors are released
        optimizer.zero_grad(set_to_none=True)
        _free(device)
        reduced.append(f"B={batch_size} ran out of device memory")
        batch_size //= 2
    mean_phases = {name: statistics.fmean(p[name] for p in phases) for name in phases[0]}
    median = statistics.median(times)
    shares = step_shares(mean_phases)
    return {
        "pairs_per_s": batch_size / median,
        "batch_size": batch_size,
        "config_batch_size": wanted,
        "reduced": reduced,
        "precision": ctx.precision,
        "step_s_median": median,
        "step_s_all": times,
        "phases_s": mean_phases,
        "shares": shares,
        "peak_gpu_mib": peak,
        "memory": f"{n:,} pairs, torch_exact float32 on {module.retriever.memory.index('image').device}",
        "value": f"{batch_size / median:,.1f} pairs/s (B={batch_size})",
        "detail": _shares_text(shares, mode)
        + f"; peak GPU {_mib_text(peak)}"
        + (f"; {', '.join(reduced)}" if reduced else ""),
    }


def _shares_text(shares: dict[str, float], mode: str) -> str:
    names = {
        "backbone": "backbone" if mode == "on_the_fly" else "cached embeddings",
        "search": "search",
        "retrieval_rest": "exclusion+gather",
        "fusion_forward": "fusion",
        "loss_backward_optimizer": "loss+backward+AdamW",
    }
    return ", ".join(f"{label} {shares[key]:.0%}" for key, label in names.items())


def _mib_text(mib: float | None) -> str:
    return "n/a (no CUDA device)" if mib is None else f"{mib / 1024:.2f} GiB"


# --- search rows ----------------------------------------------------------------------------------------
def measure_search(
    search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]],
    queries: np.ndarray,
    truth: np.ndarray,
    batch1_queries: int,
    min_seconds: float,
) -> dict[str, Any]:
    """Recall@10 against ``truth`` and queries/s at the full batch (repeated, median) and at batch 1."""
    search(queries[:8], K_RECALL)  # warm-up: kernels, thread pools, both batch shapes
    search(queries[:1], K_RECALL)
    times: list[float] = []
    while len(times) < 2 or sum(times) < min_seconds:
        start = time.perf_counter()
        ids = search(queries, K_RECALL)[1]  # numpy out: the device work is done
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    for q in queries[:batch1_queries]:
        search(q[None], K_RECALL)
    batch1_s = time.perf_counter() - start
    hits = [len(set(found) & set(want)) for found, want in zip(ids.tolist(), truth.tolist(), strict=True)]
    return {
        "recall_at_10": sum(hits) / (K_RECALL * len(truth)),
        "queries": len(queries),
        "qps_batch": len(queries) / statistics.median(times),
        "qps_batch1": batch1_queries / batch1_s,
        "batch_s_all": times,
    }


def _search_result(measured: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        **measured,
        **extra,
        "value": f"{measured['qps_batch']:,.0f} q/s @{measured['queries']}; recall@10 {measured['recall_at_10']:.3f}",
        "detail": f"batch 1: {measured['qps_batch1']:,.0f} q/s"
        + (f"; {extra['note']}" if extra.get("note") else ""),
    }


def torch_search_row(ctx: Context, dtype: str) -> dict[str, Any]:
    """``TorchExactBackend`` on the device, rows in ``dtype``."""
    from reco_lightning.memory.torch_exact import TorchExactBackend

    rows, queries, truth = ctx.search_data()
    backend = TorchExactBackend(rows.shape[1], device=str(ctx.device), dtype=dtype)
    start = time.perf_counter()
    backend.add(rows)
    backend.rows()
    build_s = time.perf_counter() - start
    try:
        measured = measure_search(
            backend.search, queries, truth, ctx.sizes.batch1_queries, ctx.sizes.search_min_seconds
        )
    finally:
        del backend
        _free(ctx.device)
    return _search_result(
        measured,
        device=str(ctx.device),
        dtype=dtype,
        n=len(rows),
        dim=rows.shape[1],
        build_s=build_s,
        float32_matmul_precision=torch.get_float32_matmul_precision(),
    )


def faiss_gpu_row(ctx: Context) -> dict[str, Any]:
    """The package's ``exact`` backend cloned to GPU 0 (where faiss was built with GPUs)."""
    faiss = faiss_module()
    if ctx.device.type != "cuda":
        raise Skipped("no CUDA device")
    from reco_lightning.memory.exact import ExactBackend
    from reco_lightning.memory.gpu import faiss_num_gpus

    if faiss_num_gpus() == 0:
        raise Skipped(f"faiss {faiss.__version__} has no GPU support (faiss-cpu)")
    rows, queries, truth = ctx.search_data()
    backend = ExactBackend(rows.shape[1])
    backend.add(rows)
    backend.to_device(ctx.device.index or 0)
    try:
        measured = measure_search(
            backend.search, queries, truth, ctx.sizes.batch1_queries, ctx.sizes.search_min_seconds
        )
    finally:
        del backend
        _free(ctx.device)
    return _search_result(measured, faiss=faiss.__version__, n=len(rows))


def faiss_cpu_row(ctx: Context) -> dict[str, Any]:
    """Bare ``faiss.IndexFlatIP`` search on CPU, and how many times faster torch exact on the device is."""
    faiss = faiss_module()
    rows, queries, truth = ctx.search_data()
    index = faiss.IndexFlatIP(rows.shape[1])
    index.add(rows)
    measured = measure_search(
        index.search, queries, truth, ctx.sizes.batch1_queries, ctx.sizes.search_min_seconds
    )
    del index
    extra: dict[str, Any] = {
        "faiss": faiss.__version__,
        "threads": faiss.omp_get_max_threads(),
        "n": len(rows),
    }
    torch_row = ctx.results.get("search_torch_exact", {})
    if "qps_batch" in torch_row:
        extra["torch_over_faiss_batch"] = torch_row["qps_batch"] / measured["qps_batch"]
        extra["torch_over_faiss_batch1"] = torch_row["qps_batch1"] / measured["qps_batch1"]
        extra["note"] = (
            f"torch exact ({torch_row['device']}) / faiss CPU = {extra['torch_over_faiss_batch']:.3g}x "
            f"@{measured['queries']}, {extra['torch_over_faiss_batch1']:.3g}x @1; {extra['threads']} threads"
        )
    else:
        extra["note"] = f"no torch row to compare with; {extra['threads']} threads"
    return _search_result(measured, **extra)


def package_exact_cpu_row(ctx: Context) -> dict[str, Any]:
    """The package's ``exact`` backend where it runs today with faiss-cpu: on the CPU (blocked torch GEMM
    for batches of 64+, faiss below)."""
    faiss_module()
    from reco_lightning.memory.exact import ExactBackend

    rows, queries, truth = ctx.search_data()
    backend = ExactBackend(rows.shape[1])
    backend.add(rows)
    measured = measure_search(
        backend.search, queries, truth, ctx.sizes.batch1_queries, ctx.sizes.search_min_seconds
    )
    del backend
    return _search_result(measured, n=len(rows), threads=torch.get_num_threads())


# --- device = CPU ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def _ieee_float32(device: torch.device) -> Iterator[str]:
    """Float32 convolutions without TF32 (cuDNN's default on GPUs rounds CLIP's patch embedding to TF32),
    so "device fp32 = CPU fp32" is checked at float32 precision; yields what was done, for the report."""
    if device.type != "cuda":
        yield "cpu: IEEE float32"
        return
    cudnn = torch.backends.cudnn
    with contextlib.ExitStack() as stack:
        try:
            flags = cudnn.flags(
                enabled=cudnn.enabled,
                benchmark=cudnn.benchmark,
                deterministic=cudnn.deterministic,
                allow_tf32=False,
            )
            stack.enter_context(flags)
            state = "cuDNN TF32 off"
        except (RuntimeError, TypeError) as err:  # a torch whose flags differ: say so, compare as configured
            state = f"cuDNN TF32 as configured ({err})"
        yield state


def _compare(a: Tensor, b: Tensor) -> dict[str, float]:
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return {
        "max_abs": float((a - b).abs().max()),
        "min_cosine": float(F.cosine_similarity(a, b, dim=-1).min()),
    }


def equivalence_row(ctx: Context) -> dict[str, Any]:
    """Refined embeddings of one batch on the device (fp32, and bf16-mixed) and on CPU (fp32): same weights,
    same inputs, same neighbour rows (found once on the device, then passed to both as a cache would)."""
    from train_throughput import on_the_fly_batch

    module, _ = ctx.module()
    device = ctx.device
    module.eval()
    config = module.backbone.model.config
    batch = on_the_fly_batch(ctx.sizes.equivalence_batch, config, len(module.retriever.memory), ctx.seed + 7)
    with torch.no_grad():
        dev_batch = _to(batch, device)
        v, t = module.embed(dev_batch)
        ids = dev_batch["id"]
        batch["image_neighbours"] = module.neighbours(v, "image", exclude_ids=ids, pair_images=v).rows.cpu()
        batch["text_neighbours"] = module.neighbours(t, "text", exclude_ids=ids, pair_images=v).rows.cpu()
        retriever, module.retriever = module.retriever, None
        try:
            cpu_module = copy.deepcopy(module).to("cpu").float()
        finally:
            module.retriever = retriever
        cpu_module.retriever = retriever  # only its gather runs: the store's rows, on the host
        cpu_out = cpu_module(batch)
        dev_batch = _to(batch, device)
        with _ieee_float32(device) as fp32_mode:
            fp32_out = module(dev_batch)
        with _autocast(device, ctx.precision)():
            mixed_out = module(dev_batch)
    module.train()
    names = ("v", "t", "v_bar", "t_bar")
    fp32 = {name: _compare(fp32_out[name], cpu_out[name]) for name in names}
    mixed = {name: _compare(mixed_out[name], cpu_out[name]) for name in names}
    fp32_ok = all(c["max_abs"] <= FP32_ATOL for c in fp32.values())
    mixed_ok = all(c["max_abs"] <= BF16_ATOL for c in mixed.values())
    worst_fp32 = max(c["max_abs"] for c in fp32.values())
    worst_mixed = max(c["max_abs"] for c in mixed.values())
    cosine = min(c["min_cosine"] for c in mixed.values())
    return {
        "passed": fp32_ok and mixed_ok,
        "fp32_passed": fp32_ok,
        "mixed_passed": mixed_ok,
        "fp32_vs_cpu": fp32,
        "mixed_vs_cpu": mixed,
        "tolerances": {"fp32_max_abs": FP32_ATOL, "mixed_max_abs": BF16_ATOL},
        "devices": f"{device} vs cpu",
        "device_fp32": fp32_mode,
        "precision": ctx.precision,
        "batch_size": ctx.sizes.equivalence_batch,
        "value": "match" if fp32_ok and mixed_ok else "MISMATCH",
        "detail": (
            f"{device} fp32 vs cpu fp32: max abs diff {worst_fp32:.1e} (tol {FP32_ATOL:g}); {device} {ctx.precision} "
            f"vs cpu fp32: max abs diff {worst_mixed:.1e} (tol {BF16_ATOL:g}), min cos {cosine:.5f}"
        ),
    }


# --- DDP ------------------------------------------------------------------------------------------------
def ddp_row(ctx: Context) -> dict[str, Any]:
    """A few Lightning DDP steps on every visible GPU (on CPU in --tiny: 2 gloo processes), in a child
    process, since Lightning's ddp strategy relaunches the script it runs in."""
    from reco_lightning.memory.store import MemoryStore

    device, sizes = ctx.device, ctx.sizes
    if device.type == "cuda":
        devices = torch.cuda.device_count()
        if devices < 2:
            raise Skipped(f"{devices} GPU visible: DDP needs 2 or more")
        accelerator = "gpu"
    elif ctx.args.tiny:
        devices, accelerator = 2, "cpu"
    else:
        raise Skipped("no CUDA device (the CPU DDP path runs with --tiny)")
    module, _ = ctx.module()
    image, text = ctx.memory_arrays()
    count = min(sizes.ddp_memory_size, len(image))
    memory_dir = ctx.work / "ddp_memory"
    MemoryStore.write(
        memory_dir,
        image[:count],
        text[:count],
        np.arange(count, dtype=np.int64),
        backend={"class_path": TORCH_EXACT, "init_args": {"dtype": "float32"}},
        fingerprint=module.backbone.fingerprint,
        overwrite=True,
    )
    spec = {
        "backbone": str(ctx.backbone_dir()),
        "memory": str(memory_dir),
        "model": ctx.config["model"],
        "precision": ctx.precision,
        "accelerator": accelerator,
        "devices": devices,
        "batch_size": ctx.results.get("train_on_the_fly", {}).get("batch_size")
        or sizes.batch_size
        or ctx.config["batch_size"],
        "steps": sizes.ddp_steps,
        "seed": ctx.seed,
        "result": str(ctx.work / "ddp_result.json"),
        "root": str(ctx.work / "ddp_root"),
    }
    spec_path = ctx.work / "ddp_spec.json"
    spec_path.write_text(json.dumps(spec))
    ctx.release()  # rank 0 runs on this process's GPU
    timeout = max(30.0, min(300.0, sizes.budget_s - (time.perf_counter() - ctx.args.started)))
    try:
        proc = subprocess.run(
            [sys.executable, str(HERE), "--ddp-child", str(spec_path)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={
                **os.environ,
                "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")])),
            },
        )
    except subprocess.TimeoutExpired as err:
        raise RuntimeError(f"DDP child did not finish in {timeout:.0f} s") from err
    result_path = Path(spec["result"])
    if proc.returncode != 0 or not result_path.is_file():
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        raise RuntimeError(f"DDP child exited with {proc.returncode}: " + " | ".join(tail))
    result = json.loads(result_path.read_text())
    result["value"] = f"{result['pairs_per_s']:,.1f} pairs/s over {result['world_size']} x {accelerator}"
    result["detail"] = (
        f"B={result['batch_size']} per device, {result['steps']} steps, losses finite: {result['losses_finite']}, "
        f"parameters equal on every rank: {result['ranks_in_sync']}; peak GPU (rank 0) {_mib_text(result['peak_gpu_mib'])}"
    )
    return result


def _ddp_child(spec_path: Path) -> None:
    """Rank process of the DDP row (Lightning relaunches this same command for the other ranks)."""
    import_reco()
    _quiet()
    from reco_lightning.cli import leave_process_group
    from reco_lightning.model import RecoModule

    spec = json.loads(spec_path.read_text())
    pl.seed_everything(spec["seed"], verbose=False)
    # this rank's GPU: Lightning starts rank r (r > 0) with LOCAL_RANK=r; rank 0 is this very process
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    search_device = f"cuda:{rank}" if spec["accelerator"] == "gpu" else "cpu"
    module = RecoModule(
        backbone=spec["backbone"],
        memory=spec["memory"],
        memory_search_params={"device": search_device},
        **spec["model"],
    )
    timer = _StepTimer()
    trainer = pl.Trainer(
        accelerator=spec["accelerator"],
        devices=spec["devices"],
        strategy="ddp",
        precision=spec["precision"],
        max_steps=spec["steps"],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=spec["root"],
        callbacks=[timer],
    )
    data = _SyntheticBatches(spec, module.backbone.model.config, count=_memory_count(spec["memory"]))
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=None))
    if trainer.is_global_zero:
        world = trainer.world_size
        times = timer.times[1:] or timer.times  # the first step pays for NCCL/gloo and kernel warm-up
        result = {
            "world_size": world,
            "strategy": type(trainer.strategy).__name__,
            "precision": str(trainer.precision),
            "batch_size": spec["batch_size"],
            "steps": len(timer.times),
            "step_s_all": timer.times,
            "pairs_per_s": world * spec["batch_size"] / statistics.median(times),
            "losses": timer.losses,
            "losses_finite": bool(timer.losses) and all(np.isfinite(timer.losses)),
            "rank_checksums": timer.checksums,
            "ranks_in_sync": timer.in_sync,
            "peak_gpu_mib": timer.peak_mib,
            "memory": f"{_memory_count(spec['memory']):,} pairs, torch_exact on each rank's own {spec['accelerator']}",
        }
        Path(spec["result"]).write_text(json.dumps(result))
    leave_process_group()  # else gloo may abort rank 0 at exit (-6) when rank 1 leaves first


def _memory_count(directory: str) -> int:
    return int(json.loads((Path(directory) / "manifest.json").read_text())["count"])


class _SyntheticBatches(torch.utils.data.IterableDataset):
    """``steps`` on-the-fly batches per rank (two distinct ones, cycled): equal counts on every rank, as DDP
    over an IterableDataset needs; built once, so the step times are the model's, not the generator's."""

    def __init__(self, spec: dict[str, Any], config: Any, count: int) -> None:
        self.spec, self.config, self.count = spec, config, count

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        from train_throughput import on_the_fly_batch

        rank = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
        seed = self.spec["seed"] + 100 * rank
        batches = [
            on_the_fly_batch(self.spec["batch_size"], self.config, self.count, seed + i) for i in range(2)
        ]
        for step in range(self.spec["steps"]):
            yield batches[step % 2]


class _StepTimer(pl.Callback):
    """Step times (device-synchronised), losses, and whether the ranks' parameters stayed identical."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.losses: list[float] = []
        self.checksums: list[float] = []
        self.in_sync: bool | None = None
        self.peak_mib: float | None = None
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        _sync(pl_module.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        _sync(pl_module.device)
        self.times.append(time.perf_counter() - self._start)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss.detach().float().cpu()))

    def on_train_end(self, trainer, pl_module) -> None:
        total = sum(p.detach().double().square().sum() for p in pl_module.trainable_parameters())
        gathered = trainer.strategy.all_gather(total.reshape(1).to(pl_module.device))
        self.checksums = [float(x) for x in gathered.flatten().cpu()]
        self.in_sync = max(self.checksums) - min(self.checksums) <= 1e-9 * max(abs(c) for c in self.checksums)
        self.peak_mib = _peak_mib(pl_module.device)


# --- the run --------------------------------------------------------------------------------------------
def environment(device: torch.device, imports: dict[str, Any]) -> dict[str, Any]:
    """Versions and devices, so a table is read against the machine that produced it."""
    import transformers

    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "numpy": np.__version__,
        "transformers": transformers.__version__,
        "pytorch_lightning": pl.__version__,
        "device": str(device),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else [],
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn_allow_tf32": _safe(lambda: torch.backends.cudnn.allow_tf32),
        **imports,
    }
    return info


def _safe(read: Callable[[], Any]) -> Any:
    try:
        return read()
    except Exception as err:  # a flag this torch does not have, or refuses to read
        return f"unreadable: {err}"


def run_rows(ctx: Context, only: set[str] | None) -> dict[str, dict[str, Any]]:
    """Every row in table order; a row past the time budget, or one that fails, says so and the rest go on."""
    plan: dict[str, Callable[[], dict[str, Any]]] = {
        "search_torch_exact": lambda: torch_search_row(ctx, "float32"),
        "search_torch_exact_fp16": lambda: torch_search_row(ctx, "float16"),
        "search_faiss_gpu": lambda: faiss_gpu_row(ctx),
        "search_faiss_cpu": lambda: faiss_cpu_row(ctx),
        "search_package_exact_cpu": lambda: package_exact_cpu_row(ctx),
        "train_on_the_fly": lambda: train_row(ctx, "on_the_fly"),
        "train_cached": lambda: train_row(ctx, "cached"),
        "gpu_matches_cpu": lambda: equivalence_row(ctx),
        "ddp": lambda: ddp_row(ctx),
    }
    for key, run in plan.items():  # run order: search data first, DDP (which frees the rest) last
        start = time.perf_counter()
        elapsed = start - ctx.args.started
        if only is not None and key not in only:
            row = {"status": "skipped: not selected (--only)"}
        elif elapsed > ctx.sizes.budget_s:
            row = {"status": f"skipped: time budget ({elapsed:.0f} s > {ctx.sizes.budget_s:.0f} s)"}
        else:
            print(f"[gpu_check] {key} ...", file=sys.stderr, flush=True)
            try:
                row = {"status": "ok", **run()}
            except Skipped as reason:
                row = {"status": f"skipped: {reason}"}
            except Exception as err:  # one failed row must not lose the others on a short-lived machine
                row = {
                    "status": f"error: {type(err).__name__}: {str(err)[:500]}",
                    "traceback": traceback.format_exc(),
                }
        row["seconds"] = time.perf_counter() - start
        ctx.results[key] = {"check": ROWS[key], **row}
    return {key: ctx.results[key] for key in ROWS}


def markdown_table(report: dict[str, Any]) -> str:
    """The one table: every row with its result, or why it did not run."""
    env = report["environment"]
    devices = ", ".join(env["cuda_devices"]) or "no CUDA device"
    lines = [
        f"gpu_check ({report['mode']}): device {env['device']} ({devices}); torch {env['torch']} (CUDA "
        f"{env['torch_cuda']}), transformers {env['transformers']}, Lightning {env['pytorch_lightning']}, "
        f"faiss {env['faiss']}; {report['seconds']:.0f} s",
        "",
        "| check | result | detail |",
        "|---|---|---|",
    ]
    for row in report["rows"].values():
        result = row.get("value", row["status"]) if row["status"] == "ok" else row["status"]
        detail = row.get("detail", "") if row["status"] == "ok" else ""
        lines.append(f"| {row['check']} | {result} | {detail} |".replace("\n", " "))
    return "\n".join(lines) + "\n"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--out", type=Path, default=Path("bench_out/gpu_check"), help="directory for the JSON and table"
    )
    p.add_argument("--tiny", action="store_true", help="tiny sizes, same code path (a CPU smoke test)")
    p.add_argument("--device", default="auto", help="auto (cuda if visible, else cpu), cuda or cpu")
    p.add_argument(
        "--config", type=Path, default=CONFIG, help="training config whose model/trainer settings apply"
    )
    p.add_argument("--precision", default=None, help="override the config's trainer.precision")
    p.add_argument(
        "--batch-size", type=int, default=None, help="per-device training batch (default: the config's)"
    )
    p.add_argument("--memory-size", type=int, default=None, help="memory rows (default: 1M, tiny 2000)")
    p.add_argument("--only", default=None, help=f"comma list of rows to run, from {list(ROWS)}")
    p.add_argument("--budget-s", type=float, default=None, help="skip rows that would start after this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ddp-child", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every row, print the table, write ``gpu_check.json`` and ``gpu_check.md`` into ``--out``."""
    args = _parse(argv)
    if args.ddp_child is not None:
        _ddp_child(args.ddp_child)
        # result written, group ended: skip the interpreter's finalisation, where gloo's threads can still
        # abort a rank after a successful run (pytorch/pytorch#179291; tests/test_losses.py measured it)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    args.started = time.perf_counter()
    if str(HERE.parent) not in sys.path:  # sibling benchmark modules (synthetic, train_throughput)
        sys.path.insert(0, str(HERE.parent))
    imports = import_reco()
    _quiet()
    requested = args.device
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if requested == "auto" else requested
    )
    sizes = TINY if args.tiny else FULL
    overrides = {"batch_size": args.batch_size, "memory_size": args.memory_size, "budget_s": args.budget_s}
    sizes = replace(sizes, **{k: v for k, v in overrides.items() if v is not None})
    only = set(args.only.split(",")) if args.only else None
    if only and only - set(ROWS):
        raise SystemExit(f"unknown rows {sorted(only - set(ROWS))}: choose from {list(ROWS)}")
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="reco-gpu-check-") as tmp:
        ctx = Context(args, sizes, device, Path(tmp))
        rows = run_rows(ctx, only)
        ctx.release()
    report = {
        "mode": "tiny" if args.tiny else "full",
        "environment": environment(device, imports),
        "sizes": asdict(sizes),
        "config": {**ctx.config, "precision_used": ctx.precision},
        "seconds": time.perf_counter() - args.started,
        "rows": rows,
    }
    table = markdown_table(report)
    from reco_lightning.atomic import atomic_write_text

    atomic_write_text(args.out / "gpu_check.json", json.dumps(report, indent=2, default=str))
    atomic_write_text(args.out / "gpu_check.md", table)
    print(table, flush=True)
    return report


if __name__ == "__main__":
    main()
