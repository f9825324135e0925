"""The rendered workspace as the official Dev Containers CLI (`@devcontainers/cli`) reads it.

Why: VS Code's "Reopen in Container" runs this same CLI code, so what it accepts, and the
`docker run` it derives, is what members get. Needs `devcontainer` on PATH
(`npm i -g @devcontainers/cli@0.89.0`); the GPU test also needs a Docker engine. Building the
image and `up`/`exec` as a member on a converged host are the sandbox tests' part.
"""

from __future__ import annotations

import itertools
import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from provision import render as workspace
from provision import sandbox
from provision.contract import INDUCTOR_CACHE
from provision.errors import DockerUnavailable
from provision.versions import resolve_image
from tests.conftest import require
from tests.test_render import HOSTS, INVENTORY, MEMBERS, REPO


@pytest.fixture(autouse=True)
def devcontainer_cli() -> None:
    require(shutil.which("devcontainer"), "the Dev Containers CLI (npm i -g @devcontainers/cli)")


def devcontainer(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    """The CLI with its own HOME: initializeCommand and ${localEnv:HOME} must not reach ours."""
    return subprocess.run(["devcontainer", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HOME": str(home)}, check=False)


def write_workspace(member_name: str, directory: Path) -> Path:
    member = next(m for m in MEMBERS if m.name == member_name)
    target, gid = HOSTS[member.name]
    files = workspace.render_workspace(INVENTORY, member, host_alias=target.alias,
                                       target=target, cache_gid=gid,
                                       image=resolve_image(INVENTORY.image))
    workspace.write_files(files, directory)
    return directory


@pytest.mark.parametrize("member", [m.name for m in MEMBERS])
def test_read_configuration_accepts_the_rendered_workspace(member: str, tmp_path: Path) -> None:
    folder = write_workspace(member, tmp_path / "sd35-fp8")
    done = devcontainer("read-configuration", "--workspace-folder", str(folder), home=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    config = json.loads(done.stdout.splitlines()[-1])["configuration"]
    assert config["remoteUser"] == member
    # The CLI resolves the variables the files rely on: her home on the host, the workspace.
    sources = {m["target"]: m["source"] for m in config["mounts"]}
    assert sources[f"/home/{member}/.config/huggingface"] == f"{tmp_path}/.config/huggingface"
    assert config["containerEnv"]["TORCHINDUCTOR_CACHE_DIR"] == (
        f"/workspaces/sd35-fp8/{INDUCTOR_CACHE}")


def test_read_configuration_accepts_this_repository(tmp_path: Path) -> None:
    done = devcontainer("read-configuration", "--workspace-folder", str(REPO), home=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.fixture(scope="module")
def local_image() -> str:
    """Any local image will do: the container is not meant to start (no GPU here)."""
    try:
        return sandbox.base_image(sandbox.docker_client(), log=lambda _: None)
    except DockerUnavailable as exc:
        require(False, f"a Docker engine ({exc.line()})")
        raise


# The CDI devices each member's container must get (contract), and no --gpus even when the
# CLI believes a GPU runtime is there (--gpu-availability all): it adds `--gpus all` only for
# hostRequirements.gpu, which the rendered file never sets.
GPU_DEVICES = {"alice": {"nvidia.com/gpu=0"}, "bob": {"nvidia.com/gpu=1", "nvidia.com/gpu=2"},
               "carol": set(), "dan": {"nvidia.com/gpu=all"}}


@pytest.mark.parametrize("member", list(GPU_DEVICES))
def test_the_cli_gives_the_container_exactly_her_gpus(member: str, local_image: str,
                                                      tmp_path: Path) -> None:
    """The rendered devcontainer.json with a local image in place of the build, brought up with
    GPU detection forced on: the `docker run` the CLI logs (it fails here: no GPU) must request
    her GPUs and no others."""
    folder = write_workspace(member, tmp_path / "sd35-fp8")
    config = json.loads((folder / ".devcontainer/devcontainer.json").read_text())
    config.pop("build")
    # No UID remapping: it would build (and leave behind) a derived image for nothing here.
    config.update(image=local_image, updateRemoteUserUID=False)
    override = tmp_path / "override" / "devcontainer.json"
    override.parent.mkdir()
    override.write_text(json.dumps(config))
    try:
        done = devcontainer("up", "--workspace-folder", str(folder), "--gpu-availability", "all",
                            "--override-config", str(override), home=tmp_path)
    finally:
        _remove_containers(folder)
    runs = [ln for ln in (done.stdout + done.stderr).splitlines() if "Start: Run: docker run" in ln]
    assert runs, done.stdout[-2000:] + done.stderr[-2000:]
    words = shlex.split(runs[0].split("Start: Run: ", 1)[1], posix=False)
    assert not [w for w in words if w.startswith("--gpus")], runs[0]
    devices = {w.removeprefix("--device=") for w in words if w.startswith("--device=")}
    devices |= {after for before, after in itertools.pairwise(words) if before == "--device"}
    assert devices == GPU_DEVICES[member], runs[0]


def _remove_containers(folder: Path) -> None:
    """The containers `up` created for this folder (created, even when they could not start)."""
    listed = subprocess.run(["docker", "ps", "-aq", "--filter",
                             f"label=devcontainer.local_folder={folder}"],
                            capture_output=True, text=True, check=False)
    ids = listed.stdout.split()
    if ids:
        subprocess.run(["docker", "rm", "-f", *ids], capture_output=True, check=False)
