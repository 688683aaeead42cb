"""The fusion-ablation benchmark on synthetic features: every row trains and scores, the label-reading
references are what they claim, the score-reading variants start as the demo's fusion, roots are pooled."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from helpers_benchmarks import load_benchmark
from reco_lightning.fusion import FusionConfig, FusionTransformer

SEEN = (0, 2, 4, 6, 8)


@pytest.fixture
def bench():
    return load_benchmark("fusion_ablations")


def synthetic(seed: int = 0, n: int = 1000, dim: int = 16, classes: int = 10) -> dict:
    """Well-separated classes: one image and one text centre each, pairs and queries scattered around."""
    g = torch.Generator().manual_seed(seed)
    image_centres = F.normalize(torch.randn(classes, dim, generator=g), dim=-1)
    text_centres = F.normalize(torch.randn(classes, dim, generator=g), dim=-1)

    def around(centres: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.normalize(centres[labels] + 0.15 * torch.randn(len(labels), dim, generator=g), dim=-1)

    mem_y = torch.arange(n) % classes
    test_y, val_y = torch.arange(200) % classes, torch.arange(100) % classes
    prompts = around(text_centres, torch.arange(classes).repeat_interleave(2)).view(classes, 2, dim)
    return {
        "mem_v": around(image_centres, mem_y),
        "mem_t": around(text_centres, mem_y),
        "mem_y": mem_y,
        "test_v": around(image_centres, test_y),
        "test_y": test_y,
        "val_v": around(image_centres, val_y),
        "val_y": val_y,
        "prompts": prompts,
    }


def test_every_row_trains_and_scores(bench):
    data = synthetic()
    for name, recipe in bench.ROWS.items():
        small = replace(recipe, epochs=1, batch_size=32)
        numbers = bench.run(data, small, 0, SEEN)
        assert set(numbers) == {"seen", "unseen", "all"}, name
        assert all(0 <= v <= 100 for v in numbers.values()), (name, numbers)
    # the retrieval reads the right classes here: the demo's fusion gets the unseen classes right
    assert bench.run(data, replace(bench.ROWS["reco"], batch_size=32), 0, SEEN)["unseen"] > 90


def test_references_read_the_labels(bench):
    data = synthetic()
    assert bench.label_vote(data, 0, SEEN) == {"seen": 100.0, "unseen": 100.0, "all": 100.0}
    assert bench.probe(data, 0, SEEN, epochs=20)["all"] > 95
    # a vote over shuffled labels is chance, so the reference is the labels' doing
    shuffled = {**data, "mem_y": data["mem_y"][torch.randperm(len(data["mem_y"]))]}
    assert bench.label_vote(shuffled, 0, SEEN)["all"] < 40


@pytest.mark.parametrize("mode", ["tokens", "gate", "weighted"])
def test_score_variants_start_as_the_demo_fusion(bench, mode):
    config = FusionConfig(num_heads=4, residual=True, retrieved_skip=0.8)
    torch.manual_seed(0)
    plain = FusionTransformer(16, config).eval()
    scored = bench.ScoredFusion(16, config, mode).eval()
    scored.load_state_dict(plain.state_dict(), strict=False)
    query, retrieved, scores = torch.randn(6, 16), torch.randn(6, 5, 16), torch.rand(6, 5)
    mask = torch.rand(6, 5) > 0.3
    mask[:, 0] = True
    torch.testing.assert_close(scored(query, retrieved, scores, mask), plain(query, retrieved, mask))
    # and the added maps train: they get gradient once the learned branch is open (its LayerNorm gain
    # starts at 0, so the first step opens it)
    torch.nn.init.ones_(scored.norm.weight)
    scored(query, retrieved, scores, mask).sum().backward()
    added = {"tokens": scored.score_map.weight, "gate": scored.gate[2].weight, "weighted": scored.sharpness}
    assert added[mode].grad is not None and added[mode].grad.abs().sum() > 0


def test_roots_are_pooled(bench, monkeypatch, tmp_path):
    roots = {"root_a": synthetic(1), "root_b": synthetic(2)}
    monkeypatch.setattr(bench, "features", lambda root: roots[str(root)])
    rows = ["k-NN label vote (labels)", "reco"]
    bench.main(["--root", *roots, "--rows", *rows, "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "fusion_ablations.json").read_text())
    assert saved["roots"] == list(roots)
    for row in rows:
        assert [r["root"] for r in saved["rows"][row]["runs"]] == list(roots)
        mean = sum(r["all"] for r in saved["rows"][row]["runs"]) / 2
        assert saved["rows"][row]["all"]["mean"] == pytest.approx(mean, abs=0.01)
