"""Benchmark the memory backends: build time, size, recall vs exact, throughput and peak memory.

    python benchmarks/memory_backends.py --out bench_out/memory            # N = 100k synthetic CLIP-like
    python benchmarks/memory_backends.py --large --out bench_out/memory_1m # N = 1M
    python benchmarks/memory_backends.py --memory path/to/memory --out ... # also a real memory's image_emb

Each backend runs in its own spawned process so its peak RSS is its own. Vectors reach the process as
files and the streaming backends are filled chunk by chunk (as a memory build does), so peak RSS is what
the index costs to build and search, not a copy of the whole data set (autofaiss, which needs every vector
in memory, is the exception; ivfpq's includes the store's fp16 pages it re-ranks from). ``ivfpq`` is the
package's defaults (``--backend ivfpq``: nlist, nprobe and rerank derived from N, trained on
``reco memory build``'s default sample) unless --nlist/--nprobe/--rerank/--m/--nbits/--train-size say
otherwise; ``ivfpq_norerank`` searches the same index by its PQ codes alone (rerank=0). The two share one
build: nprobe/rerank are search-time, so the second loads the first's index.
Ground truth is float64 brute force computed here, independently of faiss: the exact backend's recall
therefore checks the harness itself. Throughputs are best-of-repeats, because a shared 2-core machine is
noisy. Exact search is also expressed as a fraction of the machine's best float32 matmul rate (numpy or
torch, [1024, dim] x [dim, 64k]), both over the full run and timed alternately with GEMM on one block.
"""

from __future__ import annotations

import argparse
import inspect
import json
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from reco_lightning.atomic import atomic_write_text

__all__ = ["build_train_size", "main", "measure_matmul_gflops", "recall_at"]

K = 10
CHUNK_ROWS = 65536
ALL_BACKENDS = ("exact", "exact_mmap", "ivfpq", "ivfpq_norerank", "autofaiss")
#: backends whose search is a full scan: their q/s is also expressed as a fraction of the matmul rate
SCANS = ("exact", "exact_mmap")
#: IVF-PQ arguments the package derives from N when not given (None here = the package's default).
DERIVED = ("nlist", "nprobe", "rerank")


# --- helpers shared by the parent and the per-backend processes --------------------------------------------
def build_train_size() -> int:
    """``reco memory build``'s default training sample, so the ivfpq row is what a default build makes."""
    from reco_lightning.jobs.memory_build import build_memory

    return int(inspect.signature(build_memory).parameters["train_size"].default)


