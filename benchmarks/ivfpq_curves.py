"""IVF-PQ tuning curves: recall@10 and queries/s over a grid of (nprobe, rerank), in RAM and on disk, per N.

    python benchmarks/ivfpq_curves.py --n 100000 1000000 --out bench_out/ivfpq_curves
    python benchmarks/ivfpq_curves.py --n 10000000 --storage ondisk --out ... --keep-data   # ~25 min, 13 GB

Why: the package derives nprobe and rerank from N (``memory.ivfpq.default_nprobe`` / ``default_rerank``)
and the issue's target is that those defaults reach recall@10 >= 0.95 at >= 20x exact's queries/s (batch
1024) at 1M and 10M, in RAM and on disk, within 1.5x of what ``reco memory tune`` finds. The rules can only
be set from the curves they pick a point on, so this measures them, each N alone on the machine:

* rows: ``benchmarks/synthetic.py``'s CLIP-like unit vectors, fp16 on disk (a memory's store), held-out
  queries from the same distribution; the same generator and seeds as ``memory_ondisk.py``;
* exact: the ground truth and the exact scan's q/s at the batch size (``exact_mmap`` over the fp16 rows,
  and below 2M rows also ``exact``'s float32 copy in RAM; the faster one is the 20x reference);
* the index at the package's layout defaults (nlist derived from N, the default 200k training sample):
  ``ivfpq`` (codes in RAM) and/or ``ivfpq_ondisk`` (lists memory-mapped, built by ``ShardedIndexBuild``),
  re-ranking from the fp16 rows;
* every (nprobe, rerank) of the grid: recall@10 of the held-out queries, q/s at the batch size (best of
  repeats lasting ``--seconds``), and the point the package's current default rule picks.

Writes ``OUT/ivfpq_curves.json`` (merged with an earlier run's other N), a markdown table of the frontier
and a plot of recall against q/s with the 20x-exact line per N.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
K = 10
NPROBES = (1, 2, 4, 8, 16, 32, 64)
RERANKS = (0, 25, 50, 100, 200, 400, 800)


def _generate(work: Path, n: int, dim: int, queries: int, seed: int) -> None:
    """rows.npy (fp16, chunk by chunk: never all in RAM) and queries.npy, as memory_ondisk.py makes them."""
    sys.path.insert(0, str(HERE))
    from synthetic import clustered_queries, clustered_unit_vectors

    if (work / "rows.npy").is_file() and np.load(work / "rows.npy", mmap_mode="r").shape == (n, dim):
        return
    work.mkdir(parents=True, exist_ok=True)
    tmp = work / ".rows.npy.tmp"
    rows = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, dim))
    chunk = 1 << 20
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        clustered_unit_vectors(hi - lo, dim, seed=seed * 100_003 + lo // chunk, out=rows[lo:hi])
        rows.flush()
    del rows
    tmp.replace(work / "rows.npy")
    np.save(work / "queries.npy", clustered_queries(queries, dim, seed=seed))


def _qps(search, queries: np.ndarray, batch: int, seconds: float) -> float:
    """Best queries/s of a full batch over repeats lasting about ``seconds`` (at least two)."""
    block = np.resize(queries, (batch, queries.shape[1]))
    times: list[float] = []
    while len(times) < 2 or sum(times) < seconds:
        start = time.perf_counter()
        search(block)
        times.append(time.perf_counter() - start)
    return batch / min(times)


def _exact(work: Path, rows: np.ndarray, queries: np.ndarray, batch: int, seconds: float) -> dict[str, Any]:
    from reco_lightning.memory.exact import ExactBackend, scan_topk

    start = time.perf_counter()
    _, truth = scan_topk(queries, rows, K)
    np.save(work / "truth.npy", truth)
    out: dict[str, Any] = {"truth_seconds": time.perf_counter() - start}
    out["exact_mmap_qps"] = _qps(lambda q: scan_topk(q, rows, K), queries, batch, seconds)
    if len(rows) <= 2_000_000:  # a float32 copy in RAM (4 GB at 2M x 512)
        exact = ExactBackend(rows.shape[1])
        for lo in range(0, len(rows), 1 << 18):
            exact.add(np.asarray(rows[lo : lo + (1 << 18)], dtype=np.float32))
        out["exact_qps"] = _qps(lambda q: exact.search(q, K), queries, batch, seconds)
        del exact
    out["reference_qps"] = max(v for k, v in out.items() if k.endswith("_qps"))
    return out


def _index(work: Path, rows: np.ndarray, storage: str) -> tuple[Any, dict[str, Any]]:
    """The index at the package's layout defaults, built (or reused from ``work``), rows attached."""
    from reco_lightning.memory.base import DEFAULT_TRAIN_SIZE, MemoryBackend, training_sample
    from reco_lightning.memory.ivfpq import IVFPQBackend
    from reco_lightning.memory.ondisk import ShardedIndexBuild

    path = work / f"index_{storage}"
    start = time.perf_counter()
    if not (path / "backend.json").is_file():
        shutil.rmtree(path, ignore_errors=True)
        if storage == "ondisk":
            build = ShardedIndexBuild(rows, work / "build_ondisk", "ivfpq_ondisk")
            build.train()
            for shard in range(build.num_shards):
                build.build_shard(shard, progress=False)
            build.merge(path)
            shutil.rmtree(work / "build_ondisk", ignore_errors=True)
        else:
            backend = IVFPQBackend(rows.shape[1])
            backend.train(training_sample(rows, DEFAULT_TRAIN_SIZE), ntotal=len(rows))
            for lo in range(0, len(rows), 1 << 18):
                backend.add(np.asarray(rows[lo : lo + (1 << 18)], dtype=np.float32))
            backend.save(path)
    built = time.perf_counter() - start
    backend = MemoryBackend.load(path)
    backend.attach(rows)
    return backend, {"build_seconds": built, "defaults": backend.init_args()}


