"""The training-throughput and streaming-RAM benchmarks end to end at tiny sizes: schema and sane numbers."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def benchmarks(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("train_throughput"), importlib.import_module("streaming_ram")


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_train_throughput_tiny(benchmarks, tmp_path) -> None:
    throughput, _ = benchmarks
    args = ["--models", "demo", "--memory-size", "2000", "--on-the-fly-batch-sizes", "8"]
    args += ["--cached-batch-sizes", "8,64", "--steps", "2", "--warmup", "1", "--matmul-sizes", "256"]
    args += ["--min-seconds", "0"]
    report = throughput.main([*args, "--threads", "1", "--out", str(tmp_path)])
    on_disk = json.loads((tmp_path / "train_throughput.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert _positive(on_disk["matmul_gflops"]) and on_disk["models"] == ["demo"]
    demo = on_disk["demo"]
    for key in (
        "on_the_fly_samples_per_s",
        "cached_samples_per_s",
        "cached_gflops",
        "cached_fraction_of_matmul",
        "speedup",
        "speedup_same_batch_size",
        "cached_flops_per_step",
        "on_the_fly_flops_per_step_torch",
    ):
        assert _positive(demo[key]), key
    assert demo["k"] == 10 and demo["dim"] == 64 and demo["memory_size"] == 2000
    assert demo["on_the_fly_batch_size"] == 8 and demo["cached_batch_size"] in (8, 64)
    assert set(demo["on_the_fly"]) == {"8"} and set(demo["cached"]) == {"8", "64"}
    # (which path is faster is a measurement of benchmarks/train_throughput.py, not an assertion here:
    # two timed steps on a loaded machine can order them either way)
    assert demo["speedup"] == pytest.approx(demo["cached_samples_per_s"] / demo["on_the_fly_samples_per_s"])
    assert demo["cached_fraction_of_matmul"] == pytest.approx(
        demo["cached_gflops"] / on_disk["matmul_gflops"]
    )
    # the FLOP counter and the documented formula agree (the counter skips CPU attention)
    assert demo["cached_flops_counter_vs_analytic"] == pytest.approx(1.0, rel=0.05)
    # what the benchmark computes, not which path ran faster: wall-clock orders flake on a loaded machine
    phase_names = {"clip_embed", "retrieve", "fusion_forward", "loss_forward", "backward", "optimizer_step"}
    for mode, batch_size, timed_apart in (
        ("on_the_fly", demo["on_the_fly_batch_size"], {"index_search"}),  # the bare search, re-timed
        ("cached", demo["cached_batch_size"], set()),  # cached rows replace the search
    ):
        phases = dict(demo["breakdown_s"][mode])
        assert (phases.pop("batch_size"), phases.pop("threads")) == (batch_size, 1), mode
        total = phases.pop("total_without_index_search")
        assert set(phases) == phase_names | timed_apart, mode
        assert all(math.isfinite(s) and s >= 0 for s in phases.values()), mode
        assert total == pytest.approx(sum(phases[p] for p in phase_names)), mode
    for mode in ("on_the_fly", "cached"):
        for size, run in demo[mode].items():
            times = run["step_s_all"]
            assert (run["batch_size"], run["threads"], run["thread_probe_s"]) == (int(size), 1, {})
            assert run["steps_timed"] == len(times) == 2 and all(map(_positive, times)), (mode, size)
            assert run["step_s_best"] == min(times), (mode, size)
            assert run["step_s_median"] == pytest.approx(sum(times) / 2), (mode, size)
            assert run["samples_per_s"] == pytest.approx(int(size) / run["step_s_median"]), (mode, size)
    assert demo["on_the_fly_samples_per_s"] == demo["on_the_fly"]["8"]["samples_per_s"]
    cached_best = max(demo["cached"].values(), key=lambda run: run["samples_per_s"])
    assert demo["cached_samples_per_s"] == cached_best["samples_per_s"]
    assert demo["cached_batch_size"] == cached_best["batch_size"]
    # the cache takes CLIP out of the step: counted FLOPs per sample (deterministic), not seconds, show it
    cached_per_sample = demo["cached_flops_per_step"] / demo["cached_batch_size"]
    assert demo["cached_flops_per_sample"] == pytest.approx(cached_per_sample)
    assert demo["on_the_fly_flops_per_step_torch"] / demo["on_the_fly_batch_size"] > 2 * cached_per_sample
    assert demo["on_the_fly_search_flops_analytic"] == 2 * 2 * 8 * 2000 * 64  # two searches of B x N x D
    assert isinstance(next(iter(demo["targets"].values())), bool)
    ops = demo["cached_profile_top_ops"]
    assert ops and all(o["self_s"] >= 0 and 0 <= o["share"] <= 1 for o in ops)
    assert "| demo |" in (tmp_path / "train_throughput.md").read_text()
    # retrieval latency apart from model latency: shares of one step that add up to it
    assert demo["memory_backend"] == "exact"
    for mode, shares in demo["step_shares"].items():
        phases = demo["breakdown_s"][mode]
        assert sum(shares.values()) == pytest.approx(1.0), mode
        assert shares["search"] == pytest.approx(
            phases.get("index_search", 0.0) / phases["total_without_index_search"]
        )
        assert shares["backbone"] == pytest.approx(
            phases["clip_embed"] / phases["total_without_index_search"]
        )
    assert demo["step_shares"]["cached"]["search"] == 0.0  # the cache replaces the search
    assert demo["search"]["backend"]["class_path"].endswith("ExactBackend")  # the backend as built
    assert "Share of one step" in (tmp_path / "train_throughput.md").read_text()


def test_analytic_flops_formula(benchmarks) -> None:
    throughput, _ = benchmarks
    b, k, d = 4, 3, 8
    parts = throughput.analytic_cached_step_flops(b, k, d)
    seq = k + 1
    # one layer, run for the query position only: K/V of every token, the rest for the query alone
    assert parts["fusion_linear"] == 2 * 3 * 2 * b * (2 * d * d * seq + 2 * d * d + 2 * d * 4 * d)
    assert parts["fusion_attention"] == 2 * 3 * 4 * b * seq * d
    assert parts["loss"] == 7 * 2 * b * b * d
    assert parts["total"] == parts["fusion_linear"] + parts["fusion_attention"] + parts["loss"]
    all_tokens = 2 * 3 * 2 * b * seq * (4 * d * d + 2 * d * 4 * d)
    assert parts["fusion_linear_all_tokens"] == all_tokens > parts["fusion_linear"]
    two = throughput.analytic_cached_step_flops(b, k, d, layers=2)
    assert two["fusion_linear"] == parts["fusion_linear"] + all_tokens
    assert two["fusion_attention"] == parts["fusion_attention"] + 2 * 3 * 4 * b * seq * seq * d


def test_streaming_ram_tiny(benchmarks, tmp_path) -> None:
    _, streaming = benchmarks
    args = ["--sizes", "200,600", "--per-shard", "100", "--image-size", "32", "--batch-size", "16"]
    args += ["--num-workers", "1", "--sample-every", "2", "--first-batches", "2", "--shuffle-buffer", "50"]
    report = streaming.main([*args, "--out", str(tmp_path)])
    on_disk = json.loads((tmp_path / "streaming_ram.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert [r["pairs"] for r in on_disk["runs"]] == [200, 600]
    for run in on_disk["runs"]:
        assert run["pairs_streamed"] == run["pairs"] and run["bad_samples"] == 0
        for key in ("peak_rss_mb", "rss_after_first_batches_mb", "seconds", "peak_pss_mb", "bytes"):
            assert _positive(run[key]), key
        assert run["peak_rss_mb"] >= run["rss_after_first_batches_mb"]
        assert max(s["processes"] for s in run["samples"]) == 2  # the worker was measured too
    assert isinstance(on_disk["flat"], bool)
    assert on_disk["by_size"]["600"]["shards"] == 6
    assert "| 600 |" in (tmp_path / "streaming_ram.md").read_text()


def test_is_flat(benchmarks) -> None:
    _, streaming = benchmarks
    assert streaming.is_flat([1000.0, 1040.0])  # < 50 MB
    assert streaming.is_flat([1000.0, 1090.0])  # < 10%
    assert not streaming.is_flat([300.0, 400.0])
