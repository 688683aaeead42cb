"""The novelty gate (reco_lightning.novelty): which memory rows were added after training, and queries whose
neighbours are mostly such rows answered from them instead of by the fusion."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reco_lightning.fusion import FusionConfig, FusionTransformer
from reco_lightning.memory import MemoryStore
from reco_lightning.novelty import (
    GapCheck,
    NoveltyError,
    NoveltyGate,
    ShareCheck,
    added_share,
    known_rows,
    novel_answer,
    novel_queries,
)
from reco_lightning.pretrained import RecoConfig, refine_embeddings
from reco_lightning.retrieval import Retriever
from reco_lightning.whitening import MemoryWhitening

DIM = 8


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _pairs(centre: int, caption: int, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` pairs of one concept: images around e_centre, captions around e_caption."""
    rng = np.random.default_rng(seed)
    eye = np.eye(DIM, dtype=np.float32)
    return (
        unit(eye[centre] + 0.1 * rng.standard_normal((count, DIM))),
        unit(eye[caption] + 0.1 * rng.standard_normal((count, DIM))),
    )


@pytest.fixture()
def memories(tmp_path):
    """``old``: 6 pairs of a concept the fusion trained with (ids 0-5); ``grown``: the same plus 6 pairs of a
    new concept (ids 100-105), written to disk as a user's memories are."""
    old_v, old_t = _pairs(0, 1, 6, seed=0)
    new_v, new_t = _pairs(2, 3, 6, seed=1)
    old = MemoryStore.write(tmp_path / "old", old_v, old_t, ids=np.arange(6))
    grown = MemoryStore.write(
        tmp_path / "grown",
        np.concatenate([old_v, new_v]),
        np.concatenate([old_t, new_t]),
        ids=np.concatenate([np.arange(6), np.arange(100, 106)]),
    )
    return old, grown


def test_known_rows_marks_the_training_memory_and_refuses_bad_paths(memories, tmp_path):
    old, grown = memories
    ids = np.asarray(MemoryStore.open(grown, load_indexes=False).ids)
    assert known_rows(ids, old).tolist() == [True] * 6 + [False] * 6
    with pytest.raises(NoveltyError, match="no ids.npy"):
        known_rows(ids, tmp_path / "missing")
    with pytest.raises(NoveltyError, match="shares no pair id"):
        known_rows(np.arange(200, 203), old)


def test_gate_answers_novel_images_from_their_added_neighbours_and_keeps_novel_texts_frozen():
    fused, query = torch.zeros(3, 2), torch.tensor([[0.0, 1.0]] * 3)
    captions = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.6, 0.8]]] * 3)
    added = torch.tensor([[True, False, True, False], [True, False, False, False], [True, True, True, True]])
    mask = torch.tensor([[True] * 4, [True] * 4, [True, True, False, False]])
    assert added_share(added, mask).tolist() == [0.5, 0.25, 1.0]  # masked neighbours do not count
    novel = novel_queries(added, mask, 0.5)
    image = novel_answer(fused, query, "image", added, mask, captions, novel)
    assert torch.allclose(image[0], torch.tensor([1.0, 0.0]))  # the mean of its two added captions
    assert torch.equal(image[1], fused[1])  # a quarter added: the fusion's answer stands
    assert torch.allclose(image[2], torch.tensor([0.7071, 0.7071]), atol=1e-4)  # valid added ones only
    text = novel_answer(fused, query, "text", added, mask, captions, novel)
    assert torch.equal(text[0], query[0]) and torch.equal(text[1], fused[1])


def test_the_check_is_asked_for_the_share_candidates_only_and_decides_them():
    added = torch.tensor([[True, True], [True, False], [False, False], [True, True]])
    mask = torch.ones(4, 2, dtype=torch.bool)
    asked = []

    def check(candidates: torch.Tensor) -> torch.Tensor:
        asked.append(candidates.tolist())
        return candidates == 3  # the gap holds for the last query only

    assert novel_queries(added, mask, 1.0).tolist() == [True, False, False, True]
    assert novel_queries(added, mask, 1.0, check).tolist() == [False, False, False, True]
    assert asked == [[0, 3]]
    assert novel_queries(added[1:3], mask[1:3], 1.0, check).tolist() == [False, False]
    assert asked == [[0, 3]]  # no candidate: the check (a search of the training memory) is not run


