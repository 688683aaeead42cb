"""Model-independent zero-shot evaluation: class embeddings, metrics, reports and plots.

Everything here works on embeddings, scores and callables, so the same code scores plain CLIP and every
RECO setting (the module refines embeddings, this file only compares them). No Lightning, no faiss.

Tie handling (the same everywhere in this file): when two candidates have exactly the same score, the one
with the lower index ranks first. ``torch.topk`` does not guarantee any order among equal values (on CPU it
returns tied indices in arbitrary order), so ranks are computed explicitly instead:
``rank(j) = #{i : s_i > s_j} + #{i < j : s_i == s_j}`` and a candidate is in the top k iff ``rank < k``.
This is exactly the position of j in a stable descending sort, without sorting.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from reco_lightning.atomic import atomic_write_bytes

__all__ = [
    "EvaluationReport",
    "EvaluationRow",
    "ZeroShotClassificationAccumulator",
    "build_class_embeddings",
    "build_prompts",
    "class_embeddings_from_prompt_embeddings",
    "classification_metrics",
    "group_transfer_rates",
    "plot_k_sweep",
    "retrieval_metrics",
]

PLACEHOLDER = "{c}"


# --------------------------------------------------------------------------------------------------------
# Class embeddings
# --------------------------------------------------------------------------------------------------------


def build_prompts(classnames: Sequence[str], templates: Sequence[str]) -> list[str]:
    """All prompts in class-major order (class 0 with every template, then class 1, ...).

    Exposed so a caller that refines prompt embeddings itself (RECO) encodes them in the exact order that
    :func:`class_embeddings_from_prompt_embeddings` expects. ``{c}`` is substituted with ``str.replace``
    rather than ``str.format`` so templates or class names containing other braces cannot break it.
    """
    if not classnames:
        raise ValueError("classnames is empty: a zero-shot classifier needs at least one class")
    if not templates:
        raise ValueError("templates is empty: pass at least one template such as 'a photo of a {c}.'")
    for i, template in enumerate(templates):
        if PLACEHOLDER not in template:
            raise ValueError(
                f"template {i} ({template!r}) has no '{{c}}' placeholder: add one where the class name goes"
            )
    return [template.replace(PLACEHOLDER, name) for name in classnames for template in templates]


def class_embeddings_from_prompt_embeddings(
    prompt_emb: Tensor, num_classes: int | None = None, num_templates: int | None = None, blocks: int = 1
) -> Tensor:
    """Reduce prompt embeddings to one classifier row per class, the CLIP way.

    Each prompt embedding is L2-normalised (so no template dominates the average), averaged over templates,
    and the mean renormalised. Accepts ``[C, T, D]`` or class-major ``[C*T, D]`` (the order of
    :func:`build_prompts`). The average runs in float32 at least; the result has the input dtype.
    ``blocks`` > 1: embeddings made of that many equal blocks (a vote's, :mod:`reco_lightning.vote`) are
    averaged block by block, each block keeping its share of the norm, so a class scores against an image
    as the sum of its blocks' class scores.
    """
    if prompt_emb.ndim == 3:
        c, t, _ = prompt_emb.shape
        if num_classes is not None and num_classes != c:
            raise ValueError(f"prompt_emb has {c} classes on dim 0 but num_classes={num_classes}")
        if num_templates is not None and num_templates != t:
            raise ValueError(f"prompt_emb has {t} templates on dim 1 but num_templates={num_templates}")
        grouped = prompt_emb
    elif prompt_emb.ndim == 2:
        if num_classes is None or num_templates is None:
            raise ValueError("a 2-D prompt_emb [C*T, D] needs num_classes and num_templates to be split")
        if prompt_emb.shape[0] != num_classes * num_templates:
            raise ValueError(
                f"prompt_emb has {prompt_emb.shape[0]} rows but num_classes*num_templates = "
                f"{num_classes}*{num_templates} = {num_classes * num_templates}"
            )
        grouped = prompt_emb.reshape(num_classes, num_templates, prompt_emb.shape[1])
    else:
        raise ValueError(f"prompt_emb must be [C*T, D] or [C, T, D], got shape {tuple(prompt_emb.shape)}")
    work = grouped.float() if grouped.dtype in (torch.float16, torch.bfloat16) else grouped
    if blocks == 1:
        return F.normalize(F.normalize(work, dim=-1).mean(dim=1), dim=-1).to(prompt_emb.dtype)
    if blocks < 1 or work.shape[-1] % blocks:
        raise ValueError(f"blocks={blocks} must divide the embedding dim {work.shape[-1]}")
    parts = []
    for part in F.normalize(work, dim=-1).chunk(blocks, dim=-1):
        share = part.norm(dim=-1).mean(dim=1, keepdim=True)  # [C, 1] the block's share of a prompt's norm
        parts.append(F.normalize(F.normalize(part, dim=-1).mean(dim=1), dim=-1) * share)
    return F.normalize(torch.cat(parts, dim=-1), dim=-1).to(prompt_emb.dtype)


def build_class_embeddings(
    classnames: Sequence[str],
    templates: Sequence[str],
    encode_texts: Callable[[list[str]], Tensor],
    batch_size: int = 256,
    blocks: int = 1,
) -> Tensor:
    """Zero-shot classifier weights ``[C, D]``: encode every prompt, then reduce per class (``blocks``:
    see :func:`class_embeddings_from_prompt_embeddings`).

    Prompts of all classes are encoded together in chunks of ``batch_size`` (a chunk may span classes), so
    1000 classes x 80 templates costs 313 encoder calls instead of 1000 tiny ones.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prompts = build_prompts(classnames, templates)
    chunks = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        emb = encode_texts(batch)
        if emb.ndim != 2 or emb.shape[0] != len(batch):
            raise ValueError(
                f"encode_texts returned shape {tuple(emb.shape)} for {len(batch)} prompts; expected [{len(batch)}, D]"
            )
        chunks.append(emb)
    return class_embeddings_from_prompt_embeddings(torch.cat(chunks), len(classnames), len(templates), blocks)


# --------------------------------------------------------------------------------------------------------
# Classification metrics
# --------------------------------------------------------------------------------------------------------


def _check_scores_labels(scores: Tensor, labels: Tensor, num_classes: int | None = None) -> None:
    if scores.ndim != 2:
        raise ValueError(f"scores must be [N, C], got shape {tuple(scores.shape)}")
    if labels.ndim != 1 or labels.shape[0] != scores.shape[0]:
        raise ValueError(f"labels must be [N] with N={scores.shape[0]}, got shape {tuple(labels.shape)}")
    if num_classes is not None and scores.shape[1] != num_classes:
        raise ValueError(
            f"scores have {scores.shape[1]} classes but the accumulator was built for {num_classes}"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= scores.shape[1]):
        raise ValueError(
            f"labels must lie in [0, {scores.shape[1]}), got range [{int(labels.min())}, {int(labels.max())}]"
        )
    if scores.is_floating_point() and torch.isnan(scores).any():
        raise ValueError("scores contain NaN: check the embeddings (a NaN has no rank)")


def _check_top_k(top_k: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in top_k)
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"top_k must be a non-empty sequence of positive integers, got {top_k!r}")
    if len(set(ks)) != len(ks):
        raise ValueError(f"top_k has duplicates: {top_k!r}")
    return ks


