"""What the host, its containers and the checks agree on, said once, below all of them.

The rendered workspace (`render`), `verify`'s runs, the generation service (steps/service.py),
the steps that prepare the host and `doctor`, which checks it, each need the same paths, the
same `docker run` arguments and the same rules; each takes them from here. Pure: constants
and small functions, no I/O. How GPUs reach a container (and what they can do in FP8) is part
of it: its rule and the reasons, below.
"""

from __future__ import annotations

import re
import shlex
from typing import Literal

from provision.changes import as_member
from provision.facts import Gpu, HostFacts
from provision.inventory import SERVICE_NAME, Inventory

# In each account's home: the link to the shared Hugging Face cache, and the private token
# directory (0700), which HF_TOKEN_PATH names so a token never enters the shared cache.
CACHE_LINK = ".cache/huggingface"
TOKEN_DIR = ".config/huggingface"
# Where verify's runs and the service mount the shared cache (HF_HOME), and the environment
# that reads it offline: weights from the cache only, never a download.
HF_MOUNT = "/hf"
HF_OFFLINE = "HF_HUB_OFFLINE=1"
# In the workspace: the Inductor compile cache (on the host's disk, so it survives image
# rebuilds: a cold FP8 compile takes minutes), and where the build context holds the
# [image] wheelhouse.
INDUCTOR_CACHE = ".cache/torchinductor"
WHEELHOUSE = ".devcontainer/wheelhouse"
SHM_SIZE = "16g"  # Docker's 64 MB /dev/shm breaks DataLoader workers and NCCL

# The generation service: its systemd unit, and the port its API listens on in the container.
SERVICE_UNIT = f"{SERVICE_NAME}.service"
CONTAINER_PORT = 8000


def account_args(uid: int, gid: int, cache_gid: int, *, rootless: bool) -> list[str]:
    """`docker run` arguments that run a container as this account, with the cache group.

    Rootless: as the container's root, which is the account on the host (its own ids inside
    would map to subordinate ids, which own nothing of the account's), and without the group:
    a rootless container drops supplementary groups, so the cache's ACLs name it instead."""
    if rootless:
        return ["--user", "0:0"]
    return ["--user", f"{uid}:{gid}", "--group-add", str(cache_gid)]


def in_service_daemon(inventory: Inventory, script: str) -> str:
    """Shell (run as root) that runs `script` against the daemon the service's container is
    in: the system daemon as root (rootful), the account's own as the account (rootless)."""
    return as_member(SERVICE_NAME, script) if inventory.defaults.rootless else script


def reach_address(bind: str) -> str:
    """Where, on the host, to reach a service bound to `bind`: one bound to every address
    answers on the loopback too."""
    return "127.0.0.1" if bind in ("0.0.0.0", "::") else bind


def wanted_acl(group: str) -> set[str]:
    """The shared cache's `getfacl -c` lines that keep new files group-writable for `group`."""
    return {f"group:{group}:rwx", f"default:group:{group}:rwx", "default:group::rwx",
            "default:mask::rwx"}


# Which Docker engine the host runs, or will once the docker step installs it: the docker step
# installs it, the rootless step takes the packages that go with it, and whether a rootless
# daemon gets GPUs depends on it (`rootless_gpu_blocker`, below).
def choose_source(facts: HostFacts, inventory: Inventory) -> tuple[str, str]:
    """(source, why): what installs Docker on this host."""
    wanted = inventory.defaults.docker_source
    if wanted != "auto":
        return wanted, f"docker_source = {wanted!r}"
    if inventory.mirrors.docker_apt:
        return "docker-ce", "auto: [mirrors] docker_apt"
    if facts.docker.repo_reachable:
        return "docker-ce", "auto: download.docker.com answers"
    return "distro", "auto: download.docker.com does not answer"


