"""On-disk IVF-PQ at 10M rows on one small box: sharded build, memory-mapped search, and import throughput.

What it measures (the targets of the "memories at web scale" issue), each stage in its own process so its
peak RSS (VmHWM) is its own:

* ``generate``: N synthetic CLIP-like fp16 rows (benchmarks/synthetic.py) written to ``rows.npy`` chunk by
  chunk, plus held-out queries;
* ``exact``: exact top-10 of every query by a blocked scan of the memmapped fp16 rows (the package's
  ``exact_mmap`` backend, ``memory.exact.scan_topk``): the ground truth and exact's q/s at the batch size;
* ``train``, ``shard i`` (one process per shard, as on a cluster), ``merge``: the package's
  ``ShardedIndexBuild`` with the ``ivfpq_ondisk`` defaults derived from N: seconds and peak RSS per stage,
  index bytes on disk;
* ``search``: the merged index opened memory-mapped with the rows attached for exact re-ranking, as a
  ``MemoryStore`` opens it: RSS once opened, recall@1/10 against exact, q/s at batch 1 and at the batch
  size, peak RSS while searching;
* ``import``: a generated clip-retrieval folder (``--import-rows`` rows in ``--import-parts`` parts, fp16,
  with captions and keys) imported by ``reco_lightning.memory.interop.import_embeddings`` with the
  ``exact_mmap`` backend: rows/s of the import itself (copy, checks, ids, metadata).

q/s are measured in one run on one machine; the README quotes exact's q/s beside them as the ratio.
Writes ``OUT/ondisk_<N>.json`` and prints a table. Needs ~2.1 x N x dim bytes of free disk (rows and
index) plus 4 x import-rows x dim for the import.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

K = 10
HERE = Path(__file__).resolve().parent


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("needs Linux /proc")


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("needs Linux /proc")


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --- stages, each run in a child process: `python memory_ondisk.py --stage NAME ...` -----------------------
def stage_generate(a: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(HERE))
    from synthetic import clustered_queries, clustered_unit_vectors

    start = time.perf_counter()
    tmp = a.work / ".rows.npy.tmp"
    rows = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(a.n, a.dim))
    chunk = 1 << 20
    for lo in range(0, a.n, chunk):  # chunk by chunk, flushed: the rows never sit in RAM
        hi = min(a.n, lo + chunk)
        clustered_unit_vectors(hi - lo, a.dim, seed=a.seed * 100_003 + lo // chunk, out=rows[lo:hi])
        rows.flush()
    del rows
    os.replace(tmp, a.work / "rows.npy")
    np.save(a.work / "queries.npy", clustered_queries(a.queries, a.dim, seed=a.seed))
    return {"seconds": time.perf_counter() - start}


def _rows(a: argparse.Namespace) -> np.ndarray:
    return np.load(a.work / "rows.npy", mmap_mode="r")


def stage_exact(a: argparse.Namespace) -> dict[str, Any]:
    from reco_lightning.memory.exact import scan_topk

    rows, queries = _rows(a), np.load(a.work / "queries.npy")
    batch = queries[: a.batch]
    start = time.perf_counter()
    _scores, ids = scan_topk(np.ascontiguousarray(queries), rows, K)
    seconds = time.perf_counter() - start
    np.save(a.work / "truth.npy", ids)
    single = []
    for q in queries[: a.exact_single]:
        t = time.perf_counter()
        scan_topk(q[None], rows, K)
        single.append(time.perf_counter() - t)
    return {
        "qps_batch": len(queries) / seconds,
        "batch": len(batch),
        "qps_1": len(single) / sum(single) if single else None,
        "peak_rss_mb": _peak_rss_mb(),
    }


def _build(a: argparse.Namespace):
    from reco_lightning.memory.ondisk import ShardedIndexBuild

    return ShardedIndexBuild(_rows(a), a.work / "build", "ivfpq_ondisk", num_shards=a.shards)


def stage_train(a: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    build = _build(a)
    backend = build.train()
    return {
        "seconds": time.perf_counter() - start,
        "peak_rss_mb": _peak_rss_mb(),
        "num_shards": build.num_shards,
        "init_args": backend.init_args(),
    }


def stage_shard(a: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    build = _build(a)
    lo, hi = build.shard_range(a.shard)
    build.build_shard(a.shard, progress=False)
    return {"seconds": time.perf_counter() - start, "rows": hi - lo, "peak_rss_mb": _peak_rss_mb()}


def stage_merge(a: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    backend = _build(a).merge(a.work / "index")
    return {
        "seconds": time.perf_counter() - start,
        "peak_rss_mb": _peak_rss_mb(),
        "index_bytes_on_disk": _dir_bytes(a.work / "index"),
        "lists_bytes": (a.work / "index" / "lists.ivfdata").stat().st_size,
        "spec": backend.spec(),
    }


def stage_search(a: argparse.Namespace) -> dict[str, Any]:
    from reco_lightning.memory.base import MemoryBackend

    rss_before = _rss_mb()
    overrides = {
        key: value for key, value in (("nprobe", a.nprobe), ("rerank", a.rerank)) if value is not None
    }
    backend = MemoryBackend.load(a.work / "index", **overrides)
    backend.attach(_rows(a))
    rss_open = _rss_mb()
    queries, truth = np.load(a.work / "queries.npy"), np.load(a.work / "truth.npy")
    _, ids = backend.search(queries, K)  # the recall run also warms the lists' pages
    hits = (ids[:, :K, None] == truth[:, None, :K]).any(axis=2).sum(axis=1)
    recall10, recall1 = float(hits.mean() / K), float((ids[:, 0] == truth[:, 0]).mean())
    batch, done, start = queries[: a.batch], 0, time.perf_counter()
    while done == 0 or time.perf_counter() - start < a.batch_seconds:
        backend.search(batch, K)
        done += len(batch)
    qps_batch = done / (time.perf_counter() - start)
    single, start = queries[: a.single], time.perf_counter()
    for q in single:
        backend.search(q[None], K)
    qps_1 = len(single) / (time.perf_counter() - start)
    return {
        "recall@1": recall1,
        "recall@10": recall10,
        "qps_batch": qps_batch,
        "qps_1": qps_1,
        "rss_before_open_mb": rss_before,
        "rss_open_mb": rss_open,
        "peak_rss_mb": _peak_rss_mb(),
        "search_args": {"nprobe": backend.nprobe, "rerank": backend.rerank},
    }


def stage_tune(a: argparse.Namespace) -> dict[str, Any]:
    """``reco memory tune``'s measurement on the index: rows as queries, the fastest setting reaching the target."""
    from reco_lightning.memory.base import MemoryBackend
    from reco_lightning.memory.tuning import tune_search

    backend = MemoryBackend.load(a.work / "index")
    rows = _rows(a)
    backend.attach(rows)
    start = time.perf_counter()
    result = tune_search(backend, rows, target=a.tune_recall, k=K, n_queries=a.tune_queries)
    return {**result, "seconds": time.perf_counter() - start, "peak_rss_mb": _peak_rss_mb()}