def measure(args: argparse.Namespace, n: int, storage: str) -> dict[str, Any]:
    from reco_lightning.memory.ivfpq import default_nprobe, default_rerank

    work = args.work / f"n{n}"
    _generate(work, n, args.dim, args.queries, args.seed)
    rows, queries = np.load(work / "rows.npy", mmap_mode="r"), np.load(work / "queries.npy")
    exact = _exact(work, rows, queries, args.batch, args.seconds)
    truth = np.load(work / "truth.npy")
    backend, index = _index(work, rows, storage)
    grid = []
    for nprobe in [p for p in args.nprobes if p <= backend.nlist]:
        for rerank in args.reranks:
            backend.set_search(nprobe=nprobe, rerank=rerank)
            _, ids = backend.search(queries, K)
            hits = (ids[:, :K, None] == truth[:, None, :K]).any(axis=2).sum(axis=1)
            qps = _qps(lambda q: backend.search(q, K), queries, args.batch, args.seconds)
            grid.append({"nprobe": nprobe, "rerank": rerank, "recall@10": float(hits.mean() / K), "qps": qps})
            print(f"N={n:,} {storage} nprobe={nprobe} rerank={rerank}: recall@10 {grid[-1]['recall@10']:.3f}, "
                  f"{qps:,.0f} q/s = {qps / exact['reference_qps']:.1f}x exact", flush=True)  # fmt: skip
    rule = {"nprobe": default_nprobe(backend.nlist), "rerank": default_rerank(n)}
    backend.set_search(**rule)
    _, ids = backend.search(queries, K)
    hits = (ids[:, :K, None] == truth[:, None, :K]).any(axis=2).sum(axis=1)
    rule.update(
        {
            "recall@10": float(hits.mean() / K),
            "qps": _qps(lambda q: backend.search(q, K), queries, args.batch, args.seconds),
        }
    )
    return {"n": n, "storage": storage, "nlist": backend.nlist, **exact, **index, "grid": grid, "rule": rule}


