"""benchmarks/gpu_check.py in its tiny mode on CPU (same code as on a GPU): every row, sane values, honest
skips; its run without faiss; and the torch exact backend it measures against faiss's flat search."""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from reco_lightning.errors import RecoMemoryError
from reco_lightning.memory.base import MemoryBackend
from reco_lightning.memory.store import MemoryStore
from reco_lightning.memory.torch_exact import TorchExactBackend, exact_topk

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SHARE_NAMES = {"backbone", "search", "retrieval_rest", "fusion_forward", "loss_backward_optimizer"}


@pytest.fixture
def gpu_check(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("gpu_check")


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# --- the check, tiny --------------------------------------------------------------------------------------
def test_tiny_mode_runs_every_row(gpu_check, tmp_path, capsys) -> None:
    report = gpu_check.main(["--tiny", "--device", "cpu", "--out", str(tmp_path)])
    on_disk = json.loads((tmp_path / "gpu_check.json").read_text())
    assert on_disk == json.loads(json.dumps(report, default=str))
    rows = on_disk["rows"]
    assert list(rows) == list(gpu_check.ROWS)  # every row, in table order
    for key, row in rows.items():
        assert row["check"] == gpu_check.ROWS[key]
        assert row["status"] == "ok" or row["status"].startswith("skipped: "), (key, row["status"])
    assert on_disk["mode"] == "tiny" and on_disk["environment"]["device"] == "cpu"
    assert on_disk["config"]["precision_used"] == "bf16-mixed"  # configs/vit-b32.yaml's trainer setting
    sizes = on_disk["sizes"]

    for key in ("train_on_the_fly", "train_cached"):
        row = rows[key]
        assert row["status"] == "ok", row.get("traceback")
        assert row["batch_size"] == row["config_batch_size"] == sizes["batch_size"] and row["reduced"] == []
        assert _positive(row["pairs_per_s"]) and len(row["step_s_all"]) == sizes["steps"]
        assert row["pairs_per_s"] == pytest.approx(row["batch_size"] / row["step_s_median"])
        assert set(row["shares"]) == SHARE_NAMES and sum(row["shares"].values()) == pytest.approx(1.0)
        assert all(0 <= s <= 1 for s in row["shares"].values())
        assert row["peak_gpu_mib"] is None  # on CPU: said, not invented
        assert f"{sizes['memory_size']:,} pairs, torch_exact float32 on cpu" == row["memory"]
    assert rows["train_on_the_fly"]["shares"]["search"] > 0  # the bare index search, timed apart
    assert rows["train_cached"]["shares"]["search"] == 0.0  # the cache replaces the search
    assert rows["train_on_the_fly"]["phases_s"]["index_search"] > 0

    torch_row = rows["search_torch_exact"]
    assert torch_row["status"] == "ok" and torch_row["n"] == sizes["memory_size"]
    assert torch_row["recall_at_10"] >= 0.99  # float32 against the float64 reference
    assert 0.9 <= rows["search_torch_exact_fp16"]["recall_at_10"] <= 1.0
    for key in (
        "search_torch_exact",
        "search_torch_exact_fp16",
        "search_faiss_cpu",
        "search_package_exact_cpu",
    ):
        assert _positive(rows[key]["qps_batch"]) and _positive(rows[key]["qps_batch1"]), key
        assert rows[key]["queries"] == sizes["queries"], key
    assert rows["search_faiss_gpu"]["status"] == "skipped: no CUDA device"
    faiss_row = rows["search_faiss_cpu"]
    assert faiss_row["recall_at_10"] >= 0.99 and rows["search_package_exact_cpu"]["recall_at_10"] >= 0.99
    assert faiss_row["torch_over_faiss_batch"] == pytest.approx(
        torch_row["qps_batch"] / faiss_row["qps_batch"]
    )

    same = rows["gpu_matches_cpu"]
    assert same["status"] == "ok" and same["passed"] and same["devices"] == "cpu vs cpu"
    assert set(same["fp32_vs_cpu"]) == set(same["mixed_vs_cpu"]) == {"v", "t", "v_bar", "t_bar"}
    assert all(c["max_abs"] <= gpu_check.FP32_ATOL for c in same["fp32_vs_cpu"].values())
    assert all(0 < c["max_abs"] <= gpu_check.BF16_ATOL for c in same["mixed_vs_cpu"].values())  # bf16 ran

    ddp = rows["ddp"]  # on CPU in --tiny: two gloo ranks through the same Lightning code
    assert ddp["status"] == "ok", ddp.get("traceback")
    assert ddp["world_size"] == 2 and ddp["strategy"] == "DDPStrategy" and ddp["steps"] == sizes["ddp_steps"]
    assert ddp["losses_finite"] and ddp["ranks_in_sync"] and len(ddp["rank_checksums"]) == 2
    assert _positive(ddp["pairs_per_s"])

    printed = capsys.readouterr().out
    assert printed.count("| check | result | detail |") == 1  # one table
    table = (tmp_path / "gpu_check.md").read_text()
    assert table in printed and all(f"| {label} |" in table for label in gpu_check.ROWS.values())


def test_without_faiss_the_check_still_runs(tmp_path) -> None:
    """An image without faiss: torch search and training run, the faiss rows say why they did not."""
    hidden = tmp_path / "hide" / "faiss"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'faiss'\", name='faiss')\n"
    )
    only = "search_torch_exact,search_faiss_gpu,search_faiss_cpu,search_package_exact_cpu,train_cached"
    path = [str(hidden.parent), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    command = [sys.executable, str(BENCHMARKS / "gpu_check.py"), "--tiny", "--device", "cpu", "--only", only]
    proc = subprocess.run(
        [*command, "--out", str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["environment"]["faiss"].startswith("not importable")
    assert "bypassed" in report["environment"]["memory_package"]
    rows = report["rows"]
    assert rows["search_torch_exact"]["status"] == "ok" and rows["search_torch_exact"]["recall_at_10"] >= 0.99
    assert rows["train_cached"]["status"] == "ok", rows["train_cached"].get("traceback")
    for key in ("search_faiss_gpu", "search_faiss_cpu", "search_package_exact_cpu"):
        assert rows[key]["status"].startswith("skipped: faiss not importable"), key
    assert rows["ddp"]["status"] == "skipped: not selected (--only)"


def test_a_batch_that_does_not_fit_is_halved_and_said(gpu_check, tmp_path, monkeypatch) -> None:
    measure, calls = gpu_check._measure_training, []

    def first_one_runs_out(module, optimizer, batches, ctx):
        calls.append(len(batches[0]["id"]))
        if len(calls) == 1:
            raise torch.OutOfMemoryError("simulated")
        return measure(module, optimizer, batches, ctx)

    monkeypatch.setattr(gpu_check, "_measure_training", first_one_runs_out)
    args = ["--tiny", "--device", "cpu", "--only", "train_cached", "--batch-size", "16"]
    row = gpu_check.main([*args, "--out", str(tmp_path)])["rows"]["train_cached"]
    assert calls == [16, 8] and row["status"] == "ok"
    assert (row["batch_size"], row["config_batch_size"]) == (8, 16)
    assert row["reduced"] == ["B=16 ran out of device memory"] and "B=16 ran out" in row["detail"]


def test_table_shows_skips_and_errors_as_they_are(gpu_check) -> None:
    env = {"device": "cpu", "cuda_devices": [], "torch": "t", "torch_cuda": None, "transformers": "x"}
    env |= {"pytorch_lightning": "l", "faiss": "f"}
    rows = {
        "a": {"check": "ran", "status": "ok", "value": "12 q/s", "detail": "fine"},
        "b": {"check": "not here", "status": "skipped: 1 GPU visible: DDP needs 2 or more"},
        "c": {"check": "broke", "status": "error: RuntimeError: boom", "value": "never shown"},
    }
    table = gpu_check.markdown_table({"mode": "full", "environment": env, "seconds": 3.0, "rows": rows})
    assert "| ran | 12 q/s | fine |" in table
    assert "| not here | skipped: 1 GPU visible: DDP needs 2 or more |  |" in table
    assert "| broke | error: RuntimeError: boom |  |" in table and "never shown" not in table


# --- the torch exact backend ------------------------------------------------------------------------------
@pytest.mark.parametrize(("n", "k", "block"), [(5003, 10, 70 * 64), (70, 70, 1), (300, 5, 1 << 28)])
def test_torch_exact_equals_faiss_flat(n, k, block) -> None:
    rows, queries = unit(n, 24, seed=0), unit(70, 24, seed=1)
    index = faiss.IndexFlatIP(24)
    index.add(rows)
    want_scores, want_ids = index.search(queries, k)
    scores, ids = exact_topk(torch.from_numpy(queries), torch.from_numpy(rows), k, block_elements=block)
    np.testing.assert_array_equal(ids.numpy(), want_ids)
    np.testing.assert_allclose(scores.numpy(), want_scores, atol=1e-5)
    backend = TorchExactBackend(24)
    backend.add(rows[: n // 2])
    backend.add(rows[n // 2 :])  # added in chunks, concatenated on first search
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a search inside a bf16-mixed step stays float32
        scores, ids = backend.search(queries, k)
    assert ids.dtype == np.int64 and scores.dtype == np.float32
    np.testing.assert_array_equal(ids, want_ids)


def test_torch_exact_searches_the_store_rows_and_reopens_anywhere(tmp_path) -> None:
    rows, queries = unit(400, 16, seed=2), unit(9, 16, seed=3)
    spec = {"class_path": "reco_lightning.memory.torch_exact.TorchExactBackend", "init_args": {}}
    path = MemoryStore.write(tmp_path / "memory", rows, rows, backend=spec)
    want = MemoryStore.from_arrays(rows.astype(np.float16), rows.astype(np.float16)).index("image")
    memory = MemoryStore.open(path, search_params={"device": "cpu", "dtype": "float16"})
    index = memory.index("text")
    assert isinstance(index, TorchExactBackend) and index.dtype_name == "float16" and index.ntotal == 400
    assert index.nbytes() == 400 * 16 * 2 and index.init_args() == {"dtype": "float16"}
    assert memory.manifest["backend"]["init_args"] == {"dtype": "float32"}  # no device in the manifest
    found = index.search(queries, 5)[1]
    assert (found[:, 0] == want.search(queries, 5)[1][:, 0]).all()  # fp16 rows: the same nearest row
    loaded = MemoryBackend.load(path / "index_image")
    with pytest.raises(RecoMemoryError, match="no rows"):
        loaded.search(queries, 5)  # the saved index is the row count only: the store attaches its rows
    with pytest.raises(RecoMemoryError, match="store's"):
        loaded.attach(rows[:10])


def test_torch_exact_to_device_without_cuda_stays_on_cpu(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(TorchExactBackend, "_warned_no_cuda", False)
    backend = TorchExactBackend(8)
    backend.add(unit(20, 8, seed=4))
    with pytest.warns(UserWarning, match="no CUDA device"):
        backend.to_device(0)
    assert backend.rows().device.type == "cpu" and backend.device_name == "cpu"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backend.to_device(0)  # one warning per process
    with pytest.raises(RecoMemoryError, match="dtype"):
        TorchExactBackend(8, dtype="int8")
