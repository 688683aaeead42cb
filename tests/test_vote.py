"""The memory's vote (reco_lightning.vote): two-block embeddings whose cosine is the fusion's score plus W
times the whitened lookup's, through the inference model, the evaluation and the classifier, never training."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from helpers_zeroshot import shapes_by_hand
from reco_lightning.baselines import lookup
from reco_lightning.data.zeroshot import ImageFolderClassification
from reco_lightning.evaluation import ClassificationSet, RetrievalSet, ZeroShotEvaluation
from reco_lightning.metrics import build_class_embeddings, class_embeddings_from_prompt_embeddings
from reco_lightning.pretrained import RecoConfig, refine_and_gate
from reco_lightning.retrieval import Neighbours
from reco_lightning.vote import MemoryVote
from reco_lightning.whitening import MemoryWhitening


def _unit(*shape: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _vote(weight: float = 3.0) -> MemoryVote:
    return MemoryVote(MemoryWhitening(_unit(200, 8, seed=1), 0.01), weight)


def test_joined_blocks_are_unit_and_their_cosine_is_the_weighted_sum_of_scores():
    vote = _vote(3.0)
    a, b, c, d = (_unit(5, 8, seed=s) for s in range(2, 6))
    left, right = vote.join(a, b), vote.join(c, d)
    assert left.shape == (5, 16)
    assert torch.allclose(left.norm(dim=-1), torch.ones(5))
    expected = (a @ c.t() + 3.0 * b @ d.t()) / 4.0
    assert torch.allclose(left @ right.t(), expected, atol=1e-6)
    # a frozen embedding lifted into the space: its similarities to other lifted ones are unchanged
    assert torch.allclose(vote.lift(a) @ vote.lift(c).t(), a @ c.t(), atol=1e-6)
    assert torch.allclose(left @ vote.lift(c).t(), (a @ c.t() + 3.0 * b @ c.t()) / 4.0, atol=1e-6)


def test_image_block_is_the_whitened_mean_of_the_valid_neighbours_captions():
    vote = _vote()
    captions = _unit(3, 4, 8, seed=7)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True], [False] * 4])
    block = vote.image_block(captions, mask)
    for row, keep in ((0, 2), (1, 4)):
        expected = vote.whitening(F.normalize(captions[row, :keep].mean(0, keepdim=True), dim=-1))
        assert torch.allclose(block[row : row + 1], expected, atol=1e-6)
    assert torch.equal(block[2], torch.zeros(8)), "no valid neighbour: no vote"


def test_a_vote_temperature_weighs_each_neighbours_caption_by_a_softmax_of_its_score():
    vote = MemoryVote(_vote().whitening, 3.0, temperature=0.1)
    captions, scores = _unit(2, 4, 8, seed=7), torch.tensor([[0.9, 0.7, 0.5, 0.0], [0.2, 0.1, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, False], [False] * 4])
    block = vote.image_block(captions, mask, scores)
    weights = torch.softmax(scores[0, :3] / 0.1, 0)
    mean = (weights.unsqueeze(1) * captions[0, :3]).sum(0, keepdim=True)
    assert torch.allclose(block[:1], vote.whitening(F.normalize(mean, dim=-1)), atol=1e-6)
    assert not torch.allclose(block[:1], _vote().image_block(captions, mask)[:1], atol=1e-3)
    assert torch.equal(block[1], torch.zeros(8)), "no valid neighbour: no vote"
    with pytest.raises(ValueError, match="pass scores"):
        vote.image_block(captions, mask)


def test_bad_weights_and_blocks_are_refused_in_one_line():
    with pytest.raises(ValueError, match="vote weight must be > 0"):
        MemoryVote(_vote().whitening, 0.0)
    with pytest.raises(ValueError, match="vote_weight is a weight >= 0"):
        RecoConfig(vote_weight=-1.0)
    with pytest.raises(ValueError, match="vote_whiten is a ridge > 0"):
        RecoConfig(vote_whiten=0.0)
    with pytest.raises(ValueError, match="vote_temperature is a temperature > 0 or None"):
        RecoConfig(vote_temperature=0.0)
    with pytest.raises(ValueError, match="vote temperature must be > 0"):
        MemoryVote(_vote().whitening, 1.0, temperature=-1.0)
    with pytest.raises(ValueError, match="blocks=3 must divide the embedding dim 8"):
        class_embeddings_from_prompt_embeddings(_unit(2, 3, 8), blocks=3)


def test_class_embeddings_average_each_block_on_its_own():
    """blocks=2: a class is [mean of first blocks, sqrt(W) x mean of second blocks] (each renormalised),
    so it scores against an image as the sum of the two blocks' class scores; blocks=1 is unchanged."""
    vote = _vote(2.0)
    first, second = _unit(4, 3, 8, seed=8), _unit(4, 3, 8, seed=9)
    joined = vote.join(first.reshape(12, 8), second.reshape(12, 8)).reshape(4, 3, 16)
    classes = class_embeddings_from_prompt_embeddings(joined, blocks=2)
    expected = vote.join(
        class_embeddings_from_prompt_embeddings(first), class_embeddings_from_prompt_embeddings(second)
    )
    assert torch.allclose(classes, expected, atol=1e-6)
    plain = class_embeddings_from_prompt_embeddings(first)
    assert torch.equal(plain, F.normalize(F.normalize(first, dim=-1).mean(1), dim=-1))


