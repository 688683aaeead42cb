"""Named seen/unseen splits of the demo, the per-run config and the protocol guard of a demo root."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from reco_lightning.apps.demo.fashion_mnist import (
    DEFAULT_SEEN_CLASSES,
    DEFAULT_SPLIT,
    DEMO_SPLITS,
    FASHION_MNIST_CLASSES,
    FashionMNISTError,
    resolve_split,
    split_name,
)
from reco_lightning.apps.demo.pipeline import (
    CONFIG,
    DemoLayout,
    class_groups,
    discard_if_protocol_changed,
    run_config,
)


def test_named_splits_are_proper_halves():
    assert DEMO_SPLITS[DEFAULT_SPLIT] == DEFAULT_SEEN_CLASSES
    for name, seen in DEMO_SPLITS.items():
        assert len(seen) == 5 and seen == tuple(sorted(seen)), name
        assert split_name(seen) == name
    # the two family splits are complements of each other
    assert set(DEMO_SPLITS["tops"]) | set(DEMO_SPLITS["shoes"]) == set(range(10))


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("tops", (0, 2, 4, 6, 8)),
        ("look-alikes", (0, 3, 4, 7, 8)),
        ("8,0", (0, 8)),
        ("coat, bag", (4, 8)),
        (["ankle boot", 1], (1, 9)),
    ],
)
def test_resolve_split(spec, expected):
    assert resolve_split(spec) == expected


@pytest.mark.parametrize("spec", ["hats", "coat,hats", "", "12", ",".join(FASHION_MNIST_CLASSES)])
def test_bad_split_is_one_line_naming_the_choices(spec):
    with pytest.raises(FashionMNISTError) as info:
        resolve_split(spec)
    message = str(info.value)
    assert "\n" not in message
    assert "tops" in message or "subset" in message


def test_cli_rejects_a_bad_split_in_one_line(tmp_path: Path):
    from reco_lightning.apps.main import main

    with pytest.raises(SystemExit) as info:
        main(["demo", "--out", str(tmp_path / "d"), "--split", "hats"])
    assert str(info.value).startswith("reco demo: unknown split or class 'hats'")


def test_split_name_of_a_custom_split():
    assert split_name((8, 1)) == "1-8"


def test_class_groups_partition_the_classes():
    groups = class_groups(DEMO_SPLITS["look-alikes"])
    assert groups["seen"] == ["t-shirt or top", "dress", "coat", "sneaker", "bag"]
    assert groups["unseen"] == ["trouser", "pullover", "sandal", "shirt", "ankle boot"]


def _evaluation_groups(config_path: Path) -> list[dict]:
    config = yaml.safe_load(config_path.read_text())
    return [
        dataset["class_groups"]
        for callback in config["trainer"]["callbacks"]
        for dataset in callback.get("init_args", {}).get("classification", [])
    ]


def test_shipped_config_evaluates_the_default_split():
    groups = _evaluation_groups(CONFIG)
    assert groups and all(g == class_groups(DEFAULT_SEEN_CLASSES) for g in groups)


def test_run_config_for_another_split_and_root(tmp_path: Path):
    layout = DemoLayout(tmp_path / "demo_x")
    path = run_config(layout, DEMO_SPLITS["shoes"])
    assert path == layout.root / "demo.yaml"
    groups = _evaluation_groups(path)
    assert groups and all(g == class_groups(DEMO_SPLITS["shoes"]) for g in groups)
    text = path.read_text()
    assert "artifacts/demo/" not in text and f"{layout.root}/memory_all" in text
    assert "&id" not in text  # no YAML anchors: each evaluation set has its own readable groups


def test_strict_protocol_config_trains_on_seen_pairs_and_memory(tmp_path: Path):
    layout = DemoLayout(tmp_path / "demo")
    config = yaml.safe_load(run_config(layout, protocol="strict", mix_alpha=0.3).read_text())
    assert config["model"]["memory"] == str(layout.memory_seen)
    assert config["data"]["init_args"]["train"] == str(layout.fusion_train)
    callbacks = {c["class_path"].rsplit(".", 1)[1]: c["init_args"] for c in config["trainer"]["callbacks"]}
    assert callbacks["ModelCheckpoint"]["monitor"].endswith("/reco/top1_seen_only")
    assert callbacks["ZeroShotEvaluation"]["mix_alpha"] == 0.3
    assert config["model"]["vote_weight"] == 16.0  # the strict protocol's vote (session 16)
    assert "known_memory" not in config["model"]  # the novelty gate is no longer its default
    open_config = yaml.safe_load(run_config(layout).read_text())
    assert open_config["model"]["memory"] == str(layout.memory_all)
    assert open_config["model"]["vote_weight"] == 4.0 and "known_memory" not in open_config["model"]
    for each in (
        config,
        open_config,
    ):  # both weigh the vote's neighbours, the lookups as the vote (session 17)
        assert each["model"]["vote_temperature"] == 0.003
        evaluation = next(
            c for c in each["trainer"]["callbacks"] if c["class_path"].endswith("ZeroShotEvaluation")
        )
        assert evaluation["init_args"]["lookup_temperature"] == 0.003
    assert open_config["data"]["init_args"]["train"] == str(layout.memory_pairs)


def test_default_run_uses_the_shipped_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    assert run_config(DemoLayout(Path("artifacts/demo"))) == CONFIG
    other = run_config(DemoLayout(Path("artifacts/demo")), DEMO_SPLITS["shoes"])
    assert other != CONFIG and other.is_file()
    assert run_config(DemoLayout(Path("artifacts/demo")), protocol="strict") != CONFIG


def test_protocol_change_discards_memories_and_caches(tmp_path: Path):
    layout = DemoLayout(tmp_path / "demo")
    for directory in (layout.memory_all, layout.memory_seen, layout.root / "cache" / "uni"):
        directory.mkdir(parents=True)
        (directory / "manifest.json").write_text("{}")
    first = {"seed": 0, "seen_classes": [0, 2, 4, 6, 8]}
    assert discard_if_protocol_changed(layout, first)  # no record yet: nothing can be trusted
    assert not layout.memory_all.exists() and not (layout.root / "cache").exists()
    assert json.loads(layout.protocol.read_text()) == first

    layout.memory_all.mkdir()
    assert not discard_if_protocol_changed(layout, dict(first))  # same protocol: kept (a build resumes)
    assert layout.memory_all.is_dir()

    assert discard_if_protocol_changed(layout, {**first, "seen_classes": [1, 3, 5, 7, 9]})
    assert not layout.memory_all.exists()


def test_calibration_reads_the_run_config_without_rewriting_it(tmp_path: Path):
    """A run's config carries its calibrated mix_alpha; reading the demo config for the next calibration
    (one per grid setting) must not put the template's value back into that file."""
    from reco_lightning.apps.demo.pipeline import _demo_config

    layout = DemoLayout(tmp_path / "demo")
    path = run_config(layout, protocol="strict", mix_alpha=0.3)
    before = path.read_text()
    assert _demo_config(layout, protocol="strict")["model"]["memory"] == str(layout.memory_seen)
    assert path.read_text() == before and "mix_alpha: 0.3" in before


