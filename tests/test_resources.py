"""Shipped class-name and template sets for the RECO paper's evaluation datasets (package resources)."""

from __future__ import annotations

import importlib.resources
import re
import tomllib
from pathlib import Path

import pytest

from reco_lightning.data.zeroshot import (
    available_classname_sets,
    available_template_sets,
    load_classnames,
    load_templates,
)
from reco_lightning.metrics import build_prompts

EXPECTED_COUNTS = {
    "stanford_cars": 196,
    "cub200": 200,
    "flowers102": 102,
    "fgvc_aircraft": 100,
    "places365": 365,
    "imagenet": 1000,
}

# (set, label id, class name): label ids as torchvision / CLIP_benchmark index the dataset (0-based).
SPOT_CHECKS = [
    ("imagenet", 0, "tench"),
    ("imagenet", 1, "goldfish"),
    ("imagenet", 134, "crane bird"),
    ("imagenet", 207, "Golden Retriever"),
    ("imagenet", 281, "tabby cat"),
    ("imagenet", 517, "construction crane"),
    ("imagenet", 639, "one-piece bathing suit"),
    ("imagenet", 657, "missile"),
    ("imagenet", 744, "projectile"),
    ("imagenet", 836, "sunglass"),
    ("imagenet", 837, "sunglasses"),
    ("imagenet", 954, "banana"),
    ("imagenet", 999, "toilet paper"),
    ("flowers102", 0, "pink primrose"),
    ("flowers102", 49, "common dandelion"),
    ("flowers102", 101, "blackberry lily"),
    ("cub200", 0, "Black footed Albatross"),
    ("cub200", 16, "Cardinal"),
    ("cub200", 199, "Common Yellowthroat"),
    ("fgvc_aircraft", 0, "707-320"),
    ("fgvc_aircraft", 73, "F/A-18"),
    ("fgvc_aircraft", 99, "Yak-42"),
    ("places365", 0, "airfield"),
    ("places365", 8, "apartment building outdoor"),
    ("places365", 31, "bakery shop"),
    ("places365", 342, "underwater ocean deep"),
    ("places365", 364, "zen garden"),
    ("stanford_cars", 0, "AM General Hummer SUV 2000"),
    ("stanford_cars", 5, "Acura Integra Type R 2001"),
    ("stanford_cars", 195, "smart fortwo Convertible 2012"),
]

# Templates: CLIP's per-dataset prompt sets (imagenet: the 80-template ensemble; imagenet_simple: its 7-subset).
EXPECTED_TEMPLATE_COUNTS = {
    "stanford_cars": 8,
    "cub200": 1,
    "flowers102": 1,
    "fgvc_aircraft": 2,
    "places365": 2,
    "imagenet": 80,
    "imagenet_simple": 7,
}


def _raw_lines(kind: str, name: str) -> list[str]:
    resource = importlib.resources.files("reco_lightning") / "resources" / kind / f"{name}.txt"
    return resource.read_text(encoding="utf-8").splitlines()


def test_all_sets_are_listed():
    assert set(EXPECTED_COUNTS) <= set(available_classname_sets())
    assert set(EXPECTED_TEMPLATE_COUNTS) <= set(available_template_sets())


@pytest.mark.parametrize("name", sorted(EXPECTED_COUNTS))
def test_classnames_count_unique_clean(name):
    names = load_classnames(name)
    assert len(names) == EXPECTED_COUNTS[name]
    assert all(names), "empty class name"
    duplicates = sorted({n for n in names if names.count(n) > 1})
    assert not duplicates, f"{name}: duplicate class names {duplicates}"
    assert len({n.casefold() for n in names}) == len(names), f"{name}: names differ only by case"
    # The file itself: one name a line, no blank lines, no padding, no leftover raw-label syntax.
    raw = _raw_lines("classnames", name)
    assert raw == names
    assert not any("_" in n for n in raw), f"{name}: underscores left in names"
    assert not any(re.match(r"\d+\.", n) for n in raw), f"{name}: numeric id prefixes (CUB's '001.') left"


@pytest.mark.parametrize(("name", "index", "expected"), SPOT_CHECKS)
def test_classnames_label_order(name, index, expected):
    assert load_classnames(name)[index] == expected


def test_places365_names_have_no_path_syntax():
    names = load_classnames("places365")
    assert not any("/" in n for n in names)
    assert "archaeological excavation" in names
    # Indoor / outdoor variants stay apart once the slashes are gone.
    assert names.index("stage indoor") == 315 and names.index("stage outdoor") == 316


@pytest.mark.parametrize("name", sorted(EXPECTED_TEMPLATE_COUNTS))
def test_templates(name):
    templates = load_templates(name)
    assert len(templates) == EXPECTED_TEMPLATE_COUNTS[name]
    assert all(t.count("{c}") == 1 for t in templates)
    assert len(set(templates)) == len(templates)
    assert _raw_lines("templates", name) == templates


@pytest.mark.parametrize("name", sorted(EXPECTED_COUNTS))
def test_prompts_build(name):
    classnames, templates = load_classnames(name), load_templates(name)
    prompts = build_prompts(classnames, templates)
    assert len(prompts) == len(classnames) * len(templates)
    assert not any("{c}" in p for p in prompts)
    assert prompts[0] == templates[0].replace("{c}", classnames[0])


def test_spot_check_prompts():
    assert load_templates("flowers102") == ["a photo of a {c}, a type of flower."]
    assert load_templates("fgvc_aircraft")[0] == "a photo of a {c}, a type of aircraft."
    assert load_templates("cub200") == ["a photo of a {c}, a type of bird."]
    assert load_templates("stanford_cars")[:3] == [
        "a photo of a {c}.",
        "a photo of the {c}.",
        "a photo of my {c}.",
    ]
    assert load_templates("places365")[0] == "a photo of a {c}."
    imagenet = load_templates("imagenet")
    assert imagenet[0] == "a bad photo of a {c}." and imagenet[-1] == "a tattoo of the {c}."
    assert set(load_templates("imagenet_simple")) <= set(imagenet)


def test_package_data_glob_covers_resources():
    root = Path(__file__).resolve().parents[1]
    pyproject = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    globs = pyproject["tool"]["setuptools"]["package-data"]["reco_lightning"]
    package = root / "src" / "reco_lightning"
    covered = {p for pattern in globs for p in package.glob(pattern)}
    for kind in ("classnames", "templates"):
        for path in (package / "resources" / kind).iterdir():
            assert path in covered, f"{path.name} is not covered by package-data {globs}"