@pytest.fixture(scope="module")
def module(tiny_reco):
    return tiny_reco(vote_weight=2.0, vote_whiten=0.01)


def test_refine_votes_only_when_asked_and_the_control_votes_with_the_memory(module, tiny_dir):
    """``vote=True``: [fused, sqrt(W) x whitened lookup] / sqrt(1 + W) for images, [fused, sqrt(W) x
    frozen] for texts; without it (training's path) the fusion alone; the control (mask_retrieved) still
    votes with its neighbours, its fusion reading none."""
    clip = module.backbone
    images = ImageFolderClassification(tiny_dir / "zeroshot")
    v = clip.encode_images(clip.preprocess_images([images[i][0] for i in range(6)]))
    t = clip.encode_captions(["a photo of a red circle", "a blue square"])
    found: Neighbours = module.neighbours(v, "image")
    fused = module.refine(v, "image", rows=found.rows)
    assert fused.shape == (6, 32)
    voted = module.refine_and_gate(v, "image", rows=found.rows, vote=True).embeddings
    whitened = MemoryWhitening.of_memory(module.retriever.memory, 0.01, "text")(lookup(found))
    assert torch.allclose(voted, torch.cat([fused, math.sqrt(2.0) * whitened], 1) / math.sqrt(3.0), atol=1e-5)
    text = module.refine_and_gate(t, "text", vote=True).embeddings
    assert torch.allclose(text[:, 32:], math.sqrt(2.0 / 3.0) * t, atol=1e-6)
    assert torch.allclose(text[:, :32], module.refine(t, "text") / math.sqrt(3.0), atol=1e-6)
    control = refine_and_gate(
        module.image_fusion, module.retriever, v, "image", mask_retrieved=True, rows=found.rows, vote=True
    ).embeddings
    assert torch.allclose(control[:, 32:], voted[:, 32:], atol=1e-6)
    empty = module.refine_and_gate(v[:0], "image", vote=True).embeddings
    assert empty.shape == (0, 64)
    out = module({"image_emb": v[:2], "text_emb": t})  # training's forward: no vote
    assert out["v_bar"].shape == out["t_bar"].shape == (2, 32)


def test_a_voting_model_weighs_the_neighbours_by_their_exact_search_scores(tiny_reco, tiny_dir):
    """``vote_temperature``: the vote is the whitened similarity-weighted lookup (the evaluation's lookup
    with that temperature), its scores recomputed from the memory for rows found elsewhere, equal to the
    exact search's own."""
    module = tiny_reco(vote_weight=2.0, vote_whiten=0.01, vote_temperature=0.05)
    clip = module.backbone
    images = ImageFolderClassification(tiny_dir / "zeroshot")
    v = clip.encode_images(clip.preprocess_images([images[i][0] for i in range(6)]))
    found: Neighbours = module.neighbours(v, "image")
    exact = module.retriever.scores_of(v, "image", found.rows)
    assert torch.allclose(exact, found.scores, atol=1e-3)  # the index's scores (fp16 rows), to rounding
    voted = module.refine_and_gate(v, "image", rows=found.rows, vote=True).embeddings
    whitening = MemoryWhitening.of_memory(module.retriever.memory, 0.01, "text")
    weighted = whitening(lookup(dataclasses.replace(found, scores=exact), 0.05))
    assert torch.allclose(voted[:, 32:], math.sqrt(2.0 / 3.0) * weighted, atol=1e-5)
    assert not torch.allclose(weighted, whitening(lookup(found)), atol=1e-3)