def frontier(grid: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The points no other point beats on both recall and q/s, fastest first."""
    best = []
    for point in sorted(grid, key=lambda p: (-p["qps"], -p["recall@10"])):
        if not best or point["recall@10"] > best[-1]["recall@10"]:
            best.append(point)
    return best


def table(results: list[dict[str, Any]]) -> str:
    lines = []
    for r in results:
        ref = r["reference_qps"]
        lines += [
            f"### N = {r['n']:,}, {r['storage']} (nlist {r['nlist']}; exact {ref:,.1f} q/s at batch 1024, so 20x = "
            f"{20 * ref:,.0f} q/s)",
            "",
            "| nprobe | rerank | recall@10 | q/s | x exact |",
            "|---:|---:|---:|---:|---:|",
            *[
                f"| {p['nprobe']} | {p['rerank']} | {p['recall@10']:.3f} | {p['qps']:,.0f} | {p['qps'] / ref:.1f} |"
                for p in frontier(r["grid"])
            ],
            f"| rule at run time: {r['rule']['nprobe']} | {r['rule']['rerank']} | {r['rule']['recall@10']:.3f} | "
            f"{r['rule']['qps']:,.0f} | {r['rule']['qps'] / ref:.1f} |",
            "",
        ]
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Recall@10 against speed (x exact) per N (rows) and storage (columns); one colour per rerank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["n"] for r in results})
    storages = sorted({r["storage"] for r in results})
    reranks = sorted({p["rerank"] for r in results for p in r["grid"]})
    colours = {rerank: plt.cm.viridis(i / max(1, len(reranks) - 1)) for i, rerank in enumerate(reranks)}
    fig, axes = plt.subplots(
        len(sizes), len(storages), figsize=(5.5 * len(storages), 3.6 * len(sizes)), squeeze=False
    )
    for r in results:
        ax = axes[sizes.index(r["n"])][storages.index(r["storage"])]
        ref = r["reference_qps"]
        for rerank in reranks:
            pts = sorted((p for p in r["grid"] if p["rerank"] == rerank), key=lambda p: p["nprobe"])
            if pts:
                ax.plot([p["qps"] / ref for p in pts], [p["recall@10"] for p in pts], marker=".",
                        color=colours[rerank], label=f"rerank {rerank}")  # fmt: skip
        ax.scatter([r["rule"]["qps"] / ref], [r["rule"]["recall@10"]], marker="s", color="k",
                   label=f"rule at run time ({r['rule']['nprobe']}, {r['rule']['rerank']})")  # fmt: skip
        ax.axvline(20, linestyle="--", color="k", linewidth=0.8)
        ax.axhline(0.95, linestyle=":", color="k", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_ylim(0.4, 1.01)
        ax.set_xlabel("x exact q/s at batch 1024 (along a line: nprobe, fewer to the right)")
        ax.set_ylabel("recall@10")
        ax.set_title(f"N = {r['n']:,}, {r['storage']} (nlist {r['nlist']})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--storage", nargs="+", choices=["ram", "ondisk"], default=["ram", "ondisk"])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--seconds", type=float, default=2.0, help="time each setting's batches this long")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nprobes", type=int, nargs="+", default=list(NPROBES), help="the grid's nprobe values")
    p.add_argument("--reranks", type=int, nargs="+", default=list(RERANKS), help="the grid's rerank values")
    p.add_argument("--out", type=Path, default=Path("bench_out/ivfpq_curves"))
    p.add_argument("--keep-data", action="store_true", help="keep OUT/_work (rows, indexes) for reruns")
    p.add_argument("--replot", action="store_true", help="only redraw the table and plot from OUT's JSON")
    args = p.parse_args(argv)
    args.work = args.out / "_work"
    path = args.out / "ivfpq_curves.json"
    previous = json.loads(path.read_text()) if path.is_file() else []
    if args.replot:
        (args.out / "ivfpq_curves.md").write_text(table(previous))
        plot(previous, args.out / "ivfpq_curves.png")
        return previous
    results = [
        r for r in previous if (r["n"], r["storage"]) not in {(n, s) for n in args.n for s in args.storage}
    ]
    try:
        for n in args.n:
            for storage in args.storage:
                results.append(measure(args, n, storage))
    finally:
        if not args.keep_data:
            shutil.rmtree(args.work, ignore_errors=True)
    results.sort(key=lambda r: (r["n"], r["storage"]))
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    (args.out / "ivfpq_curves.md").write_text(table(results))
    plot(results, args.out / "ivfpq_curves.png")
    print(table(results))
    return results


if __name__ == "__main__":
    main()