def engine_source(facts: HostFacts, inventory: Inventory) -> str:
    """docker-ce or distro: what the engine on the host is (or will be, once installed)."""
    if "docker-ce" in facts.docker.packages:
        return "docker-ce"
    if "docker.io" in facts.docker.packages:
        return "distro"
    return choose_source(facts, inventory)[0]


# -------------------- GPUs
# How a container gets the host's NVIDIA GPUs: one rule for the dev container, `verify`, the
# nvidia step's proof, `doctor` and the generation service; and what those GPUs can do in FP8.
#
# The rule: through CDI, the Container Device Interface (NVIDIA's way forward, "CDI support" in
# the container toolkit's documentation), never through Docker's `--gpus`:
#
# - A daemon that reads CDI specs (Docker >= 25 rootful, with `"features": {"cdi": true}` below
#   28.2; a rootless daemon from Docker 28, see steps/nvidia.py) gets her GPUs as CDI devices,
#   `--device=nvidia.com/gpu=N` (or `=all`), the names `nvidia-ctk cdi generate` writes.
# - An older rootful daemon (Debian 12's docker.io is 20.10) runs the container with the nvidia
#   runtime and asks for the same CDI names in NVIDIA_VISIBLE_DEVICES: the runtime in its default
#   `auto` mode switches itself to CDI when every requested device is a fully qualified CDI name
#   (nvidia-container-toolkit v1.18.0, internal/info/auto.go, ResolveRuntimeMode:
#   `OnlyFullyQualifiedCDIDevices` -> CDIRuntimeMode), so no global mode is changed.
#
# Why not `--gpus`: Docker serves it through the toolkit's legacy prestart hook, which needs
# libnvidia-container (nvidia-container-cli). That exists in NVIDIA's apt repository but not in a
# clean source build of the toolkit, and on the lent H200 `--gpus all` failed ("could not select
# device driver") where both CDI paths gave the container the GPU (bench/gpu_container/).
# Both paths hand over exactly the GPUs named, numbered from 0 inside the container.
#
# The Dev Containers CLI appends `--gpus all` to `runArgs` when `hostRequirements.gpu` is set and
# `docker info` lists an nvidia runtime (@devcontainers/cli 0.89.0, dist/spec-node, the function
# that writes "GPU support found, add GPU flags to docker call."): that would hand a member
# assigned GPU 0 every GPU, and fails where only CDI works. So the rendered devcontainer.json
# never sets `hostRequirements.gpu`: her GPUs come from `runArgs` alone.

CDI_KIND = "nvidia.com/gpu"  # `--device=nvidia.com/gpu=0`, `=all`
CDI_SPEC = "/etc/cdi/nvidia.yaml"
CDI_DOCKER = (25, 0)  # features.cdi exists
CDI_BY_DEFAULT = (28, 2)  # features.cdi on unless turned off
ROOTLESS_CDI_DOCKER = (28, 0)  # dockerd-rootless.sh lets her daemon see /etc/cdi
# FP8 tensor cores (Ada, Hopper and later): below this compute capability FP8 is storage only.
FP8_TENSOR_CORES = "8.9"
PROOF_IMAGE = "ubuntu:24.04"  # the GPU proof's container: anything that runs nvidia-smi

GpuPath = Literal["cdi", "runtime"]


def docker_version(facts: HostFacts) -> tuple[int, int] | None:
    """The engine's major.minor: the daemon's answer, else the installed package's version
    (`5:28.5.1-1~ubuntu.24.04~noble`, `20.10.24+dfsg1-1+deb12u1`); None: not installed."""
    for text in (facts.docker.version, facts.docker.packages.get("docker-ce"),
                 facts.docker.packages.get("docker.io")):
        found = re.match(r"(?:\d+:)?(\d+)\.(\d+)", text or "")
        if found:
            return int(found[1]), int(found[2])
    return None


