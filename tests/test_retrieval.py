import numpy as np
import pytest
import torch

from reco_lightning.memory import MemoryStore
from reco_lightning.retrieval import Retriever


def unit(x):
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture()
def memory():
    """Pair i: image = e_i, text = e_{(i+1) % 4} in 4-d, ids 100+i: every lookup has one right answer."""
    eye = np.eye(4, dtype=np.float32)
    return MemoryStore.from_arrays(eye, np.roll(eye, -1, axis=0), ids=np.arange(100, 104))


def test_uni_search_cross_fusion_returns_texts_of_nearest_images(memory):
    nb = Retriever(memory, k=1)(torch.tensor(unit([[1, 0.1, 0, 0]])), "image")
    assert nb.rows.tolist() == [[0]]
    assert torch.allclose(nb.embeddings[0, 0], torch.tensor([0.0, 1, 0, 0]))  # text of pair 0


def test_the_2x2_grid(memory):
    q = torch.tensor(unit([[0, 0, 1, 0.1]]))  # text query close to text of pair 1 (e_2)
    grid = {
        (s, f): Retriever(memory, k=1, search=s, fusion=f)(q, "text")
        for s in ("uni", "cross")
        for f in ("uni", "cross")
    }
    assert (
        grid["uni", "cross"].rows.item() == 1 and grid["uni", "cross"].embeddings[0, 0].argmax().item() == 1
    )
    assert grid["uni", "uni"].rows.item() == 1 and grid["uni", "uni"].embeddings[0, 0].argmax().item() == 2
    assert (
        grid["cross", "cross"].rows.item() == 2
        and grid["cross", "cross"].embeddings[0, 0].argmax().item() == 2
    )
    assert (
        grid["cross", "uni"].rows.item() == 2 and grid["cross", "uni"].embeddings[0, 0].argmax().item() == 3
    )


def test_training_excludes_own_pair_and_near_duplicates():
    rng = np.random.default_rng(0)
    base = unit(rng.normal(size=(6, 16)))
    image = np.concatenate(
        [base, unit(base[:1] + 0.01 * rng.normal(size=(1, 16)))]
    )  # row 6: near-copy of row 0
    text = unit(rng.normal(size=(7, 16)))  # texts unlike the images: a check on the wrong modality fails
    mem = MemoryStore.from_arrays(image, text, ids=np.arange(7))
    retriever = Retriever(mem, k=3, near_duplicate_threshold=0.95)
    q = torch.from_numpy(base[:1])
    assert retriever(q, "image").rows[0, :2].tolist() in ([0, 6], [6, 0])
    excluded = retriever(q, "image", exclude_ids=torch.tensor([0]))
    assert 0 not in excluded.rows.tolist()[0] and 6 not in excluded.rows.tolist()[0]
    assert excluded.mask.all()


def test_fewer_than_k_survivors_are_masked_not_invented():
    x = unit(np.eye(3))
    # texts unlike their images (text 2 = image 0 = the query): a near-duplicate check on the texts drops row 2
    mem = MemoryStore.from_arrays(x, np.roll(x, -1, axis=0), ids=np.array([7, 7, 8]))
    nb = Retriever(mem, k=3, exclusion_margin=0)(
        torch.from_numpy(x[:1]), "image", exclude_ids=torch.tensor([7])
    )
    assert nb.mask.tolist() == [[True, False, False]]
    assert nb.rows.tolist() == [[2, -1, -1]]
    assert torch.count_nonzero(nb.embeddings[0, 1:]) == 0


def test_bad_settings_are_refused(memory):
    with pytest.raises(ValueError, match="exceeds the memory size 4"):
        Retriever(memory, k=5)
    with pytest.raises(ValueError, match="search and fusion must be"):
        Retriever(memory, search="both")


def test_search_widens_for_queries_whose_candidates_are_all_near_duplicates():
    rng = np.random.default_rng(1)
    centre = unit(rng.normal(size=(1, 16)))
    cluster = unit(centre + 1e-4 * rng.normal(size=(40, 16)))  # 40 near-copies of the query
    others = unit(rng.normal(size=(30, 16)))
    x = np.concatenate([cluster, others])
    texts = unit(rng.normal(size=x.shape))  # unlike the images: a check on the texts keeps the cluster
    mem = MemoryStore.from_arrays(x, texts)
    retriever = Retriever(mem, k=3, exclusion_margin=4, near_duplicate_threshold=0.99)
    nb = retriever(torch.from_numpy(centre), "image", exclude_ids=torch.tensor([-1]))
    assert nb.mask.all() and (nb.rows >= 40).all(), (
        "found the 3 best non-duplicates beyond the first 7 candidates"
    )
    expected = np.argsort(-(others @ centre[0]))[:3] + 40
    assert nb.rows[0].tolist() == expected.tolist()


