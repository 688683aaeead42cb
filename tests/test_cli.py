import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reco_lightning.cli import main

CONFIG = Path(__file__).parents[1] / "configs" / "tiny.yaml"


@pytest.fixture()
def in_project(tiny_dir, tmp_path, monkeypatch):
    """Run from a fresh directory whose artifacts/tiny is the session's tiny setup, as configs/tiny.yaml expects."""
    (tmp_path / "artifacts").mkdir()
    (tmp_path / "artifacts" / "tiny").symlink_to(tiny_dir)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def tiny_args(tiny_dir, root):
    return [
        "--config",
        str(CONFIG),
        f"--trainer.default_root_dir={root}",
        "--trainer.enable_progress_bar=false",
    ]


def test_fit_writes_small_checkpoint_and_reruns(tiny_dir, tmp_path, in_project):
    args = ["fit", *tiny_args(tiny_dir, tmp_path), "--trainer.max_steps=3", "--trainer.val_check_interval=3"]
    main(args)
    main(args)  # an existing config.yaml must not stop a second run
    checkpoints = sorted(tmp_path.rglob("last.ckpt"))
    assert len(checkpoints) == 2
    state = torch.load(checkpoints[0], weights_only=False)["state_dict"]
    assert state and not any(k.startswith("backbone.") for k in state)


def test_validate_and_test_and_predict_from_checkpoint(tiny_dir, tmp_path, in_project):
    main(["fit", *tiny_args(tiny_dir, tmp_path), "--trainer.max_steps=2", "--trainer.val_check_interval=2"])
    ckpt = next(tmp_path.rglob("last.ckpt"))
    for command in ("validate", "test", "predict"):
        main([command, *tiny_args(tiny_dir, tmp_path / command), f"--ckpt_path={ckpt}"])
    report = json.loads(
        (tmp_path / "test" / "lightning_logs" / "version_0" / "zeroshot_report.json").read_text()
    )
    settings = {(row["dataset"], row["setting"]) for row in report["rows"]}
    assert {
        ("shapes", "clip"),
        ("shapes", "reco"),
        ("shapes_captions", "reco_text"),
        ("shapes", "reco@k=2"),
    } <= settings
    assert (tmp_path / "test" / "lightning_logs" / "version_0" / "k_sweep_shapes.png").stat().st_size > 1000


def test_test_with_checkpoint_uses_the_configured_memory_not_the_trained_one(tiny_dir, tmp_path, in_project):
    from reco_lightning.cli import lightning_main
    from reco_lightning.memory import MemoryStore

    main(["fit", *tiny_args(tiny_dir, tmp_path), "--trainer.max_steps=1", "--trainer.val_check_interval=1"])
    ckpt = next(tmp_path.rglob("last.ckpt"))
    full = MemoryStore.open(tiny_dir / "memory")
    MemoryStore.write(
        tmp_path / "half",
        full.image_embeddings[:60],
        full.text_embeddings[:60],
        full.ids[:60],
        fingerprint=full.fingerprint,
    )
    cli = lightning_main(
        [
            "test",
            *tiny_args(tiny_dir, tmp_path / "t"),
            f"--ckpt_path={ckpt}",
            f"--model.memory={tmp_path / 'half'}",
        ]
    )
    assert cli.model.retriever.memory.path == tmp_path / "half"
    assert len(cli.model.retriever.memory) == 60


def test_print_config(tiny_dir, tmp_path, in_project, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *tiny_args(tiny_dir, tmp_path), "--print_config"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "near_duplicate_threshold: 0.999" in out and "backbone:" in out


def test_ddp_on_cpu_with_two_processes(tiny_dir, tmp_path, in_project):
    """Through the installed `reco` script: Lightning's ddp launcher re-executes the command per rank."""
    reco = Path(sys.executable).parent / "reco"
    args = [
        str(reco),
        "fit",
        *tiny_args(tiny_dir, tmp_path),
        "--trainer.strategy=ddp",
        "--trainer.devices=2",
        "--trainer.max_steps=2",
        "--trainer.val_check_interval=2",
    ]
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher's child rank too
        output, _ = proc.communicate()
        pytest.fail(f"DDP run hung:\n{output[-3000:]}")
    assert proc.returncode == 0, output[-3000:]
    assert "distributed_backend=gloo" in output
    assert "All distributed processes registered. Starting with 2 processes" in output
    assert "zero-shot report" in output
    assert list(tmp_path.rglob("last.ckpt"))


def test_memory_commands(tiny_dir, tmp_path, capsys):
    main(["memory", "info", str(tiny_dir / "memory")])
    info = json.loads(capsys.readouterr().out)
    assert info["count"] == 192 and info["bytes"]["embeddings"] == 2 * 192 * 32 * 2
    main(
        [
            "memory",
            "concat",
            str(tiny_dir / "memory"),
            str(tiny_dir / "memory"),
            "--out",
            str(tmp_path / "twice"),
        ]
    )
    main(
        [
            "memory",
            "build",
            "--source",
            str(tiny_dir / "val.csv"),
            "--out",
            str(tmp_path / "val_mem"),
            "--backbone",
            str(tiny_dir / "clip"),
            "--accelerator",
            "cpu",
            "--devices",
            "1",
            "--batch_size",
            "32",
        ]
    )
    capsys.readouterr()
    main(["memory", "info", str(tmp_path / "val_mem")])
    assert json.loads(capsys.readouterr().out)["count"] == 64
