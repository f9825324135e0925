"""How containers get GPUs (`provision.contract`), decided once and used by the dev container,
verify, the nvidia step's proof, doctor and the service.

Why: `--gpus` needs libnvidia-container, which a toolkit built from source lacks (on the lent
H200 `--gpus all` failed where CDI worked), and the Dev Containers CLI widens a member's GPUs to
all of them when `hostRequirements.gpu` meets an nvidia runtime. The engines here are set by
hand on recorded facts (SYNTHESIZED: no GPU host with each Docker version could be reached).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from provision.contract import gpu_path, gpu_run_args, host_gpu_path
from provision.facts import DAEMON_JSON, PathState, parse_facts
from provision.image import host_image
from provision.inventory import Defaults, Inventory, Member
from provision.render import render_for_host
from provision.steps import nvidia

FIXTURES = Path(__file__).parent / "fixtures"


def h200_with_docker(package: str, version: str, daemon_json: str | None = None):
    """The lent H200's recorded facts (no Docker there) with the engine set by hand."""
    facts = parse_facts((FIXTURES / "facts" / "ubuntu-24.04-h200.txt").read_text(),
                        "/data/cache/huggingface")
    engine = dataclasses.replace(facts.docker, installed=True, version=version.split("-")[0],
                                 packages={package: version}, runtimes=("runc",))
    paths = dict(facts.paths)
    if daemon_json is not None:
        paths[DAEMON_JSON] = PathState(DAEMON_JSON, "file", "root", "root", "644", "",
                                       daemon_json)
    return dataclasses.replace(facts, docker=engine, paths=paths)


@pytest.mark.parametrize(("version", "rootless", "path"), [
    ((20, 10), False, "runtime"),  # Debian 12's docker.io: no CDI in the daemon
    ((24, 0), False, "runtime"),
    ((25, 0), False, "cdi"),  # features.cdi exists
    ((28, 5), False, "cdi"),
    (None, False, "cdi"),  # not read yet: a current engine
    ((20, 10), True, "cdi"),  # rootless asks for CDI devices; the nvidia step says none come
])
def test_the_gpu_path_follows_the_engine(version, rootless, path) -> None:
    assert gpu_path(version, rootless=rootless) == path


@pytest.mark.parametrize(("gpus", "cdi", "runtime"), [
    ("0", ["--device=nvidia.com/gpu=0"],
     ["--runtime=nvidia", "--env=NVIDIA_VISIBLE_DEVICES=nvidia.com/gpu=0"]),
    ("1,2", ["--device=nvidia.com/gpu=1", "--device=nvidia.com/gpu=2"],
     ["--runtime=nvidia", "--env=NVIDIA_VISIBLE_DEVICES=nvidia.com/gpu=1,nvidia.com/gpu=2"]),
    ("all", ["--device=nvidia.com/gpu=all"],
     ["--runtime=nvidia", "--env=NVIDIA_VISIBLE_DEVICES=nvidia.com/gpu=all"]),
    ("none", [], []),
])
def test_her_gpus_are_named_as_cdi_devices_on_either_path(gpus, cdi, runtime) -> None:
    assert gpu_run_args(gpus, "cdi") == cdi
    # Fully qualified CDI names make the runtime's auto mode use CDI (no legacy hook).
    assert gpu_run_args(gpus, "runtime") == runtime
    assert not [a for a in cdi + runtime if a.startswith("--gpus")]


def test_an_old_rootful_docker_gets_the_runtime_in_her_devcontainer_and_the_proof() -> None:
    facts = h200_with_docker("docker.io", "20.10.24+dfsg1-1+deb12u1")
    assert host_gpu_path(facts, rootless=False) == "runtime"
    inventory = Inventory(path=Path("provision.toml"), defaults=Defaults(docker_mode="rootful"),
                          members=(Member("alice", keys=(), gpus="0"),))
    files = render_for_host(inventory, inventory.members[0], facts,
                            host_image(facts, inventory), host_alias="h200", target=None)
    config = json.loads(files[".devcontainer/devcontainer.json"])
    assert config["runArgs"][:2] == ["--runtime=nvidia",
                                     "--env=NVIDIA_VISIBLE_DEVICES=nvidia.com/gpu=0"]
    assert "hostRequirements" not in config
    assert "docker run --rm --runtime=nvidia --env=NVIDIA_VISIBLE_DEVICES=nvidia.com/gpu=all " \
        in nvidia.proof(facts, inventory).script
    plan = nvidia.plan(facts, inventory)
    assert not [a for c in plan for a in c.actions if getattr(a, "path", None) == DAEMON_JSON]


def test_docker_25_to_28_1_gets_cdi_on_in_the_system_daemon_before_the_runtime() -> None:
    """One restart for both; nvidia-ctk runs after the write, so it keeps features.cdi."""
    facts = h200_with_docker("docker.io", "26.1.5+dfsg1-9+b11", '{"log-level": "warn"}\n')
    inventory = Inventory(path=Path("provision.toml"), defaults=Defaults(docker_mode="rootful"))
    (daemon,) = [c for c in nvidia.plan(facts, inventory) if c.restarts_docker]
    write, configure, restart = daemon.actions
    assert write.path == DAEMON_JSON
    assert json.loads(write.content) == {"log-level": "warn", "features": {"cdi": True}}
    assert configure.command == "nvidia-ctk runtime configure --runtime=docker"
    assert restart.command == "systemctl restart docker.service"
    assert "docker run --rm --device=nvidia.com/gpu=all " in nvidia.proof(facts, inventory).script
    newer = h200_with_docker("docker-ce", "5:28.5.1-1~ubuntu.24.04~noble", "{}\n")
    (daemon,) = [c for c in nvidia.plan(newer, inventory) if c.restarts_docker]
    assert [type(a).__name__ for a in daemon.actions] == ["Run", "Run"]  # CDI on by default
