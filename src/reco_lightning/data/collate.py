"""The collate stage: a list of decoded samples -> the backbone's input tensors, bad samples set aside.

Runs in the DataLoader workers, after the stream has decoded the images. It applies the backbone's own
image processor and tokenizer (:class:`reco_lightning.encoders.Preprocessor`, the same calls the
backbone uses for prompts), so training sees exactly the backbone family's inputs. Apart from the stream because it is
the only stage that needs the backbone's processor: a memory build, a feature cache and training each
build one from their backbone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from reco_lightning.data.records import PairRecord
from reco_lightning.encoders import Preprocessor

__all__ = ["PairCollator"]


class PairCollator:
    """A list of samples -> backbone inputs. Bad samples are dropped, their keys and why passed on."""

    def __init__(self, preprocessor: Preprocessor) -> None:
        self.preprocessor = preprocessor

    def __call__(self, samples: Sequence[tuple[int, PairRecord, dict[str, Any] | str]]) -> dict[str, Any]:
        good = [(p, s) for p, _, s in samples if isinstance(s, dict)]
        batch: dict[str, Any] = {
            "id": torch.tensor([s["id"] for _, s in good], dtype=torch.long),
            "position": torch.tensor([p for p, _ in good], dtype=torch.long),
            "key": [s["key"] for _, s in good],
            "caption": [s["caption"] for _, s in good],
            "image_path": [s.get("image_path", s["key"]) for _, s in good],
            "bad_keys": [f"{r.key} ({s})" for _, r, s in samples if isinstance(s, str)],  # key and why
            "bad_why": [s for _, _, s in samples if isinstance(s, str)],  # why alone: what tallies count
        }
        if (
            not good
        ):  # every sample bad: an empty batch that the module still steps through (DDP stays in sync)
            return batch
        batch.update(self.preprocessor.images([s["image"] for _, s in good]))
        batch.update(self.preprocessor.tokenize(batch["caption"]))
        return batch
