"""configs/vit-b32.yaml end to end on CPU: a randomly initialised CLIP of ViT-B/32 sizes saved locally.

The config is run as shipped except for what a CPU test must change: paths (backbone, memory, shards, the
evaluation set), the accelerator (cpu, 1 device, no DDP) and the batch size; `fast_dev_run` runs one
training and one validation batch, then `reco test` scores the config's settings on a tiny CLIP_benchmark
layout set. The backbone has ViT-B/32's shapes (vision width 768, patch 32, 224 px; text width 512; 12
layers each; embedding 512; 77 tokens) except its vocabulary (a small BPE built offline).
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import yaml
from PIL import Image

from helpers_data import write_shards
from reco_lightning.cli import main
from reco_lightning.tiny_clip import build_clip_tokenizer, new_clip, save_clip

CONFIG = Path(__file__).parents[1] / "configs" / "vit-b32.yaml"


@pytest.fixture(scope="module")
def vitb32_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vitb32")
    tokenizer = build_clip_tokenizer([f"a photo number {i}" for i in range(64)], max_merges=200)
    model = new_clip(
        tokenizer,
        embed_dim=512,
        text_width=512,
        vision_width=768,
        layers=12,
        heads=8,
        image_size=224,
        patch_size=32,
        max_text_len=77,
    )
    save_clip(root / "clip", model, tokenizer)
    write_shards(root / "train", [8, 8])
    write_shards(root / "val", [8])
    main(
        [
            "memory", "build", "--source", str(root / "train" / "{00000..00001}.tar"), "--out",
            str(root / "memory"), "--backbone", str(root / "clip"), "--backend", "exact",
            "--accelerator", "cpu", "--devices", "1", "--batch_size", "8",
        ]
    )  # fmt: skip
    evaluation = root / "eval"
    (evaluation / "test").mkdir(parents=True)
    (evaluation / "classnames.txt").write_text("red car\ngreen car\nblue car\n")
    with tarfile.open(evaluation / "test" / "0.tar", "w") as tar:
        for i, colour in enumerate([(200, 0, 0), (0, 200, 0), (0, 0, 200), (190, 10, 0)]):
            buffer = io.BytesIO()
            Image.new("RGB", (16, 16), colour).save(buffer, format="PNG")
            for ext, data in (("png", buffer.getvalue()), ("cls", str(i % 3).encode())):
                info = tarfile.TarInfo(f"s{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return root


def _run_config(root: Path, tmp_path: Path) -> Path:
    """configs/vit-b32.yaml with this machine's paths and a CPU trainer; every other setting as shipped."""
    config = yaml.safe_load(CONFIG.read_text())
    config["trainer"].update(accelerator="cpu", devices=1, strategy="auto", default_root_dir=str(tmp_path))
    evaluation = config["trainer"]["callbacks"][0]["init_args"]
    first = evaluation["classification"][0]
    # one small set in the shipped layout: the class list of the set itself (3 classes), the config's templates
    evaluation["classification"] = [{**first, "root": str(root / "eval"), "classnames": None}]
    evaluation["num_workers"] = 0
    config["model"].update(backbone=str(root / "clip"), memory=str(root / "memory"))
    config["data"]["init_args"].update(
        train=str(root / "train" / "{00000..00001}.tar"),
        val=str(root / "val" / "00000.tar"),
        batch_size=8,
        num_workers=0,
    )
    path = tmp_path / "vit-b32.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_shipped_config_keeps_the_paper_recipe():
    config = yaml.safe_load(CONFIG.read_text())
    model = config["model"]
    assert model["backbone"] == "openai/clip-vit-base-patch32"
    assert (model["k"], model["search"], model["fusion"]) == (10, "uni", "cross")
    assert model["fusion_config"]["num_layers"] == 1
    trainer = config["trainer"]
    assert (trainer["strategy"], trainer["precision"]) == ("ddp", "bf16-mixed")
    sets = config["trainer"]["callbacks"][0]["init_args"]["classification"]
    assert {s["name"] for s in sets} == {"cars", "cub", "flowers", "aircraft", "places365", "imagenet"}
    assert all(s["during"] == "test" for s in sets), "checkpoints must not be picked on test sets"


def test_vitb32_config_runs_end_to_end_on_cpu(vitb32_dir, tmp_path):
    config = _run_config(vitb32_dir, tmp_path)
    main(["fit", "--config", str(config), "--trainer.fast_dev_run=true"])
    main(["test", "--config", str(config), "--trainer.fast_dev_run=true"])
    report = next(tmp_path.rglob("zeroshot_report.json")).read_text()
    for setting in ("clip", "lookup", "mix", "reco"):
        assert f'"{setting}"' in report


def test_vitb32_print_config_round_trips(vitb32_dir, tmp_path, capsys):
    config = _run_config(vitb32_dir, tmp_path)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config), "--print_config"])
    printed = capsys.readouterr().out
    (tmp_path / "printed.yaml").write_text(printed)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(tmp_path / "printed.yaml"), "--print_config"])
    assert capsys.readouterr().out == printed
    parsed = yaml.safe_load(printed)
    assert parsed["model"]["fusion_config"]["num_heads"] == 8
    assert parsed["trainer"]["precision"] == "bf16-mixed"
