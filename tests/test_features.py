import json
import shutil

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from reco_lightning.data.datamodule import ImageTextDataModule
from reco_lightning.data.features import CachedPairs, FeatureCacheError, open_feature_cache
from reco_lightning.data.sources import open_source
from reco_lightning.jobs.feature_cache import build_feature_cache, cache_requirements
from reco_lightning.memory import MemoryStore
from reco_lightning.model import RecoModule

TRAINER = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False}


def module(tiny_dir, **kwargs):
    torch.manual_seed(0)
    settings = {
        "k": 4,
        "fusion_config": {"num_heads": 4},
        "near_duplicate_threshold": 0.999,
        "memory": str(tiny_dir / "memory"),
    }
    m = RecoModule(backbone=str(tiny_dir / "clip"), **{**settings, **kwargs})
    m.setup("fit")
    return m


@pytest.fixture(scope="module")
def cache(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "train"
    build_feature_cache(
        module(tiny_dir),
        str(tiny_dir / "train.csv"),
        out,
        batch_size=64,
        chunk_size=100,
        trainer_kwargs=TRAINER,
    )
    return out


def test_cache_rows_match_live_search_with_exclusion(tiny_dir, cache):
    model = module(tiny_dir)
    arrays = open_feature_cache(cache, cache_requirements(model, str(tiny_dir / "train.csv")))
    ids = [r.id for r in open_source(tiny_dir / "train.csv")]
    assert arrays["ids"].tolist() == ids
    dm = ImageTextDataModule(str(tiny_dir / "clip"), train=str(tiny_dir / "train.csv"), batch_size=64)
    batch = dm.collator(next(iter(dm.stream("train", dm.hparams.train, shuffle=False))))
    v, t = model.embed(batch)
    assert batch["id"].tolist() == ids[:64]
    for query, modality in ((v, "image"), (t, "text")):
        live = model.retriever(query, modality, exclude_ids=batch["id"], pair_images=v).rows
        cached = torch.tensor(arrays[f"{modality}_neighbours"][:64])
        # same search; only exact float ties between candidates may order differently
        assert (live == cached).float().mean() >= 0.98
    assert (arrays["image_neighbours"] >= 0).mean() > 0.9
    own = arrays["image_neighbours"][np.arange(192)] == np.arange(192)[:, None]
    assert not own.any(), "a pair's own memory row is never its neighbour"
    assert not (cache.parent / ".train.partial").exists() and not (cache / "build.json").exists()


def test_cached_and_on_the_fly_give_the_same_loss_on_the_same_batch(tiny_dir, cache):
    model = module(tiny_dir).eval()
    dm = ImageTextDataModule(str(tiny_dir / "clip"), train=str(tiny_dir / "train.csv"), batch_size=32)
    live = next(iter(dm.stream("train", dm.hparams.train, shuffle=False)))
    live = dm.collator(live)
    arrays = open_feature_cache(cache)
    rows = live["position"].numpy()  # row i of the cache is pair i of the source
    cached = {
        "image_emb": torch.from_numpy(np.asarray(arrays["image_emb"][rows], dtype=np.float32)),
        "text_emb": torch.from_numpy(np.asarray(arrays["text_emb"][rows], dtype=np.float32)),
        "id": live["id"],
        "image_neighbours": torch.from_numpy(np.asarray(arrays["image_neighbours"][rows])),
        "text_neighbours": torch.from_numpy(np.asarray(arrays["text_neighbours"][rows])),
    }
    with torch.no_grad():
        a, b = model(live, exclude_self=True), model(cached, exclude_self=True)
        loss_live = model.criterion(a["v"], a["t"], a["v_bar"], a["t_bar"])["loss"]
        loss_cached = model.criterion(b["v"], b["t"], b["v_bar"], b["t_bar"])["loss"]
    assert loss_live.item() == pytest.approx(loss_cached.item(), rel=2e-3)  # the cache stores fp16 embeddings


def test_stale_or_missing_cache_is_refused(tiny_dir, cache, tmp_path):
    with pytest.raises(FeatureCacheError, match="stale .*k: cache has 4, model needs 2"):
        open_feature_cache(cache, cache_requirements(module(tiny_dir, k=2), str(tiny_dir / "train.csv")))
    with pytest.raises(FeatureCacheError, match="search: cache has 'uni', model needs 'cross'"):
        open_feature_cache(
            cache, cache_requirements(module(tiny_dir, search="cross"), str(tiny_dir / "train.csv"))
        )
    with pytest.raises(FeatureCacheError, match="reco cache --config"):
        open_feature_cache(tmp_path / "nothing")


def test_cached_pairs_split_ranks_evenly_and_reshuffle(cache):
    arrays = open_feature_cache(cache)
    seen = []
    for rank in range(3):
        pairs = CachedPairs(arrays, batch_size=10, shuffle=True, seed=1, rank=rank, world_size=3)
        batches = list(pairs)
        assert len(batches) == len(pairs) == 7
        seen.extend(i for b in batches for i in b["id"].tolist())
    assert len(seen) == len(set(seen)) == 192
    pairs = CachedPairs(arrays, batch_size=192, shuffle=True, seed=1)
    first = next(iter(pairs))["id"].tolist()
    pairs.set_epoch(1)
    assert next(iter(pairs))["id"].tolist() != first


def test_fit_from_cache_is_one_yaml_field(tiny_dir, cache, tmp_path):
    root = cache.parent
    build_feature_cache(
        module(tiny_dir), str(tiny_dir / "val.csv"), root / "val", batch_size=64, trainer_kwargs=TRAINER
    )
    model = module(tiny_dir)
    dm = ImageTextDataModule(
        str(tiny_dir / "clip"),
        train=str(tiny_dir / "train.csv"),
        val=str(tiny_dir / "val.csv"),
        batch_size=32,
        feature_cache=str(root),
    )
    calls = []
    model.backbone.encode_images = lambda *a, **k: calls.append(1)  # must never run in cached mode
    pl.Trainer(
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        **{"accelerator": "cpu"},
    ).fit(model, dm)
    assert not calls and model.trainer.global_step == 4
    stale = module(tiny_dir, k=3)
    with pytest.raises(FeatureCacheError, match="stale"):
        pl.Trainer(max_steps=1, logger=False, enable_progress_bar=False, accelerator="cpu").fit(stale, dm)


def stamped(cache, directory, requirements):
    """A copy of ``cache`` whose manifest says it was computed for ``requirements``."""
    copy = directory / "cache"
    shutil.copytree(cache, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "requirements": requirements}))
    return copy


