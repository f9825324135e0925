"""nvidia: the NVIDIA Container Toolkit, registered with Docker, proven by nvidia-smi in a
container.

Only on hosts whose facts show an NVIDIA GPU; otherwise the step says "skipped: no NVIDIA GPU"
(a failure under --require-gpu). A GPU without a working driver is an error with the remedy:
installing the driver itself is out of scope. Docker restarts only when `nvidia-ctk` changes
its configuration, and never under running containers without --yes (the engine's rule).

NVIDIA's repository (or `[mirrors] nvidia_apt`, which stands for it, with `nvidia_apt_key` or
the mirror's copy of NVIDIA's key) must be accepted by `apt-get update` with its key before it
stays (`signed_repository`). A pinned `nvidia_toolkit_version` pins the toolkit's four packages
together, as NVIDIA's install guide does: each requires the others at exactly its version.
"""

from __future__ import annotations

from provision.changes import Change, Run, run
from provision.facts import HostFacts
from provision.inventory import AptKey, Inventory
from provision.steps import (
    APT_UPDATE,
    NoGpu,
    Proof,
    Step,
    StepBlocked,
    apt_install,
    signed_repository,
)
from provision.templating import render

NAME = "nvidia"
REPOSITORY = "https://nvidia.github.io/libnvidia-container"
KEYRING = "/usr/share/keyrings/nvidia-container-toolkit-keyring.gpg"
SOURCES = "/etc/apt/sources.list.d/nvidia-container-toolkit.list"
TOOLKIT = ("nvidia-container-toolkit", "nvidia-container-toolkit-base", "libnvidia-container-tools",
           "libnvidia-container1")
FP8_TENSOR_CORES = (8, 9)
PROOF_IMAGE = "ubuntu:24.04"


def plan(facts: HostFacts, inventory: Inventory) -> list[Change]:
    nvidia = facts.nvidia
    if not nvidia.has_gpu:
        raise NoGpu("skipped: no NVIDIA GPU")
    if not nvidia.gpus:
        raise StepBlocked(
            f"{len(nvidia.pci_devices)} NVIDIA GPU(s) on the PCI bus but the driver does not "
            f"answer ({(nvidia.smi_error.strip().splitlines() or ['nvidia-smi failed'])[-1]})",
            "install the NVIDIA driver (Ubuntu: 'ubuntu-drivers install --gpgpu'), reboot, "
            "then rerun")
    changes = []
    pinned = inventory.defaults.nvidia_toolkit_version
    installed = nvidia.ctk_version
    if installed is None or (pinned and not pinned.startswith(installed)):
        mirror = inventory.mirrors.nvidia_apt
        repository = mirror or REPOSITORY
        key = inventory.mirrors.nvidia_apt_key or AptKey(url=f"{repository}/gpgkey")
        packages = [f"{p}={pinned}" for p in TOOLKIT] if pinned else [TOOLKIT[0]]
        changes += [
            signed_repository(
                NAME, f"NVIDIA's apt repository ({repository}), signed-by {KEYRING} with the "
                      f"key from {key.source}",
                what="NVIDIA's container toolkit repository", uri=repository, key=key,
                setting="[mirrors] nvidia_apt_key" if mirror else "the host's network",
                keyring=KEYRING, sources=SOURCES,
                content=render("host/nvidia-container-toolkit.list.j2",
                               repository=repository, keyring=KEYRING),
                current=facts.text(SOURCES)),
            Change(NAME, f"install NVIDIA Container Toolkit {pinned or '(newest)'}",
                   (Run(APT_UPDATE), Run(apt_install(*packages))))]
    if "nvidia" not in facts.docker.runtimes:
        changes.append(run(NAME, "register the nvidia runtime in /etc/docker/daemon.json "
                                 "(nvidia-ctk merges it), restart Docker",
                           "nvidia-ctk runtime configure --runtime=docker",
                           "systemctl restart docker.service", restarts_docker=True))
    return changes


def notes(facts: HostFacts, inventory: Inventory) -> list[str]:
    slow = [g for g in facts.nvidia.gpus
            if tuple(int(x) for x in g.compute_capability.split(".")[:2]) < FP8_TENSOR_CORES]
    return [f"GPU {g.index} ({g.name}) has compute capability {g.compute_capability} < 8.9: "
            "FP8 runs as storage only there, without FP8 tensor cores" for g in slow]


def proof(facts: HostFacts, inventory: Inventory) -> Proof:
    """A container started with --gpus all sees exactly the GPUs the host lists."""
    expected = sorted(g.uuid for g in facts.nvidia.gpus)

    def check(stdout: str) -> str | None:
        seen = sorted(line.strip() for line in stdout.splitlines() if line.strip())
        if seen == expected:
            return None
        return f"a --gpus all container sees {seen or 'no GPU'}, the host lists {expected}"

    return Proof(f"docker run --rm --gpus all {PROOF_IMAGE} "
                 "nvidia-smi --query-gpu=uuid --format=csv,noheader", check)


STEP = Step(NAME, plan, lambda inventory: (SOURCES,), notes, proof,
            needs=("docker",))
