"""The training-free baselines (lookup, mix) and the calibration rules, against hand computations."""

import pytest
import torch
import torch.nn.functional as F

from helpers_zeroshot import shapes_by_hand
from reco_lightning.baselines import lookup, mix, neighbour_mean
from reco_lightning.calibration import calibrate, choose
from reco_lightning.evaluation import ClassificationSet, ZeroShotEvaluation
from reco_lightning.model import RecoModule
from reco_lightning.retrieval import Neighbours


def _neighbours() -> Neighbours:
    emb = torch.tensor([[[1.0, 0, 0], [0, 1, 0], [0, 0, 1]], [[0, 1, 0], [5, 5, 5], [0, 0, 0]]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    scores = torch.tensor([[0.9, 0.5, 0.1], [0.3, 0.0, 0.0]])
    return Neighbours(embeddings=emb, mask=mask, rows=torch.zeros(2, 3, dtype=torch.long), scores=scores)


def test_neighbour_mean_reads_valid_neighbours_only():
    mean = neighbour_mean(_neighbours())
    assert torch.allclose(mean, torch.tensor([[0.5, 0.5, 0], [0, 1, 0]]))


def test_similarity_weighted_lookup_is_a_softmax_over_scores():
    weighted = neighbour_mean(_neighbours(), temperature=0.1)
    w = torch.softmax(torch.tensor([9.0, 5.0]), 0)
    assert torch.allclose(weighted[0], torch.tensor([w[0], w[1], 0]), atol=1e-6)
    assert torch.allclose(lookup(_neighbours()), F.normalize(torch.tensor([[1.0, 1, 0], [0, 1, 0]]), dim=-1))
    with pytest.raises(ValueError, match="temperature"):
        neighbour_mean(_neighbours(), temperature=0.0)


def test_mix_keeps_the_query_and_adds_alpha_times_the_mean():
    query = torch.tensor([[0.0, 0, 1], [1, 0, 0]])
    got = mix(query, _neighbours(), alpha=2.0)
    assert torch.allclose(got, F.normalize(torch.tensor([[1.0, 1, 1], [1, 2, 0]]), dim=-1))
    assert torch.allclose(mix(query, _neighbours(), alpha=0.0), query)


def test_choose_rules():
    scores = {0.1: 50.0, 0.5: 60.0, 1.0: 60.0, 2.0: 40.0}
    assert choose(scores, "max") == 0.5  # ties: the weight that trusts the memory less
    assert choose(scores, "keep", reference=55.0, tolerance=0.5) == 1.0
    assert choose(scores, "keep", reference=70.0) == 0.0
    with pytest.raises(ValueError, match="unknown calibration rule"):
        choose(scores, "best")


@pytest.fixture(scope="module")
def module(tiny_reco):
    return tiny_reco()


def _shapes(tiny_dir) -> ClassificationSet:
    return ClassificationSet("shapes", str(tiny_dir / "zeroshot"), templates="clip_generic")


def test_lookup_and_mix_rows_use_the_models_neighbours(module, tiny_dir):
    """The report's baseline rows equal the baselines computed by hand from the same neighbours."""
    from reco_lightning.metrics import build_class_embeddings, classification_metrics

    evaluation = ZeroShotEvaluation(
        classification=[_shapes(tiny_dir)], settings=["lookup", "mix"], mix_alpha=0.7
    )
    report, _ = evaluation.evaluate(module)
    rows = {r.setting: r.metrics for r in report.rows}
    clip, shapes = module.backbone, shapes_by_hand(module.backbone, tiny_dir)
    v = shapes.images
    guard = evaluation.leakage_threshold  # the report's image sides search with the leakage guard
    looked = lookup(module.neighbours(v, "image", leak_threshold=guard))
    expected = classification_metrics(looked @ shapes.frozen_classes.t(), shapes.labels)
    assert rows["lookup"]["top1"] == pytest.approx(expected["top1"])

    def mixed_text(texts):
        t = clip.encode_captions(texts)
        return mix(t, module.neighbours(t, "text"), 0.7)

    weights = build_class_embeddings(shapes.classnames, shapes.templates, mixed_text)
    mixed = mix(v, module.neighbours(v, "image", leak_threshold=guard), 0.7)
    expected = classification_metrics(mixed @ weights.t(), shapes.labels)
    assert rows["mix"]["top1"] == pytest.approx(expected["top1"])


def test_untrained_reco_with_skips_equals_mix(module, tiny_dir):
    """RECO's untrained start (residual + retrieved_skip w) is the mix baseline at alpha = w."""
    report, _ = ZeroShotEvaluation(
        classification=[_shapes(tiny_dir)], settings=["reco", "mix"], mix_alpha=0.5
    ).evaluate(module)
    rows = {r.setting: r.metrics for r in report.rows}
    assert rows["reco"]["top1"] == pytest.approx(rows["mix"]["top1"])


def test_calibrate_sweeps_and_picks_by_rule(module, tiny_dir):
    result = calibrate(module, _shapes(tiny_dir), "mix_alpha", values=(0.0, 0.5, 1.0), rule="max")
    assert set(result["values"]) == {0.0, 0.5, 1.0}
    assert result["chosen"] == choose(result["values"], "max")
    assert result["values"][0.0] == pytest.approx(result["clip"]), "alpha 0 is the frozen model"
    skip = calibrate(
        module, _shapes(tiny_dir), "fusion_config.retrieved_skip", values=(0.2, 0.4), rule="keep"
    )
    assert module.image_fusion.config.retrieved_skip == skip["chosen"]
    assert module.hparams["fusion_config"]["retrieved_skip"] == skip["chosen"]
    calibrate(
        module, _shapes(tiny_dir), "fusion_config.retrieved_skip", values=(0.5,)
    )  # back to the fixture's
    with pytest.raises(ValueError, match="cannot calibrate"):
        calibrate(module, _shapes(tiny_dir), "k")
    with pytest.raises(ValueError, match="metric 'top1_nope'"):
        calibrate(module, _shapes(tiny_dir), "mix_alpha", values=(0.5,), metric="top1_nope")


def test_control_reads_no_neighbours(tiny_dir):
    """mask_retrieved: the paper's training-without-retrieval control; its output ignores the memory."""
    torch.manual_seed(0)
    control = RecoModule(
        backbone=str(tiny_dir / "clip"), memory=None, k=4, fusion_config={"num_heads": 4}, mask_retrieved=True
    ).eval()
    query = F.normalize(torch.randn(3, 32), dim=-1)
    out = control.refine(query, "image")  # no memory attached: nothing is retrieved
    blank = torch.zeros(3, 1, 32)
    expected = control.image_fusion(query, blank, torch.zeros(3, 1, dtype=torch.bool))
    assert torch.allclose(out, expected)
    assert control.refine(query[:0], "text").shape == (0, 32)


def test_calibration_reads_the_neighbours_the_evaluation_reads(module, tiny_dir):
    """The leakage guard reaches calibration (its scores are the evaluation's at the same guard, and a guard
    that excludes every pair changes them); `leakage_threshold_of` takes the run config's value."""
    from pathlib import Path

    import yaml

    from reco_lightning.calibration import leakage_threshold_of
    from reco_lightning.evaluation import DEFAULT_LEAKAGE_THRESHOLD

    for guard in (-1.0, None, 0.95):  # -1.0: no memory pair is ever retrieved for an image
        swept = calibrate(module, _shapes(tiny_dir), "mix_alpha", values=(0.5,), leakage_threshold=guard)
        evaluation = ZeroShotEvaluation(
            [_shapes(tiny_dir)], settings=["mix"], mix_alpha=0.5, leakage_threshold=guard
        )
        assert swept["values"][0.5] == pytest.approx(evaluation.evaluate(module)[0].rows[0].metrics["top1"])
    blind = calibrate(module, _shapes(tiny_dir), "mix_alpha", values=(0.5,), leakage_threshold=-1.0)
    assert (
        blind["values"][0.5]
        != calibrate(module, _shapes(tiny_dir), "mix_alpha", values=(0.5,))["values"][0.5]
    )
    configs = Path(__file__).parents[1] / "configs"
    assert leakage_threshold_of(yaml.safe_load((configs / "demo.yaml").read_text())) == 0.9999
    assert (
        leakage_threshold_of(yaml.safe_load((configs / "tiny.yaml").read_text())) == DEFAULT_LEAKAGE_THRESHOLD
    )
    assert leakage_threshold_of({}) == DEFAULT_LEAKAGE_THRESHOLD


def test_whitened_lookup_row_is_the_lookup_through_the_memorys_caption_covariance(module, tiny_dir):
    """``lookup_whitened``: each image's lookup (the guard's neighbours' caption mean) sent through
    :class:`MemoryWhitening` of the attached memory's captions at ``lookup_whiten``, against the frozen
    prompts; equal to the hand computation, and another answer than the plain lookup's."""
    from reco_lightning.metrics import classification_metrics
    from reco_lightning.whitening import MemoryWhitening

    evaluation = ZeroShotEvaluation(
        classification=[_shapes(tiny_dir)], settings=["lookup", "lookup_whitened"], lookup_whiten=0.01
    )
    rows = {r.setting: r.metrics for r in evaluation.evaluate(module)[0].rows}
    shapes = shapes_by_hand(module.backbone, tiny_dir)
    looked = lookup(module.neighbours(shapes.images, "image", leak_threshold=evaluation.leakage_threshold))
    whitened = MemoryWhitening.of_memory(module.retriever.memory, 0.01, "text")(looked)
    assert not torch.allclose(whitened, looked)
    expected = classification_metrics(whitened @ shapes.frozen_classes.t(), shapes.labels)
    assert rows["lookup_whitened"]["top1"] == pytest.approx(expected["top1"])
    assert rows["lookup_whitened"]["top5"] == pytest.approx(expected["top5"])
    assert rows["lookup_whitened"]["leak_images"] == rows["lookup"]["leak_images"]
