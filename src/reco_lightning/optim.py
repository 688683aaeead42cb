"""The learning-rate schedule shared by RECO's fusion and the demo's stand-in backbone.

One function so both recipes mean the same thing by "warmup then cosine" (linear warm-up over
``warmup_steps``, then cosine decay to ``min_ratio x peak`` at ``total_steps``).
"""

from __future__ import annotations

import math

__all__ = ["warmup_cosine"]


def warmup_cosine(
    step: int, warmup_steps: int, total_steps: int, peak: float = 1.0, min_ratio: float = 0.0
) -> float:
    """The learning rate (or, at ``peak`` 1, the LambdaLR factor) at optimiser step ``step`` (0-based)."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
