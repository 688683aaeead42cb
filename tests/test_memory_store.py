import json
import shutil

import numpy as np
import pytest

from reco_lightning.errors import RecoMemoryError
from reco_lightning.memory import MemoryStore
from reco_lightning.memory.base import MemoryBackend

FP = {"name_or_path": "clip-a", "config_sha": "c", "weights_sha": "w", "dim": 8, "id": "a"}


def unit(n, d=8, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture()
def written(tmp_path):
    image, text = unit(50), unit(50, seed=1)
    path = MemoryStore.write(
        tmp_path / "mem",
        image,
        text,
        ids=np.arange(1000, 1050),
        captions=[f"c{i}" for i in range(50)],
        fingerprint=FP,
    )
    return path, image, text


def test_write_open_round_trip_is_memory_mapped_and_searchable(written):
    path, image, text = written
    store = MemoryStore.open(path, expected_fingerprint=FP)
    assert len(store) == 50 and store.dim == 8
    assert isinstance(store.image_embeddings, np.memmap) and store.image_embeddings.dtype == np.float16
    assert np.allclose(store.text_embeddings, text, atol=1e-3)
    assert store.ids[0] == 1000
    _, rows = store.index("image").search(image[:5], 1)
    assert rows[:, 0].tolist() == [0, 1, 2, 3, 4]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["backend"]["class_path"].endswith("ExactBackend") and manifest["count"] == 50
    assert not list(path.parent.glob(".mem.partial-*")), "no temp dir left behind"


def test_existing_memory_is_not_overwritten_by_accident(written):
    path, image, text = written
    with pytest.raises(RecoMemoryError, match="already exists"):
        MemoryStore.write(path, image, text)
    MemoryStore.write(path, image[:10], text[:10], overwrite=True)
    assert len(MemoryStore.open(path)) == 10


@pytest.mark.parametrize(
    ("expected", "match"),
    [
        ({**FP, "id": "b", "name_or_path": "clip-b"}, "built with backbone 'clip-a'.*rebuild the memory"),
        ({**FP, "dim": 16}, "has dim 8 but the backbone clip-a has dim 16"),
    ],
)
def test_backbone_mismatch_is_refused(written, expected, match):
    with pytest.raises(RecoMemoryError, match=match):
        MemoryStore.open(written[0], expected_fingerprint=expected)


def test_missing_truncated_and_inconsistent_files_are_refused(written, tmp_path):
    path = written[0]
    broken = shutil.copytree(path, tmp_path / "b1")
    (broken / "text_emb.npy").unlink()
    with pytest.raises(RecoMemoryError, match="missing memory file .*text_emb.npy"):
        MemoryStore.open(broken)

    broken = shutil.copytree(path, tmp_path / "b2")
    data = (broken / "image_emb.npy").read_bytes()
    (broken / "image_emb.npy").write_bytes(data[: len(data) // 2])
    with pytest.raises(RecoMemoryError, match="image_emb.npy.*truncated"):
        MemoryStore.open(broken)

    broken = shutil.copytree(path, tmp_path / "b3")
    data = (broken / "index_text" / "index.faiss").read_bytes()
    (broken / "index_text" / "index.faiss").write_bytes(data[:100])
    with pytest.raises(RecoMemoryError, match="index.faiss.*truncated or corrupt"):
        MemoryStore.open(broken)

    broken = shutil.copytree(path, tmp_path / "b4")
    small = MemoryStore.from_arrays(unit(20), unit(20)).index("image")
    small.save(broken / "index_image")
    with pytest.raises(RecoMemoryError, match="holds 20 vectors .* store has 50 rows"):
        MemoryStore.open(broken)

    broken = shutil.copytree(path, tmp_path / "b5")
    (broken / "manifest.json").unlink()
    with pytest.raises(RecoMemoryError, match="is not a memory: .*manifest.json is missing"):
        MemoryStore.open(broken)

    broken = shutil.copytree(path, tmp_path / "b6")
    (broken / "metadata.parquet").write_bytes(b"PAR1")
    with pytest.raises(RecoMemoryError, match="metadata.parquet.*truncated"):
        MemoryStore.open(broken)


def test_empty_and_misaligned_inputs_are_refused(tmp_path):
    with pytest.raises(RecoMemoryError, match="empty memory"):
        MemoryStore.from_arrays(np.zeros((0, 8), np.float32), np.zeros((0, 8), np.float32))
    with pytest.raises(RecoMemoryError, match="row-aligned"):
        MemoryStore.from_arrays(unit(5), unit(4))
    with pytest.raises(RecoMemoryError, match="k=11 but the memory holds 10"):
        MemoryStore.from_arrays(unit(10), unit(10)).index("text").search(unit(1), 11)


def test_concat_appends_rows_without_reencoding(written, tmp_path):
    path = written[0]
    second = MemoryStore.write(
        tmp_path / "m2", unit(7, seed=5), unit(7, seed=6), ids=np.arange(7), fingerprint=FP
    )
    out = MemoryStore.concat([path, second], tmp_path / "both")
    both = MemoryStore.open(out)
    assert len(both) == 57 and both.ids[50:].tolist() == list(range(7))
    assert np.array_equal(both.image_embeddings[:50], np.asarray(MemoryStore.open(path).image_embeddings))
    other = MemoryStore.write(tmp_path / "m3", unit(3), unit(3), fingerprint={**FP, "id": "zz"})
    with pytest.raises(RecoMemoryError, match="different backbones"):
        MemoryStore.concat([path, other], tmp_path / "bad")


def test_search_params_reach_the_backend_on_open(written):
    store = MemoryStore.open(written[0], search_params={})
    assert isinstance(store.index("text"), MemoryBackend)


def test_ivfpq_memory_opens_with_search_overrides_and_swaps_with_exact(tmp_path):
    import torch

    from reco_lightning.retrieval import Retriever

    image, text = unit(3000, d=16, seed=3), unit(3000, d=16, seed=4)
    spec = {"class_path": "ivfpq", "init_args": {"nlist": 16, "m": 4, "nbits": 6, "nprobe": 2}}
    approx = MemoryStore.write(tmp_path / "ivfpq", image, text, backend=spec, fingerprint={**FP, "dim": 16})
    exact = MemoryStore.write(tmp_path / "exact", image, text, fingerprint={**FP, "dim": 16})
    store = MemoryStore.open(approx, search_params={"nprobe": 16, "rerank": 64})
    assert store.index("image").nprobe == 16 and store.manifest["backend"]["init_args"]["nprobe"] == 2
    query = torch.from_numpy(image[:20])
    ivf_rows = Retriever(store, k=5)(query, "image").rows
    exact_rows = Retriever(MemoryStore.open(exact), k=5)(query, "image").rows
    assert (ivf_rows[:, 0] == torch.arange(20)).all(), "re-ranked top-1 of a stored vector is itself"
    overlap = sum(len(set(a) & set(b)) for a, b in zip(ivf_rows.tolist(), exact_rows.tolist(), strict=True))
    assert overlap / exact_rows.numel() >= 0.9


@pytest.mark.parametrize("name", ["image_emb.npy", "text_emb.npy", "ids.npy"])
@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda data: b"", id="empty"),
        pytest.param(lambda data: data[:5], id="cut-in-magic"),
        pytest.param(lambda data: data[:40], id="cut-in-header"),
        pytest.param(lambda data: b"\x00" * len(data), id="zeroed"),
        pytest.param(lambda data: data[: len(data) - 7], id="cut-in-data"),
    ],
)
def test_empty_or_corrupt_array_files_give_one_error_naming_the_file(written, tmp_path, name, damage):
    broken = shutil.copytree(written[0], tmp_path / "broken")
    (broken / name).write_bytes(damage((broken / name).read_bytes()))
    with pytest.raises(RecoMemoryError, match=rf"{name}.*empty, truncated or corrupt, rebuild the memory"):
        MemoryStore.open(broken)