def _stable_rank_of(scores: Tensor, target: Tensor, target_score: Tensor) -> Tensor:
    """Rank of ``target`` in each row under a stable descending sort (ties: lower index first)."""
    index = torch.arange(scores.shape[1], device=scores.device)
    higher = (scores > target_score[:, None]).sum(dim=1)
    tied_before = ((scores == target_score[:, None]) & (index[None, :] < target[:, None])).sum(dim=1)
    return higher + tied_before


def _stable_argmax(scores: Tensor) -> Tensor:
    """Row-wise argmax returning the lowest index among maxima (explicit, not relying on kernel behaviour)."""
    index = torch.arange(scores.shape[1], device=scores.device)
    is_max = scores == scores.max(dim=1, keepdim=True).values
    return torch.where(is_max, index[None, :], scores.shape[1]).min(dim=1).values


def _classification_counts(
    scores: Tensor, labels: Tensor, top_k: tuple[int, ...], block_size: int = 4096
) -> tuple[Tensor, Tensor]:
    """Integer sufficient statistics: confusion ``[C, C]`` (rows = true class) and top-k hit counts."""
    num_classes = scores.shape[1]
    labels = labels.to(device=scores.device, dtype=torch.long)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.long, device=scores.device)
    correct = torch.zeros(len(top_k), dtype=torch.long, device=scores.device)
    for start in range(0, scores.shape[0], block_size):
        s = scores[start : start + block_size]
        y = labels[start : start + block_size]
        rank = _stable_rank_of(s, y, s.gather(1, y[:, None]).squeeze(1))
        correct += torch.stack([(rank < min(k, num_classes)).sum() for k in top_k])
        pred = _stable_argmax(s)
        confusion += torch.bincount(y * num_classes + pred, minlength=num_classes * num_classes)
    return confusion.view(num_classes, num_classes), correct


