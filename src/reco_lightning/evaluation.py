"""ZeroShotEvaluation: frozen CLIP and RECO side by side on zero-shot sets, during `fit` and in `test`.

The callback encodes each evaluation set once, scores every requested setting from the same pass
(frozen CLIP, RECO refining both sides, only the image side, only the text side), logs the metrics so a
ModelCheckpoint can select on zero-shot accuracy, and writes one report (markdown + JSON) per run next
to the logs. An optional k sweep re-scores RECO at several k and plots accuracy versus k.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from reco_lightning.baselines import lookup, mix
from reco_lightning.data.zeroshot import (
    ImageFolderClassification,
    RetrievalPairs,
    WebDatasetClassification,
    load_templates,
)
from reco_lightning.metrics import (
    EvaluationReport,
    ZeroShotClassificationAccumulator,
    build_class_embeddings,
    plot_k_sweep,
    retrieval_metrics,
)
from reco_lightning.retrieval import Neighbours
from reco_lightning.vote import MemoryVote
from reco_lightning.whitening import MemoryWhitening

__all__ = [
    "SETTINGS",
    "ClassificationSet",
    "RetrievalSet",
    "ZeroShotEvaluation",
    "grouped_classification_metrics",
]

Side = Literal["frozen", "reco", "reco_without_vote", "lookup", "lookup_whitened", "mix"]

#: ZeroShotEvaluation's leakage guard by default (cosine of memory image to evaluated image; see the class)
DEFAULT_LEAKAGE_THRESHOLD = 0.95

# setting -> (what the image side is, what the text side is): the frozen embedding, RECO's fusion, or a
# training-free use of the same neighbours (reco_lightning.baselines)
SETTINGS: dict[str, tuple[Side, Side]] = {
    "clip": ("frozen", "frozen"),
    "reco": ("reco", "reco"),
    "reco_image": ("reco", "frozen"),
    "reco_text": ("frozen", "reco"),
    "reco_without_vote": ("reco_without_vote", "reco_without_vote"),
    "lookup": ("lookup", "frozen"),
    "lookup_whitened": ("lookup_whitened", "frozen"),
    "mix": ("mix", "mix"),
}


@dataclass
class ClassificationSet:
    """A zero-shot classification set.

    Args:
        name: label in logs and reports.
        root: image folder (one sub-folder per class) or CLIP_benchmark webdataset directory.
        format: "folder" or "wds".
        classnames / templates: file path or shipped set name; default: the dataset's own files, then
            the generic CLIP templates.
        split: webdataset split folder.
        class_groups: extra top-1 restricted to images of these classes (names as in classnames),
            e.g. {"seen": [...], "unseen": [...]}: ``top1_<group>`` classifies them among all classes,
            ``top1_<group>_only`` among the group's own classes only.
        during: evaluate it at validation in `fit`, at `test`, or both (a validation set for
            checkpoint selection, the official test split for the final report).
    """

    name: str
    root: str
    format: Literal["folder", "wds"] = "folder"
    classnames: str | None = None
    templates: str | None = None
    split: str = "test"
    class_groups: dict[str, list[str]] | None = None
    during: Literal["fit", "test", "both"] = "both"


@dataclass
class RetrievalSet:
    """A zero-shot retrieval set: CSV/TSV of (image path, caption), several captions per image allowed."""

    name: str
    annotations: str
    image_column: str = "filepath"
    caption_column: str = "caption"
    during: Literal["fit", "test", "both"] = "both"


class ZeroShotEvaluation(pl.Callback):
    """Evaluate CLIP vs RECO settings on zero-shot sets at validation end (fit) and test end.

    Args:
        classification / retrieval: the evaluation sets.
        settings: rows of the report, from "clip", "reco" (both sides refined: the paper's classification
            setting), "reco_image", "reco_text" (the paper's best retrieval setting), and the training-free
            baselines over the very same neighbours: "lookup" (the image side replaced by its neighbours'
            average, a k-NN vote against frozen prompts) and "mix" (both sides ``normalize(x + mix_alpha x
            mean of neighbours)``); see reco_lightning.baselines.
            "lookup_whitened" is the lookup sent through the memory's covariance of what it averages (its
            captions for images: :class:`~reco_lightning.whitening.MemoryWhitening`, label-free), so the
            directions all captions share count for less than those that tell classes apart.
            "reco_without_vote": for a model with a vote (``vote_weight`` > 0, :mod:`reco_lightning.vote`),
            RECO's fusion (and gate) alone, what the vote adds to (not reported for a model without a vote:
            it would repeat "reco"). With a vote every other side meets the vote's two-block space lifted
            (``MemoryVote.lift``: their own similarities unchanged).
        mix_alpha: the "mix" baseline's retrieval weight (calibrate it: `reco calibrate`).
        lookup_temperature: None: "lookup" averages its neighbours uniformly; a float: softmax(score /
            temperature) weights.
        lookup_whiten: "lookup_whitened"'s ridge (a fraction of the covariance's largest eigenvalue); a
            property of the backbone, chosen on held-out data (0.001 on the demo's validation split).
        k_sweep: also score "reco" at each of these k (inference-time k) and plot accuracy vs k.
        batch_size / num_workers: evaluation loader settings.
        during_fit: evaluate at every validation epoch end of `fit` (logged as zeroshot/...).
        report_dir: where reports go; default: the trainer's log dir.
        limit_images: evaluate at most this many images per set (quick checks).
        print_report: print each report's table on the console (the report files are written either way);
            off where a caller prints its own summary (``reco demo``).
        leakage_threshold: the leakage guard: memory pairs whose image has cosine >= this with the
            evaluated image are not retrieved for it (a web-scale memory can hold the evaluation images
            themselves). Each row that reads neighbours of images reports ``leak_images`` (evaluated images
            that had such a pair) and ``leak_items`` (pairs excluded). ``None`` turns the guard off. 0.95
            catches resized and re-encoded copies for real CLIPs; a backbone whose image embeddings are
            far more concentrated needs a higher value (the demo uses 0.9999: exact copies).

    A model with a novelty gate (``known_memory``) also reports ``gated_images`` on the classification rows
    whose image side is RECO's (the images the gate answered from the memory rows added after training) and
    ``gated_prompts`` on those whose text side is (the class prompts it kept frozen). Under DDP each rank
    reads a share of the images; the image counts are summed over ranks.
    """

    def __init__(
        self,
        classification: Sequence[ClassificationSet] = (),
        retrieval: Sequence[RetrievalSet] = (),
        settings: Sequence[str] = ("clip", "reco"),
        mix_alpha: float = 1.0,
        lookup_temperature: float | None = None,
        lookup_whiten: float = 1e-3,
        k_sweep: Sequence[int] | None = None,
        batch_size: int = 256,
        num_workers: int = 0,
        during_fit: bool = True,
        report_dir: str | None = None,
        limit_images: int | None = None,
        leakage_threshold: float | None = DEFAULT_LEAKAGE_THRESHOLD,
        print_report: bool = True,
    ) -> None:
        unknown = [s for s in settings if s not in SETTINGS]
        if unknown:
            raise ValueError(f"unknown zero-shot settings {unknown}: choose from {sorted(SETTINGS)}")
        if not classification and not retrieval:
            raise ValueError("ZeroShotEvaluation needs at least one classification or retrieval set")
        self.classification, self.retrieval = list(classification), list(retrieval)
        self.settings, self.k_sweep = list(settings), sorted(set(k_sweep or ()))
        self.mix_alpha, self.lookup_temperature = float(mix_alpha), lookup_temperature
        if not lookup_whiten > 0:
            raise ValueError(
                f"lookup_whiten is a ridge > 0 (a fraction of the largest eigenvalue), got {lookup_whiten}"
            )
        self.lookup_whiten = float(lookup_whiten)
        self._whitenings: dict[str, tuple[object, MemoryWhitening]] = {}  # modality -> (memory, its map)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.during_fit, self.report_dir, self.limit_images = during_fit, report_dir, limit_images
        self.leakage_threshold, self.print_report = leakage_threshold, bool(print_report)
        self.last_report: EvaluationReport | None = None

    # --- Lightning hooks -------------------------------------------------------------------------------
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.during_fit and not trainer.sanity_checking and trainer.state.fn == "fit":
            self._run(trainer, pl_module)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._run(trainer, pl_module)

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stage = "fit" if trainer.state.fn == "fit" else "test"
        report, sweep = self.evaluate(pl_module, trainer.global_rank, trainer.world_size, stage=stage)
        if not report.rows:
            return
        for row in report.rows:
            for metric, value in row.metrics.items():
                pl_module.log(f"zeroshot/{row.dataset}/{row.setting}/{metric}", value, sync_dist=False)
        self.last_report = report
        # trainer.log_dir broadcasts from rank 0: every rank must ask, or DDP deadlocks
        directory = Path(self.report_dir or trainer.log_dir or trainer.default_root_dir)
        if trainer.is_global_zero:
            report.save(directory)
            if sweep:
                for name, series in sweep.items():
                    plot_k_sweep(
                        series, "top1", directory / f"k_sweep_{name}.png", title=f"{name}: top-1 vs k"
                    )
            if self.print_report:
                rank_zero_info(f"zero-shot report ({directory / 'zeroshot_report.md'}):\n{report}")

    # --- evaluation without a trainer too ------------------------------------------------------------
    @torch.no_grad()
    def evaluate(
        self, pl_module: pl.LightningModule, rank: int = 0, world_size: int = 1, stage: str | None = None
    ) -> tuple[EvaluationReport, dict[str, dict[str, dict[int, float]]]]:
        """Score every set (of ``stage``: "fit" or "test"; None: all) under every setting.

        Returns the report and the k sweep (set -> series -> k -> top1).
        """
        was_training = pl_module.training
        pl_module.eval()
        report = EvaluationReport()
        sweep: dict[str, dict[str, dict[int, float]]] = {}
        try:
            for spec in self.classification:
                if stage is None or spec.during in (stage, "both"):
                    sweep[spec.name] = self._classification(pl_module, spec, report, rank, world_size)
            for spec in self.retrieval:
                if stage is None or spec.during in (stage, "both"):
                    self._retrieval(pl_module, spec, report)
        finally:
            pl_module.train(was_training)
        return report, {name: series for name, series in sweep.items() if series}

    def _settings(self, pl_module: pl.LightningModule) -> list[str]:
        """The settings reported for this model: "reco_without_vote" only where there is a vote."""
        voting = _voter(pl_module) is not None
        return [s for s in self.settings if voting or s != "reco_without_vote"]

    def _loader(self, dataset: Dataset, pl_module: pl.LightningModule) -> DataLoader:
        backbone = pl_module.backbone

        def collate(samples: list[tuple[Any, int]]) -> tuple[dict[str, Tensor], Tensor]:
            images, labels = zip(*samples, strict=True)
            return backbone.preprocess_images(images), torch.tensor(labels, dtype=torch.long)

        return DataLoader(
            dataset, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=collate
        )

    def _classification(
        self,
        pl_module: pl.LightningModule,
        spec: ClassificationSet,
        report: EvaluationReport,
        rank: int,
        world: int,
    ) -> dict[str, dict[int, float]]:
        dataset: Dataset
        if spec.format == "wds":
            dataset = WebDatasetClassification(spec.root, split=spec.split, classnames_file=spec.classnames)
        else:
            dataset = ImageFolderClassification(spec.root, classnames_file=spec.classnames)
        templates = (
            load_templates(spec.templates)
            if spec.templates
            else (dataset.templates or load_templates("clip_generic"))
        )
        classnames = dataset.classnames
        groups = _group_labels(spec, classnames)
        if not isinstance(dataset, IterableDataset):
            indices = list(range(len(dataset)))
            if self.limit_images is not None and self.limit_images < len(indices):
                step = len(indices) / self.limit_images  # evenly spread: image folders are sorted by class
                indices = [indices[int(i * step)] for i in range(self.limit_images)]
            dataset = Subset(dataset, indices[rank::world])

        voter = _voter(pl_module)
        encode = pl_module.backbone.encode_captions
        prompts_gated = _GateCount("gated_prompts")
        weights: dict[tuple[Side, int | None], Tensor] = {}
        for setting, k in [(s, None) for s in self._settings(pl_module)] + [
            ("reco", k) for k in self.k_sweep
        ]:
            text_side = SETTINGS[setting][1]
            key = _side_key(text_side, k)
            if key not in weights:
                weights[key] = build_class_embeddings(
                    classnames,
                    templates,
                    self._side(pl_module, encode, "text", text_side, k, prompts_gated),
                    self.batch_size,
                    blocks=1 if voter is None else 2,
                )

        accumulators: dict[tuple[str, int | None], dict[str, ZeroShotClassificationAccumulator]] = {}
        device = pl_module.device
        for setting in self._settings(pl_module):
            accumulators[(setting, None)] = _group_accumulators(len(classnames), groups, device)
        for k in self.k_sweep:
            accumulators[("reco", k)] = _group_accumulators(len(classnames), groups, device)

        leaks, gated = _LeakCount(), _GateCount("gated_images")
        for image_inputs, labels in _progress(self._loader(dataset, pl_module), f"zero-shot {spec.name}"):
            v = pl_module.backbone.encode_images(image_inputs)
            images: dict[tuple[Side, int | None], Tensor] = {("frozen", None): _lifted(voter, "frozen", v)}
            image_sides = self._guarded_sides(pl_module, v, "image", leaks, gated=gated)
            for (setting, k), groups_acc in accumulators.items():
                image_side, text_side = SETTINGS[setting]
                image_key = _side_key(image_side, k)
                if image_key not in images:
                    images[image_key] = image_sides(image_side, k)
                text_key = _side_key(text_side, k)
                scores = images[image_key] @ weights[text_key].to(device).t()
                for group, acc in groups_acc.items():
                    _update_group(acc, group, groups, scores, labels)

        if world > 1:  # each rank read its share of the images: the counts are the ranks' sum
            _sum_over_ranks(pl_module.device, leaks, gated)
        sweep: dict[str, dict[int, float]] = {}
        for (setting, k), groups_acc in accumulators.items():
            metrics = _group_metrics(groups_acc)
            name = setting if k is None else f"{setting}@k={k}"
            image_side, text_side = SETTINGS[setting]
            gate = {**gated.metrics(image_side, k), **prompts_gated.metrics(text_side, k)}
            report.add(spec.name, name, {**metrics, **leaks.metrics(image_side), **gate})
            if k is not None:
                sweep.setdefault("reco", {})[k] = metrics["top1"]
        if sweep:
            clip_top1 = next(
                (r.metrics["top1"] for r in report.rows if r.dataset == spec.name and r.setting == "clip"),
                None,
            )
            if clip_top1 is not None:
                sweep["clip"] = dict.fromkeys(self.k_sweep, clip_top1)
        return sweep

    def _retrieval(self, pl_module: pl.LightningModule, spec: RetrievalSet, report: EvaluationReport) -> None:
        dataset = RetrievalPairs(
            spec.annotations, image_column=spec.image_column, caption_column=spec.caption_column
        )
        images = torch.cat(
            [pl_module.backbone.encode_images(inputs) for inputs, _ in self._loader(dataset, pl_module)]
        )
        captions = dataset.captions
        texts = torch.cat(
            [
                pl_module.backbone.encode_captions(captions[i : i + self.batch_size])
                for i in range(0, len(captions), self.batch_size)
            ]
        )
        # captions are guarded against their own images: a memory holding the evaluated pair would hand
        # the text side (uni-search, cross-fusion) the very image it must find
        pair_images = images[dataset.text_to_image.to(images.device)]
        leaks = {"image": _LeakCount(), "text": _LeakCount("leak_captions", "leak_caption_items")}
        sides: dict[tuple[str, Side], Tensor] = {}
        for modality, frozen, refs in (("image", images, None), ("text", texts, pair_images)):
            needed = list(
                dict.fromkeys(SETTINGS[s][0 if modality == "image" else 1] for s in self._settings(pl_module))
            )
            chunks: dict[Side, list[Tensor]] = {side: [] for side in needed}
            for start in range(0, len(frozen), self.batch_size):
                batch = slice(start, start + self.batch_size)
                of = self._guarded_sides(
                    pl_module, frozen[batch], modality, leaks[modality], None if refs is None else refs[batch]
                )
                for side in needed:  # one search per batch, whatever the sides
                    chunks[side].append(of(side, None))
            sides.update({(modality, side): torch.cat(parts) for side, parts in chunks.items()})
        for setting in self._settings(pl_module):
            image_side, text_side = SETTINGS[setting]
            metrics = retrieval_metrics(
                sides[("image", image_side)], sides[("text", text_side)], dataset.text_to_image
            )
            guard = {**leaks["image"].metrics(image_side), **leaks["text"].metrics(text_side)}
            report.add(spec.name, setting, {**metrics, **guard})

    def _guarded_sides(
        self,
        pl_module: pl.LightningModule,
        x: Tensor,
        modality: str,
        leaks: _LeakCount,
        pair_images: Tensor | None = None,
        gated: _GateCount | None = None,
    ) -> Callable[[Side, int | None], Tensor]:
        """What each side does to a batch of frozen ``modality`` embeddings ``x``, every side reading the
        same neighbours (one search per k), found with the leakage guard (images against themselves,
        captions against ``pair_images``, their own images); counts what the guard excluded and, into
        ``gated``, the queries RECO's novelty gate answers from the memory added after training."""
        found: dict[int | None, Neighbours] = {}

        def side_of(side: Side, k: int | None) -> Tensor:
            if side == "frozen":
                return _lifted(_voter(pl_module), side, x)
            if k not in found:
                found[k] = pl_module.neighbours(
                    x, modality, k=k, leak_threshold=self.leakage_threshold, leak_images=pair_images
                )
                if leaks.counts(k):
                    leaks.add(found[k].excluded)
            counts = gated if _GateCount.counts(side, k) else None
            return self._apply(pl_module, x, modality, side, found[k], counts)

        return side_of

    def _side(
        self,
        pl_module: pl.LightningModule,
        encode: Callable[[Any], Tensor],
        modality: str,
        side: Side,
        k: int | None,
        gated: _GateCount | None = None,
    ) -> Callable[[Any], Tensor]:
        """``encode`` followed by what ``side`` does to one modality's embeddings (RECO's gate decisions at
        the trained k counted into ``gated``)."""
        if side == "frozen":
            voter = _voter(pl_module)
            return encode if voter is None else lambda x: voter.lift(encode(x))
        counts = gated if _GateCount.counts(side, k) else None

        def transformed(x: Any) -> Tensor:
            embeddings = encode(x)
            return self._apply(
                pl_module, embeddings, modality, side, pl_module.neighbours(embeddings, modality, k=k), counts
            )

        return transformed

    def _apply(
        self,
        pl_module: pl.LightningModule,
        x: Tensor,
        modality: str,
        side: Side,
        neighbours: Neighbours,
        gated: _GateCount | None = None,
    ) -> Tensor:
        """What a retrieving ``side`` makes of embeddings ``x`` and their ``neighbours`` (the same rows the
        fusion reads, so every setting compares uses of one retrieval); RECO's gate decisions go to ``gated``.
        With a vote, every side but RECO's own is lifted into its two-block space."""
        if side == "reco":
            refined = pl_module.refine_and_gate(x, modality, rows=neighbours.rows, vote=True)
            if gated is not None:
                gated.add(refined.gated)
            return refined.embeddings
        if side == "reco_without_vote":
            out = pl_module.refine_and_gate(x, modality, rows=neighbours.rows).embeddings
        elif side == "lookup":
            out = lookup(neighbours, self.lookup_temperature)
        elif side == "lookup_whitened":
            out = self._whitening_of(pl_module, modality)(lookup(neighbours, self.lookup_temperature))
        else:
            out = mix(x, neighbours, self.mix_alpha)
        return _lifted(_voter(pl_module), side, out)

    def _whitening_of(self, pl_module: pl.LightningModule, modality: str) -> MemoryWhitening:
        """The attached memory's whitening of what ``modality`` queries' neighbours carry (built once per
        memory and modality: an evaluation calls it per batch)."""
        retriever = pl_module.require_retriever()
        carried = retriever.fused_modality(modality)
        cached = self._whitenings.get(carried)
        if cached is None or cached[0] is not retriever.memory:  # a memory swapped in: its own statistics
            cached = (
                retriever.memory,
                MemoryWhitening.of_memory(retriever.memory, self.lookup_whiten, carried),
            )
            self._whitenings[carried] = cached
        return cached[1]


class _LeakCount:
    """What the leakage guard excluded for one modality's queries over one evaluation set (counted once,
    at the first k searched), reported as ``count_key`` (queries that had such a pair) and ``items_key``
    (pairs excluded)."""

    def __init__(self, count_key: str = "leak_images", items_key: str = "leak_items") -> None:
        self.count_key, self.items_key = count_key, items_key
        self.queries = self.items = 0
        self.k: object = _UNSET
        self.guarded = False  # searches ran with the guard on

    def counts(self, k: int | None) -> bool:
        """Whether searches at ``k`` are counted: only those at the first k searched, so that each image is
        counted once however many k a sweep scores."""
        if self.k is _UNSET:
            self.k = k
        return self.k == k

    def add(self, excluded: Tensor | None) -> None:
        if excluded is not None:
            self.guarded = True
            self.queries += int((excluded > 0).sum())
            self.items += int(excluded.sum())

    def metrics(self, side: Side) -> dict[str, float]:
        """The counts, for rows whose side of this modality reads neighbours searched with the guard on."""
        if side == "frozen" or not self.guarded:
            return {}
        return {self.count_key: self.queries, self.items_key: self.items}


_UNSET = object()


def _sum_over_ranks(device: torch.device, leaks: _LeakCount, gated: _GateCount) -> None:
    """Replace one rank's image counts by every rank's sum (each rank reads a share of the images; the
    accuracies sync through their torchmetrics states). Prompts are not summed: every rank encodes them all."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    counts = [leaks.queries, leaks.items, int(leaks.guarded), gated.count, int(gated.active)]
    total = torch.tensor(counts, dtype=torch.long, device=device)
    torch.distributed.all_reduce(total)
    leaks.queries, leaks.items, leaks.guarded, gated.count, gated.active = (
        int(total[0]),
        int(total[1]),
        bool(total[2]),
        int(total[3]),
        bool(total[4]),
    )


class _GateCount:
    """How many of one classification set's queries of one modality RECO's novelty gate answered from the
    memory rows added after training (``known_memory``), reported as ``key`` on the rows whose side of that
    modality is RECO's (at the trained k), and only where the model has a gate: how often the attached
    memory was trusted over the fusion (images) or a class name was new to it (prompts, kept frozen)."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.count = 0
        self.active = False

    @staticmethod
    def counts(side: Side, k: int | None) -> bool:
        """Whether ``side`` at ``k`` is counted and reported: RECO's own decisions, at the trained k."""
        return side == "reco" and k is None

    def add(self, novel: Tensor | None) -> None:
        if novel is not None:
            self.active = True
            self.count += int(novel.sum())

    def metrics(self, side: Side, k: int | None) -> dict[str, float]:
        return {self.key: self.count} if self.active and self.counts(side, k) else {}


def _voter(pl_module: pl.LightningModule) -> MemoryVote | None:
    """The attached memory's vote (``vote_weight`` > 0), else None."""
    retriever = getattr(pl_module, "retriever", None)
    return None if retriever is None else retriever.vote


def _lifted(voter: MemoryVote | None, side: Side, x: Tensor) -> Tensor:
    """``x`` of ``side`` in the vote's two-block space (RECO's own side is there already)."""
    return x if voter is None or side == "reco" else voter.lift(x)


def _side_key(side: Side, k: int | None) -> tuple[Side, int | None]:
    """Cache key of one side's embeddings: the frozen side does not depend on k."""
    return side, None if side == "frozen" else k


def _group_labels(spec: ClassificationSet, classnames: list[str]) -> dict[str, Tensor]:
    groups = {}
    for group, names in (spec.class_groups or {}).items():
        missing = [n for n in names if n not in classnames]
        if missing:
            raise ValueError(
                f"class_groups.{group} of {spec.name} names unknown classes {missing}; classes: {classnames}"
            )
        groups[group] = torch.tensor([classnames.index(n) for n in names], dtype=torch.long)
    return groups


#: suffix of a class group's accumulator that classifies its images among its own classes only
ONLY = "_only"


def _group_accumulators(
    num_classes: int, groups: dict[str, Tensor], device: torch.device
) -> dict[str, ZeroShotClassificationAccumulator]:
    """ "all" (every image among every class), each group's images among every class (``top1_<group>``), and
    each group's images among its own classes only (``top1_<group>_only``: for the seen classes, whether the
    refined model still tells apart what the frozen one knew, whatever the other classes pull to them)."""
    accumulators = {
        name: ZeroShotClassificationAccumulator(num_classes, groups=groups if name == "all" else None)
        for name in ("all", *groups)
    }
    for name, members in groups.items():
        accumulators[name + ONLY] = ZeroShotClassificationAccumulator(len(members), top_k=(1,))
    return {name: acc.to(device) for name, acc in accumulators.items()}


def grouped_classification_metrics(
    scores: Tensor, labels: Tensor, groups: dict[str, Tensor]
) -> dict[str, float]:
    """The metrics a zero-shot report gives one setting, from its scores [N, C] of all images at once: what
    references outside the evaluation (a k-NN label vote, a probe) are reported with, so their rows read
    like the settings' rows."""
    accumulators = _group_accumulators(scores.shape[1], groups, scores.device)
    for group, acc in accumulators.items():
        _update_group(acc, group, groups, scores, labels)
    return _group_metrics(accumulators)


def _group_metrics(accumulators: dict[str, ZeroShotClassificationAccumulator]) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for group, acc in accumulators.items():
        computed = acc.compute()
        if group == "all":
            metrics.update(computed)
        else:
            metrics[f"top1_{group}"] = computed["top1"]
    return metrics


def _update_group(
    acc: ZeroShotClassificationAccumulator,
    group: str,
    groups: dict[str, Tensor],
    scores: Tensor,
    labels: Tensor,
) -> None:
    """Add a batch's ``scores`` [B, C] to one accumulator of :func:`_group_accumulators`."""
    if group == "all":
        acc.update(scores, labels.to(scores.device))
        return
    members = groups[group.removesuffix(ONLY)]
    mask = torch.isin(labels, members)
    if not mask.any():
        return
    picked, picked_labels = scores[mask.to(scores.device)], labels[mask]
    if group.endswith(ONLY):  # among the group's own classes, labels renumbered to their place in it
        position = torch.full((scores.shape[1],), -1, dtype=torch.long)
        position[members] = torch.arange(len(members))
        picked, picked_labels = picked[:, members.to(scores.device)], position[picked_labels]
    acc.update(picked, picked_labels.to(scores.device))


def _progress(iterable, desc: str):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False)
