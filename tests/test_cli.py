import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reco_lightning.cli import is_user_error, lightning_main, main
from reco_lightning.errors import RecoMemoryError
from reco_lightning.memory import MemoryStore

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


def test_fit_writes_small_checkpoint_and_reruns(tiny_dir, tmp_path, in_project, capsys):
    args = ["fit", *tiny_args(tiny_dir, tmp_path), "--trainer.max_steps=3", "--trainer.val_check_interval=3"]
    main(args, announce=True)  # as the console script: the run names its checkpoint
    main(args)  # an existing config.yaml must not stop a second run (a library call: no line)
    checkpoints = sorted(tmp_path.rglob("last.ckpt"))
    assert len(checkpoints) == 2
    named = [line for line in capsys.readouterr().out.splitlines() if line.startswith("checkpoint: ")]
    assert [line.split()[1] for line in named] == [str(checkpoints[0])]
    state = torch.load(checkpoints[0], weights_only=False)["state_dict"]
    assert state and not any(k.startswith("backbone.") for k in state)


def test_validate_and_test_and_predict_from_checkpoint(tiny_dir, tmp_path, in_project):
    main(["fit", *tiny_args(tiny_dir, tmp_path), "--trainer.max_steps=2", "--trainer.val_check_interval=2"])
    ckpt = next(tmp_path.rglob("last.ckpt"))
    for command in ("validate", "test", "predict"):
        output = [f"--output_dir={tmp_path / 'embeddings'}"] if command == "predict" else []
        main([command, *tiny_args(tiny_dir, tmp_path / command), f"--ckpt_path={ckpt}", *output])
    assert json.loads((tmp_path / "embeddings" / "manifest.json").read_text())["rows"] > 0
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


@pytest.fixture(scope="module")
def trained_ckpt(tiny_dir, tmp_path_factory):
    """One checkpoint (k=4, backbone artifacts/tiny/clip as configs/tiny.yaml says) for the inference tests."""
    root = tmp_path_factory.mktemp("trained")
    (root / "artifacts").mkdir()
    (root / "artifacts" / "tiny").symlink_to(tiny_dir)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        main(["fit", *tiny_args(tiny_dir, root), "--trainer.max_steps=1", "--trainer.val_check_interval=1"])
    return next(root.rglob("last.ckpt"))


def test_inference_settings_given_with_a_checkpoint_are_honoured(
    tiny_dir, tmp_path, in_project, trained_ckpt
):
    """A moved backbone directory, another k and search params: the run's values, not the checkpoint's."""
    moved = shutil.copytree(tiny_dir / "clip", tmp_path / "moved_clip")
    assert torch.load(trained_ckpt, weights_only=False)["hyper_parameters"]["k"] == 4
    cli = lightning_main(
        [
            "validate",
            *tiny_args(tiny_dir, tmp_path / "v"),
            f"--ckpt_path={trained_ckpt}",
            f"--model.backbone={moved}",
            "--model.k=2",
            "--model.memory_search_params={nprobe: 64}",  # an IVF knob: the exact memory ignores it
            "--model.refine_text=false",
            "--trainer.limit_val_batches=1",
        ]
    )
    model = cli.model
    assert model.backbone.name_or_path == str(moved) and cli.datamodule.hparams.backbone == str(moved)
    assert model.hparams.k == 2 and model.retriever.k == 2
    assert model.hparams.memory_search_params == {"nprobe": 64} and model.hparams.refine_text is False


def test_checkpoint_beside_another_backbone_fails_in_one_line_naming_both(
    tiny_dir, tmp_path, in_project, trained_ckpt, other_backbone, capsys
):
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "validate",
                *tiny_args(tiny_dir, tmp_path),
                f"--ckpt_path={trained_ckpt}",
                f"--model.backbone={other_backbone}",
            ]
        )
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("reco: error:")]
    assert len(errors) == 1 and "Traceback" not in err
    assert errors[0].startswith("reco: error: checkpoint was trained on backbone 'artifacts/tiny/clip'")
    assert f"this model loads {other_backbone!r}" in errors[0]


