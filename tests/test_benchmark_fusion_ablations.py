"""The fusion-ablation benchmark on synthetic features: every row trains and scores, the label-reading
references are what they claim, the score-reading variants start as the demo's fusion, the strict rows'
calibration and novelty gate do what they say, roots are pooled."""

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
        expected = {"seen", "seen_only", "unseen", "all", "skip"}
        if recipe.novelty_gate:  # how the gate judged each group, and how well its signal separates them
            expected |= {"judged_novel_seen", "judged_novel_unseen", "novelty_auroc", "confidence_auroc"}
        if recipe.added_gate:
            expected |= {"judged_novel_seen", "judged_novel_unseen", "novelty_auroc"}
        assert set(numbers) == expected, name
        assert all(0 <= v <= 100 for v in numbers.values()), (name, numbers)
        assert numbers["skip"] in (0.0, *bench.DEFAULT_VALUES), (name, numbers)
    # the retrieval reads the right classes here: the demo's fusion gets the unseen classes right
    assert bench.run(data, replace(bench.ROWS["reco"], batch_size=32), 0, SEEN)["unseen"] > 90


def test_one_training_run_scores_both_splits(bench):
    data = synthetic()
    recipe = replace(bench.ROWS["strict, calibrated"], epochs=1, batch_size=32)
    both = bench.run(data, recipe, 0, SEEN, ("val", "test"))
    assert set(both) == {"val", "test"}
    assert both["test"] == bench.run(data, recipe, 0, SEEN, "test")  # same seed, same training


def test_training_free_rows(bench):
    data = synthetic()
    # the synthetic towers are unaligned (random image and text centres): the frozen model is at chance,
    # the lookup (an image's neighbours' captions against the prompts) reads the right classes
    assert bench.training_free(data, SEEN, "test", "frozen")["all"] < 40
    assert bench.training_free(data, SEEN, "test", "lookup")["all"] > 95
    # whitened by the memory's captions, the lookup is the library's lookup_whitened: still right here
    assert bench.training_free(data, SEEN, "test", "lookup whitened 0.001")["all"] > 95
    # the strict rule never costs the seen classes more than its tolerance on val
    alpha = bench.calibrate_skip(data, SEEN, "keep")
    chosen = bench.training_free(data, SEEN, "val", "mix keep")
    assert chosen["skip"] == alpha
    assert chosen["seen"] >= bench.training_free(data, SEEN, "val", "frozen")["seen"] - 0.5
    only = bench.training_free(data, SEEN, "val", "mix keep-only")
    assert only["seen_only"] >= bench.training_free(data, SEEN, "val", "frozen")["seen_only"] - 0.5
    assert bench.calibrate_skip(data, SEEN, "wide-max") in bench.WIDE_VALUES


def test_seen_only_reads_the_seen_classes_only(bench):
    labels = torch.tensor([0, 2, 1])
    logits = torch.tensor([[0.0, 9.0, 1.0], [0.0, 9.0, 1.0], [0.0, 9.0, 1.0]])  # class 1 always wins
    numbers = bench.top1(logits, labels, (0, 2))
    assert numbers["seen"] == 0.0 and numbers["unseen"] == 100.0
    assert numbers["seen_only"] == 50.0  # among classes 0 and 2: image 1 (class 2) right, image 0 wrong


def test_novelty_gate_sends_what_disagrees_with_its_neighbours_to_the_lookup(bench):
    g = torch.Generator().manual_seed(0)
    train_query = F.normalize(torch.randn(200, 8, generator=g), dim=-1)
    train_paired = train_query.unsqueeze(1).repeat(1, 3, 1)  # training pairs agree with their neighbours
    query = F.normalize(torch.randn(2, 8, generator=g), dim=-1)
    paired = torch.stack([query[0].repeat(3, 1), -query[1].repeat(3, 1)])  # the second disagrees
    fused = torch.zeros(2, 8)
    out, novel = bench.novelty_gated(fused, query, paired, train_query, train_paired, 0.05)
    assert novel.tolist() == [False, True]
    torch.testing.assert_close(out[0], fused[0])
    torch.testing.assert_close(out[1], -query[1])


