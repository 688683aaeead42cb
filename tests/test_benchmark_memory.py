"""The memory-backend benchmark end to end on tiny data: report schema, sanity of its numbers, artefacts."""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TINY = ["--n", "3000", "--dim", "32", "--queries", "40", "--m", "8", "--batch1-queries", "10"]
TINY += ["--batch-seconds", "0.05", "--autofaiss-index-key", "IVF16,Flat", "--autofaiss-query-ms", "50"]


@pytest.fixture
def bench(monkeypatch):
    # on sys.path (not only loaded from its file) so spawned per-backend processes can import it too
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("memory_backends")


@pytest.mark.autofaiss
def test_all_backends_in_process(bench, tmp_path) -> None:
    pytest.importorskip("autofaiss")
    report = bench.main([*TINY, "--out", str(tmp_path), "--in-process"])
    on_disk = json.loads((tmp_path / "memory_backends.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    for key, kind in (
        ("matmul_gflops", float),
        ("n", int),
        ("dim", int),
        ("exact_fraction_of_matmul", float),
    ):
        assert isinstance(on_disk[key], kind), key
    assert on_disk["n"] == 3000 and on_disk["dim"] == 32 and on_disk["matmul_gflops"] > 0
    backends = on_disk["backends"]
    assert set(backends) == {"exact", "exact_mmap", "ivfpq", "ivfpq_norerank", "autofaiss"}
    for name, r in backends.items():
        assert "error" not in r, (name, r)
        for key in ("build_s", "bytes_per_vector", "recall@1", "recall@10", "qps_batch1", "qps_batch1024"):
            assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] >= 0, (name, key)
        assert r["peak_rss_mb"] > 0 and r["ntotal"] == 3000 and 0 <= r["recall@10"] <= 1
    assert backends["exact"]["recall@1"] == backends["exact"]["recall@10"] == 1.0
    assert backends["exact"]["bytes_per_vector"] == 32 * 4
    assert backends["ivfpq"]["bytes_per_vector"] < 32 * 4
    assert backends["ivfpq"]["recall@10"] > backends["ivfpq_norerank"]["recall@10"]
    assert backends["ivfpq_norerank"]["build_shared_with"] == "ivfpq"  # one IVF-PQ build serves both
    # the ivfpq row is the package's defaults (only m given): derived from N = 3000 and the whole of it
    # as training sample (`reco memory build` trains on up to 200k rows)
    from reco_lightning.memory.ivfpq import default_nlist, default_nprobe, default_rerank

    nlist = default_nlist(3000, 3000)
    expected = {
        "nlist": nlist,
        "m": 8,
        "nbits": 8,
        "nprobe": default_nprobe(nlist),
        "rerank": default_rerank(3000),
    }
    assert backends["ivfpq"]["init_args"] == expected and expected["rerank"] > 0
    assert (
        backends["ivfpq"]["derived"] == ["nlist", "nprobe", "rerank"]
        and backends["ivfpq"]["train_size"] == 3000
    )
    assert backends["ivfpq_norerank"]["init_args"] == {**expected, "rerank": 0}
    # the fraction is the exact backend's FLOP rate over the best measured matmul rate
    flops = 2 * 3000 * 32 * backends["exact"]["qps_batch1024"] / 1e9
    assert on_disk["exact_fraction_of_matmul"] == pytest.approx(flops / on_disk["matmul_gflops"])
    assert (
        on_disk["exact_fraction_of_matmul_interleaved"]
        == backends["exact"]["kernel_fraction_interleaved"]
        > 0
    )
    auto = backends["autofaiss"]
    assert auto["index_key"] == "IVF16,Flat"
    assert isinstance(auto["within_memory_budget"], bool) and isinstance(
        auto["within_query_time_budget"], bool
    )
    assert auto["within_memory_budget"] is False  # default budget 1/16 of exact; IVF-Flat is bigger
    markdown = (tmp_path / "memory_backends.md").read_text()
    assert "| ivfpq_norerank |" in markdown and "recall@10" in markdown
    assert "derived from N: nlist, nprobe, rerank" in markdown and "x exact's q/s" in markdown
    assert (tmp_path / "memory_backends.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "_work").exists()


def test_scans_without_autofaiss_report_their_fraction_of_matmul(bench, tmp_path) -> None:
    """The core environment (no autofaiss): exact and exact_mmap scans, each as a fraction of the GEMM rate."""
    report = bench.main([*TINY, "--out", str(tmp_path), "--in-process", "--backends", "exact,exact_mmap"])
    backends = report["backends"]
    for name in ("exact", "exact_mmap"):
        assert backends[name]["recall@10"] == 1.0 and backends[name]["kernel_fraction_interleaved"] > 0
    assert backends["exact_mmap"]["bytes_per_vector"] == 0  # it scans the store's rows, holds none
    flops = 2 * 3000 * 32 * backends["exact_mmap"]["qps_batch1024"] / 1e9
    assert report["exact_mmap_fraction_of_matmul"] == pytest.approx(flops / report["matmul_gflops"])
    markdown = (tmp_path / "memory_backends.md").read_text()
    assert "exact batched search at" in markdown and "exact_mmap batched search at" in markdown


def test_spawned_backend_is_measured_in_its_own_process(bench, tmp_path) -> None:
    args = [
        "--n",
        "2000",
        "--dim",
        "16",
        "--queries",
        "30",
        "--batch1-queries",
        "5",
        "--batch-seconds",
        "0.05",
    ]
    report = bench.main([*args, "--backends", "exact", "--out", str(tmp_path)])
    exact = report["backends"]["exact"]
    assert exact["isolated_process"] is True and exact["recall@10"] == 1.0
    # per-process peak: the child's own high-water mark, at least what its imports already hold (the slack:
    # a CUDA build of torch maps ~0.5 GB more of its libraries on first use, even on a CPU)
    assert exact["rss_after_imports_mb"] <= exact["peak_rss_mb"] < exact["rss_after_imports_mb"] + 1500


def test_real_memory_uses_held_out_rows_as_queries(bench, tmp_path) -> None:
    memory = tmp_path / "memory"
    memory.mkdir()
    np.save(memory / "image_emb.npy", np.random.default_rng(0).standard_normal((1500, 16)).astype(np.float16))
    args = [
        "--n",
        "1000",
        "--dim",
        "16",
        "--queries",
        "30",
        "--batch1-queries",
        "5",
        "--batch-seconds",
        "0.05",
    ]
    args += ["--m", "4", "--backends", "exact,ivfpq", "--in-process", "--memory", str(memory)]
    report = bench.main([*args, "--out", str(tmp_path / "o")])
    real = report["real_memory"]
    assert real["n"] == 1470 and real["dim"] == 16 and real["queries"] == 30
    assert real["backends"]["exact"]["recall@10"] == 1.0
    assert real["backends"]["ivfpq"]["recall@10"] > 0.8
    assert "real memory" in (tmp_path / "o" / "memory_backends.md").read_text()
    with pytest.raises(SystemExit, match="image_emb.npy"):
        bench.main([*args[:-1], str(tmp_path), "--out", str(tmp_path / "o2")])


def test_helpers() -> None:
    bench = _load()
    truth = np.array([[1, 2, 3], [4, 5, 6]])
    approx = np.array([[1, 3, 9], [6, 7, 8]])
    assert bench.recall_at(approx, truth, 1) == 0.5
    assert bench.recall_at(approx, truth, 3) == pytest.approx(3 / 6)
    assert bench.build_train_size() == 200_000  # `reco memory build`'s default sample
    assert bench._memory_bytes("128M") == 128 * 2**20 and bench._memory_bytes("1.5GB") == int(1.5 * 2**30)


def _load():
    spec = importlib.util.spec_from_file_location(
        "memory_backends_helpers", BENCHMARKS / "memory_backends.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ondisk_benchmark_end_to_end_on_tiny_data(monkeypatch, tmp_path) -> None:
    """benchmarks/memory_ondisk.py: every stage in its own process, the report's numbers sane, --reuse-build."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    ondisk = importlib.import_module("memory_ondisk")
    tiny = ["--n", "4000", "--dim", "64", "--queries", "64", "--batch", "64", "--batch-seconds", "0.05"]
    tiny += [
        "--single",
        "5",
        "--exact-single",
        "1",
        "--shards",
        "2",
        "--import-rows",
        "600",
        "--import-parts",
        "3",
    ]
    tiny += ["--import-repeats", "1", "--tune-queries", "200", "--tune-recall", "0.9", "--out", str(tmp_path)]
    report = ondisk.main([*tiny, "--keep-data"])
    assert json.loads((tmp_path / "ondisk_4000.json").read_text()) == json.loads(json.dumps(report))
    assert [s["rows"] for s in report["build"]["shards"]] == [2000, 2000]
    for row in ("search", "search_tuned"):
        assert (
            0.5 < report[row]["recall@10"] <= 1
            and report[row]["qps_batch"] > 0
            and report[row]["peak_rss_mb"] > 0
        )
    assert report["tune"]["recall"] >= 0.9 and report["tune"]["reached"]
    assert report["import"]["rows_per_s"] > 0 and report["exact"]["qps_batch"] > 0
    assert "| ivfpq_ondisk + re-rank, defaults |" in (tmp_path / "ondisk_4000.md").read_text()
    assert (tmp_path / "ondisk_4000.png").stat().st_size > 0

    again = ondisk.main([*tiny, "--reuse-build", "--import-rows", "0"])
    assert again["reused_from_previous_run"] == ["build", "import"]
    assert again["build"] == report["build"] and again["import"] == report["import"]
    assert not (tmp_path / "_work").exists()  # no --keep-data this time