@pytest.mark.parametrize("fusion", ["cross", "uni"])
def test_refine_is_unchanged_on_the_training_memory_and_gates_the_new_concept(memories, fusion):
    old, grown = memories
    torch.manual_seed(0)
    net = FusionTransformer(DIM, FusionConfig(num_heads=2))
    net.eval()
    queries = torch.from_numpy(unit(np.eye(DIM, dtype=np.float32)[[0, 2]] + 0.05))  # old concept, new concept
    kwargs = {"k": 4, "fusion": fusion}

    def gate(known) -> NoveltyGate | None:
        return None if known is None else NoveltyGate(~known, 0.5)

    def refined(memory, known) -> torch.Tensor:
        retriever = Retriever(MemoryStore.open(memory), novelty=gate(known), **kwargs)
        return refine_embeddings(net, retriever, queries, "image")

    plain = refined(grown, None)
    known_old = known_rows(np.asarray(MemoryStore.open(grown, load_indexes=False).ids), old)
    assert torch.equal(
        refined(old, np.ones(6, dtype=bool)),
        refine_embeddings(net, Retriever(MemoryStore.open(old), **kwargs), queries, "image"),
    )  # nothing added: the gate is inert
    gated = refined(grown, known_old)
    assert torch.equal(gated[0], plain[0])  # the old concept's neighbours are all known: fused
    store = MemoryStore.open(grown)
    rows = Retriever(store, k=4)(queries[1:], "image").rows[0].numpy()
    assert (rows >= 6).all()  # the new concept's neighbours are the added rows...
    expected = unit(np.asarray(store.embeddings("text"), dtype=np.float32)[rows].mean(0))
    assert np.allclose(gated[1].detach().numpy(), expected, atol=1e-5)  # ...and it is their captions' mean
    captions = torch.from_numpy(unit(np.eye(DIM, dtype=np.float32)[[1, 3]] + 0.05))  # old, new concept's
    retriever = Retriever(store, novelty=gate(known_old), **kwargs)
    texts = refine_embeddings(net, retriever, captions, "text")
    assert torch.equal(texts[1], captions[1])  # the new concept's text keeps its frozen embedding
    assert torch.equal(texts[0], refine_embeddings(net, Retriever(store, **kwargs), captions, "text")[0])


def test_config_checks_the_threshold_and_records_the_known_memory_as_a_path(tmp_path):
    with pytest.raises(ValueError, match="novelty_threshold"):
        RecoConfig(novelty_threshold=0.0)
    assert RecoConfig(known_memory=tmp_path).known_memory == str(tmp_path)
    assert RecoConfig().known_memory is None and RecoConfig().novelty_threshold == 0.9
    with pytest.raises(ValueError, match="novelty_whiten"):
        RecoConfig(novelty_whiten=0.0)
    assert RecoConfig.from_mapping({"novelty_whiten": None}).novelty_whiten is None  # None turns it off


def test_gap_check_spares_more_rows_of_a_known_concept_and_gates_a_new_one(tmp_path):
    """A memory grown with more rows of the trained concept A and with a new concept B: A's queries have
    mostly added neighbours too, yet their best added row is no closer than training rows are to each
    other; B's is far closer than anything in the training memory."""
    a_v, a_t = _pairs(0, 1, 60, seed=2)
    b_v, b_t = _pairs(2, 3, 20, seed=3)
    training = MemoryStore.write(tmp_path / "training", a_v[:15], a_t[:15], ids=np.arange(15))
    grown = MemoryStore.open(
        MemoryStore.write(
            tmp_path / "grown",
            np.concatenate([a_v, b_v]),
            np.concatenate([a_t, b_t]),
            ids=np.concatenate([np.arange(60), np.arange(100, 120)]),
        )
    )
    known = known_rows(np.asarray(grown.ids), training)
    assert known.sum() == 15
    net = FusionTransformer(DIM, FusionConfig(num_heads=2)).eval()
    queries = torch.from_numpy(_pairs(0, 1, 40, seed=4)[0])  # concept A
    queries = torch.cat([queries, torch.from_numpy(_pairs(2, 3, 10, seed=5)[0])])  # concept B
    share_only = refine_embeddings(
        net, Retriever(grown, k=4, novelty=NoveltyGate(~known, 0.5)), queries, "image"
    )
    plain = refine_embeddings(net, Retriever(grown, k=4), queries, "image")
    gate = GapCheck(grown, known, MemoryStore.open(training), quantile=0.9, k=4)
    retriever = Retriever(grown, k=4, novelty=NoveltyGate(~known, 0.5, gate))
    checked = refine_embeddings(net, retriever, queries, "image")
    gated_by_share = ~torch.isclose(share_only, plain).all(1)
    gated_checked = ~torch.isclose(checked, plain).all(1)
    assert gated_by_share[:40].float().mean() > 0.5  # the share alone takes more rows of A for a new concept
    # the check gates A about as often as training rows beat the 90th percentile, and every B
    assert gated_checked[:40].float().mean() < 0.3 and gated_checked[40:].all()
    assert gate.threshold("image", "image") == gate._thresholds["image->image"]  # computed once
    with pytest.raises(ValueError, match="novelty_gap"):
        RecoConfig(novelty_gap=1.0)


