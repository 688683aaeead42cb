"""A console a person can read: the `reco` command filters the known-harmless noise of the libraries it drives.

Lightning prints tips, hardware lines and a warning per LightningCLI call made from Python; transformers
warns that torchvision is missing and draws a progress bar per saved file; a frozen backbone makes Lightning
warn about modules in eval mode. None of it is actionable for a `reco` user, and it buried the demo's own
output (1,118 lines, 158 of them tips and notices). :func:`quiet_console` drops exactly those messages,
by pattern, and nothing else: warnings and log records that match no pattern still show.

Only the console script calls it (``reco ...`` from a shell, and the DDP ranks it launches): library calls
and the tests see every message. ``RECO_DEBUG=1`` (or ``reco --verbose ...``) shows everything.
"""

from __future__ import annotations

import logging
import os
import re
import warnings

__all__ = ["NOISY_LOGS", "NOISY_WARNINGS", "quiet_console", "verbose"]

#: Python warnings (message regex) that say nothing a `reco` user can act on
NOISY_WARNINGS: tuple[str, ...] = (
    r"LightningCLI's args parameter is intended to run from within Python",  # reco demo drives the CLI
    r"Found \d+ module\(s\) in eval mode",  # the frozen backbone is in eval mode on purpose
    r"Your `IterableDataset` has `__len__` defined",  # our streams shard by rank and worker themselves
    r"Couldn't infer the batch indices fetched from your dataloader",  # positions travel in the batch
    r".*does not have many workers which may be a bottleneck",  # the tiny and demo runs choose 0 workers
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # inside Lightning, fixed upstream
    r"Starting from v1\.9\.0, `tensorboardX` has been removed",  # CSVLogger is what we want
    r"The `srun` command is available on your system",
    r"Checkpoint directory .* exists and is not empty",  # a re-run of the same command
    r".*Precision 16-mixed is not supported by the model summary",
    r".*requires torchvision \(not installed\); falling back to",  # PIL image processors are what we use
    r"The dirpath has changed from .* therefore `best_model_score`",  # testing a checkpoint of another run
)

#: log records (message regex) of Lightning and transformers that only announce or advertise
NOISY_LOGS: tuple[str, ...] = (
    r"💡 Tip:",
    r"(GPU|TPU|HPU|IPU) available:",
    r"LOCAL_RANK: \d+ - CUDA_VISIBLE_DEVICES",
    r"You are using a CUDA device .* that has Tensor Cores",
    r"Seed set to \d+",
    r"`Trainer\.fit` stopped: `max_(steps|epochs)=\d+` reached",
    r"(Restoring states|Loaded model weights) from the checkpoint",
    r"Restored all states from the checkpoint",
    r".*requires torchvision \(not installed\); falling back to",
    r"Model config: (bos|eos|pad)_token_id must be `None` or an integer within the vocabulary",
    r"Initializing distributed: GLOBAL_RANK",
    r"Loading `train_dataloader` to estimate number of stepping batches",
)
_RANK_PREFIX = re.compile(r"^\[rank: \d+\] ")  # what Lightning puts before a record of a rank > 0

_LOGGERS = ("pytorch_lightning", "lightning", "lightning_fabric", "lightning.pytorch", "transformers")


def verbose() -> bool:
    """Whether the user asked for every message (``RECO_DEBUG=1`` or ``reco --verbose``)."""
    return any(os.environ.get(name, "") not in ("", "0") for name in ("RECO_DEBUG", "RECO_VERBOSE"))


class _DropNoise(logging.Filter):
    def __init__(self, patterns: tuple[str, ...]) -> None:
        super().__init__("reco-console")
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is not ours to hide
            return True
        return self.pattern.match(_RANK_PREFIX.sub("", message.lstrip())) is None


def quiet_console() -> None:
    """Drop the known-harmless messages (module docstring) for the rest of this process; idempotent, and
    a no-op when :func:`verbose`. Sets ``RECO_QUIET=1`` so processes this one starts quiet down alike."""
    if verbose():
        return
    os.environ["RECO_QUIET"] = "1"
    for pattern in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    drop = _DropNoise(NOISY_LOGS)
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(drop)  # records logged on this logger itself
        for handler in logger.handlers:  # records of its children reach its handlers
            if not any(isinstance(f, _DropNoise) for f in handler.filters):
                handler.addFilter(drop)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Writing model shards" once per saved backbone
        for handler in hf_logging.get_logger().handlers:
            if not any(isinstance(f, _DropNoise) for f in handler.filters):
                handler.addFilter(drop)
    except ImportError:
        pass