def test_cache_is_keyed_on_source_content_search_params_and_columns(tiny_dir, cache, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "images").symlink_to(tiny_dir / "images")
    lines = (tiny_dir / "train.csv").read_text().splitlines()
    csv = data / "train.csv"
    csv.write_text("\n".join([lines[0] + ",caption2", *(f"{line},other words" for line in lines[1:])]) + "\n")
    model = module(tiny_dir)
    copy = stamped(cache, tmp_path, cache_requirements(model, str(csv)))
    open_feature_cache(copy, cache_requirements(model, str(csv)))  # current

    # other columns of the same file decide other rows
    with pytest.raises(
        FeatureCacheError, match="caption_column: cache has 'caption', model needs 'caption2'"
    ):
        open_feature_cache(copy, cache_requirements(model, str(csv), caption_column="caption2"))
    # the CSV regenerated in place: same path, other pairs
    csv.write_text("\n".join([lines[0] + ",caption2", *(f"{line},x" for line in reversed(lines[1:]))]) + "\n")
    with pytest.raises(FeatureCacheError, match="stale .*source_content: cache has"):
        open_feature_cache(copy, cache_requirements(model, str(csv)))

    # a search-time knob of the memory's index (nprobe) decides which neighbours were found
    store = MemoryStore.open(tiny_dir / "memory")
    ivf = MemoryStore.write(
        tmp_path / "ivf",
        store.image_embeddings,
        store.text_embeddings,
        store.ids,
        backend={"class_path": "ivfpq", "init_args": {"nlist": 4, "m": 4, "nbits": 4, "nprobe": 1}},
        fingerprint=store.fingerprint,
        id_scheme=store.manifest["id_scheme"],
    )
    source = str(tiny_dir / "train.csv")
    one, four = (module(tiny_dir, memory=str(ivf), memory_search_params={"nprobe": n}) for n in (1, 4))
    probed = stamped(cache, tmp_path / "probed", cache_requirements(one, source))
    open_feature_cache(probed, cache_requirements(one, source))
    with pytest.raises(FeatureCacheError, match="stale .*memory_search: cache has"):
        open_feature_cache(probed, cache_requirements(four, source))