def test_search_params_another_backend_does_not_understand_are_ignored_with_one_warning(tmp_path):
    import warnings

    from reco_lightning.memory import base

    base._WARNED_IGNORED.clear()
    image, text = unit(3000, d=16, seed=3), unit(3000, d=16, seed=4)
    spec = {"class_path": "ivfpq", "init_args": {"nlist": 16, "m": 4, "nbits": 6, "nprobe": 2}}
    approx = MemoryStore.write(tmp_path / "ivfpq", image, text, backend=spec)
    exact = MemoryStore.write(tmp_path / "exact", image, text)
    params = {"nprobe": 8, "rerank": 32}  # one config for both memories
    with pytest.warns(UserWarning, match=r"\['nprobe', 'rerank'\] ignored: the 'exact' backend") as caught:
        store = MemoryStore.open(exact, search_params=params)
    assert len([w for w in caught if "ignored" in str(w.message)]) == 1, "two indexes, one warning"
    _, rows = store.index("image").search(image[:4], 1)
    assert rows[:, 0].tolist() == [0, 1, 2, 3]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ivfpq understands both: nothing to say
        approx_store = MemoryStore.open(approx, search_params=params)
        MemoryStore.open(exact, search_params=params)  # already said once in this process
    assert approx_store.index("text").nprobe == 8 and approx_store.index("text").rerank == 32
    with pytest.warns(UserWarning, match=r"\['efSearch'\] ignored: the 'ivfpq' backend .*nprobe"):
        store = MemoryStore.open(approx, search_params={"nprobe": 4, "efSearch": 64})
    assert store.index("image").nprobe == 4
