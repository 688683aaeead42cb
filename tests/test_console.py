"""A console a person can read: the `reco` script drops the libraries' known-harmless noise, keeps its own
output and every other warning, and shows everything with --verbose / RECO_DEBUG=1."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

from reco_lightning import console

CONFIG = Path(__file__).parents[1] / "configs" / "tiny.yaml"


def _fit(project: Path, root: Path, *extra: str, env: dict[str, str]) -> str:
    reco = Path(sys.executable).parent / "reco"
    args = [str(reco), "fit", "--config", str(CONFIG), f"--trainer.default_root_dir={root}",
            "--trainer.max_steps=1", "--trainer.val_check_interval=1", *extra]  # fmt: skip
    run = subprocess.run(args, cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    return run.stdout + run.stderr


def test_the_reco_script_is_quiet_and_verbose_shows_everything(tiny_dir, tmp_path):
    (tmp_path / "artifacts").mkdir()
    (tmp_path / "artifacts" / "tiny").symlink_to(tiny_dir)
    env = {k: v for k, v in os.environ.items() if k not in ("RECO_DEBUG", "RECO_VERBOSE", "RECO_QUIET")}
    quiet = _fit(tmp_path, tmp_path / "quiet", env=env)
    loud = _fit(tmp_path, tmp_path / "loud", "--verbose", env=env)
    noise = ("GPU available:", "module(s) in eval mode", "Your `IterableDataset` has `__len__` defined")
    for line in noise:
        assert line in loud, f"--verbose lost {line!r}"
        assert line not in quiet, f"the quiet console still prints {line!r}"
    for ours in ("zero-shot report", "| shapes | reco |"):  # the run's own results are always shown
        assert ours in quiet and ours in loud
    assert len(quiet.splitlines()) < len(loud.splitlines())


def test_the_filters_drop_only_what_they_name(monkeypatch):
    monkeypatch.delenv("RECO_DEBUG", raising=False)
    monkeypatch.delenv("RECO_VERBOSE", raising=False)
    record = logging.LogRecord("pytorch_lightning.x", logging.INFO, __file__, 1, "%s", ("",), None)
    drop = console._DropNoise(console.NOISY_LOGS)
    for message, kept in [
        ("GPU available: False, used: False", False),
        ("[rank: 1] Seed set to 0", False),
        ("💡 Tip: For seamless cloud uploads", False),
        ("zero-shot report (runs/x/zeroshot_report.md):", True),
        ("Restoring something else entirely", True),
    ]:
        record.args = (message,)
        assert drop.filter(record) is kept, message
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for pattern in console.NOISY_WARNINGS:  # what quiet_console installs (not called: process-wide)
            warnings.filterwarnings("ignore", message=pattern)
        warnings.warn("Found 66 module(s) in eval mode at the start of training.", UserWarning, stacklevel=1)
        warnings.warn("a warning nobody listed", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["a warning nobody listed"]


def test_debug_means_verbose(monkeypatch):
    monkeypatch.setenv("RECO_DEBUG", "1")
    assert console.verbose()
    monkeypatch.setenv("RECO_DEBUG", "0")
    monkeypatch.delenv("RECO_VERBOSE", raising=False)
    assert not console.verbose()