def test_share_check_gates_only_beyond_the_base_rate_of_added_rows_around_known_concepts(tmp_path):
    """Concept A grown after training, concept B new. A few added rows of A: A's queries see few added
    neighbours, as its training rows do, B's see only added ones and are gated. Mostly added rows of A: the
    training rows' own neighbours are often all added, so no share says "new" and nothing is gated (the
    check's limit, by design: a memory grown tenfold with known concepts is spared whole)."""
    a_v, a_t = _pairs(0, 1, 60, seed=2)
    b_v, b_t = _pairs(2, 3, 20, seed=3)
    ids = np.concatenate([np.arange(60), np.arange(100, 120)])
    grown = MemoryStore.open(
        MemoryStore.write(tmp_path / "grown", np.concatenate([a_v, b_v]), np.concatenate([a_t, b_t]), ids=ids)
    )
    queries = torch.cat(
        [torch.from_numpy(_pairs(0, 1, 40, seed=4)[0]), torch.from_numpy(_pairs(2, 3, 10, seed=5)[0])]
    )
    net = FusionTransformer(DIM, FusionConfig(num_heads=2)).eval()
    plain = refine_embeddings(net, Retriever(grown, k=4), queries, "image")
    for trained_with, threshold in ((50, 0.5), (15, 1.0)):
        training = MemoryStore.write(
            tmp_path / f"t{trained_with}", a_v[:trained_with], a_t[:trained_with], ids=np.arange(trained_with)
        )
        known = known_rows(np.asarray(grown.ids), training)
        check = ShareCheck(grown, known, quantile=0.95, k=4)
        retriever = Retriever(grown, k=4, novelty=NoveltyGate(~known, 0.5, share=check))
        gated = ~torch.isclose(refine_embeddings(net, retriever, queries, "image"), plain).all(1)
        assert check.threshold("image", "image") == threshold
        if trained_with == 50:
            assert gated[40:].all() and gated[:40].float().mean() < 0.1
        else:
            assert not gated.any()
    with pytest.raises(ValueError, match="novelty_share_quantile"):
        RecoConfig(novelty_share_quantile=1.0)


def test_a_check_turned_off_stays_off_through_an_export_config():
    config = RecoConfig(novelty_share_quantile=None, novelty_gap=0.9)
    again = RecoConfig.from_mapping(config.to_json())
    assert again.novelty_share_quantile is None and again.novelty_gap == 0.9
    assert (
        RecoConfig.from_mapping({"k": None}).k == RecoConfig().k
    )  # a None where none is allowed: the default


def test_refine_whitens_the_gated_images_answer_only(memories):
    """With ``whitening`` on the gate, a gated image is its added neighbours' caption mean through it; an
    image the gate lets through and a gated text are as without it."""
    old, grown = memories
    torch.manual_seed(0)
    net = FusionTransformer(DIM, FusionConfig(num_heads=2))
    net.eval()
    store = MemoryStore.open(grown)
    known = known_rows(np.asarray(store.ids), old)
    whitening = MemoryWhitening.of_memory(store, ridge=1e-2)
    queries = torch.from_numpy(unit(np.eye(DIM, dtype=np.float32)[[0, 2]] + 0.05))

    def retriever(white: MemoryWhitening | None) -> Retriever:
        return Retriever(store, k=4, novelty=NoveltyGate(~known, 0.5, whitening=white))

    plain = refine_embeddings(net, retriever(None), queries, "image")
    white = refine_embeddings(net, retriever(whitening), queries, "image")
    assert torch.equal(white[0], plain[0])  # not gated: the fusion's answer
    assert torch.allclose(white[1], whitening(plain[1:])[0], atol=1e-6)  # gated: the mean, whitened
    assert not torch.allclose(white[1], plain[1])
    captions = torch.from_numpy(unit(np.eye(DIM, dtype=np.float32)[[1, 3]] + 0.05))
    assert torch.equal(
        refine_embeddings(net, retriever(whitening), captions, "text"),
        refine_embeddings(net, retriever(None), captions, "text"),
    )
    assert np.array_equal(
        whitening.mean.numpy(), MemoryWhitening.of_memory(store, 1e-2, sample=100).mean.numpy()
    )
