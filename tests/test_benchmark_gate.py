"""The novelty gate's research scripts: the share's trade-off frontier per split (gate_frontier), the
ceiling of label-free novelty signals (gate_signals) and the answers a gated image can get (gated_answer),
on synthetic features and rows."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

from helpers_benchmarks import BENCHMARKS
from test_benchmark_fusion_ablations import SEEN, synthetic


@pytest.fixture
def benches(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # both import their sibling fusion_ablations
    return importlib.import_module("gate_frontier"), importlib.import_module("gate_signals")


def _run(root: str, seen_only: float, all_class: float) -> dict:
    return {"root": root, "seed": 0, "seen_only": seen_only, "all": all_class}


def test_frontier_per_split_with_its_targets(benches, tmp_path):
    frontier, _ = benches
    roots = {}
    for name, seen in (("tops", [0, 2, 4, 6, 8]), ("shoes", [1, 3, 5, 7, 9])):
        for seed in (0, 1):
            root = tmp_path / f"{name}{seed}"
            root.mkdir()
            (root / "protocol.json").write_text(json.dumps({"seen_classes": seen}))
            roots.setdefault(name, []).append(str(root))

    def row(values: dict[str, tuple[float, float]]) -> dict:
        """{split: (seen-only, all)}; the two seeds of a split straddle the value by one point."""
        runs = [
            _run(r, so + d, a - d)
            for split, (so, a) in values.items()
            for r, d in zip(roots[split], (-1, 1), strict=True)
        ]
        return {"runs": runs}

    gate = "strict, calibrated on seen-only, added-memory gate {}, share quantile 0.95"
    rows = {
        "clip (frozen)": row({"tops": (80, 40), "shoes": (90, 45)}),
        "lookup": row({"tops": (70, 60), "shoes": (85, 66)}),
        "mix, strict rule on seen-only": row({"tops": (81, 58), "shoes": (90, 64)}),
        "control, strict": row({"tops": (81, 40), "shoes": (91, 45)}),
        "strict, calibrated on seen-only": row({"tops": (81, 55), "shoes": (91, 60)}),
        gate.format("0.9"): row({"tops": (79.5, 70), "shoes": (88, 68)}),
        gate.format("1.0"): row({"tops": (80.5, 66), "shoes": (89.5, 67)}),
    }
    result = frontier.frontier(rows)
    assert result["tops"]["target_all"] == 63 and result["tops"]["target_seen_only"] == 79
    assert result["shoes"]["target_all"] == 69 and result["shoes"]["target_seen_only"] == 89
    assert result["tops"]["points"] == {
        "0.9": {"seen_only": 79.5, "all": 70},
        "1.0": {"seen_only": 80.5, "all": 66},
        "none": {"seen_only": 81, "all": 55},
    }
    source = tmp_path / "fusion_ablations.json"
    source.write_text(json.dumps({"split": "val", "rows": rows}))
    frontier.main(["--json", str(source), "--out", str(tmp_path / "out")])
    saved = json.loads((tmp_path / "out" / "gate_frontier_val.json").read_text())
    assert saved["splits"] == json.loads(json.dumps(result))
    assert (tmp_path / "out" / "gate_frontier_val.png").stat().st_size > 0
    del rows["lookup"]  # a peer missing: the targets cannot be drawn, and the script says which
    with pytest.raises(SystemExit, match="lookup"):
        frontier.frontier(rows)


def test_signals_on_separated_classes(benches, monkeypatch, tmp_path):
    """Well-separated classes: the share of added neighbours gates every unseen image at any seen rate,
    the fit on val labels too, and gate_signals writes what it prints."""
    _, signals = benches
    data = synthetic()
    found, unseen = signals.signals(data, SEEN, "test")
    assert set(found) == {"share 10", "share 20", "share 40", "share 80", "gap", "caption agreement"} | {
        "top probability",
        "seen probability",
        "best score",
    }
    assert torch.equal(found["share 10"] == 1.0, unseen)  # synthetic classes: 100 rows each, k <= 80
    assert signals.unseen_gated(found["share 10"], unseen, 2.8) == 100.0
    assert signals.unseen_gated(found["gap"], unseen, 2.8) == 100.0
    monkeypatch.setattr(signals, "features", lambda root: data)
    monkeypatch.setattr(signals, "seen_of", lambda root, default: SEEN)
    summary = signals.main(["--root", "a", "b", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "gate_signals.json").read_text())
    assert saved["mean"] == summary and set(saved["per_root"]) == {"a", "b"}
    assert summary["logistic, 8 signals (reads labels)"]["2.8"] == 100.0
    assert summary["share of added, k 10"]["2.8"] == 100.0  # deeper shares break the ties


def test_vote_counts_the_marked_neighbours_and_breaks_ties_to_the_nearest(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    answer = importlib.import_module("gated_answer")
    labels = torch.tensor([[1, 2, 2, 1], [3, 1, 1, 3], [0, 1, 2, 3]])
    counted = torch.tensor([[True, True, True, True], [False, True, False, True], [False] * 4])
    # a 2-2 tie goes to the nearest counted neighbour; none counted: all count (a 1-1-1-1 tie: the first)
    assert answer.vote(labels, counted, 4).tolist() == [1, 1, 0]


def test_gated_answers_on_separated_classes(monkeypatch, tmp_path):
    """Well-separated classes, captions that name them: every label-free answer from the added rows gets
    the unseen classes right, as the label vote over the same rows does; the frozen model never predicts
    them; gated_answer writes what it prints, per split of the roots."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    answer = importlib.import_module("gated_answer")
    data = synthetic()
    numbers = answer.score(data, SEEN, "test")
    assert set(numbers) == {
        "caption mean, all neighbours (lookup)",
        "caption mean, added neighbours (the library's)",
        "the same, whitened (ridge 0.001)",
        "the same, whitened (ridge 0.01)",
        "vote of the added neighbours' caption classes",
        "... smoothed over the image graph",
        "class means of text-retrieved images",
        "label vote over the added neighbours (reads labels)",
        "the library's, gated prompts their added captions' mean",
        "the library's, gated prompts plus that mean",
        "frozen model (no memory)",
    }
    frozen = numbers.pop("frozen model (no memory)")
    assert frozen["unseen"] < 40  # synthetic images and prompts are not aligned: near chance
    for name, cells in numbers.items():  # every unseen image is gated (all its neighbours were added)
        assert cells["unseen"] == 100.0 and cells["seen"] == frozen["seen"], (name, cells)
        assert cells["all"] == pytest.approx((frozen["seen"] + 100.0) / 2), (name, cells)
    monkeypatch.setattr(answer, "features", lambda root: data)
    monkeypatch.setattr(answer, "seen_of", lambda root, default: SEEN)
    summary = answer.main(["--root", "a", "b", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "gated_answer.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(summary)) and set(saved["per_root"]) == {"a", "b"}
    assert set(summary["test"]) == {"mean", saved["per_root"]["a"]["split"]}