def test_added_memory_gate_answers_the_concepts_added_after_training_from_the_memory(bench):
    """Strict: training retrieves from the seen pairs only, so the unseen pairs are the rows added after
    training; an unseen image's neighbours are all such rows and it becomes their captions' mean (the
    synthetic towers are unaligned: only the memory gets it right), a seen image keeps the frozen answer."""
    data = synthetic()
    gated = bench.run(data, bench.ROWS["strict, added-memory gate 0.9 over frozen"], 0, SEEN)
    frozen = bench.training_free(data, SEEN, "test", "frozen")
    assert gated["judged_novel_unseen"] == 100.0 and gated["judged_novel_seen"] == 0.0
    assert gated["novelty_auroc"] == 1.0
    assert gated["unseen"] > 95 and frozen["unseen"] < 40
    assert (gated["seen"], gated["seen_only"]) == (frozen["seen"], frozen["seen_only"])
    # the open protocol trains with every row: nothing is added, the gate changes nothing
    recipe = replace(bench.ROWS["reco"], epochs=1, batch_size=32)
    assert bench.run(data, replace(recipe, added_gate=0.9), 0, SEEN) == {
        **bench.run(data, recipe, 0, SEEN),
        "judged_novel_seen": 0.0,
        "judged_novel_unseen": 0.0,
        "novelty_auroc": 0.5,
    }


def test_the_score_gap_tells_a_new_concept_from_more_rows_of_a_known_one(bench):
    """Training rows of concept A; added rows: more of A, and B. A query of B beats the training rows by
    far more than training rows beat each other; a query of A does not."""
    g = torch.Generator().manual_seed(0)
    a, b = F.normalize(torch.randn(2, 16, generator=g), dim=-1)

    def around(centre: torch.Tensor, count: int) -> torch.Tensor:
        return F.normalize(centre + 0.2 * torch.randn(count, 16, generator=g), dim=-1)

    keys = torch.cat([around(a, 100), around(a, 300), around(b, 300)])
    added = torch.arange(700) >= 100
    novel = bench.gap_beyond_known(torch.cat([around(a, 50), around(b, 50)]), keys, added, 0.9, 0)
    assert novel[:50].float().mean() < 0.3 and novel[50:].all()
    nothing_added = bench.gap_beyond_known(around(b, 5), keys, torch.zeros(700, dtype=torch.bool), 0.9, 0)
    assert not nothing_added.any()


def test_the_local_base_rate_spares_a_known_concept_grown_but_not_a_new_one(bench):
    """Training rows of A (a tenth of them) and C; added rows: the rest of A, and B. A query of A sees
    mostly added rows, as do its nearest training rows: mostly not beyond its local base rate. A query of
    B sees only added rows, its nearest training rows (of C) none."""
    g = torch.Generator().manual_seed(0)
    a, b, c = torch.eye(16)[:3]  # three concepts apart

    def around(centre: torch.Tensor, count: int) -> torch.Tensor:
        return F.normalize(centre + 0.1 * torch.randn(count, 16, generator=g), dim=-1)

    keys = torch.cat([around(a, 30), around(c, 300), around(a, 270), around(b, 300)])
    added = torch.arange(900) >= 330
    queries = torch.cat([around(a, 50), around(b, 50)])
    rows = bench.neighbours(queries, keys, 10)[0]
    novel = bench.share_beyond_local(rows, queries, keys, added, 0.1)
    assert novel[50:].all()
    # A's queries: the share alone (>= 0.9) takes most of them for new, the local base rate few
    by_share = bench.added_share(added[rows[:50]], bench.valid(rows[:50])) >= 0.9
    assert by_share.float().mean() > 0.6 and novel[:50].float().mean() < 0.3
    nothing_added = torch.zeros(900, dtype=torch.bool)
    assert not bench.share_beyond_local(rows, queries, keys, nothing_added, 0.0).any()


def test_references_read_the_labels(bench):
    data = synthetic()
    assert bench.label_vote(data, 0, SEEN) == {
        "seen": 100.0,
        "seen_only": 100.0,
        "unseen": 100.0,
        "all": 100.0,
    }
    assert bench.probe(data, 0, SEEN, epochs=20)["all"] > 95
    # a vote over shuffled labels is chance, so the reference is the labels' doing
    shuffled = {**data, "mem_y": data["mem_y"][torch.randperm(len(data["mem_y"]))]}
    assert bench.label_vote(shuffled, 0, SEEN)["all"] < 40


@pytest.mark.parametrize("mode", ["tokens", "gate", "weighted", "trust"])
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
    added = {
        "tokens": scored.score_map.weight,
        "gate": scored.gate[2].weight,
        "weighted": scored.sharpness,
        "trust": scored.gate[2].weight,
    }
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