def rootless_gpu_blocker(facts: HostFacts, inventory: Inventory) -> str | None:
    """Why members' rootless daemons cannot get GPUs on this host (None: through CDI, they can).

    Docker not installed yet: Docker's repository gives its newest engine, which can; the
    distribution's is judged once installed (the engine re-reads the facts between steps).
    """
    version = docker_version(facts)
    if version is None:
        if engine_source(facts, inventory) == "docker-ce":
            return None
        return "the distribution's Docker is not installed yet: its version decides"
    if version < ROOTLESS_CDI_DOCKER:
        return (f"Docker {version[0]}.{version[1]} cannot hand GPUs to a rootless daemon (CDI "
                f"for rootless daemons needs Docker >= {ROOTLESS_CDI_DOCKER[0]}.0)")
    return None


ROOTLESS_GPU_REMEDY = ("set docker_source = \"docker-ce\" (Docker's repository; remove the "
                       "distribution's docker.io first) and converge, or docker_mode = "
                       "\"rootful\" (the docker group: root-equivalent)")


def gpu_path(version: tuple[int, int] | None, *, rootless: bool) -> GpuPath:
    """How the daemon of this Docker version hands GPUs over (the rule above).

    An engine not known yet (no host read, Docker not installed) is taken to be a current one.
    A rootless daemon always asks by CDI device: where her Docker cannot, the nvidia step says
    her containers get no GPU (`rootless_gpu_blocker`)."""
    if rootless or version is None or version >= CDI_DOCKER:
        return "cdi"
    return "runtime"


def host_gpu_path(facts: HostFacts | None, *, rootless: bool) -> GpuPath:
    """`gpu_path` for the engine a host's facts show (None: no host read)."""
    return gpu_path(docker_version(facts) if facts else None, rootless=rootless)


def gpu_run_args(gpus: str, path: GpuPath) -> list[str]:
    """A member's `gpus` ("all", "0", "1,2", "none") as `docker run` arguments."""
    if gpus == "none":
        return []
    names = [f"{CDI_KIND}={gpu}" for gpu in gpus.split(",")]
    if path == "cdi":
        return [f"--device={name}" for name in names]
    return ["--runtime=nvidia", f"--env=NVIDIA_VISIBLE_DEVICES={','.join(names)}"]


def runs_on_gpu(facts: HostFacts, gpus: str) -> bool:
    """Whether a container given `gpus` (a member's, the service's) gets a GPU on this host:
    some are assigned, and the host has GPUs nvidia-smi reads."""
    return bool(facts.nvidia.gpus) and gpus != "none"


def host_gpu_args(facts: HostFacts, gpus: str, *, rootless: bool) -> list[str]:
    """`gpu_run_args` for this host's engine; none where the container gets no GPU."""
    if not runs_on_gpu(facts, gpus):
        return []
    return gpu_run_args(gpus, host_gpu_path(facts, rootless=rootless))


def gpu_proof(gpu_args: list[str], nvidia_smi: str, docker: str = "docker") -> str:
    """Shell: `nvidia-smi <nvidia_smi>` in a throwaway container given `gpu_args`, what the
    nvidia step's proof and doctor both run to see the GPUs a container gets."""
    gpus = "".join(f"{shlex.quote(arg)} " for arg in gpu_args)
    return f"{docker} run --rm {gpus}{PROOF_IMAGE} nvidia-smi {nvidia_smi}"


def without_fp8_tensor_cores(gpus: tuple[Gpu, ...]) -> list[Gpu]:
    """The GPUs whose compute capability is below FP8_TENSOR_CORES."""
    return [g for g in gpus
            if _capability(g.compute_capability) < _capability(FP8_TENSOR_CORES)]


def _capability(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(".")[:2])


def container_cuda_devices(gpus: str) -> str | None:
    """CUDA_VISIBLE_DEVICES inside her container, which numbers her GPUs from 0; None: all."""
    if gpus == "all":
        return None
    return "" if gpus == "none" else ",".join(str(i) for i in range(gpus.count(",") + 1))
