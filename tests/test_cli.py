import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reco_lightning.cli import main

CONFIG = Path(__file__).parents[1] / "configs" / "tiny.yaml"


def tiny_args(tiny_dir, root):
    return [
        "--config",
        str(CONFIG),
        f"--model.backbone={tiny_dir / 'clip'}",
        f"--model.memory={tiny_dir / 'memory'}",
        f"--data.init_args.train={tiny_dir / 'train.csv'}",
        f"--data.init_args.val={tiny_dir / 'val.csv'}",
        f"--trainer.default_root_dir={root}",
        "--trainer.enable_progress_bar=false",
    ]


def test_fit_writes_small_checkpoint_and_reruns(tiny_dir, tmp_path):
    args = ["fit", *tiny_args(tiny_dir, tmp_path), "--trainer.max_steps=3", "--trainer.val_check_interval=3"]
    main(args)
    main(args)  # an existing config.yaml must not stop a second run
    checkpoints = sorted(tmp_path.rglob("last.ckpt"))
    assert len(checkpoints) == 2
    state = torch.load(checkpoints[0], weights_only=False)["state_dict"]
    assert state and not any(k.startswith("backbone.") for k in state)


def test_validate_and_test_and_predict_from_checkpoint(tiny_dir, tmp_path):
    main(["fit", *tiny_args(tiny_dir, tmp_path), "--trainer.max_steps=2", "--trainer.val_check_interval=2"])
    ckpt = next(tmp_path.rglob("last.ckpt"))
    for command in ("validate", "test", "predict"):
        main([command, *tiny_args(tiny_dir, tmp_path / command), f"--ckpt_path={ckpt}"])


def test_print_config(tiny_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *tiny_args(tiny_dir, tmp_path), "--print_config"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "near_duplicate_threshold: 0.99" in out and "backbone:" in out


def test_ddp_on_cpu_with_two_processes(tiny_dir, tmp_path):
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
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "distributed_backend=gloo" in result.stderr + result.stdout
    assert "All distributed processes registered. Starting with 2 processes" in result.stderr + result.stdout
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
