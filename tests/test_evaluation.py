import json
import os
from pathlib import Path

import pytest
import torch

from reco_lightning.data.zeroshot import ImageFolderClassification
from reco_lightning.evaluation import (
    DEFAULT_LEAKAGE_THRESHOLD,
    ClassificationSet,
    RetrievalSet,
    ZeroShotEvaluation,
)
from reco_lightning.metrics import classification_metrics
from reco_lightning.model import RecoModule


@pytest.fixture(scope="module")
def module(tiny_dir):
    torch.manual_seed(0)
    m = RecoModule(
        backbone=str(tiny_dir / "clip"), memory=str(tiny_dir / "memory"), k=4, fusion_config={"num_heads": 4}
    )
    m.setup("test")
    return m.eval()


def callback(tiny_dir, **kwargs):
    groups = {"reds": ["red circle", "red square", "red triangle"]}
    return ZeroShotEvaluation(
        classification=[
            ClassificationSet(
                "shapes", str(tiny_dir / "zeroshot"), templates="clip_generic", class_groups=groups
            )
        ],
        retrieval=[RetrievalSet("captions", str(tiny_dir / "val.csv"))],
        **{"settings": ["clip", "reco", "reco_image", "reco_text"], "batch_size": 16, **kwargs},
    )


def test_every_setting_is_reported_and_evaluation_is_deterministic(module, tiny_dir):
    cb = callback(tiny_dir, k_sweep=[1, 4])
    first, sweep = cb.evaluate(module)
    second, _ = cb.evaluate(module)
    assert first.to_json() == second.to_json()
    rows = {(r.dataset, r.setting): r.metrics for r in first.rows}
    assert set(rows) == {
        ("shapes", s) for s in ("clip", "reco", "reco_image", "reco_text", "reco@k=1", "reco@k=4")
    } | {("captions", s) for s in ("clip", "reco", "reco_image", "reco_text")}
    assert rows["shapes", "reco@k=4"] == rows["shapes", "reco"], "the trained k is 4"
    assert set(sweep["shapes"]) == {"reco", "clip"} and set(sweep["shapes"]["reco"]) == {1, 4}
    assert {"top1", "top5", "mean_per_class_recall", "top1_reds"} <= set(rows["shapes", "clip"])
    assert {"image_to_text_R@1", "text_to_image_R@10"} <= set(rows["captions", "reco_text"])


def test_clip_row_equals_a_hand_computed_zero_shot_classifier(module, tiny_dir):
    from reco_lightning.data.zeroshot import ImageFolderClassification, load_templates

    report, _ = callback(tiny_dir, settings=["clip"]).evaluate(module)
    data = ImageFolderClassification(tiny_dir / "zeroshot")
    templates = load_templates("clip_generic")
    clip = module.backbone
    weights = torch.stack(
        [
            torch.nn.functional.normalize(
                clip.encode_captions([t.replace("{c}", c) for t in templates]).mean(0), dim=0
            )
            for c in data.classnames
        ]
    )
    images, labels = zip(*[data[i] for i in range(len(data))], strict=True)
    scores = clip.encode_images(clip.preprocess_images(images)) @ weights.t()
    expected = classification_metrics(scores, torch.tensor(labels))
    got = next(r.metrics for r in report.rows if r.setting == "clip" and r.dataset == "shapes")
    assert got["top1"] == pytest.approx(expected["top1"]) and got["top5"] == pytest.approx(expected["top5"])
    labels = torch.tensor(labels)
    red = torch.isin(
        labels, torch.tensor([data.classnames.index(f"red {s}") for s in ("circle", "square", "triangle")])
    )
    assert red.sum() == 12
    assert got["top1_reds"] == pytest.approx(classification_metrics(scores[red], labels[red])["top1"])
    # the red images among the red classes only: the argmax over those three columns
    reds = torch.tensor([data.classnames.index(f"red {s}") for s in ("circle", "square", "triangle")])
    among_reds = (
        scores[red][:, reds].argmax(1) == (labels[red].unsqueeze(1) == reds).int().argmax(1)
    ).float()
    assert got["top1_reds_only"] == pytest.approx(100 * among_reds.mean().item())
    assert got["top1_reds_only"] >= got["top1_reds"]  # fewer classes to confuse them with


