"""The package's shape, checked: layers import only downward, no cycles, the apps apart from the library.

Every import counts, function-level and TYPE_CHECKING ones too (they are dependencies all the same).
The layers are docs/architecture.md's; a new module must be placed in one here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src"
PACKAGE = "reco_lightning"

# bottom-up; a module may import modules of its own layer or below (prefix match, longest wins)
LAYERS: list[tuple[str, ...]] = [
    (
        "errors",
        "types",
        "atomic",
        "arrays",
        "optim",
        "hashing",
        "console",
    ),  # foundation: no torch models, no Lightning
    ("encoders", "fusion", "losses", "metrics", "pooling", "tiny_clip", "memory"),  # components
    # memory + embeddings -> neighbours (and what is new in them, the memory's whitening of answers, its vote)
    ("retrieval", "baselines", "novelty", "whitening", "vote"),
    ("data",),  # sources -> shards/records -> stream -> collate -> datamodule; feature cache reader
    ("jobs",),  # resumable multi-device predict jobs that write to disk (memory build, feature cache)
    (
        "model_card",
        "pretrained",
        "export",
    ),  # RecoModel: the trained RECO at inference, its export; no Lightning
    ("model",),  # RecoModule (trains the RecoModel's fusions)
    ("evaluation", "calibration", "prediction"),  # callbacks (evaluation, embedding export), sweeps
    ("cli",),  # the library's commands
    ("apps",),  # the demo, the tiny setup, the `reco` script: on top, imported by nothing below
]
NO_LIGHTNING = ("errors", "console", "types", "atomic", "arrays", "optim", "hashing", "encoders", "fusion", "losses", "metrics",
                "pooling", "memory", "retrieval", "baselines", "novelty", "whitening", "vote", "model_card", "pretrained",
                "export")  # fmt: skip


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(path: Path, name: str) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: up (level - 1) packages from this module's package
                parts = package.split(".")
                base = ".".join([*parts[: len(parts) - node.level + 1], base]).strip(".")
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return out


def _layer(module: str) -> int:
    rel = module.removeprefix(PACKAGE + ".")
    best = None
    for index, names in enumerate(LAYERS):
        for name in names:
            if rel == name or rel.startswith(name + "."):
                best = index
    if best is None:
        raise AssertionError(f"{module} is in no layer of tests/test_architecture.py: place it there")
    return best


MODULES = _modules()
GRAPH = {
    name: {m for m in _imports(path, name) if m in MODULES and m != name and m != PACKAGE}
    for name, path in MODULES.items()
    if name != PACKAGE
}


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_point_down(module):
    here = _layer(module)
    upward = sorted(m for m in GRAPH[module] if _layer(m) > here)
    assert not upward, f"{module} (layer {here}) imports upward: {upward}"


def test_no_import_cycles():
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                cycle = trail[trail.index(nxt) :] if nxt in trail else trail
                raise AssertionError(f"import cycle: {' -> '.join([*cycle, nxt])}")
            if nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for node in sorted(GRAPH):
        if node not in state:
            visit(node, [node])


@pytest.mark.parametrize(
    "module", [m for m in sorted(GRAPH) if m.removeprefix(PACKAGE + ".").startswith(NO_LIGHTNING)]
)
def test_lower_layers_do_not_import_lightning(module):
    used = {m.split(".")[0] for m in _imports(MODULES[module], module)}
    assert not used & {"pytorch_lightning", "lightning"}, f"{module} imports the training framework"


def test_the_checks_can_fail():
    """A module importing upward, and a two-module cycle, are caught by the same code."""
    assert _layer(f"{PACKAGE}.memory.store") < _layer(f"{PACKAGE}.model") < _layer(f"{PACKAGE}.apps.main")
    GRAPH["reco_lightning.memory.store"].add("reco_lightning.model")
    try:
        with pytest.raises(AssertionError, match="imports upward"):
            test_imports_point_down("reco_lightning.memory.store")
        with pytest.raises(AssertionError, match="import cycle"):
            test_no_import_cycles()
    finally:
        GRAPH["reco_lightning.memory.store"].discard("reco_lightning.model")