def stage_import_data(a: argparse.Namespace) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sys.path.insert(0, str(HERE))
    from synthetic import clustered_unit_vectors

    src = a.work / "clip_retrieval"
    shutil.rmtree(src, ignore_errors=True)
    for folder in ("img_emb", "text_emb", "metadata"):
        (src / folder).mkdir(parents=True)
    bounds = [int(b) for b in np.linspace(0, a.import_rows, a.import_parts + 1)]
    for part, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        for folder, stream in (("img_emb", 1), ("text_emb", 2)):
            rows = np.lib.format.open_memmap(
                src / folder / f"{folder}_{part}.npy",
                mode="w+",
                dtype=np.float16,
                shape=(int(hi - lo), a.dim),
            )
            clustered_unit_vectors(hi - lo, a.dim, seed=1000 * stream + part, out=rows)
            rows.flush()
            del rows
        keys = [f"{part:05d}/{i:09d}.jpg" for i in range(lo, hi)]
        captions = [f"a photo of thing {i % 997} number {i}" for i in range(lo, hi)]
        pq.write_table(
            pa.table({"image_path": keys, "caption": captions}), src / "metadata" / f"metadata_{part}.parquet"
        )
    return {"rows": a.import_rows, "parts": a.import_parts, "source_bytes": _dir_bytes(src)}


