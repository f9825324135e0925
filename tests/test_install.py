"""The package as a new user gets it: the wheel, in a fresh venv without the system's packages.

Why: an import of an undeclared package (click, which typer 0.29 stopped depending on) once
passed every test here because the development environment happened to have it, and the first
`provision --help` after `pip install .` was a traceback. This builds the wheel, installs it
into a venv made without system site-packages, and runs the CLI from there: help, init, render
(templates must ship inside the wheel) and usage errors; exit codes 0 and 2, never a traceback.
"""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest

from provision.sandbox import new_key_pair
from tests.conftest import REPO


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `provision` entry point of the wheel, installed into a bare venv."""
    base = tmp_path_factory.mktemp("install")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                    str(base / "dist"), str(REPO)], check=True, capture_output=True, timeout=600)
    wheel = next((base / "dist").glob("provision-*.whl"))
    venv.create(base / "venv", with_pip=True, system_site_packages=False)
    pip = base / "venv" / "bin" / "pip"
    done = subprocess.run([str(pip), "install", "-q", "--disable-pip-version-check", str(wheel)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    return base / "venv" / "bin" / "provision"


def cli(provision: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(provision), *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd, env={"PATH": "/usr/bin:/bin", "HOME": str(cwd),
                                        "COLUMNS": "200"}, check=False)
    assert "Traceback" not in done.stdout + done.stderr, done.stdout + done.stderr
    return done


def test_the_wheel_runs_in_a_bare_venv(installed: Path, tmp_path: Path) -> None:
    help_text = cli(installed, "--help", cwd=tmp_path)
    assert help_text.returncode == 0 and "onboard" in help_text.stdout

    assert cli(installed, "init", cwd=tmp_path).returncode == 0
    inventory = tmp_path / "provision.toml"
    new_key_pair(tmp_path)
    inventory.write_text(inventory.read_text() + '\n[[members]]\nname = "alice"\n'
                         'keys = ["id_ed25519.pub"]\ngpus = "0"\n')
    rendered = cli(installed, "render", "--out", "out", cwd=tmp_path)
    assert rendered.returncode == 0, rendered.stderr
    for name in (".devcontainer/devcontainer.json", ".devcontainer/Dockerfile",
                 ".vscode/launch.json", "inference.py", "sd35/__init__.py", "sd35/fp8.py"):
        assert (tmp_path / "out" / "alice" / name).is_file(), name


@pytest.mark.parametrize("args", [("host", "--bogus"), ("nosuchcmd",), ("facts",), ()],
                         ids=lambda a: " ".join(a) or "no arguments")
def test_usage_errors_from_the_wheel_exit_2(installed: Path, tmp_path: Path,
                                            args: tuple[str, ...]) -> None:
    done = cli(installed, *args, cwd=tmp_path)
    assert done.returncode == 2
    assert "Usage: provision" in done.stdout + done.stderr