def recall_at(approx: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean |approx top-k ∩ true top-k| / k (for k=1: fraction of queries whose top-1 matches)."""
    hits = (approx[:, :k, None] == truth[:, None, :k]).any(axis=2).sum(axis=1)
    return float(hits.mean() / k)


def measure_matmul_gflops(dim: int, cols: int, rows: int = 1024, repeats: int = 5) -> dict[str, float]:
    """Best-of-``repeats`` float32 GEMM rate with all threads, for numpy and torch, at exact-search shapes."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((rows, dim), dtype=np.float32)
    b = rng.standard_normal((dim, cols), dtype=np.float32)
    flops = 2.0 * rows * dim * cols
    rates: dict[str, float] = {}
    for lib, fn in (("numpy", lambda: a @ b), ("torch", lambda: torch.from_numpy(a) @ torch.from_numpy(b))):
        fn()  # warm-up: thread pools, allocations
        best = min(_timed(fn) for _ in range(repeats))
        rates[lib] = flops / best / 1e9
    rates["best"] = max(rates.values())
    return rates


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _npy_layout(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and data offset of a C-order .npy file, for chunked reads that bypass mmap (and RSS)."""
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        reader = (
            np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        )
        shape, fortran, dtype = reader(fh)
        if fortran:
            raise ValueError(f"{path} is Fortran-ordered; expected C order")
        return shape, dtype, fh.tell()


def _iter_chunks(path: Path, rows: int = CHUNK_ROWS):
    (n, dim), dtype, offset = _npy_layout(path)
    with open(path, "rb") as fh:
        fh.seek(offset)
        for start in range(0, n, rows):
            count = min(rows, n - start)
            yield start, np.fromfile(fh, dtype=dtype, count=count * dim).reshape(count, dim)


def _sample_rows(path: Path, size: int, seed: int) -> np.ndarray:
    (n, dim), _, _ = _npy_layout(path)
    size = min(size, n)
    picked = np.sort(np.random.default_rng(seed).choice(n, size, replace=False))
    out = np.empty((size, dim), dtype=np.float32)
    filled = 0
    for start, chunk in _iter_chunks(path):
        sel = picked[(picked >= start) & (picked < start + len(chunk))] - start
        out[filled : filled + len(sel)] = chunk[sel]
        filled += len(sel)
    return out


def _peak_rss_mb() -> float:
    """Peak RSS of this process's own address space.

    Linux's VmHWM resets at exec; ``ru_maxrss`` does not (it keeps the forked parent's RSS from before the
    spawn's exec), so it is only the fallback.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    try:
        import resource
    except ImportError:  # not POSIX: the current RSS is a lower bound of the peak
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _memory_bytes(text: str) -> int:
    """Parse autofaiss-style sizes ('128M', '4G', '1.5GB'); units are powers of 1024 as autofaiss uses."""
    units = {u: 1024**i for i, u in enumerate("BKMGT")}
    s = text.strip().upper().removesuffix("B") or "0"
    if s[-1] in units:
        return int(float(s[:-1]) * units[s[-1]])
    return int(float(s))


# --- one backend, in its own process ----------------------------------------------------------------------
def _make_backend(task: dict[str, Any]):
    from reco_lightning.memory.autotuned import AutofaissBackend
    from reco_lightning.memory.exact import ExactBackend, MappedExactBackend
    from reco_lightning.memory.ivfpq import IVFPQBackend

    kind, dim, params = task["kind"], task["dim"], task["params"]
    if kind == "exact":
        return ExactBackend(dim)
    if kind == "exact_mmap":
        return MappedExactBackend(dim)
    if kind == "ivfpq":
        return IVFPQBackend(dim, **params)
    if kind == "autofaiss":
        return AutofaissBackend(dim, **params)
    raise ValueError(f"unknown backend kind {kind!r}")


def _run_backend(task: dict[str, Any]) -> dict[str, Any]:
    """Build, measure and describe one backend; runs in a fresh spawned process."""
    import psutil

    rss_after_imports = psutil.Process().memory_info().rss / 2**20
    work = Path(task["work"])
    shared = task.get("shared_index")
    if "shared_build_s" in task:
        # Same index layout as an earlier backend: load it with this backend's search-time overrides.
        from reco_lightning.memory.base import MemoryBackend

        backend = MemoryBackend.load(shared, **{k: task["params"][k] for k in task["search_params"]})
        build_s = float(task["shared_build_s"])
    else:
        backend = _make_backend(task)
        start = time.perf_counter()
        if task["kind"] == "autofaiss":  # autofaiss needs every vector in memory at once
            backend.build(np.load(work / "database.npy"))
        else:
            if backend.needs_training:
                sample = _sample_rows(work / "database.npy", task["train_size"], task["seed"])
                if task["kind"] == "ivfpq":  # the whole database's size sizes the derived nlist/rerank
                    backend.train(sample, ntotal=task["n"])
                else:
                    backend.train(sample)
            for _, chunk in _iter_chunks(work / "database.npy"):
                backend.add(chunk)
        build_s = time.perf_counter() - start
        if shared:
            backend.save(shared)
    if (getattr(backend, "rerank", None) or 0) > 0 or task["kind"] == "exact_mmap":
        # the store's fp16 rows: what the package's default re-ranks from, and what exact_mmap scans
        backend.attach(np.load(work / "database_fp16.npy", mmap_mode="r"))

    queries = np.load(work / "queries.npy")
    truth = np.load(work / "truth_ids.npy")
    batch = task["batch"]
    ids = np.concatenate(
        [backend.search(queries[s : s + batch], K)[1] for s in range(0, len(queries), batch)]
    )

    # batch-1 latency: one query at a time, bounded in time so a slow exact scan at 1M stays affordable
    latencies: list[float] = []
    t_loop = time.perf_counter()
    for i in tqdm(
        range(min(task["batch1_queries"], len(queries))), desc=f"{task['name']} batch-1", leave=False
    ):
        latencies.append(_timed(lambda i=i: backend.search(queries[i : i + 1], K)))
        if time.perf_counter() - t_loop > task["batch1_seconds"] and len(latencies) >= 10:
            break

    block = np.resize(queries, (batch, queries.shape[1]))  # a full batch even with fewer queries
    times: list[float] = []
    while len(times) < 3 or (len(times) < 5 and sum(times) < task["batch_seconds"]):
        times.append(_timed(lambda: backend.search(block, K)))
    result: dict[str, Any] = {"peak_rss_mb": _peak_rss_mb()}  # before the matmul probe's own buffers
    if task["kind"] in SCANS:  # the matmul rate right after the scan's timing, same machine state
        matmul = measure_matmul_gflops(task["dim"], min(task["n"], CHUNK_ROWS))
        result["matmul_gflops_adjacent"] = matmul["best"]
        result["kernel_fraction_interleaved"] = _interleaved_fraction(
            work / "database.npy", block, mapped=task["kind"] == "exact_mmap"
        )

    n_total = backend.ntotal
    index_bytes = backend.nbytes()
    result.update(
        {
            "build_s": build_s,
            "bytes_per_vector": index_bytes / n_total,
            "recall@1": recall_at(ids, truth, 1),
            "recall@10": recall_at(ids, truth, K),
            "qps_batch1": len(latencies) / sum(latencies),
            "qps_batch1024": batch / min(times),
            "rss_after_imports_mb": rss_after_imports,
            "ntotal": n_total,
            "index_bytes": index_bytes,
            "latency_ms_batch1_mean": 1000 * float(np.mean(latencies)),
            "latency_ms_batch1_p99": 1000 * float(np.quantile(latencies, 0.99)),
            "batch1_queries_timed": len(latencies),
            "batch_size": batch,
            "batch_repeats": len(times),
            "init_args": backend.init_args(),
        }
    )
    if task["kind"] == "ivfpq":
        result["train_size"] = min(task["train_size"], task["n"])
        result["derived"] = [key for key in DERIVED if task["params"].get(key) is None]
    if task["kind"] == "autofaiss":
        budget_bytes = _memory_bytes(task["params"]["max_index_memory_usage"])
        budget_ms = task["params"]["max_index_query_time_ms"]
        result.update(
            {
                "index_key": backend.index_key,
                "index_param": backend.index_param,
                "autofaiss_metrics": backend.metrics,
                "max_index_memory_bytes": budget_bytes,
                "max_index_query_time_ms": budget_ms,
                "within_memory_budget": bool(index_bytes <= budget_bytes),
                "within_query_time_budget": bool(result["latency_ms_batch1_mean"] <= budget_ms),
            }
        )
    return result


def _interleaved_fraction(database: Path, block: np.ndarray, rounds: int = 5, mapped: bool = False) -> float:
    """Exact search FLOP rate over GEMM rate, timed alternately on one [1024, dim] x [dim, 64k] block
    (``mapped``: exact_mmap over the block's rows in fp16, as a store holds them).

    Other processes on a shared machine slow long runs unevenly; alternating short runs of the two
    kernels exposes both to the same conditions, so their ratio isolates the exact backend's own overhead
    (top-k selection, merging; the package's search path, not a bare faiss call).
    """
    import torch

    from reco_lightning.memory.exact import ExactBackend, MappedExactBackend

    _, rows = next(_iter_chunks(database))
    backend = MappedExactBackend(rows.shape[1]) if mapped else ExactBackend(rows.shape[1])
    backend.add(rows)
    if mapped:
        backend.attach(rows.astype(np.float16))
    a, b = torch.from_numpy(block), torch.from_numpy(np.ascontiguousarray(rows.T))
    search, gemm = [], []
    for _ in range(rounds):
        search.append(_timed(lambda: backend.search(block, K)))
        gemm.append(min(_timed(lambda: block @ b.numpy()), _timed(lambda: a @ b)))
    return min(gemm) / min(search)


# --- the parent: data, ground truth, orchestration, reports ------------------------------------------------
def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100_000, help="synthetic database size")
    p.add_argument("--large", action="store_true", help="N = 1,000,000")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=1000, help="held-out queries for recall")
    p.add_argument("--memory", type=Path, default=None, help="also benchmark this memory dir's image_emb.npy")
    p.add_argument("--backends", default=",".join(ALL_BACKENDS), help=f"comma list from {ALL_BACKENDS}")
    p.add_argument("--out", type=Path, default=Path("bench_out/memory"))
    p.add_argument("--batch", type=int, default=1024, help="batch size of the throughput measurement")
    p.add_argument("--batch1-queries", type=int, default=200, help="single queries to time (at most)")
    p.add_argument("--batch1-seconds", type=float, default=20.0, help="stop the batch-1 loop after this")
    p.add_argument("--batch-seconds", type=float, default=3.0, help="repeat batched search for this long")
    p.add_argument("--nlist", type=int, default=None, help="IVF lists (default: the package's, from N)")
    p.add_argument("--m", type=int, default=64, help="PQ sub-quantisers (bytes per vector at nbits=8)")
    p.add_argument("--nbits", type=int, default=8)
    p.add_argument("--nprobe", type=int, default=None, help="IVF lists probed (default: the package's)")
    p.add_argument(
        "--rerank",
        type=int,
        default=None,
        help="candidates re-scored exactly by ivfpq (default: the package's)",
    )
    p.add_argument(
        "--train-size", type=int, default=None, help="IVF-PQ training sample (default: reco memory build's)"
    )
    p.add_argument("--autofaiss-memory", default=None, help="autofaiss index budget; default 1/16 of exact")
    p.add_argument("--autofaiss-query-ms", type=float, default=10.0, help="autofaiss batch-1 latency budget")
    p.add_argument(
        "--autofaiss-index-key", default=None, help="force an index key (skips autofaiss's choice)"
    )
    p.add_argument("--clusters", type=int, default=1024, help="clusters of the synthetic data")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep-data", action="store_true", help="keep the vector files under OUT/_work")
    p.add_argument(
        "--in-process",
        action="store_true",
        help="run backends in this process (faster start; peak RSS is then cumulative, not per backend)",
    )
    args = p.parse_args(argv)
    if args.large:
        args.n = 1_000_000
    if args.train_size is None:
        args.train_size = build_train_size()
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = sorted(set(args.backends) - set(ALL_BACKENDS))
    if unknown:
        p.error(f"unknown backends {unknown}: choose from {ALL_BACKENDS}")
    if args.memory is not None and not (args.memory / "image_emb.npy").is_file():
        raise SystemExit(f"{args.memory / 'image_emb.npy'} not found: --memory must be a memory directory")
    return args


