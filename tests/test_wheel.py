"""The built wheel carries everything `reco` needs outside a source checkout (demo config, class lists).

The wheel is built from a copy of the project (so no stale build/ output can leak in), installed into a
private folder and imported from there in a subprocess whose working directory is not the checkout.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PROJECT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    copy = work / "project"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist")
    copy.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(PROJECT / name, copy / name)
    for name in ("src", "configs"):
        shutil.copytree(PROJECT / name, copy / name, symlinks=True, ignore=ignore)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", str(copy), "--no-deps", "--no-build-isolation", "-w", str(work / "dist")],
                   check=True, capture_output=True)  # fmt: skip
    wheel = next((work / "dist").glob("reco_lightning-*.whl"))
    site = work / "site"
    subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, capture_output=True
    )
    return site


def _python(site: Path, cwd: Path, code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )


def test_demo_config_and_resources_come_from_the_installed_package(installed, tmp_path):
    result = _python(
        installed,
        tmp_path,
        f"""
        from pathlib import Path
        import reco_lightning
        from reco_lightning.apps.demo.pipeline import CONFIG, DemoLayout, run_config
        from reco_lightning.data.zeroshot import load_classnames, load_templates
        assert Path(reco_lightning.__file__).is_relative_to({str(installed)!r}), reco_lightning.__file__
        assert CONFIG.is_file() and not CONFIG.is_symlink() and CONFIG.is_relative_to({str(installed)!r})
        assert "ZeroShotEvaluation" in CONFIG.read_text()
        assert run_config(DemoLayout(Path("artifacts/demo"))) == CONFIG
        assert len(load_classnames("imagenet")) == 1000 and load_templates("fashion_mnist")
        print("ok")
        """,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_reco_script_of_the_wheel_has_the_app_commands(installed, tmp_path):
    result = _python(
        installed,
        tmp_path,
        """
        import sys
        from reco_lightning.apps.main import main
        sys.argv = ["reco", "demo", "--help"]
        main()
        """,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--protocol" in result.stdout and "reco demo" in result.stdout