def test_evaluation_reports_reco_with_the_vote_and_without_and_every_other_row_unchanged(
    module, tiny_dir, tiny_reco
):
    """With a vote, ``reco`` is the fusion's score plus W x the whitened lookup's (against frozen prompts)
    over 1 + W, hand-computed; ``reco_without_vote`` is the fusion alone; clip and lookup (lifted into the
    two-block space) score as in a model without a vote; retrieval runs over the joined embeddings."""
    from reco_lightning.metrics import classification_metrics

    spec = ClassificationSet("shapes", str(tiny_dir / "zeroshot"), templates="clip_generic")
    settings = ["clip", "lookup", "reco", "reco_without_vote", "reco_image"]
    evaluation = ZeroShotEvaluation(
        classification=[spec],
        retrieval=[RetrievalSet("captions", str(tiny_dir / "val.csv"))],
        settings=settings,
        batch_size=16,
    )
    rows = {(r.dataset, r.setting): r.metrics for r in evaluation.evaluate(module)[0].rows}
    plain = tiny_reco()
    plain.load_state_dict(module.state_dict())
    unvoted = {
        (r.dataset, r.setting): r.metrics
        for r in ZeroShotEvaluation(classification=[spec], settings=settings, batch_size=16)
        .evaluate(plain.eval())[0]
        .rows
    }
    for setting in ("clip", "lookup"):
        assert rows["shapes", setting]["top1"] == pytest.approx(unvoted["shapes", setting]["top1"])
    assert rows["shapes", "reco_without_vote"]["top1"] == pytest.approx(unvoted["shapes", "reco"]["top1"])

    clip, shapes = module.backbone, shapes_by_hand(module.backbone, tiny_dir)
    refined = build_class_embeddings(
        shapes.classnames, shapes.templates, lambda p: module.refine(clip.encode_captions(p), "text")
    )
    found = module.neighbours(shapes.images, "image", leak_threshold=evaluation.leakage_threshold)
    fused = module.refine(shapes.images, "image", rows=found.rows)
    whitened = MemoryWhitening.of_memory(module.retriever.memory, 0.01, "text")(lookup(found))
    scores = (fused @ refined.t() + 2.0 * whitened @ shapes.frozen_classes.t()) / 3.0
    expected = classification_metrics(scores, shapes.labels)
    assert rows["shapes", "reco"]["top1"] == pytest.approx(expected["top1"])
    assert rows["shapes", "reco"]["top5"] == pytest.approx(expected["top5"])
    assert {"image_to_text_R@1", "text_to_image_R@1"} <= set(rows["captions", "reco"])


def test_calibrating_the_fusions_weight_scores_the_fusion_without_the_vote(tiny_dir, tiny_reco):
    """``reco calibrate``'s retrieved_skip sweep on a model with a vote scores its fusion alone: the same
    scores as the model without the vote (the vote's weight is chosen on its own)."""
    from reco_lightning.calibration import RETRIEVED_SKIP, calibrate

    spec = ClassificationSet("shapes", str(tiny_dir / "zeroshot"), templates="clip_generic")
    found = []
    for vote in (2.0, 0.0):
        model = tiny_reco(vote_weight=vote)
        assert (model.retriever.vote is None) == (vote == 0.0)
        found.append(calibrate(model, spec, RETRIEVED_SKIP, values=(0.2, 0.9), batch_size=16))
    assert found[0]["values"] == found[1]["values"] and found[0]["chosen"] == found[1]["chosen"]