def test_errors_of_ours_are_one_line_on_stderr_with_exit_status_1(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RECO_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["memory", "info", str(tmp_path)])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == (
        f"reco: error: {tmp_path} is not a memory: {tmp_path / 'manifest.json'} is missing "
        "(RECO_DEBUG=1 shows the traceback)\n"
    )
    missing = tmp_path / "missing.csv"
    with pytest.raises(SystemExit):
        main(["memory", "build", "--source", str(missing), "--out", str(tmp_path / "m"), "--backbone", "x"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("reco: error: ") and str(missing) in err

    with pytest.raises(SystemExit):
        main(["memory", "info", str(tmp_path / "typo")])
    assert capsys.readouterr().err == (
        f"reco: error: memory directory {tmp_path / 'typo'} does not exist: build one with `reco memory build` "
        "(RECO_DEBUG=1 shows the traceback)\n"
    )

    monkeypatch.setenv("RECO_DEBUG", "1")
    with pytest.raises(RecoMemoryError, match="is not a memory"):
        main(["memory", "info", str(tmp_path)])


def test_ctrl_c_is_one_line_saying_whether_a_rerun_resumes(tmp_path, capsys, monkeypatch):
    from reco_lightning.memory import interop
    from test_memory_interop import make_clip_retrieval

    def stopped(*args):
        raise KeyboardInterrupt

    monkeypatch.delenv("RECO_DEBUG", raising=False)
    monkeypatch.setattr(interop, "_copy_rows", stopped)  # a real import, stopped in its first part
    src = make_clip_retrieval(tmp_path / "src")
    commands = {"stop": lambda argv: stopped()}
    cases = {
        ("memory", "import", str(src), "--out", str(tmp_path / "m"), "--backbone", "x"): (
            "; re-run the same command to resume (its copied parts are kept)"
        ),
        ("stop",): "",
    }
    for argv, hint in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            main(list(argv), commands)
        assert exit_info.value.code == 130
        assert capsys.readouterr().err == f"reco: interrupted{hint}\n"
    monkeypatch.setenv("RECO_DEBUG", "1")
    with pytest.raises(KeyboardInterrupt):
        main(["stop"], commands)


def test_a_rejected_setting_is_one_line_naming_it_and_the_help(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RECO_DEBUG", raising=False)
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  memroy: somewhere\n")
    cases = {
        ("fit", "--config", str(CONFIG), "--config", str(typo)): (
            "Subcommand 'fit' does not accept option 'model.memroy'; `reco fit --help` lists the options"
        ),
        ("fit", "--config", str(CONFIG), "--model.kk", "3"): "unrecognized arguments: --model.kk 3",
        ("fit", "--config", str(CONFIG), "--data.init_args.batchsize", "3"): (
            "Parser key \"data\": Option 'batchsize' is not accepted"
        ),
        ("memory", "build", "--bogus", "1"): "--bogus 1; `reco memory build --help` lists the options",
        ("fitt",): "invalid choice: 'fitt'",
    }
    for argv, expected in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            main(list(argv))
        err = capsys.readouterr().err
        assert exit_info.value.code == 1 and err.count("\n") == 1, err[-500:]
        assert err.startswith("reco: error: ") and expected in err


def test_help_names_the_commands_beside_lightnings(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("more commands: ") and all(c in last for c in ("export", "memory", "calibrate"))


def test_only_errors_written_for_the_user_lose_their_traceback(monkeypatch):
    from reco_lightning.metrics import build_prompts

    def raised(call):
        try:
            call()
        except Exception as err:
            return err
        raise AssertionError("no error")

    assert is_user_error(raised(lambda: build_prompts([], ["a {c}."])))  # our ValueError, our message
    assert is_user_error(raised(lambda: Path("/nonexistent/reco.csv").read_text()))
    assert not is_user_error(raised(lambda: json.loads("{")))  # a library's ValueError: maybe a bug
    assert not is_user_error(raised(lambda: {}["key"]))
    import reco_lightning.cli as cli

    monkeypatch.setitem(cli.COMMANDS, "memory", lambda args: {}["bug"])
    with pytest.raises(KeyError):  # a bug keeps its traceback
        main(["memory", "info", "x"])


def test_console_script_prints_one_line_and_debug_shows_the_traceback(tmp_path):
    reco = Path(sys.executable).parent / "reco"
    env = {k: v for k, v in os.environ.items() if k != "RECO_DEBUG"}
    plain = subprocess.run(
        [str(reco), "memory", "info", str(tmp_path)], capture_output=True, text=True, env=env
    )
    assert plain.returncode == 1 and plain.stdout == ""
    assert plain.stderr.count("\n") == 1 and plain.stderr.startswith(
        f"reco: error: {tmp_path} is not a memory"
    )
    debug = subprocess.run(
        [str(reco), "memory", "info", str(tmp_path)],
        capture_output=True,
        text=True,
        env={**env, "RECO_DEBUG": "1"},
    )
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "RecoMemoryError" in debug.stderr


def test_memory_build_prints_rows_and_bad_samples_with_their_first_keys(tmp_path, tiny_dir, capsys):
    lines = (tiny_dir / "train.csv").read_text().splitlines()[:9]
    (tmp_path / "images").symlink_to(tiny_dir / "images")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    lines += ["broken.png,a red circle.", "images/train_000001.png,", "missing.png,a blue square."]
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "mem"
    args = ["--source", str(tmp_path / "pairs.csv"), "--out", str(out), "--backbone", str(tiny_dir / "clip")]
    main(["memory", "build", *args, "--accelerator", "cpu", "--devices", "1", "--batch_size", "4"])
    keys = json.loads((out / "manifest.json").read_text())["bad_keys"]
    assert len(keys) == 3
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"memory written to {out}: 8 rows, 3 bad samples skipped (1 not an image PIL can open, 1 empty caption, 1 "
        f"image not found; first: {', '.join(keys)}); warning: 27% of "
        "the source could not be read (an image missing or unreadable, or an empty caption; relative image "
        "paths are read from the CSV's own folder)"
    )


def test_calibrate_command_writes_the_sweep_and_the_choice(tiny_dir, tmp_path, capsys):
    import yaml

    from reco_lightning.cli import main

    config = tmp_path / "run.yaml"
    model = {
        "backbone": str(tiny_dir / "clip"),
        "memory": str(tiny_dir / "memory"),
        "k": 4,
        "fusion_config": {"num_heads": 4, "residual": True, "retrieved_skip": 0.5},
    }
    config.write_text(yaml.safe_dump({"model": model}))
    out = tmp_path / "cal.json"
    main(
        [
            "calibrate",
            "--config", str(config),
            "--parameter", "mix_alpha",
            "--values", "[0.0, 0.5, 2.0]",
            "--dataset.name", "shapes",
            "--dataset.root", str(tiny_dir / "zeroshot"),
            "--dataset.templates", "clip_generic",
            "--out", str(out),
        ]
    )  # fmt: skip
    result = json.loads(out.read_text())
    scores = {float(v): s for v, s in result["values"].items()}
    assert set(scores) == {0.0, 0.5, 2.0} and result["rule"] == "max"
    best = max(scores.values())
    assert result["chosen"] == min(v for v, s in scores.items() if s == best)
    assert f"mix_alpha = {result['chosen']:g}" in capsys.readouterr().out
    words = tmp_path / "words.json"  # the values as words, as usage.md writes them
    main(["calibrate", "--config", str(config), "--parameter", "mix_alpha", "--values", "0.5", "2",
          "--dataset.name", "shapes", "--dataset.root", str(tiny_dir / "zeroshot"),
          "--dataset.templates", "clip_generic", "--out", str(words)])  # fmt: skip
    assert json.loads(words.read_text())["values"] == {
        k: v for k, v in result["values"].items() if k != "0.0"
    }


def test_tiny_config_before_prepare_tiny_names_the_command_to_run(tmp_path, monkeypatch, capsys):
    from reco_lightning.apps.main import main as reco

    monkeypatch.chdir(tmp_path)  # no artifacts/tiny here
    with pytest.raises(SystemExit) as exit_info:
        reco(["fit", "--config", str(CONFIG), f"--trainer.default_root_dir={tmp_path}"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "'artifacts/tiny/clip' does not exist" in err and "`reco prepare-tiny --out artifacts/tiny`" in err
    assert "Repo id" not in err  # not the hub's error


def test_missing_local_backbone_is_not_looked_up_on_the_hub(tmp_path):
    from reco_lightning.encoders import FrozenCLIP
    from reco_lightning.errors import MissingInputError

    for path in (str(tmp_path / "nope"), "./clip", "a/b/c"):
        with pytest.raises(MissingInputError, match="does not exist"):
            FrozenCLIP(path)