def _metrics_from_counts(confusion: Tensor, correct: Tensor, top_k: tuple[int, ...]) -> dict[str, float]:
    total = int(confusion.sum())
    if total == 0:
        raise ValueError("no samples were scored: classification metrics are undefined on an empty set")
    metrics = {f"top{k}": 100.0 * int(c) / total for k, c in zip(top_k, correct.tolist(), strict=True)}
    support = confusion.sum(dim=1).double()
    present = support > 0
    recall = confusion.diagonal().double()[present] / support[present]
    metrics["mean_per_class_recall"] = 100.0 * float(recall.mean())
    return metrics


def classification_metrics(
    logits_or_scores: Tensor, labels: Tensor, top_k: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Top-k accuracies and mean per-class recall, in percent.

    Keys are ``top{k}`` for each requested k (the name keeps the requested k; when k > C it is evaluated as
    k = C, so ``top5`` on 3 classes is 100) and ``mean_per_class_recall`` (averaged over the classes that
    occur in ``labels``; the standard metric for unbalanced sets like Aircraft or Pets). Ties: lower class
    index wins (see module docstring).
    """
    ks = _check_top_k(top_k)
    _check_scores_labels(logits_or_scores, labels)
    confusion, correct = _classification_counts(logits_or_scores.detach(), labels, ks)
    return _metrics_from_counts(confusion, correct, ks)


class ZeroShotClassificationAccumulator(Metric):
    """Streaming version of :func:`classification_metrics` for validation over many batches.

    The state is integer counts only (a ``[C, C]`` confusion matrix and one hit counter per k), reduced with
    ``sum`` across processes by torchmetrics, so DDP sync is exact and memory does not grow with the number
    of samples. Gives bit-identical numbers to the functional version on the concatenated batches.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    confusion: Tensor
    topk_correct: Tensor

    def __init__(
        self,
        num_classes: int,
        top_k: Sequence[int] = (1, 5),
        groups: dict[str, Tensor] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.groups = {name: torch.as_tensor(c, dtype=torch.long).cpu() for name, c in (groups or {}).items()}
        self.top_k = _check_top_k(top_k)
        self.add_state(
            "confusion", torch.zeros(num_classes, num_classes, dtype=torch.long), dist_reduce_fx="sum"
        )
        self.add_state("topk_correct", torch.zeros(len(self.top_k), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, scores: Tensor, labels: Tensor) -> None:
        """Add one batch of ``[N, C]`` scores and ``[N]`` labels."""
        _check_scores_labels(scores, labels, self.num_classes)
        confusion, correct = _classification_counts(
            scores.detach().to(self.confusion.device), labels, self.top_k
        )
        self.confusion += confusion
        self.topk_correct += correct

    def compute(self) -> dict[str, float]:
        """Metrics over everything seen since the last reset (after cross-process sync), plus
        :func:`group_transfer_rates` when the accumulator was given class groups."""
        metrics = _metrics_from_counts(self.confusion, self.topk_correct, self.top_k)
        return {**metrics, **group_transfer_rates(self.confusion, self.groups)}


def group_transfer_rates(confusion: Tensor, groups: dict[str, Tensor]) -> dict[str, float]:
    """``{g}_to_{h}``: percent of the images of group g's classes that are predicted as a class of group h.

    With seen/unseen groups, ``seen_to_unseen`` says how much of a seen-class loss comes from images now
    sent to the newly reachable unseen classes rather than confused within their own group.
    """
    confusion = confusion.cpu()
    rates = {}
    for g, g_classes in groups.items():
        total = int(confusion[g_classes].sum())
        for h, h_classes in groups.items():
            if h != g and total:
                rates[f"{g}_to_{h}"] = 100.0 * int(confusion[g_classes][:, h_classes].sum()) / total
    return rates


# --------------------------------------------------------------------------------------------------------
# Retrieval metrics
# --------------------------------------------------------------------------------------------------------


def retrieval_metrics(
    image_emb: Tensor,
    text_emb: Tensor,
    text_to_image: Tensor,
    ks: Sequence[int] = (1, 5, 10),
    block_size: int = 512,
) -> dict[str, float]:
    """Recall@k for image->text and text->image retrieval, in percent, as in the CLIP paper.

    Image->text is a hit when ANY of the image's captions ranks in the top k texts (equivalently: the best
    ranked true caption does); text->image when the caption's own image ranks in the top k images.
    Similarity is the plain dot product (the caller L2-normalises; refined RECO embeddings are compared as
    given). Queries are processed ``block_size`` at a time so 5k images x 25k captions needs only a
    ``block_size x 25k`` score block. Half-precision inputs are scored in float32. Ties: lower index first.
    """
    if image_emb.ndim != 2 or text_emb.ndim != 2 or image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(
            f"image_emb and text_emb must be [Ni, D] and [Nt, D] with the same D, got "
            f"{tuple(image_emb.shape)} and {tuple(text_emb.shape)}"
        )
    num_images, num_texts = image_emb.shape[0], text_emb.shape[0]
    if text_to_image.ndim != 1 or text_to_image.shape[0] != num_texts:
        raise ValueError(
            f"text_to_image must be [Nt] with Nt={num_texts}, got shape {tuple(text_to_image.shape)}"
        )
    if num_images == 0 or num_texts == 0:
        raise ValueError("retrieval needs at least one image and one caption")
    ks_ = _check_top_k(ks)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    device = image_emb.device
    dtype = torch.promote_types(torch.promote_types(image_emb.dtype, text_emb.dtype), torch.float32)
    images = image_emb.detach().to(dtype)
    texts = text_emb.detach().to(device=device, dtype=dtype)
    owner = text_to_image.to(device=device, dtype=torch.long)
    if int(owner.min()) < 0 or int(owner.max()) >= num_images:
        raise ValueError(
            f"text_to_image values must lie in [0, {num_images}), got [{int(owner.min())}, {int(owner.max())}]"
        )
    captions_per_image = torch.bincount(owner, minlength=num_images)
    if bool((captions_per_image == 0).any()):
        missing = torch.nonzero(captions_per_image == 0).flatten()[:5].tolist()
        raise ValueError(
            f"{int((captions_per_image == 0).sum())} images have no caption in text_to_image (first: {missing}); "
            "drop them before evaluating, image->text recall is undefined for them"
        )
    if torch.isnan(images).any() or torch.isnan(texts).any():
        raise ValueError("image_emb or text_emb contains NaN: check the encoder outputs")

    text_ranks = torch.empty(num_texts, dtype=torch.long, device=device)
    for start in range(0, num_texts, block_size):
        sims = texts[start : start + block_size] @ images.T  # [b, Ni]
        target = owner[start : start + block_size]
        text_ranks[start : start + block_size] = _stable_rank_of(
            sims, target, sims.gather(1, target[:, None])[:, 0]
        )

    image_ranks = torch.empty(num_images, dtype=torch.long, device=device)
    text_index = torch.arange(num_texts, device=device)
    for start in range(0, num_images, block_size):
        sims = images[start : start + block_size] @ texts.T  # [b, Nt]
        rows = torch.arange(start, start + sims.shape[0], device=device)
        own = owner[None, :] == rows[:, None]
        # Best true caption: highest score, lowest index among tied true captions; its rank is the minimum
        # rank over all true captions, so "any true caption in top k" <=> its rank < k.
        best = sims.masked_fill(~own, -math.inf).max(dim=1).values
        best_index = (
            torch.where(own & (sims == best[:, None]), text_index[None, :], num_texts).min(dim=1).values
        )
        image_ranks[start : start + sims.shape[0]] = _stable_rank_of(sims, best_index, best)

    metrics: dict[str, float] = {}
    for k in ks_:
        metrics[f"image_to_text_R@{k}"] = 100.0 * int((image_ranks < k).sum()) / num_images
    for k in ks_:
        metrics[f"text_to_image_R@{k}"] = 100.0 * int((text_ranks < k).sum()) / num_texts
    return metrics


# --------------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------------


@dataclass
class EvaluationRow:
    """One evaluated (dataset, setting) pair, e.g. ("cars", "reco[uni-search,cross-fusion]")."""

    dataset: str
    setting: str
    metrics: dict[str, float]


@dataclass
class EvaluationReport:
    """Collects metrics of several datasets x settings and renders them as one table.

    Adding a row for a (dataset, setting) that already exists replaces it (re-running an evaluation
    updates the report instead of duplicating rows). Columns are the union of metric names in first-seen
    order; a row without a metric shows ``-`` in markdown and is absent from its JSON metrics.
    """

    rows: list[EvaluationRow] = field(default_factory=list)
    precision: int = 2

    def add(self, dataset: str, setting: str, metrics: Mapping[str, float]) -> None:
        """Record (or replace) the metrics of one dataset under one setting."""
        row = EvaluationRow(dataset, setting, {str(k): float(v) for k, v in metrics.items()})
        for i, existing in enumerate(self.rows):
            if existing.dataset == dataset and existing.setting == setting:
                self.rows[i] = row
                return
        self.rows.append(row)

    @property
    def metric_names(self) -> list[str]:
        """Union of metric names over rows, in first-seen order."""
        names: dict[str, None] = {}
        for row in self.rows:
            names.update(dict.fromkeys(row.metrics))
        return list(names)

    def to_markdown(self) -> str:
        """A GitHub-flavoured markdown table, one row per (dataset, setting)."""

        def cell(text: str) -> str:
            return text.replace("|", "\\|")

        def number(value: float | None) -> str:
            if value is None:
                return "-"
            return f"{value:.{self.precision}f}"

        columns = self.metric_names
        header = ["dataset", "setting", *columns]
        lines = [
            "| " + " | ".join(cell(h) for h in header) + " |",
            "|" + "|".join(["---", "---"] + ["---:"] * len(columns)) + "|",
        ]
        for row in self.rows:
            values = [number(row.metrics.get(name)) for name in columns]
            lines.append("| " + " | ".join([cell(row.dataset), cell(row.setting), *values]) + " |")
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict; non-finite metric values become ``null`` (JSON has no NaN)."""
        return {
            "metrics": self.metric_names,
            "rows": [
                {
                    "dataset": row.dataset,
                    "setting": row.setting,
                    "metrics": {k: (v if math.isfinite(v) else None) for k, v in row.metrics.items()},
                }
                for row in self.rows
            ],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EvaluationReport:
        """Rebuild a report from :meth:`to_json` output (``null`` metrics come back as NaN)."""
        report = cls()
        for row in data.get("rows", []):
            metrics = {k: (math.nan if v is None else float(v)) for k, v in row["metrics"].items()}
            report.add(row["dataset"], row["setting"], metrics)
        return report

    def save(self, directory: str | os.PathLike[str]) -> tuple[Path, Path]:
        """Write ``zeroshot_report.json`` and ``zeroshot_report.md`` atomically; returns both paths."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        json_path, md_path = out / "zeroshot_report.json", out / "zeroshot_report.md"
        text = json.dumps(self.to_json(), indent=2, allow_nan=False) + "\n"
        atomic_write_bytes(json_path, text.encode("utf-8"))
        atomic_write_bytes(md_path, self.to_markdown().encode("utf-8"))
        return json_path, md_path

    def __str__(self) -> str:
        return self.to_markdown()


# --------------------------------------------------------------------------------------------------------
# k sweep plot
# --------------------------------------------------------------------------------------------------------

SweepPoint = float | Mapping[str, float]


def _series_points(name: str, points: Mapping[int, SweepPoint], metric: str) -> list[tuple[int, float]]:
    out = []
    for k, value in points.items():
        if isinstance(k, bool) or not isinstance(k, int):
            raise ValueError(f"series {name!r}: k values must be ints, got {k!r}")
        if isinstance(value, Mapping):
            if metric not in value:
                raise ValueError(f"series {name!r}, k={k}: no metric {metric!r} (has {sorted(value)})")
            value = value[metric]
        out.append((k, float(value)))
    if not out:
        raise ValueError(f"series {name!r} has no points")
    return sorted(out)


def plot_k_sweep(
    results: Mapping[int, SweepPoint] | Mapping[str, Mapping[int, SweepPoint]],
    metric: str,
    path: str | os.PathLike[str],
    *,
    baselines: Mapping[str, float] | None = None,
    title: str | None = None,
) -> Path:
    """Plot ``metric`` against the number of retrieved neighbours k and save a PNG.

    ``results`` is either one series ``{k: point}`` or several ``{series_name: {k: point}}`` (one line
    each, e.g. one per dataset or per RECO setting). A point is a metrics dict (``metric`` is picked from
    it, so the dicts returned by :func:`classification_metrics` can be passed as is) or a bare number.
    ``baselines`` draws dashed horizontal lines, e.g. ``{"CLIP": 57.2}``. Uses the Agg canvas directly,
    never pyplot, so it does not touch the global matplotlib backend. Written atomically; returns the path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not results:
        raise ValueError("results is empty: nothing to plot")
    keys = list(results)
    if all(isinstance(k, int) and not isinstance(k, bool) for k in keys):
        series = {metric: _series_points(metric, results, metric)}  # type: ignore[arg-type]
    elif all(isinstance(k, str) for k in keys):
        series = {name: _series_points(name, pts, metric) for name, pts in results.items()}  # type: ignore[union-attr]
    else:
        raise ValueError("results keys must be all ints (k -> point) or all strings (series -> {k: point})")

    figure = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    all_ks: set[int] = set()
    for name, points in series.items():
        xs, ys = zip(*points, strict=True)
        all_ks.update(xs)
        axes.plot(xs, ys, marker="o", label=name)
    for name, value in (baselines or {}).items():
        axes.axhline(float(value), linestyle="--", linewidth=1, color="grey")
        axes.annotate(
            name, (min(all_ks), float(value)), textcoords="offset points", xytext=(2, 3), fontsize=8
        )
    axes.set_xticks(sorted(all_ks))
    axes.set_xlabel("k (retrieved neighbours)")
    axes.set_ylabel(metric)
    axes.set_title(title or f"{metric} vs k")
    axes.grid(alpha=0.3)
    if len(series) > 1:
        axes.legend()
    figure.tight_layout()

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    atomic_write_bytes(out, buffer.getvalue())
    return out
