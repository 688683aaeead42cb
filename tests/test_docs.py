"""The documentation's shape, checked: a short README, links into docs/ that resolve, one Python example.

The README says what the package is and how to start; everything else lives in docs/ pages it links.
Every relative link (``[text](path)`` and ``![alt](path)``) in README.md and docs/*.md must name an
existing file relative to the file holding it, and an ``#anchor`` must name a heading of its target.
The link extractor checks itself on a synthetic page first, so a broken extractor cannot pass vacuously.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 300

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$", re.M)
EXAMPLE = re.compile(r"<!-- python-example:start -->\n```python\n(.*?)```\n<!-- python-example:end -->", re.S)


def pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def _prose(text: str) -> str:
    """The text without fenced code blocks and code spans (a ``[x](y)`` there is code, not a link)."""
    return CODE_SPAN.sub("code", FENCE.sub("", text))


def links(text: str) -> list[str]:
    """Relative link targets of a markdown text, ``#fragment`` kept; web, mail and same-page links dropped."""
    found = []
    for match in LINK.finditer(_prose(text)):
        target = match.group(1)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # http(s)://, mailto:, ... and anchors on the same page
        found.append(target)
    return found


def slug(heading: str) -> str:
    """GitHub's anchor for a heading (ASCII headings: lowercase, punctuation but ``-`` and ``_`` dropped)."""
    text = CODE_SPAN.sub(lambda m: m.group(0)[1:-1], heading).strip().lower()
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link in a heading reads as its text
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for match in HEADING.finditer(FENCE.sub("", text)):
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def broken_links(page: Path) -> list[str]:
    """'target (why)' for each relative link of ``page`` that does not resolve."""
    broken = []
    for target in links(page.read_text()):
        path, _, fragment = target.partition("#")
        file = (page.parent / path).resolve()
        shown = file.relative_to(ROOT) if file.is_relative_to(ROOT) else file
        if not file.is_file():
            broken.append(f"{target} (no file {shown})")
        elif fragment and file.suffix == ".md" and fragment not in anchors(file.read_text()):
            broken.append(f"{target} (no heading #{fragment} in {shown})")
    return broken


def test_link_extractor_checks_itself(tmp_path):
    """On a synthetic page: every kind of link is found or skipped as it should be, and a broken one is
    reported (so the tests below could fail)."""
    page = """# Title

See [a page](other.md), [a section](other.md#the-part), ![a plot](img/plot.png "a title"),
[the web](https://example.com/x.md), [here](#title), [mail](mailto:a@b.c) and [`code`](code.md).
[gone](missing.md), [no section](other.md#nowhere), `values[0](x.md)` in code, and a [link
over two lines](code.md#code).

```python
x = values[0](1)  # [not](a-link.md)
```
"""
    assert links(page) == [
        "other.md",
        "other.md#the-part",
        "img/plot.png",
        "code.md",
        "missing.md",
        "other.md#nowhere",
        "code.md#code",
    ]
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "plot.png").write_bytes(b"")
    (tmp_path / "code.md").write_text("# Code\n")
    (tmp_path / "other.md").write_text("# Other\n\n## The part\n\n```bash\n# not a heading\n```\n")
    source = tmp_path / "page.md"
    source.write_text(page)
    broken = [entry.split(" ")[0] for entry in broken_links(source)]
    assert broken == ["missing.md", "other.md#nowhere"]
    assert (
        slug("Memory backends (`benchmarks/memory_backends.py`)")
        == "memory-backends-benchmarksmemory_backendspy"
    )
    assert slug("Set-up: two commands") == "set-up-two-commands"
    assert anchors("# A\n## A\n") == {"a", "a-1"}


def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines (at most {MAX_README_LINES})"


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    assert broken_links(page) == []


def test_readme_links_every_docs_page():
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in links(README.read_text())}
    pages_ = sorted(DOCS.glob("*.md"))
    assert pages_, "docs/ has no pages"
    assert [p.name for p in pages_ if p.resolve() not in linked] == []


def test_readme_has_exactly_one_python_example():
    text = README.read_text()
    assert text.count("<!-- python-example:start -->") == 1
    assert text.count("<!-- python-example:end -->") == 1
    (example,) = EXAMPLE.findall(text)
    assert "RecoModel.from_pretrained" in example


def test_configuration_reference_names_every_option():
    from reco_lightning.fusion import FusionConfig
    from reco_lightning.losses import LossConfig

    reference = (DOCS / "configuration.md").read_text()
    missing = [
        f"{cls.__name__}.{field.name}"
        for cls in (FusionConfig, LossConfig)
        for field in dataclasses.fields(cls)
        if f"`{field.name}`" not in reference
    ]
    assert missing == []


def test_results_table_is_the_generated_one(tmp_path, monkeypatch):
    """docs/results.md holds what benchmarks/demo_accuracy.py renders from its committed JSON, between the
    markers the script rewrites (and the script rewrites only between them)."""
    from helpers_benchmarks import load_benchmark

    demo_accuracy = load_benchmark("demo_accuracy")
    assert demo_accuracy.RESULTS == DOCS / "results.md"
    rendered = demo_accuracy.table(json.loads((ROOT / "benchmarks/results/demo_accuracy.json").read_text()))
    page = demo_accuracy.RESULTS.read_text()
    assert page.count(demo_accuracy.START) == 1 and page.count(demo_accuracy.END) == 1
    assert page.split(demo_accuracy.START, 1)[1].split(demo_accuracy.END, 1)[0] == "\n" + rendered

    copy = tmp_path / "results.md"
    copy.write_text(f"head\n{demo_accuracy.START}\nold\n{demo_accuracy.END}\ntail\n")
    monkeypatch.setattr(demo_accuracy, "RESULTS", copy)
    demo_accuracy.update_readme("| new |\n")
    assert copy.read_text() == f"head\n{demo_accuracy.START}\n| new |\n{demo_accuracy.END}\ntail\n"
