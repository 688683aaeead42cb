"""`reco export`: a Lightning checkpoint of a training run -> a shareable RecoModel export directory.

The checkpoint is read with ``torch.load(weights_only=True)`` (tensors and plain containers only: a
tampered pickle is refused, never run) and only its trained part is kept: the two fusions and the
temperature go to ``model.safetensors``; the settings, the backbone fingerprint, the memory trained with
and the weights calibrated by ``reco calibrate`` go to ``config.json``; the run's ``zeroshot_report.json`` (found beside the
checkpoint, or given) becomes the model card's table. No Lightning is needed to read or write any of it.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from reco_lightning.errors import RecoError
from reco_lightning.pretrained import BackboneMismatchError, RecoConfig, RecoModel

__all__ = ["CheckpointError", "export_checkpoint", "read_checkpoint", "run_files"]


class CheckpointError(RecoError, ValueError):
    """A checkpoint that is not loaded: missing, unreadable, not RecoModule's, or holding pickled objects."""


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A RecoModule checkpoint's contents, loaded without executing anything (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: give a .ckpt written by `reco fit`")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"checkpoint {path} holds objects other than tensors and plain values, so it is not loaded "
            f"(weights_only: {first}): use only checkpoints written by `reco fit`"
        ) from None
    except (RuntimeError, OSError, EOFError) as err:
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({err}): give a .ckpt written by `reco fit`"
        ) from err
    if (
        not isinstance(checkpoint, dict)
        or "state_dict" not in checkpoint
        or "reco_backbone" not in checkpoint
    ):
        raise CheckpointError(
            f"{path} is not a RecoModule checkpoint (no state_dict / reco_backbone): give one of `reco fit`"
        )
    return checkpoint


def run_files(checkpoint: str | os.PathLike) -> dict[str, Path]:
    """The files of the run a checkpoint belongs to (``<log_dir>/checkpoints/x.ckpt``): its ``config.yaml``
    and ``zeroshot_report.json``, where they exist."""
    found: dict[str, Path] = {}
    for directory in (Path(checkpoint).parent, Path(checkpoint).parent.parent):
        for name in ("config.yaml", "zeroshot_report.json"):
            if name not in found and (directory / name).is_file():
                found[name] = directory / name
    return found


def _calibration(calibrations: Sequence[str | os.PathLike]) -> dict[str, float]:
    """The weights chosen by each ``reco calibrate`` output given. The run config's own ``mix_alpha`` is not
    one: LightningCLI saves every default, so a weight nobody calibrated would read as calibrated."""
    chosen: dict[str, float] = {}
    for path in calibrations:
        result = json.loads(Path(path).read_text())
        if "parameter" not in result or "chosen" not in result:
            raise CheckpointError(f"{path} is not an output of `reco calibrate` (no parameter / chosen)")
        chosen[str(result["parameter"])] = float(result["chosen"])
    return chosen


def _absolute(path: str | os.PathLike | None) -> str | None:
    """An existing local path made absolute (an export is loaded from anywhere); anything else (a hub
    name, a path gone since training) as it was."""
    if path is None:
        return None
    return os.path.abspath(path) if Path(path).exists() else str(path)  # abspath keeps symlinks


def _memory_record(path: str | None) -> dict[str, Any] | None:
    """Where the training memory was and what it was (rows, identity), as far as it is still readable."""
    if not path:
        return None
    record: dict[str, Any] = {"path": _absolute(path)}
    try:
        from reco_lightning.memory.store import MemoryStore

        store = MemoryStore.open(path, load_indexes=False)
        record.update(count=len(store), identity=store.identity, backend=store.manifest.get("backend", {}))
    except Exception as err:  # moved or deleted since training: the path is all that is known
        record["note"] = f"not readable at export time ({type(err).__name__})"
    return record


def export_checkpoint(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    backbone: str | os.PathLike | None = None,
    report: str | os.PathLike | None = None,
    calibrations: Sequence[str | os.PathLike] = (),
) -> Path:
    """Write the export of ``checkpoint`` to ``out`` (see the module docstring); returns ``out``.

    ``backbone``: where the backbone is now, if it moved since training (its fingerprint must match the
    checkpoint's). ``report``: a ``zeroshot_report.json`` (default: the one beside the checkpoint).
    ``calibrations``: outputs of ``reco calibrate`` whose choices are recorded.
    """
    data = read_checkpoint(checkpoint)
    hparams = dict(data.get("hyper_parameters") or {})
    recorded = data["reco_backbone"]
    files = run_files(checkpoint)
    if hparams.get("known_memory"):
        hparams["known_memory"] = _absolute(hparams["known_memory"])
    model = RecoModel(
        _absolute(backbone or hparams.get("backbone") or recorded["name_or_path"]),
        RecoConfig.from_mapping(hparams),
        info={
            "memory": _memory_record(hparams.get("memory")),
            "calibration": _calibration(calibrations),
            "loss_config": hparams.get("loss_config"),
            "checkpoint": _absolute(checkpoint),
            "trained_steps": int(data.get("global_step", 0)),
        },
    )
    if model.backbone.fingerprint["id"] != recorded.get("id"):
        raise BackboneMismatchError(
            f"checkpoint {checkpoint} was trained on backbone {recorded.get('name_or_path')!r} (id {recorded.get('id')}) "
            f"but {model.backbone.name_or_path!r} is another (id {model.backbone.fingerprint['id']}): give --backbone "
            "the directory of the one it was trained on"
        )
    state = data["state_dict"]
    trained = {
        **{f"image_fusion.{k}": v for k, v in model.image_fusion.state_dict().items()},
        **{f"text_fusion.{k}": v for k, v in model.text_fusion.state_dict().items()},
    }
    missing = [key for key in trained if key not in state]
    if missing or "criterion.log_scale" not in state:
        raise CheckpointError(
            f"checkpoint {checkpoint} lacks fusion weights ({missing[:3]}): give one of `reco fit`"
        )
    model.image_fusion.load_state_dict(
        {k[len("image_fusion.") :]: v for k, v in state.items() if k.startswith("image_fusion.")}
    )
    model.text_fusion.load_state_dict(
        {k[len("text_fusion.") :]: v for k, v in state.items() if k.startswith("text_fusion.")}
    )
    model.logit_scale.fill_(float(state["criterion.log_scale"].exp()))
    report_path = Path(report) if report else files.get("zeroshot_report.json")
    report_data = json.loads(report_path.read_text()) if report_path else None
    return model.save_pretrained(out, report=report_data)
