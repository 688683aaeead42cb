"""Calibrate a retrieval weight on validation data, by a stated rule, never on test data.

Two weights decide how far a memory pulls an embedding: the "mix" baseline's ``mix_alpha`` and the
fusion's ``fusion_config.retrieved_skip`` (its untrained start is exactly ``query + weight x mean of
neighbours``). Both are set the way one deploys a memory: sweep candidate values on a held-out
classification set with the deployment memory attached, and pick by one of two rules:

- ``max``: the value with the best validation ``metric`` (ties: the smaller weight, the one that trusts
  the memory less);
- ``keep``: the largest value whose ``metric`` costs at most ``tolerance`` points against the frozen
  model (e.g. ``top1_seen``: keep what the backbone already knew). 0 when every value costs more.

``reco calibrate`` is the command; ``reco demo`` calls :func:`calibrate` itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, Literal

from reco_lightning.evaluation import DEFAULT_LEAKAGE_THRESHOLD, ClassificationSet, ZeroShotEvaluation
from reco_lightning.model import RecoModule

__all__ = ["PARAMETERS", "Rule", "calibrate", "choose"]

Rule = Literal["max", "keep"]

#: calibratable parameter -> the report setting whose score it changes
#: the model option the fusion's untrained start is calibrated by (its key under ``model:``)
RETRIEVED_SKIP = "fusion_config.retrieved_skip"
PARAMETERS: dict[str, str] = {"mix_alpha": "mix", RETRIEVED_SKIP: "reco"}

DEFAULT_VALUES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def choose(
    scores: dict[float, float], rule: Rule, reference: float | None = None, tolerance: float = 0.5
) -> float:
    """The value a rule picks from ``{value: validation metric}`` (``reference``: the frozen model's)."""
    if not scores:
        raise ValueError("nothing to choose from: give at least one candidate value")
    if rule == "max":
        best = max(scores.values())
        return min(value for value, score in scores.items() if score == best)
    if rule == "keep":
        if reference is None:
            raise ValueError("rule 'keep' needs the frozen model's score as reference")
        allowed = [value for value, score in scores.items() if score >= reference - tolerance]
        return max(allowed) if allowed else 0.0
    raise ValueError(f"unknown calibration rule {rule!r}: use 'max' or 'keep'")


def calibrate(
    model: RecoModule,
    dataset: ClassificationSet,
    parameter: str,
    values: Sequence[float] = DEFAULT_VALUES,
    rule: Rule = "max",
    metric: str = "top1",
    tolerance: float = 0.5,
    batch_size: int = 256,
    limit_images: int | None = None,
    leakage_threshold: float | None = DEFAULT_LEAKAGE_THRESHOLD,
) -> dict[str, Any]:
    """Sweep ``parameter`` over ``values`` on ``dataset`` and pick one by ``rule``.

    ``leakage_threshold``: the evaluation's leakage guard, as the run's ZeroShotEvaluation has it (see
    :func:`leakage_threshold_of`), so the weight is chosen on the neighbours the evaluation will read.

    The model keeps its memory and weights; ``fusion_config.retrieved_skip`` is set on both fusions for the
    sweep and left at the chosen value, scored on the fusion alone (a model with a vote, ``vote_weight``,
    is scored without it: the vote adds to the fusion's answer, its weight is chosen on its own). Returns
    {"parameter", "values": {value: metric}, "clip": the frozen model's metric, "rule", "metric",
    "tolerance", "chosen"}.
    """
    if parameter not in PARAMETERS:
        raise ValueError(f"cannot calibrate {parameter!r}: choose from {sorted(PARAMETERS)}")
    setting = PARAMETERS[parameter]
    if setting == "reco" and model.require_retriever().vote is not None:
        setting = "reco_without_vote"  # the weight is the fusion's; the memory's vote adds to it afterwards

    def score(setting: str, alpha: float = 1.0) -> float:
        evaluation = ZeroShotEvaluation(
            classification=[dataset],
            settings=[setting],
            mix_alpha=alpha,
            batch_size=batch_size,
            limit_images=limit_images,
            leakage_threshold=leakage_threshold,
        )
        report, _ = evaluation.evaluate(model)
        metrics = report.rows[0].metrics
        if metric not in metrics:
            raise ValueError(
                f"metric {metric!r} is not reported for {dataset.name}: choose from {sorted(metrics)} "
                "(top1_<group> needs that group in the set's class_groups)"
            )
        return float(metrics[metric])

    reference = score("clip")
    scores: dict[float, float] = {}
    for value in values:
        value = float(value)
        if value < 0:
            raise ValueError(f"{parameter} values are weights >= 0, got {value}")
        if parameter == RETRIEVED_SKIP:
            _set_retrieved_skip(model, value)
            scores[value] = score(setting)
        else:
            scores[value] = score(setting, value)
    chosen = choose(scores, rule, reference, tolerance)
    if parameter == RETRIEVED_SKIP:
        _set_retrieved_skip(model, chosen)
    return {
        "parameter": parameter,
        "dataset": dataset.name,
        "values": scores,
        "clip": reference,
        "rule": rule,
        "metric": metric,
        "tolerance": tolerance,
        "chosen": chosen,
    }


def _set_retrieved_skip(model: RecoModule, weight: float) -> None:
    for fusion in (model.image_fusion, model.text_fusion):
        fusion.config = replace(fusion.config, retrieved_skip=weight)
    model.hparams["fusion_config"] = {**model.hparams["fusion_config"], "retrieved_skip": weight}


def leakage_threshold_of(config: Mapping[str, Any]) -> float | None:
    """The leakage guard of a `reco fit` config's ZeroShotEvaluation callback (its default without one)."""
    for callback in (config.get("trainer") or {}).get("callbacks") or []:
        if isinstance(callback, Mapping) and str(callback.get("class_path", "")).endswith(
            "ZeroShotEvaluation"
        ):
            return (callback.get("init_args") or {}).get("leakage_threshold", DEFAULT_LEAKAGE_THRESHOLD)
    return DEFAULT_LEAKAGE_THRESHOLD
