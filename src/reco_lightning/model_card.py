"""The README.md model card of an export: what the fusion is, how to load it, what it was trained with, how it scored.

Generated from the export's own ``config.json`` (and the run's ``zeroshot_report.json`` when there is
one), so the card never says more than the files hold. The front matter follows the Hugging Face Hub's
model card metadata, so an export pushed to the Hub is indexed as a zero-shot image classifier.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

__all__ = ["model_card", "report_table"]

#: the report columns the card shows, in this order, when the report has them
CARD_METRICS = ("top1", "top5", "mean_per_class_recall", "top1_seen", "top1_unseen", "i2t_r@1", "t2i_r@1")


def report_table(report: Mapping[str, Any], max_rows: int = 40) -> str:
    """A markdown table of a ``zeroshot_report.json`` (``{"metrics": [...], "rows": [...]}``)."""
    rows = list(report.get("rows", []))[:max_rows]
    names = [m for m in CARD_METRICS if any(m in r.get("metrics", {}) for r in rows)]
    names = names or [m for m in report.get("metrics", []) if not m.startswith("leak")][:6]
    lines = [
        "| dataset | setting | " + " | ".join(names) + " |",
        "|---|---|" + "---:|" * len(names),
    ]
    for row in rows:
        metrics = row.get("metrics", {})
        cells = ["-" if metrics.get(name) is None else f"{float(metrics[name]):.2f}" for name in names]
        lines.append(f"| {row.get('dataset')} | {row.get('setting')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def model_card(config: Mapping[str, Any], report: Mapping[str, Any] | None = None) -> str:
    """The card of an export whose ``config.json`` is ``config``."""
    backbone = config.get("backbone", {})
    name = str(backbone.get("name_or_path", "?"))
    family = backbone.get("family", "clip")
    hub_name = not name.startswith((".", "/", "~")) and name.count("/") <= 1
    fusion = config.get("fusion_config", {})
    memory = config.get("memory") or {}
    front = [
        "---",
        "library_name: reco-lightning",
        "pipeline_tag: zero-shot-image-classification",
        "tags: [reco, retrieval-augmented, zero-shot-image-classification, " + f"{family}]",
        *([f"base_model: {name}"] if hub_name else []),
        "---",
    ]
    width = fusion.get("width") or backbone.get("dim")
    settings = [
        ("backbone", f"`{name}` ({family}, dim {backbone.get('dim')}, fingerprint `{backbone.get('id')}`)"),
        (
            "retrieval",
            f"k = {config.get('k')}, {config.get('search')}-modal search, {config.get('fusion')}-modal fusion",
        ),
        ("refined sides", ", ".join(s for s in ("image", "text") if config.get(f"refine_{s}")) or "none"),
        (
            "fusion",
            f"{fusion.get('num_layers')} layer(s), width {width}, {fusion.get('num_heads')} heads, "
            f"residual {fusion.get('residual')}, retrieved skip {fusion.get('retrieved_skip')}",
        ),
        ("temperature", f"{1.0 / float(config.get('logit_scale', 1.0)):.4f}"),
        (
            "control (no retrieval)",
            "yes: retrieved tokens are masked" if config.get("mask_retrieved") else "no",
        ),
    ]
    if config.get("known_memory"):
        checks = [
            f"that share above the {config[name]} quantile of what training rows see ({name})"
            if name == "novelty_share_quantile"
            else f"their best added row closer than training rows are, {config[name]} quantile ({name})"
            for name in ("novelty_share_quantile", "novelty_gap")
            if config.get(name) is not None
        ]
        whitened = (
            f" (an image: its added neighbours' caption mean through the memory's caption covariance, ridge "
            f"{config['novelty_whiten']}, novelty_whiten)"
            if config.get("novelty_whiten") is not None
            else ""
        )
        settings.append(
            (
                "novelty gate",
                f"on: queries with at least {config.get('novelty_threshold')} of their neighbours absent from "
                f"`{config['known_memory']}` (rows added after training){''.join(f', {c}' for c in checks)} "
                f"bypass the fusion{whitened}; pass `known_memory=` where that memory lives now, or None to turn "
                "it off",
            )
        )
    if config.get("vote_weight"):
        temperature = config.get("vote_temperature")
        weighting = "a plain mean" if temperature is None else f"softmax(cosine / {temperature}) weights"
        settings.append(
            (
                "memory's vote",
                f"on: refined embeddings carry the whitened k-NN lookup of the neighbours' captions (ridge "
                f"{config.get('vote_whiten')}, {weighting}) as a second block, weight {config['vote_weight']} "
                "(vote_weight): "
                f"refined embeddings have dim {2 * int(backbone.get('dim') or 0)}, twice the backbone's; "
                "`vote_weight=0` turns it off",
            )
        )
    if memory:
        settings.append(
            (
                "memory it was trained with",
                f"`{memory.get('path')}` ({memory.get('count', '?')} pairs, identity `{memory.get('identity')}`)",
            )
        )
    calibration = config.get("calibration") or {}
    if calibration:
        settings.append(("calibrated", ", ".join(f"{k} = {v}" for k, v in sorted(calibration.items()))))
    if config.get("checkpoint"):
        settings.append(("exported from", f"`{config['checkpoint']}`"))
    lines = [
        *front,
        "",
        f"# RECO fusion for {name}",
        "",
        "A retrieval-enhanced dual encoder (RECO, Iscen et al., ICLR 2024) trained with "
        "reco-lightning (the `reco_lightning` package): the frozen backbone's image and "
        "text embeddings are refined by a one-layer fusion transformer that reads the k nearest pairs "
        "retrieved from a memory of image-text pairs. This export holds only the two fusions and the "
        "temperature (`model.safetensors`); the backbone is loaded from where it lives and checked against "
        "the fingerprint in `config.json`.",
        "",
        "## Use",
        "",
        "```python",
        "from reco_lightning import RecoModel",
        "",
        'model = RecoModel.from_pretrained("THIS_DIRECTORY", memory="MEMORY_DIRECTORY")',
        'image_emb = model.encode_image(["photo.jpg"])',
        'text_emb = model.encode_text(["a photo of a cat"])',
        'print(model.classifier(["cat", "dog"]).predict(["photo.jpg"]))',
        "```",
        "",
        "The memory must be built with the same backbone (`reco memory build --backbone ...`); any such "
        "memory works, a bigger one usually better.",
        "",
        "## Settings",
        "",
        "| | |",
        "|---|---|",
        *[f"| {key} | {value} |" for key, value in settings],
        "",
        "## Evaluation",
        "",
    ]
    if report and report.get("rows"):
        shown = {row.get("setting") for row in report["rows"]}
        meanings = [
            (name, meaning)
            for name, meaning in (
                ("clip", "the frozen backbone"),
                ("reco", "this fusion (with the memory's vote where it has one)"),
                ("reco_without_vote", "this fusion without the memory's vote"),
                ("lookup", "training-free retrieval over the same memory"),
                ("lookup_whitened", "the same, whitened by the memory's captions"),
                ("mix", "training-free retrieval over the same memory"),
            )
            if name in shown
        ]
        said = "; ".join(f"`{name}` {meaning}" for name, meaning in meanings)
        lines += [
            f"Zero-shot results of the training run (its `zeroshot_report.json`{'; ' + said if said else ''}):",
            "",
            report_table(report),
        ]
    else:
        lines += ["No evaluation report was found beside the checkpoint; none is claimed.", ""]
    lines += [
        "## Files",
        "",
        "- `model.safetensors`: `image_fusion.*`, `text_fusion.*`, `logit_scale`",
        "- `config.json`: backbone fingerprint, settings, memory, calibration (format "
        f"`{config.get('format')}`)",
        "",
        "<details><summary>config.json</summary>",
        "",
        "```json",
        json.dumps(dict(config), indent=2, sort_keys=True),
        "```",
        "",
        "</details>",
        "",
    ]
    return "\n".join(lines)