def _write_database(work: Path, rows_iter, n: int, dim: int) -> None:
    """Write float32 rows (what backends index) and fp16 rows (what a store keeps for re-ranking)."""
    f32 = np.lib.format.open_memmap(work / "database.npy", mode="w+", dtype=np.float32, shape=(n, dim))
    f16 = np.lib.format.open_memmap(work / "database_fp16.npy", mode="w+", dtype=np.float16, shape=(n, dim))
    for start, chunk in rows_iter:
        f32[start : start + len(chunk)] = chunk
        f16[start : start + len(chunk)] = chunk
    f32.flush()
    f16.flush()
    del f32, f16


def _ground_truth(work: Path, queries: np.ndarray, n: int) -> np.ndarray:
    """Top-K ids by float64 brute force, streamed over the database."""
    q = queries.astype(np.float64)
    best_s = np.full((len(q), 0), -np.inf)
    best_i = np.zeros((len(q), 0), dtype=np.int64)
    for start, chunk in tqdm(
        _iter_chunks(work / "database.npy"), total=-(-n // CHUNK_ROWS), desc="ground truth"
    ):
        s = np.concatenate([best_s, q @ chunk.astype(np.float64).T], axis=1)
        i = np.concatenate(
            [best_i, np.broadcast_to(np.arange(start, start + len(chunk)), (len(q), len(chunk)))], axis=1
        )
        keep = np.argpartition(-s, min(K, s.shape[1] - 1), axis=1)[:, :K]
        best_s, best_i = np.take_along_axis(s, keep, axis=1), np.take_along_axis(i, keep, axis=1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_i, order, axis=1)


def _synthetic(work: Path, args: argparse.Namespace) -> tuple[int, np.ndarray]:
    from synthetic import clustered_queries, clustered_unit_vectors

    n, dim = args.n, args.dim
    chunk = 131072
    rows = clustered_unit_vectors(n, dim, n_clusters=args.clusters, seed=args.seed)
    _write_database(work, ((s, rows[s : s + chunk]) for s in range(0, n, chunk)), n, dim)
    del rows
    return n, clustered_queries(args.queries, dim, n_clusters=args.clusters, seed=args.seed)


def _real(work: Path, args: argparse.Namespace) -> tuple[int, np.ndarray]:
    """Hold out random rows of the memory as queries; the rest (renumbered) is the database."""
    path = args.memory / "image_emb.npy"
    emb = np.load(path, mmap_mode="r")
    n_all, dim = emb.shape
    if n_all <= args.queries + K:
        raise SystemExit(f"{path} has {n_all} rows: need more than --queries {args.queries} + {K}")
    held = np.zeros(n_all, dtype=bool)
    held[np.random.default_rng(args.seed).choice(n_all, args.queries, replace=False)] = True

    def unit(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    def rows():
        written = 0
        for s in range(0, n_all, CHUNK_ROWS):
            part = unit(emb[s : s + CHUNK_ROWS])[~held[s : s + CHUNK_ROWS]]
            yield written, part
            written += len(part)

    n = n_all - args.queries
    _write_database(work, rows(), n, dim)
    return n, unit(emb[np.flatnonzero(held)])


def _tasks(args: argparse.Namespace, n: int, dim: int, work: Path) -> list[dict[str, Any]]:
    train_size = min(args.train_size, n)
    budget = args.autofaiss_memory or f"{max(1, n * dim * 4 // 16 // 1024)}K"
    common = {"dim": dim, "n": n, "work": str(work), "train_size": train_size, "seed": args.seed}
    common.update(batch=args.batch, batch1_queries=args.batch1_queries, batch1_seconds=args.batch1_seconds)
    common.update(batch_seconds=args.batch_seconds)
    # None = the package's default, resolved by the backend from N when trained (and by load for the
    # search-time ones: a shared index searched with rerank=None re-ranks by the package's rule)
    ivf = {"nlist": args.nlist, "m": args.m, "nbits": args.nbits, "nprobe": args.nprobe}
    specs = {
        "exact": ("exact", {}),
        "exact_mmap": ("exact_mmap", {}),
        "ivfpq": ("ivfpq", {**ivf, "rerank": args.rerank}),
        "ivfpq_norerank": ("ivfpq", {**ivf, "rerank": 0}),
        "autofaiss": (
            "autofaiss",
            {
                "max_index_memory_usage": budget,
                "max_index_query_time_ms": args.autofaiss_query_ms,
                "index_key": args.autofaiss_index_key,
            },
        ),
    }
    tasks = [
        {**common, "name": name, "kind": specs[name][0], "params": specs[name][1]} for name in args.backends
    ]
    for task in tasks:
        if task["kind"] == "ivfpq":  # nprobe/rerank are search-time: one build serves both ivfpq entries
            task["layout"] = f"ivfpq-{args.nlist or 'derived'}-{args.m}-{args.nbits}-{train_size}"
            task["search_params"] = ["nprobe", "rerank"]
    return tasks


def _run_suite(
    work: Path, args: argparse.Namespace, n: int, queries: np.ndarray, label: str
) -> dict[str, Any]:
    np.save(work / "queries.npy", np.ascontiguousarray(queries, dtype=np.float32))
    np.save(work / "truth_ids.npy", _ground_truth(work, queries, n))
    ctx = multiprocessing.get_context("spawn")
    results: dict[str, Any] = {}
    built: dict[str, tuple[str, str, float]] = {}  # index layout -> (backend name, saved dir, build seconds)
    for task in tqdm(_tasks(args, n, queries.shape[1], work), desc="backends"):
        tqdm.write(f"[{task['name']}] building and measuring on N={n} ...")
        layout = task.get("layout")
        if layout in built:  # e.g. ivfpq_rerank searches the index ivfpq already built: build it once
            owner, task["shared_index"], task["shared_build_s"] = built[layout]
        elif layout is not None:
            task["shared_index"], owner = str(work / f"index_{label}_{task['name']}"), None
            shutil.rmtree(task["shared_index"], ignore_errors=True)
        try:
            if args.in_process:
                results[task["name"]] = {**_run_backend(task), "isolated_process": False}
            else:
                pool = ctx.Pool(1)
                try:
                    results[task["name"]] = {**pool.apply(_run_backend, (task,)), "isolated_process": True}
                finally:
                    pool.close()
                    pool.join()
        except Exception as err:  # one failing backend must not lose the others' measurements
            results[task["name"]] = {"error": f"{type(err).__name__}: {err}"}
        result = results[task["name"]]
        if layout is not None and "error" not in result:
            if owner is None:
                built[layout] = (task["name"], task["shared_index"], result["build_s"])
            else:
                result["build_shared_with"] = owner
        tqdm.write(f"[{task['name']}] {_summary(result)}")
    return results


def _summary(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"error: {r['error']}"
    return (
        f"build {r['build_s']:.1f}s, {r['bytes_per_vector']:.1f} B/vec, R@10 {r['recall@10']:.4f}, "
        f"{r['qps_batch1024']:.0f} q/s @1024, peak {r['peak_rss_mb']:.0f} MB"
    )


def _exact_fraction(
    results: dict[str, Any], n: int, dim: int, matmul: float, name: str = "exact"
) -> float | None:
    exact = results.get(name, {})
    if "qps_batch1024" not in exact:
        return None
    return 2.0 * n * dim * exact["qps_batch1024"] / 1e9 / matmul


def _table(title: str, n: int, dim: int, results: dict[str, Any]) -> str:
    head = (
        f"### {title} (N={n:,}, dim={dim})\n\n"
        "| backend | build s | B/vector | recall@1 | recall@10 | q/s batch 1 | q/s batch 1024 | peak RSS MB | notes |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---|\n"
    )
    lines = []
    exact_qps = results.get("exact", {}).get("qps_batch1024")
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | - | - | - | - | - | - | - | {r['error']} |")
            continue
        args = r["init_args"]
        if name.startswith("ivfpq"):
            note = (
                f"nlist={args['nlist']} m={args['m']} nprobe={args['nprobe']} rerank={args['rerank']}, "
                f"trained on {r['train_size']:,}"
                + (f"; derived from N: {', '.join(r['derived'])}" if r.get("derived") else "")
                + (f"; {r['qps_batch1024'] / exact_qps:.1f}x exact's q/s @1024" if exact_qps else "")
            )
        elif name == "autofaiss":
            note = (
                f"{r['index_key']} {r['index_param'] or ''}; memory budget "
                f"{'met' if r['within_memory_budget'] else 'MISSED'}, "
                f"{r['max_index_query_time_ms']:g} ms budget {'met' if r['within_query_time_budget'] else 'MISSED'} "
                f"({r['latency_ms_batch1_mean']:.2f} ms)"
            )
        else:
            note = ""
        lines.append(
            f"| {name} | {r['build_s']:.1f} | {r['bytes_per_vector']:.1f} | {r['recall@1']:.4f} | "
            f"{r['recall@10']:.4f} | {r['qps_batch1']:.1f} | {r['qps_batch1024']:.1f} | {r['peak_rss_mb']:.0f} | {note} |"
        )
    return head + "\n".join(lines) + "\n"


def _plot(path: Path, suites: dict[str, dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for (title, results), marker in zip(suites.items(), "os^", strict=False):
        for name, r in results.items():
            if "error" in r:
                continue
            ax.scatter(r["qps_batch1024"], r["recall@10"], marker=marker)
            ax.annotate(
                f"{name} ({title})",
                (r["qps_batch1024"], r["recall@10"]),
                fontsize=8,
                xytext=(4, 4),
                textcoords="offset points",
            )
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("queries/s at batch 1024 (log)")
    ax.set_ylabel("recall@10 vs exact")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and write memory_backends.{json,md,png} into ``--out``; returns the JSON dict."""
    args = _parse(argv)
    out: Path = args.out
    work = out / "_work"
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {}
    try:
        matmul = measure_matmul_gflops(args.dim, min(args.n, CHUNK_ROWS))
        n, queries = _synthetic(work, args)
        results = _run_suite(work, args, n, queries, "synthetic")
        adjacent = max(results.get(name, {}).get("matmul_gflops_adjacent", 0.0) for name in SCANS)
        best = max(matmul["best"], adjacent)
        report = {
            "matmul_gflops": best,
            "matmul_gflops_by_library": matmul,
            "n": n,
            "dim": args.dim,
            "queries": len(queries),
            "data": f"synthetic clustered_unit_vectors(n_clusters={args.clusters}, seed={args.seed})",
            "exact_fraction_of_matmul": _exact_fraction(results, n, args.dim, best),
            "exact_fraction_of_matmul_interleaved": results.get("exact", {}).get(
                "kernel_fraction_interleaved"
            ),
            "exact_mmap_fraction_of_matmul": _exact_fraction(results, n, args.dim, best, "exact_mmap"),
            "exact_mmap_fraction_of_matmul_interleaved": results.get("exact_mmap", {}).get(
                "kernel_fraction_interleaved"
            ),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "cpu_count": os.cpu_count(),
            "backends": results,
        }
        tables = [_table("synthetic CLIP-like vectors", n, args.dim, results)]
        suites = {"synthetic": results}
        if args.memory is not None:
            n_real, real_queries = _real(work, args)
            real = _run_suite(work, args, n_real, real_queries, "real")
            dim_real = real_queries.shape[1]
            report["real_memory"] = {
                "path": str(args.memory),
                "n": n_real,
                "dim": dim_real,
                "queries": len(real_queries),
                "exact_fraction_of_matmul": _exact_fraction(real, n_real, dim_real, best),
                "backends": real,
            }
            tables.append(_table(f"real memory {args.memory}", n_real, dim_real, real))
            suites["real"] = real
        scans = []
        for name, key in (
            ("exact", "exact_fraction_of_matmul"),
            ("exact_mmap", "exact_mmap_fraction_of_matmul"),
        ):
            frac, inter = report[key], report[f"{key}_interleaved"]
            if frac is not None:
                scans.append(
                    f"{name} batched search at {100 * frac:.1f}% of it"
                    + (
                        f" ({100 * inter:.1f}% when timed alternately with GEMM on a 64k block)"
                        if inter
                        else ""
                    )
                )
        header = (
            f"matmul {best:.1f} GFLOP/s (best of numpy/torch, {os.cpu_count()} cores); "
            + ("; ".join(scans) or "no scan backend run")
            + f"; load average at the end {report['load_average']}\n\n"
        )
        markdown = header + "\n".join(tables)
        atomic_write_text(out / "memory_backends.json", json.dumps(report, indent=2))
        atomic_write_text(out / "memory_backends.md", markdown)
        _plot(out / "memory_backends.png", suites)
        print(markdown)
    finally:
        if not args.keep_data:
            shutil.rmtree(work, ignore_errors=True)
    return report


if __name__ == "__main__":
    main()