def test_bad_configuration_is_refused(tiny_dir, module):
    with pytest.raises(ValueError, match="unknown zero-shot settings"):
        ZeroShotEvaluation(classification=[ClassificationSet("x", "y")], settings=["clip", "best"])
    with pytest.raises(ValueError, match="at least one classification or retrieval set"):
        ZeroShotEvaluation()
    with pytest.raises(ValueError, match="lookup_whiten is a ridge > 0"):
        ZeroShotEvaluation(classification=[ClassificationSet("x", "y")], lookup_whiten=0.0)
    bad = ZeroShotEvaluation(
        classification=[
            ClassificationSet("s", str(tiny_dir / "zeroshot"), class_groups={"g": ["purple hexagon"]})
        ]
    )
    with pytest.raises(ValueError, match=r"class_groups.g of s names unknown classes \['purple hexagon'\]"):
        bad.evaluate(module)


def test_leakage_guard_is_reported_per_set_and_can_be_turned_off(module, tiny_dir):
    """Rows that read image neighbours report what the guard excluded; clip rows and a disabled guard don't."""
    sets = [ClassificationSet("shapes", str(tiny_dir / "zeroshot"), templates="clip_generic")]
    on, _ = ZeroShotEvaluation(classification=sets, settings=["clip", "reco", "lookup"]).evaluate(module)
    rows = {r.setting: r.metrics for r in on.rows}
    assert "leak_images" not in rows["clip"]
    assert rows["reco"]["leak_images"] == rows["lookup"]["leak_images"] >= 0
    assert rows["reco"]["leak_items"] >= rows["reco"]["leak_images"]
    off, _ = ZeroShotEvaluation(classification=sets, settings=["reco"], leakage_threshold=None).evaluate(
        module
    )
    assert "leak_images" not in off.rows[0].metrics
    # a threshold every memory image passes excludes pairs for every image (and the report says so)
    everything, _ = ZeroShotEvaluation(
        classification=sets, settings=["reco"], leakage_threshold=-1.0
    ).evaluate(module)
    assert everything.rows[0].metrics["leak_images"] == len(ImageFolderClassification(tiny_dir / "zeroshot"))


def test_retrieval_guards_images_and_captions_and_counts_each_once(module, tiny_dir):
    """Retrieval rows report the guard of each side that reads neighbours, counted once however many
    settings read the same search: images against themselves, captions against their own images."""
    from reco_lightning.data.zeroshot import RetrievalPairs

    owners = RetrievalPairs(str(tiny_dir / "val.csv")).text_to_image
    sets = [RetrievalSet("captions", str(tiny_dir / "val.csv"))]
    settings = ["clip", "reco", "lookup", "mix", "reco_image", "reco_text"]
    everything, _ = ZeroShotEvaluation(retrieval=sets, settings=settings, leakage_threshold=-1.0).evaluate(
        module
    )
    rows = {r.setting: r.metrics for r in everything.rows}
    images, captions = int(owners.max()) + 1, len(owners)
    assert not any(key.startswith("leak") for key in rows["clip"])
    for setting in ("reco", "mix"):
        assert rows[setting]["leak_images"] == images and rows[setting]["leak_captions"] == captions
    assert "leak_captions" not in rows["lookup"] and rows["lookup"]["leak_images"] == images  # frozen text
    assert "leak_captions" not in rows["reco_image"] and rows["reco_image"]["leak_images"] == images
    assert "leak_images" not in rows["reco_text"] and rows["reco_text"]["leak_captions"] == captions
    off, _ = ZeroShotEvaluation(retrieval=sets, settings=["reco"], leakage_threshold=None).evaluate(module)
    assert not any(key.startswith("leak") for key in off.rows[0].metrics)


def _gated_module(tiny_dir, known):
    """The tiny RECO with a novelty gate whose training memory (``known``) lacks every other row of the
    attached one: half the memory is added, many queries are gated (the share alone, at 0.5)."""
    import numpy as np

    from reco_lightning.memory.store import MemoryStore

    if not (known / "ids.npy").is_file():
        ids = np.asarray(MemoryStore.open(tiny_dir / "memory", load_indexes=False).ids)
        known.mkdir(exist_ok=True)
        np.save(known / "ids.npy", ids[::2])
    torch.manual_seed(0)
    gated = RecoModule(
        backbone=str(tiny_dir / "clip"),
        memory=str(tiny_dir / "memory"),
        k=4,
        fusion_config={"num_heads": 4},
        known_memory=str(known),
        novelty_threshold=0.5,
        novelty_share_quantile=None,
    )
    gated.setup("test")
    return gated.eval()


