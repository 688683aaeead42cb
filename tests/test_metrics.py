"""Tests for reco_lightning.metrics: every metric checked against numbers worked out by hand."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from reco_lightning.metrics import (
    EvaluationReport,
    ZeroShotClassificationAccumulator,
    build_class_embeddings,
    build_prompts,
    class_embeddings_from_prompt_embeddings,
    classification_metrics,
    group_transfer_rates,
    plot_k_sweep,
    retrieval_metrics,
)

# ------------------------------------------------------------------------------------------------------
# Class embeddings
# ------------------------------------------------------------------------------------------------------


def test_build_prompts_is_class_major_and_substitutes_only_placeholder():
    prompts = build_prompts(["cat", "dog"], ["a {c}.", "{c} with {braces}"])
    assert prompts == ["a cat.", "cat with {braces}", "a dog.", "dog with {braces}"]


def test_build_prompts_rejects_template_without_placeholder():
    with pytest.raises(ValueError, match=r"template 1 .*no '\{c\}' placeholder"):
        build_prompts(["cat"], ["a {c}.", "a photo."])
    with pytest.raises(ValueError, match="classnames is empty"):
        build_prompts([], ["a {c}."])


def test_class_embeddings_from_prompt_embeddings_by_hand():
    # Class 0 prompts [3,0] and [0,4] normalise to [1,0] and [0,1]; mean [.5,.5] renormalises to
    # [1/sqrt2, 1/sqrt2]. Without the per-prompt normalisation the mean would be [1.5, 2] -> [0.6, 0.8].
    # Class 1 prompts [0,-2] and [0,-5] both normalise to [0,-1] -> [0,-1].
    flat = torch.tensor([[3.0, 0.0], [0.0, 4.0], [0.0, -2.0], [0.0, -5.0]])
    expected = torch.tensor([[1 / math.sqrt(2), 1 / math.sqrt(2)], [0.0, -1.0]])
    out_flat = class_embeddings_from_prompt_embeddings(flat, num_classes=2, num_templates=2)
    out_3d = class_embeddings_from_prompt_embeddings(flat.view(2, 2, 2))
    torch.testing.assert_close(out_flat, expected)
    torch.testing.assert_close(out_3d, expected)


def test_class_embeddings_keep_dtype_and_check_shapes():
    half = torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=torch.float16)
    assert class_embeddings_from_prompt_embeddings(half, 1, 2).dtype == torch.float16
    with pytest.raises(ValueError, match="needs num_classes and num_templates"):
        class_embeddings_from_prompt_embeddings(torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"4 rows but num_classes\*num_templates = 3\*2 = 6"):
        class_embeddings_from_prompt_embeddings(torch.zeros(4, 2), 3, 2)
    with pytest.raises(ValueError, match="2 templates on dim 1 but num_templates=3"):
        class_embeddings_from_prompt_embeddings(torch.zeros(2, 2, 5), num_templates=3)


def test_build_class_embeddings_batches_across_classes():
    table = {
        "a cat": [3.0, 0.0],
        "the cat": [0.0, 4.0],
        "a dog": [0.0, -2.0],
        "the dog": [0.0, -5.0],
    }
    calls: list[list[str]] = []

    def encode(texts: list[str]) -> torch.Tensor:
        calls.append(list(texts))
        return torch.tensor([table[t] for t in texts])

    out = build_class_embeddings(["cat", "dog"], ["a {c}", "the {c}"], encode, batch_size=3)
    # 4 prompts in chunks of 3: the first call spans both classes, the second holds the rest.
    assert calls == [["a cat", "the cat", "a dog"], ["the dog"]]
    torch.testing.assert_close(out, torch.tensor([[1 / math.sqrt(2), 1 / math.sqrt(2)], [0.0, -1.0]]))


def test_build_class_embeddings_checks_encoder_output():
    with pytest.raises(ValueError, match=r"returned shape \(1, 2\) for 2 prompts"):
        build_class_embeddings(["cat", "dog"], ["{c}"], lambda texts: torch.zeros(1, 2))


# ------------------------------------------------------------------------------------------------------
# Classification metrics
# ------------------------------------------------------------------------------------------------------

# 4 samples, 3 classes.
# s0 label 0: 0.9 is the max                           -> rank 0 (hit@1), predicted 0
# s1 label 1: tie 0.5/0.5 with class 0, lower wins     -> rank 1 (miss@1, hit@2), predicted 0
# s2 label 0: same tie, class 0 is the lower index     -> rank 0 (hit@1), predicted 0
# s3 label 2: 0.1 below 0.3 and 0.2                    -> rank 2 (miss@2, hit@3), predicted 1
HAND_SCORES = torch.tensor(
    [[0.9, 0.1, 0.0], [0.5, 0.5, 0.1], [0.5, 0.5, 0.1], [0.2, 0.3, 0.1]],
)
HAND_LABELS = torch.tensor([0, 1, 0, 2])


def test_classification_metrics_by_hand_with_ties():
    metrics = classification_metrics(HAND_SCORES, HAND_LABELS, top_k=(1, 2, 5))
    # top1 = 2/4, top2 = 3/4, top5 evaluated as k=min(5,3)=3 -> 4/4.
    # per-class recall: class 0 -> 2/2, class 1 -> 0/1, class 2 -> 0/1; mean = 1/3.
    assert metrics == pytest.approx(
        {"top1": 50.0, "top2": 75.0, "top5": 100.0, "mean_per_class_recall": 100.0 / 3}
    )
    assert list(metrics) == ["top1", "top2", "top5", "mean_per_class_recall"]


def test_classification_default_keys():
    assert set(classification_metrics(HAND_SCORES, HAND_LABELS)) == {"top1", "top5", "mean_per_class_recall"}


def test_ties_break_towards_lower_class_index_even_where_topk_is_unordered():
    # 100 tied scores: the true class's rank is its own index, so classes 0..4 are in the top 5
    # and class 5 is not, and only class 0 is a top-1 hit.
    scores = torch.zeros(3, 100)
    labels = torch.tensor([0, 4, 5])
    metrics = classification_metrics(scores, labels)
    assert metrics["top1"] == pytest.approx(100 / 3)  # only label 0
    assert metrics["top5"] == pytest.approx(200 / 3)  # labels 0 and 4


def test_mean_per_class_recall_ignores_absent_classes():
    # C=4 but only classes 0 and 1 appear. Class 0: 1 of 3 correct; class 1: 1 of 1 correct.
    # Mean over present classes = (1/3 + 1) / 2 = 2/3; plain accuracy = 2/4.
    scores = torch.tensor(
        [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]]
    )
    labels = torch.tensor([0, 0, 0, 1])
    metrics = classification_metrics(scores, labels, top_k=(1,))
    assert metrics["top1"] == pytest.approx(50.0)
    assert metrics["mean_per_class_recall"] == pytest.approx(200.0 / 3)


def test_classification_metrics_input_errors():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        classification_metrics(HAND_SCORES, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="NaN"):
        classification_metrics(torch.full((1, 3), float("nan")), torch.tensor([0]))
    with pytest.raises(ValueError, match="integer tensor"):
        classification_metrics(HAND_SCORES, HAND_LABELS.float())
    with pytest.raises(ValueError, match="empty set"):
        classification_metrics(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="positive integers"):
        classification_metrics(HAND_SCORES, HAND_LABELS, top_k=(0,))


def _tied_random_scores(n: int, c: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 4, (n, c), generator=generator).float()  # values in {0..3}: many ties
    labels = torch.randint(0, c, (n,), generator=generator)
    return scores, labels


def _reference_classification(scores: torch.Tensor, labels: torch.Tensor, ks) -> dict[str, float]:
    """Brute force via a stable descending sort, independent of the rank formula under test."""
    order = torch.argsort(scores, dim=1, descending=True, stable=True)
    position = (order == labels[:, None]).float().argmax(dim=1)
    out = {f"top{k}": 100.0 * float((position < min(k, scores.shape[1])).float().mean()) for k in ks}
    pred = order[:, 0]
    recalls = [float((pred[labels == c] == c).float().mean()) for c in labels.unique().tolist()]
    out["mean_per_class_recall"] = 100.0 * sum(recalls) / len(recalls)
    return out


def test_classification_matches_stable_sort_reference():
    scores, labels = _tied_random_scores(300, 7, seed=0)
    assert classification_metrics(scores, labels, (1, 3, 5)) == pytest.approx(
        _reference_classification(scores, labels, (1, 3, 5))
    )


def test_accumulator_equals_functional_exactly_and_resets():
    scores, labels = _tied_random_scores(257, 6, seed=1)
    expected = classification_metrics(scores, labels)
    acc = ZeroShotClassificationAccumulator(num_classes=6)
    for start, stop in [(0, 100), (100, 101), (101, 257)]:  # uneven batches, one of size 1
        acc.update(scores[start:stop], labels[start:stop])
    assert acc.compute() == expected  # exact equality, not approx
    acc.reset()
    acc.update(scores[:10], labels[:10])  # after reset only these 10 count
    assert acc.compute() == classification_metrics(scores[:10], labels[:10])


def test_accumulator_states_sum_like_ddp():
    # Two "ranks" each see half the data; summing states (what DDP sync does) gives the global numbers.
    scores, labels = _tied_random_scores(120, 5, seed=2)
    rank0, rank1 = ZeroShotClassificationAccumulator(5), ZeroShotClassificationAccumulator(5)
    rank0.update(scores[:70], labels[:70])
    rank1.update(scores[70:], labels[70:])
    rank0.merge_state(rank1)
    assert rank0.compute() == classification_metrics(scores, labels)


def test_accumulator_checks_class_count_and_empty():
    acc = ZeroShotClassificationAccumulator(num_classes=4)
    with pytest.raises(ValueError, match="scores have 3 classes but the accumulator was built for 4"):
        acc.update(HAND_SCORES, HAND_LABELS)
    fresh = ZeroShotClassificationAccumulator(num_classes=4)
    with (
        pytest.warns(UserWarning, match="before the ``update``"),
        pytest.raises(ValueError, match="no samples"),
    ):
        fresh.compute()


def test_group_transfer_rates_by_hand():
    # rows = true class; classes 0,1 "seen", 2 "unseen"
    confusion = torch.tensor([[5, 1, 4], [0, 8, 2], [3, 0, 7]])
    groups = {"seen": torch.tensor([0, 1]), "unseen": torch.tensor([2])}
    rates = group_transfer_rates(confusion, groups)
    assert rates == {"seen_to_unseen": 100.0 * 6 / 20, "unseen_to_seen": 100.0 * 3 / 10}


def test_accumulator_with_groups_adds_synced_transfer_rates():
    scores, labels = _tied_random_scores(120, 5, seed=4)
    groups = {"a": torch.tensor([0, 1]), "b": torch.tensor([2, 3, 4])}
    rank0 = ZeroShotClassificationAccumulator(5, groups=groups)
    rank1 = ZeroShotClassificationAccumulator(5, groups=groups)
    rank0.update(scores[:50], labels[:50])
    rank1.update(scores[50:], labels[50:])
    rank0.merge_state(rank1)
    got = rank0.compute()
    pred = scores.argmax(1)
    in_a, in_b = labels < 2, labels >= 2
    assert got["a_to_b"] == pytest.approx(100.0 * float((pred[in_a] >= 2).float().mean()))
    assert got["b_to_a"] == pytest.approx(100.0 * float((pred[in_b] < 2).float().mean()))
    assert {k: v for k, v in got.items() if "_to_" not in k} == classification_metrics(scores, labels)


def test_classification_is_deterministic():
    scores, labels = _tied_random_scores(200, 9, seed=3)
    assert classification_metrics(scores, labels) == classification_metrics(scores.clone(), labels.clone())


# ------------------------------------------------------------------------------------------------------
# Retrieval metrics
# ------------------------------------------------------------------------------------------------------

# image_emb = identity, so sims[image i, text t] = TEXT_SCORES[t, i] exactly (small integers).
TEXT_SCORES = torch.tensor(
    [
        [0.0, 3.0, 1.0],  # T0, caption of image 0
        [4.0, 1.0, 0.0],  # T1, caption of image 0
        [2.0, 2.0, 2.0],  # T2, caption of image 1
        [1.0, 5.0, 1.0],  # T3, caption of image 2
        [1.0, 0.0, 1.0],  # T4, caption of image 2
    ]
)
TEXT_TO_IMAGE = torch.tensor([0, 0, 1, 2, 2])
# Text -> image ranks (ties: lower image index first):
#   T0: own image 0 scores 0 < 3 and 1 -> rank 2     T1: 4 is the max -> rank 0
#   T2: 2 tied with image 0 (lower)   -> rank 1     T3: 5 above, tie with image 0 -> rank 2
#   T4: tied with image 0             -> rank 1
#   ranks [2, 0, 1, 2, 1]: R@1 = 1/5, R@2 = 3/5, R@3 = 5/5
# Image -> text (columns of TEXT_SCORES):
#   image 0: [0, 4, 2, 1, 1], true T0 (0) and T1 (4): best true is T1 at rank 0 -> hit@1 (only "any
#            caption" makes this a hit: T0 alone would rank 4)
#   image 1: [3, 1, 2, 5, 0], true T2 (2): T0 and T3 above -> rank 2
#   image 2: [1, 0, 2, 1, 1], true T3, T4 (both 1): T2 above, T0 tied with lower index -> rank 2
#   ranks [0, 2, 2]: R@1 = 1/3, R@2 = 1/3, R@3 = 3/3
HAND_RETRIEVAL = {
    "image_to_text_R@1": 100 / 3,
    "image_to_text_R@2": 100 / 3,
    "image_to_text_R@3": 100.0,
    "text_to_image_R@1": 20.0,
    "text_to_image_R@2": 60.0,
    "text_to_image_R@3": 100.0,
}


@pytest.mark.parametrize("block_size", [1, 2, 512])
def test_retrieval_metrics_by_hand(block_size):
    metrics = retrieval_metrics(torch.eye(3), TEXT_SCORES, TEXT_TO_IMAGE, ks=(1, 2, 3), block_size=block_size)
    assert metrics == pytest.approx(HAND_RETRIEVAL)


def test_retrieval_default_keys_and_k_beyond_size():
    metrics = retrieval_metrics(torch.eye(3), TEXT_SCORES, TEXT_TO_IMAGE)
    assert list(metrics) == [
        "image_to_text_R@1",
        "image_to_text_R@5",
        "image_to_text_R@10",
        "text_to_image_R@1",
        "text_to_image_R@5",
        "text_to_image_R@10",
    ]
    assert metrics["image_to_text_R@5"] == 100.0 and metrics["text_to_image_R@10"] == 100.0


def test_retrieval_all_tied_ranks_by_index():
    # All scores 0: item t's own partner ranks at its index t (everything before it is tied and lower).
    # 10 pairs: R@1 = 1/10, R@5 = 5/10, R@10 = 10/10 both ways.
    metrics = retrieval_metrics(torch.zeros(10, 4), torch.zeros(10, 4), torch.arange(10))
    assert metrics == pytest.approx(
        {
            "image_to_text_R@1": 10.0,
            "image_to_text_R@5": 50.0,
            "image_to_text_R@10": 100.0,
            "text_to_image_R@1": 10.0,
            "text_to_image_R@5": 50.0,
            "text_to_image_R@10": 100.0,
        }
    )


def test_retrieval_does_not_renormalise():
    # Text 1 is [2, 0] (norm 2). Image 0 = [1, 0] scores text 1 at 2 above its own caption text 0 at 1;
    # after renormalising they would tie and text 0 (lower index) would win.
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    metrics = retrieval_metrics(images, texts, torch.tensor([0, 1]), ks=(1,))
    assert metrics["image_to_text_R@1"] == 0.0


def _reference_retrieval(images, texts, owner, ks):
    sims = images @ texts.T
    i2t_order = torch.argsort(sims, dim=1, descending=True, stable=True)
    t2i_order = torch.argsort(sims.T, dim=1, descending=True, stable=True)
    out = {}
    for k in ks:
        hits = [bool((owner[i2t_order[i, :k]] == i).any()) for i in range(images.shape[0])]
        out[f"image_to_text_R@{k}"] = 100.0 * sum(hits) / len(hits)
    for k in ks:
        hits = [bool((t2i_order[t, :k] == owner[t]).any()) for t in range(texts.shape[0])]
        out[f"text_to_image_R@{k}"] = 100.0 * sum(hits) / len(hits)
    return out


def test_retrieval_matches_stable_sort_reference_with_ties():
    generator = torch.Generator().manual_seed(4)
    images = torch.randint(-1, 2, (40, 3), generator=generator).float()  # coarse values: many ties
    owner = torch.cat([torch.arange(40), torch.randint(0, 40, (80,), generator=generator)])
    texts = torch.randint(-1, 2, (120, 3), generator=generator).float()
    expected = _reference_retrieval(images, texts, owner, (1, 5, 10))
    assert retrieval_metrics(images, texts, owner, block_size=7) == pytest.approx(expected)
    assert retrieval_metrics(images, texts, owner) == retrieval_metrics(images, texts, owner)


def test_retrieval_input_errors():
    with pytest.raises(ValueError, match=r"1 images have no caption .*first: \[2\]"):
        retrieval_metrics(torch.eye(3), torch.eye(3)[:2], torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"values must lie in \[0, 3\)"):
        retrieval_metrics(torch.eye(3), torch.eye(3), torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match="same D"):
        retrieval_metrics(torch.eye(3), torch.zeros(3, 2), torch.tensor([0, 1, 2]))


# ------------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------------


def _report() -> EvaluationReport:
    report = EvaluationReport()
    report.add("cars", "clip", {"top1": 57.2, "top5": 90.0})
    report.add("cars", "reco[uni-search,cross-fusion]", {"top1": 68.125, "top5": 95.0})
    report.add("cub", "clip", {"top1": 52.8, "mean_per_class_recall": 52.0})
    return report


def test_report_markdown():
    expected = (
        "| dataset | setting | top1 | top5 | mean_per_class_recall |\n"
        "|---|---|---:|---:|---:|\n"
        "| cars | clip | 57.20 | 90.00 | - |\n"
        "| cars | reco[uni-search,cross-fusion] | 68.12 | 95.00 | - |\n"
        "| cub | clip | 52.80 | - | 52.00 |\n"
    )
    report = _report()
    assert report.to_markdown() == expected
    assert str(report) == expected


def test_report_replaces_same_row_and_escapes_pipes():
    report = _report()
    report.add("cars", "clip", {"top1": 60.0})
    assert len(report.rows) == 3
    assert report.rows[0].metrics == {"top1": 60.0}
    report.add("a|b", "clip", {"top1": 1.0})
    assert "| a\\|b | clip |" in report.to_markdown()


def test_report_json_and_save(tmp_path):
    report = _report()
    report.add("flowers", "clip", {"top1": float("nan")})
    data = report.to_json()
    assert data["metrics"] == ["top1", "top5", "mean_per_class_recall"]
    assert data["rows"][1] == {
        "dataset": "cars",
        "setting": "reco[uni-search,cross-fusion]",
        "metrics": {"top1": 68.125, "top5": 95.0},
    }
    assert data["rows"][3]["metrics"] == {"top1": None}

    json_path, md_path = report.save(tmp_path / "out")
    assert json.loads(json_path.read_text()) == data
    assert md_path.read_text() == report.to_markdown()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "zeroshot_report.json",
        "zeroshot_report.md",
    ]

    back = EvaluationReport.from_json(json.loads(json_path.read_text()))
    assert back.rows[:3] == report.rows[:3]
    assert math.isnan(back.rows[3].metrics["top1"])


# ------------------------------------------------------------------------------------------------------
# k sweep plot
# ------------------------------------------------------------------------------------------------------

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_plot_single_series_from_metric_dicts(tmp_path):
    results = {1: {"top1": 60.0}, 10: {"top1": 68.1}, 5: {"top1": 65.0}}
    path = plot_k_sweep(results, "top1", tmp_path / "plots" / "sweep.png", baselines={"CLIP": 57.2})
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (600, 400)
    assert [p.name for p in path.parent.iterdir()] == ["sweep.png"]


def test_plot_several_series_and_bare_numbers(tmp_path):
    results = {"cars": {1: 60.0, 10: 68.1}, "cub": {1: {"top1": 55.0}, 10: {"top1": 63.0}}}
    path = plot_k_sweep(results, "top1", tmp_path / "multi.png", title="RECO k sweep")
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_plot_errors(tmp_path):
    with pytest.raises(ValueError, match=r"series 'top5', k=1: no metric 'top5' \(has \['top1'\]\)"):
        plot_k_sweep({1: {"top1": 1.0}}, "top5", tmp_path / "x.png")
    with pytest.raises(ValueError, match="all ints"):
        plot_k_sweep({1: 1.0, "a": {1: 1.0}}, "top1", tmp_path / "x.png")
    with pytest.raises(ValueError, match="empty"):
        plot_k_sweep({}, "top1", tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