def stage_import(a: argparse.Namespace) -> dict[str, Any]:
    """The import, and in the same run a plain copy of the same embedding files (this disk's floor).

    Disk writes on a shared VM vary several-fold from minute to minute, so each is run ``--import-repeats``
    times, alternating, after a ``sync``; the best of each is kept.
    """
    from reco_lightning.memory.interop import import_embeddings

    src, out, copy = a.work / "clip_retrieval", a.work / "imported", a.work / "copied"
    imports, copies = [], []
    for _ in range(a.import_repeats):
        for target in (out, copy):
            shutil.rmtree(target, ignore_errors=True)
        os.sync()
        start = time.perf_counter()
        for folder in ("img_emb", "text_emb"):
            shutil.copytree(src / folder, copy / folder)
        os.sync()
        copies.append(time.perf_counter() - start)
        start = time.perf_counter()
        import_embeddings(src, out, backbone="openai/clip-vit-base-patch32", backend="exact_mmap")
        os.sync()
        imports.append(time.perf_counter() - start)
    for target in (out, copy):
        shutil.rmtree(target, ignore_errors=True)
    return {
        "seconds": min(imports),
        "all_seconds": imports,
        "rows_per_s": a.import_rows / min(imports),
        "copy_seconds": min(copies),
        "all_copy_seconds": copies,
        "copy_rows_per_s": a.import_rows / min(copies),
        "peak_rss_mb": _peak_rss_mb(),
    }


STAGES = {
    "generate": stage_generate,
    "exact": stage_exact,
    "train": stage_train,
    "shard": stage_shard,
    "merge": stage_merge,
    "search": stage_search,
    "tune": stage_tune,
    "import_data": stage_import_data,
    "import": stage_import,
}


# --- the parent: runs each stage in a fresh process and collects the results -------------------------------
def _child(a: argparse.Namespace, stage: str, **extra: Any) -> dict[str, Any]:
    result_path = a.work / f".result_{stage}.json"
    argv = [sys.executable, __file__, "--stage", stage, "--result", str(result_path), *a.forward]
    for key, value in extra.items():
        argv += [f"--{key}", str(value)]
    print(f"[{time.strftime('%H:%M:%S')}] {stage} {extra or ''}", flush=True)
    subprocess.run(argv, check=True)
    return json.loads(result_path.read_text())