def _templated_memory():
    """Pairs 0-3: distinct images, all captioned with the same text; pair 4: another caption."""
    rng = np.random.default_rng(2)
    images = unit(rng.normal(size=(5, 16)))
    caption, other = unit(rng.normal(size=(2, 16)))
    texts = np.stack([caption] * 4 + [other])
    return MemoryStore.from_arrays(images, texts, ids=np.arange(5)), images, texts


def test_text_queries_keep_other_pairs_with_the_same_caption():
    """near_duplicate_of="image": a text query's neighbours with its exact caption but other images are
    knowledge, not leaks; only a copy of the pair's own image is excluded."""
    mem, images, texts = _templated_memory()
    retriever = Retriever(mem, k=3, near_duplicate_threshold=0.95)
    query, pair_image = torch.from_numpy(texts[:1]), torch.from_numpy(images[:1])
    nb = retriever(query, "text", exclude_ids=torch.tensor([0]), pair_images=pair_image)
    assert nb.mask.all() and sorted(nb.rows[0].tolist()) == [1, 2, 3]
    with pytest.raises(ValueError, match="pair_images"):
        retriever(query, "text", exclude_ids=torch.tensor([0]))


def test_text_queries_with_query_exclusion_drop_every_same_caption():
    mem, _images, texts = _templated_memory()
    retriever = Retriever(mem, k=3, near_duplicate_threshold=0.95, near_duplicate_of="query")
    nb = retriever(torch.from_numpy(texts[:1]), "text", exclude_ids=torch.tensor([0]))
    assert nb.rows[0].tolist() == [4, -1, -1]


def test_text_queries_drop_pairs_whose_image_copies_the_pair_image():
    mem, images, texts = _templated_memory()
    copy = np.concatenate([images, unit(images[:1] + 1e-3)])  # pair 5: the pair's image again, same caption
    mem = MemoryStore.from_arrays(copy, np.concatenate([texts, texts[:1]]), ids=np.arange(6))
    nb = Retriever(mem, k=4, near_duplicate_threshold=0.95)(
        torch.from_numpy(texts[:1]),
        "text",
        exclude_ids=torch.tensor([0]),
        pair_images=torch.from_numpy(images[:1]),
    )
    assert 5 not in nb.rows[0].tolist() and 0 not in nb.rows[0].tolist()


def test_leakage_guard_drops_copies_of_the_evaluated_image_and_counts_them():
    """Evaluation: memory pairs whose image is (nearly) the query image are not retrieved; counted per query."""
    rng = np.random.default_rng(0)
    images = unit(rng.normal(size=(40, 8)))
    texts = unit(rng.normal(size=(40, 8)))  # differ from the images: the check must read the image side
    memory = MemoryStore.from_arrays(images, texts, ids=np.arange(40))
    queries = torch.tensor(np.stack([images[3], unit(images[7] + 0.01), unit(rng.normal(size=8))]))
    retriever = Retriever(memory, k=5)
    plain = retriever(queries, "image")
    assert plain.rows[0, 0] == 3 and plain.rows[1, 0] == 7 and plain.excluded is None
    guarded = retriever(queries, "image", leak_threshold=0.99)
    assert 3 not in guarded.rows[0].tolist() and 7 not in guarded.rows[1].tolist()
    assert guarded.mask.all(), "k neighbours survive: the search widens past the dropped copy"
    assert guarded.excluded.tolist() == [1, 1, 0]
    assert guarded.rows[2].tolist() == plain.rows[2].tolist()  # no copy: nothing changes
    at_one = retriever(queries[:1], "image", leak_threshold=1.0)  # cosine >= 1.0: the exact copy still is one
    assert at_one.excluded.tolist() == [1]
    # text queries without images of their own (class prompts) are not guarded
    assert retriever(torch.tensor(texts[:1]), "text", leak_threshold=0.99).excluded is None


def test_leakage_guard_of_captions_drops_pairs_holding_their_own_image():
    """Evaluation, text queries: a memory pair whose image copies the caption's own image is not retrieved
    (under cross-fusion it would hand the text side the answer), whatever its caption."""
    rng = np.random.default_rng(1)
    images = unit(rng.normal(size=(40, 8)))
    texts = unit(rng.normal(size=(40, 8)))
    memory = MemoryStore.from_arrays(images, texts, ids=np.arange(40))
    retriever = Retriever(memory, k=5)
    captions = torch.tensor(np.stack([texts[3], texts[9]]))
    own = torch.tensor(np.stack([images[3], unit(rng.normal(size=8))]))  # caption 1's image: not in memory
    plain = retriever(captions, "text")
    assert plain.rows[0, 0] == 3 and plain.rows[1, 0] == 9
    guarded = retriever(captions, "text", leak_threshold=0.99, leak_images=own)
    assert 3 not in guarded.rows[0].tolist() and guarded.mask.all()
    assert guarded.excluded.tolist() == [1, 0]
    assert guarded.rows[1].tolist() == plain.rows[1].tolist()  # pair 9's image is not caption 1's
    with pytest.raises(ValueError, match="leak_images"):
        retriever(captions, "text", leak_threshold=0.99, leak_images=own[:1])