def test_backbone_recipe_overrides():
    from reco_lightning.apps.demo.recipe import BackboneRecipe

    recipe = BackboneRecipe().replaced({"width": 128, "caption_templates": ["a {c}."]})
    assert recipe.width == 128 and recipe.caption_templates == ("a {c}.",)
    assert recipe.to_dict()["width"] == 128 and BackboneRecipe().width == 64
    with pytest.raises(ValueError, match=r"unknown BackboneRecipe field\(s\) \['widht'\]"):
        BackboneRecipe().replaced({"widht": 128})
    with pytest.raises(ValueError, match=r"\['seed'\] are set by other options \(seed by --seed\)"):
        BackboneRecipe().replaced({"seed": 3}, fixed={"seed": "--seed"})


def test_cli_refuses_a_bad_backbone_override_before_any_work(tmp_path: Path, capsys):
    from reco_lightning.apps.main import main

    out = tmp_path / "d"
    with pytest.raises(SystemExit):
        main(["demo", "--out", str(out), "--backbone", '{"widht": 128}'])
    err = capsys.readouterr().err.strip()
    assert err.startswith("reco: error: unknown BackboneRecipe field(s) ['widht']") and "\n" not in err
    assert not out.exists()
    with pytest.raises(SystemExit):
        main(["demo", "--out", str(out), "--backbone", '{"seed": 3}'])
    assert "['seed'] are set by other options (seed by --seed), not overrides" in capsys.readouterr().err