GATE_SETTINGS = ["clip", "reco", "reco_image", "reco_text", "lookup"]


def _gate_evaluation(tiny_dir) -> ZeroShotEvaluation:
    sets = [ClassificationSet("shapes", str(tiny_dir / "zeroshot"), templates="clip_generic")]
    return ZeroShotEvaluation(classification=sets, settings=GATE_SETTINGS, k_sweep=[2], batch_size=8)


def test_the_queries_the_novelty_gate_answers_from_the_added_memory_are_counted(module, tiny_dir, tmp_path):
    """With ``known_memory`` the rows whose image side is RECO's report ``gated_images`` (the images the
    gate answered from the added rows) and those whose text side is RECO's ``gated_prompts`` (the class
    prompts it kept frozen), as ``gated_queries`` decides them over the same neighbours; other rows, the
    k sweep's, and a model without a gate report neither."""
    from reco_lightning.data.zeroshot import load_templates
    from reco_lightning.metrics import build_prompts
    from reco_lightning.pretrained import gated_queries

    gated = _gated_module(tiny_dir, tmp_path / "known")
    evaluation = _gate_evaluation(tiny_dir)
    report, _ = evaluation.evaluate(gated)
    rows = {r.setting: r.metrics for r in report.rows}
    data = ImageFolderClassification(str(tiny_dir / "zeroshot"))
    images = torch.cat(
        [gated.backbone.encode_images(inputs) for inputs, _ in evaluation._loader(data, gated)]
    )
    found = gated.neighbours(images, "image", leak_threshold=DEFAULT_LEAKAGE_THRESHOLD)
    expected = int(gated_queries(gated.retriever, images, "image", found).sum())
    assert 0 < expected < len(images)
    assert rows["reco"]["gated_images"] == rows["reco_image"]["gated_images"] == expected
    texts = build_prompts(data.classnames, load_templates("clip_generic"))
    novel = []
    for start in range(0, len(texts), 8):  # the evaluation's batches: captions tie, and ties depend on them
        prompts = gated.backbone.encode_captions(texts[start : start + 8])
        novel.append(gated_queries(gated.retriever, prompts, "text", gated.neighbours(prompts, "text")))
    expected = int(torch.cat(novel).sum())
    assert 0 < expected < len(texts)
    assert rows["reco"]["gated_prompts"] == rows["reco_text"]["gated_prompts"] == expected
    assert all("gated_images" not in rows[s] for s in ("clip", "reco_text", "lookup", "reco@k=2"))
    assert all("gated_prompts" not in rows[s] for s in ("clip", "reco_image", "lookup", "reco@k=2"))
    plain, _ = ZeroShotEvaluation(classification=evaluation.classification, settings=["reco"]).evaluate(
        module
    )
    assert not any(key.startswith("gated") for key in plain.rows[0].metrics)


def _ddp_evaluation_worker(rank: int, store: str, tiny_dir: str, known: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        report, _ = _gate_evaluation(Path(tiny_dir)).evaluate(
            _gated_module(Path(tiny_dir), Path(known)), rank, 2
        )
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(report.to_json()))
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()
    os._exit(0)  # gloo can abort a process at interpreter finalisation (see tests/test_losses.py)


def test_two_ranks_report_the_counts_of_one_process(tiny_dir, tmp_path):
    """Under DDP each rank evaluates a share of the images: the accuracies, what the leakage guard excluded
    and the gated images are the sums over both ranks, equal to one process's report (prompts: each rank's
    own, all of them)."""
    import torch.multiprocessing as mp

    known = tmp_path / "known"
    single, _ = _gate_evaluation(tiny_dir).evaluate(_gated_module(tiny_dir, known))
    mp.start_processes(
        _ddp_evaluation_worker,
        args=(str(tmp_path / "store"), str(tiny_dir), str(known), str(tmp_path)),
        nprocs=2,
        start_method="spawn",
    )
    want = {(r.dataset, r.setting): r.metrics for r in single.rows}
    assert want["shapes", "reco"]["gated_images"] > 0 and want["shapes", "reco"]["leak_images"] >= 0
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        rows = {(r["dataset"], r["setting"]): r["metrics"] for r in got["rows"]}
        assert rows.keys() == want.keys()
        for key, metrics in want.items():
            assert rows[key].keys() == metrics.keys(), key
            for name, value in metrics.items():
                assert rows[key][name] == pytest.approx(value, abs=1e-6), (key, name)