def _table(r: dict[str, Any]) -> str:
    n, s, e, b = r["n"], r["search"], r["exact"], r["build"]
    reused = r.get("reused_from_previous_run")
    lines = [
        f"on-disk IVF-PQ, N = {n:,} x {r['dim']} fp16 rows, {r['queries']} queries, k = {K}"
        + (f" ({', '.join(reused)} from the previous run)" if reused else ""),
        f"index: {b['merge']['spec']['init_args']}, {b['train']['num_shards']} shards, "
        f"{b['merge']['index_bytes_on_disk'] / 2**20:,.0f} MiB on disk",
        "",
        "| stage | seconds | peak RSS (MiB) |",
        "|---|---:|---:|",
        f"| train | {b['train']['seconds']:.0f} | {b['train']['peak_rss_mb']:.0f} |",
        *(
            f"| shard {i} ({sh['rows']:,} rows) | {sh['seconds']:.0f} | {sh['peak_rss_mb']:.0f} |"
            for i, sh in enumerate(b["shards"])
        ),
        f"| merge | {b['merge']['seconds']:.0f} | {b['merge']['peak_rss_mb']:.0f} |",
        "",
        "| search | recall@1 | recall@10 | q/s batch 1 | q/s batch {0} | x exact (batch {0}) | RSS open (MiB) | peak RSS (MiB) |".format(
            r["batch"]
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        _search_row("ivfpq_ondisk + re-rank, defaults", s, e),
        *(
            (
                _search_row(
                    f"same index, tuned: nprobe {r['tune']['nprobe']}, rerank {r['tune']['rerank']}",
                    r["search_tuned"],
                    e,
                ),
            )
            if "tune" in r
            else ()
        ),
        f"| exact_mmap (scan of the fp16 memmap) | 1 | 1 | {e['qps_1'] or float('nan'):.2f} | {e['qps_batch']:.1f} | 1.0 | - | "
        f"{e['peak_rss_mb']:.0f} |",
    ]
    if "tune" in r:
        t = r["tune"]
        lines += [
            "",
            f"`reco memory tune --recall {t['target']}` ({t['queries']} memory rows as queries, exact truth by a scan): "
            f"nprobe {t['nprobe']}, rerank {t['rerank']}, recall@{t['k']} {t['recall']:.3f} on those rows; "
            f"{len(t['measured'])} settings measured in {t['seconds']:.0f} s, peak RSS {t['peak_rss_mb']:.0f} MiB",
        ]
    if "import" in r:
        im = r["import"]
        lines += [
            "",
            f"import of a {r['import_data']['rows']:,}-row clip-retrieval folder ({r['import_data']['parts']} parts): "
            f"{im['seconds']:.1f} s, {im['rows_per_s']:,.0f} rows/s (written to disk, best of "
            f"{len(im['all_seconds'])}), peak RSS {im['peak_rss_mb']:.0f} MiB; a plain copy of its embedding files: "
            f"{im['copy_rows_per_s']:,.0f} rows/s",
        ]
    return "\n".join(lines)


def plot(r: dict[str, Any], path: Path) -> None:
    """Recall@10 against queries/s: the tuning's measured settings (on memory rows), the searches on held-out
    queries at the defaults and at the tuned setting, and exact, with the 20x-exact line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    exact = r["exact"]["qps_batch"]
    if "tune" in r:
        grid = r["tune"]["measured"]
        ax.scatter([m["qps"] for m in grid], [m["recall"] for m in grid], marker=".", color="grey",
                   label="tuning: (nprobe, rerank) on 1000 memory rows")  # fmt: skip
        for m in grid:
            ax.annotate(f"{m['nprobe']},{m['rerank']}", (m["qps"], m["recall"]), fontsize=7, xytext=(3, -8),
                        textcoords="offset points", color="grey")  # fmt: skip
    rows = [("defaults", r["search"], "o")]
    if "search_tuned" in r:
        rows.append((f"tuned ({r['tune']['nprobe']}, {r['tune']['rerank']})", r["search_tuned"], "s"))
    for label, s, marker in rows:
        ax.scatter(
            [s["qps_batch"]], [s["recall@10"]], marker=marker, s=60, label=f"{label}: held-out queries"
        )
    ax.scatter([exact], [1.0], marker="^", s=60, label="exact scan of the memmap")
    ax.axvline(20 * exact, linestyle="--", color="k", linewidth=0.8, label="20x exact")
    ax.axhline(0.95, linestyle=":", color="k", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel(f"queries/s at batch {r['batch']} (log)")
    ax.set_ylabel("recall@10 vs exact")
    ax.set_title(f"on-disk IVF-PQ, N = {r['n']:,}")
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _search_row(label: str, s: dict[str, Any], e: dict[str, Any]) -> str:
    return (
        f"| {label} | {s['recall@1']:.3f} | {s['recall@10']:.3f} | {s['qps_1']:.1f} | {s['qps_batch']:.0f} | "
        f"{s['qps_batch'] / e['qps_batch']:.1f} | {s['rss_open_mb']:.0f} | {s['peak_rss_mb']:.0f} |"
    )


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000, help="rows (the issue's target: 10000000)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=1024, help="held-out queries: recall and exact's batch")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--batch-seconds", type=float, default=20.0, help="repeat batched search this long")
    p.add_argument("--single", type=int, default=200, help="queries timed one at a time")
    p.add_argument("--exact-single", type=int, default=3, help="single queries exact scans (slow)")
    p.add_argument("--shards", type=int, default=None, help="default: the package's (one per 2M rows)")
    p.add_argument("--import-rows", type=int, default=1_000_000, help="0 skips the import benchmark")
    p.add_argument("--import-parts", type=int, default=10)
    p.add_argument("--import-repeats", type=int, default=3)
    p.add_argument("--tune-recall", type=float, default=0.98, help="`reco memory tune` target; 0 skips it")
    p.add_argument("--tune-queries", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench_out/ondisk"))
    p.add_argument("--keep-data", action="store_true", help="keep OUT/_work (rows, index) for reruns")
    p.add_argument(
        "--reuse-build",
        action="store_true",
        help="with --keep-data's index: rerun exact and the search stages only, keep OUT's build (and import "
        "with --import-rows 0) results, recorded as reused",
    )
    p.add_argument("--stage", choices=sorted(STAGES), default=None, help=argparse.SUPPRESS)
    p.add_argument("--shard", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--nprobe", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--rerank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.work = a.out / "_work"
    a.forward = [
        *("--n", str(a.n), "--dim", str(a.dim), "--queries", str(a.queries), "--batch", str(a.batch)),
        *("--batch-seconds", str(a.batch_seconds), "--single", str(a.single)),
        *("--exact-single", str(a.exact_single), "--import-rows", str(a.import_rows)),
        *(
            "--import-parts",
            str(a.import_parts),
            "--import-repeats",
            str(a.import_repeats),
            "--seed",
            str(a.seed),
            "--tune-recall",
            str(a.tune_recall),
            "--tune-queries",
            str(a.tune_queries),
            "--out",
            str(a.out),
        ),
        *(("--shards", str(a.shards)) if a.shards else ()),
    ]
    return a


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    a = _parse(argv)
    if a.stage is not None:  # a child
        result = STAGES[a.stage](a)
        a.result.write_text(json.dumps(result))
        return None
    a.work.mkdir(parents=True, exist_ok=True)
    r: dict[str, Any] = {
        "n": a.n,
        "dim": a.dim,
        "queries": a.queries,
        "batch": a.batch,
        "cpus": os.cpu_count(),
    }
    started = time.perf_counter()
    if not (a.work / "rows.npy").is_file() or np.load(a.work / "rows.npy", mmap_mode="r").shape != (
        a.n,
        a.dim,
    ):
        shutil.rmtree(a.work / "build", ignore_errors=True)
        r["generate"] = _child(a, "generate")
    result_path = a.out / f"ondisk_{a.n}.json"
    previous = json.loads(result_path.read_text()) if a.reuse_build and result_path.is_file() else None
    r["exact"] = _child(a, "exact")
    if previous is not None and (a.work / "index").is_dir():  # search stages again, back to back, alone
        r["build"], r["reused_from_previous_run"] = previous["build"], ["build"]
    else:
        shutil.rmtree(a.work / "build", ignore_errors=True)
        shutil.rmtree(a.work / "index", ignore_errors=True)
        train = _child(a, "train")
        shards = [_child(a, "shard", shard=i) for i in range(train["num_shards"])]
        r["build"] = {"train": train, "shards": shards, "merge": _child(a, "merge")}
    r["search"] = _child(a, "search")
    if a.tune_recall:
        r["tune"] = _child(a, "tune")
        r["search_tuned"] = _child(a, "search", nprobe=r["tune"]["nprobe"], rerank=r["tune"]["rerank"])
    if a.import_rows:
        r["import_data"] = _child(a, "import_data")
        r["import"] = _child(a, "import")
    elif previous is not None and "import" in previous:
        r["import_data"], r["import"] = previous["import_data"], previous["import"]
        r["reused_from_previous_run"].append("import")
    r["wall_seconds"] = time.perf_counter() - started
    table = _table(r)
    print(table)
    a.out.mkdir(parents=True, exist_ok=True)
    result_path.write_text(json.dumps(r, indent=2))
    (a.out / f"ondisk_{a.n}.md").write_text(table + "\n")
    plot(r, a.out / f"ondisk_{a.n}.png")
    if not a.keep_data:
        shutil.rmtree(a.work, ignore_errors=True)
    return r


if __name__ == "__main__":
    main()
