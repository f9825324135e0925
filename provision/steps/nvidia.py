"""nvidia: the NVIDIA Container Toolkit, registered with Docker, proven by nvidia-smi in a
container.

Only on hosts whose facts show an NVIDIA GPU; otherwise the step says "skipped: no NVIDIA GPU"
(a failure under --require-gpu). A GPU without a working driver is an error with the remedy:
installing the driver itself is out of scope. Docker restarts only when `nvidia-ctk` changes
its configuration, and never under running containers without --yes (the engine's rule).
"""

from __future__ import annotations

from provision.changes import Change, Run, WriteFile, run
from provision.facts import HostFacts
from provision.inventory import Inventory
from provision.steps import NoGpu, Proof, Step, StepBlocked, apt_install
from provision.templating import render

NAME = "nvidia"
REPOSITORY = "https://nvidia.github.io/libnvidia-container"
KEYRING = "/usr/share/keyrings/nvidia-container-toolkit-keyring.gpg"
SOURCES = "/etc/apt/sources.list.d/nvidia-container-toolkit.list"
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
        package = f"nvidia-container-toolkit={pinned}" if pinned else "nvidia-container-toolkit"
        changes.append(Change(
            NAME, f"NVIDIA Container Toolkit {pinned or '(newest)'} from NVIDIA's apt repository"
                  f", signed-by {KEYRING}",
            (Run(apt_install("ca-certificates", "curl", "gnupg")),
             Run(f"curl -fsSL {REPOSITORY}/gpgkey | gpg --batch --yes --dearmor -o {KEYRING}"),
             WriteFile(SOURCES, render("host/nvidia-container-toolkit.list.j2",
                                       repository=REPOSITORY, keyring=KEYRING),
                       facts.text(SOURCES)),
             Run("apt-get -o DPkg::Lock::Timeout=300 update -q >/dev/null"),
             Run(apt_install(package)))))
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


STEP = Step(NAME, plan, lambda inventory: (SOURCES,), notes, proof)
