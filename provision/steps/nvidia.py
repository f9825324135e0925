"""nvidia: the NVIDIA Container Toolkit, the GPUs as CDI devices, proven by nvidia-smi in a
container.

Only on hosts whose facts show an NVIDIA GPU; otherwise the step says "skipped: no NVIDIA GPU"
(a failure under --require-gpu). A GPU without a working driver is an error with the remedy:
installing the driver itself is out of scope. Docker restarts only when its configuration
changes, and never under running containers without --yes (the engine's rule).

NVIDIA's repository (or `[mirrors] nvidia_apt`, which stands for it, with `nvidia_apt_key` or
the mirror's copy of NVIDIA's key) must be accepted by `apt-get update` with its key before it
stays (`signed_repository`). A pinned `nvidia_toolkit_version` pins the toolkit's four packages
together, as NVIDIA's install guide does: each requires the others at exactly its version.

Containers get GPUs through CDI in every docker mode (`provision.contract` says how and why
not `--gpus`): the step writes the spec, turns CDI on in the system daemon where its Docker
needs the flag, registers the nvidia runtime (Docker < 25 asks it for CDI names), and for
rootless members turns CDI on in each one's own daemon.
NVIDIA's rootless recipe (`nvidia-ctk runtime configure --runtime=docker
--config=$HOME/.config/docker/daemon.json` plus `no-cgroups = true`) changes
/etc/nvidia-container-runtime/config.toml for every daemon, which breaks the rootful one; NVIDIA
points rootless users at CDI instead, where the toolkit sets up no cgroups at all
(NVIDIA/nvidia-container-toolkit#56; "CDI also improves the compatibility of the NVIDIA
container stack with certain features such as rootless containers", docs.nvidia.com
container-toolkit cdi-support.html). What each piece rests on:

- The spec: `nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml`, as root (NVIDIA's CDI
  guide). It names the driver's libraries by their versioned file names, so a spec that does not
  name the running driver is stale and is generated again. Toolkit >= 1.18 also keeps
  /var/run/cdi/nvidia.yaml current itself (its nvidia-cdi-refresh service, on driver and toolkit
  changes); the same device in both is no conflict: the CDI cache lets the later spec directory
  (/var/run/cdi) win (container-device-interface pkg/cdi/cache.go, resolveConflict). /etc/cdi
  is kept because it survives reboots and exists before her daemon starts.
- Docker: CDI exists from Docker 25 as an opt-in (`"features": {"cdi": true}`; the CDI project's
  issue #84, and nvidia-ctk 1.14.5 sets exactly that key), on by default from 28.2.0 (Docker
  28.2.0 release notes). A rootless daemon runs in rootlesskit's mount namespace with /etc and
  /run copied up, where it could not read /etc/cdi (moby#47676); dockerd-rootless.sh bind-mounts
  /etc/cdi and /var/run/cdi into it, when they exist as it starts, since moby#48541 (28.0; the
  backports to 25.0/26.1/27.x name no release we could check, so 28.0 is the floor here).
- The container: `--device=nvidia.com/gpu=<index>` per GPU, or `=all` (the names `nvidia-ctk
  cdi generate` gives by default), in place of `--gpus`; on a rootful Docker < 25 the nvidia
  runtime with those names in NVIDIA_VISIBLE_DEVICES (`contract.gpu_run_args`).

Older Docker (Debian 12's docker.io is 20.10): rootless members get no GPU; the plan says so
with the remedy (Docker's repository, or docker_mode = "rootful"), and doctor fails the check.
"""

from __future__ import annotations

from provision.changes import Change, Run, WriteFile, as_member
from provision.contract import (
    CDI_BY_DEFAULT,
    CDI_DOCKER,
    CDI_KIND,
    CDI_SPEC,
    FP8_TENSOR_CORES,
    ROOTLESS_GPU_REMEDY,
    docker_version,
    gpu_proof,
    gpu_run_args,
    host_gpu_path,
    rootless_gpu_blocker,
    without_fp8_tensor_cores,
)
from provision.facts import DAEMON_JSON, HostFacts
from provision.inventory import AptKey, Inventory
from provision.steps import (
    APT_UPDATE,
    NoGpu,
    Proof,
    Step,
    StepBlocked,
    apt_install,
    home_of,
    primary_group,
    signed_repository,
)
from provision.steps.docker import merged_daemon_json
from provision.steps.rootless import user_manager
from provision.templating import render

NAME = "nvidia"
REPOSITORY = "https://nvidia.github.io/libnvidia-container"
KEYRING = "/usr/share/keyrings/nvidia-container-toolkit-keyring.gpg"
SOURCES = "/etc/apt/sources.list.d/nvidia-container-toolkit.list"
TOOLKIT = ("nvidia-container-toolkit", "nvidia-container-toolkit-base", "libnvidia-container-tools",
           "libnvidia-container1")
CDI_ON = {"features": {"cdi": True}}  # daemon.json, where Docker < 28.2 needs it
MEMBER_DAEMON_JSON = ".config/docker/daemon.json"  # her rootless daemon's, under her home


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
    changes += _cdi_spec(facts)
    changes += _system_daemon(facts)
    if inventory.defaults.rootless and rootless_gpu_blocker(facts, inventory) is None:
        # Her daemon sees only spec directories that existed when it started.
        new_spec = not facts.path(CDI_SPEC).exists
        for member in inventory.members:
            changes.extend(daemon_cdi(facts, member.name, restart=new_spec))
    return changes


def _cdi_spec(facts: HostFacts) -> list[Change]:
    """/etc/cdi/nvidia.yaml, which both GPU paths read (`provision.contract`): generated when
    missing, and again when it does not name the running driver (it names the driver's
    libraries by their versioned file names)."""
    spec = facts.path(CDI_SPEC)
    driver = facts.nvidia.driver
    if spec.exists and (not driver or f".so.{driver}" in (spec.content or "")):
        return []
    why = "for containers' GPUs" if not spec.exists else f"again for driver {driver}"
    return [Change(NAME, f"{CDI_SPEC}: the GPUs as CDI devices ({CDI_KIND}=N), generated {why}",
                   (Run(f"mkdir -p {CDI_SPEC.rsplit('/', 1)[0]}\n"
                        f"nvidia-ctk cdi generate --output={CDI_SPEC} >&2"),))]


def _system_daemon(facts: HostFacts) -> list[Change]:
    """The system daemon hands GPUs over its way (`contract.gpu_path`): CDI on where its
    Docker needs the flag (25 <= version < 28.2; merged into daemon.json, other keys kept),
    and the nvidia runtime registered (`nvidia-ctk` merges it; the GPU path of Docker < 25,
    and what NVIDIA's guide sets up). One restart for both."""
    actions: list[WriteFile | Run] = []
    what = []
    version = docker_version(facts)
    if version is not None and CDI_DOCKER <= version < CDI_BY_DEFAULT:
        text = facts.text(DAEMON_JSON)
        merged = merged_daemon_json(text, DAEMON_JSON, CDI_ON)
        if merged is not None:
            actions.append(WriteFile(DAEMON_JSON, merged, text))
            what.append(f"{DAEMON_JSON}: features.cdi on (other keys kept)")
    if "nvidia" not in facts.docker.runtimes:
        # After the write above: nvidia-ctk reads the file as it then is and keeps its keys.
        actions.append(Run("nvidia-ctk runtime configure --runtime=docker"))
        what.append(f"register the nvidia runtime in {DAEMON_JSON} (nvidia-ctk merges it)")
    if not actions:
        return []
    actions.append(Run("systemctl restart docker.service"))
    return [Change(NAME, "; ".join(what) + ", restart Docker", tuple(actions),
                   restarts_docker=True)]


def daemon_cdi(facts: HostFacts, name: str, *, restart: bool, step: str = NAME
               ) -> list[Change]:
    """Her ~/.config/docker/daemon.json with CDI on where her Docker needs the flag (merged,
    written as her), and her daemon restarted when that changed or /etc/cdi is new (her
    daemon sees only spec directories that existed when it started). The service account's
    daemon gets the same (the service step asks)."""
    actions: list[WriteFile | Run] = []
    what = []
    version = docker_version(facts)
    if version is None or version < CDI_BY_DEFAULT:
        state = facts.path(f"~{name}/{MEMBER_DAEMON_JSON}")
        merged = merged_daemon_json(state.content, f"{name}'s ~/{MEMBER_DAEMON_JSON}", CDI_ON)
        if merged is not None:
            actions.append(WriteFile(f"{home_of(facts, name)}/{MEMBER_DAEMON_JSON}",
                                     merged, state.content,
                                     owner=name, group=primary_group(facts, name),
                                     member=name))
            what.append(f"~/{MEMBER_DAEMON_JSON}: features.cdi on (other keys kept)")
    if actions or restart:
        actions.append(Run(user_manager(name)))
        actions.append(Run(as_member(name, "systemctl --user restart docker.service")))
        what.append("restart her daemon (her running containers stop)")
    if not actions:
        return []
    return [Change(step, f"{name}: GPUs in her own daemon through CDI: " + "; ".join(what),
                   tuple(actions))]


def notes(facts: HostFacts, inventory: Inventory) -> list[str]:
    found = [f"GPU {g.index} ({g.name}) has compute capability {g.compute_capability} < "
             f"{FP8_TENSOR_CORES}: "
             "FP8 runs as storage only there, without FP8 tensor cores"
             for g in without_fp8_tensor_cores(facts.nvidia.gpus)]
    if inventory.defaults.rootless and facts.nvidia.has_gpu:
        blocker = rootless_gpu_blocker(facts, inventory)
        found.append(f"docker_mode = rootless: members' own daemons get GPUs through CDI "
                     f"({CDI_SPEC}; dev containers ask for --device={CDI_KIND}=N)"
                     if blocker is None else
                     f"docker_mode = rootless: members' containers get NO GPU: {blocker}; to "
                     f"fix: {ROOTLESS_GPU_REMEDY}")
    return found


def proof(facts: HostFacts, inventory: Inventory) -> Proof:
    """A container of the system daemon given every GPU (the way `contract` hands them
    over) sees exactly the GPUs the host lists."""
    expected = sorted(g.uuid for g in facts.nvidia.gpus)
    args = gpu_run_args("all", host_gpu_path(facts, rootless=False))
    gpus = " ".join(args)

    def check(stdout: str) -> str | None:
        seen = sorted(line.strip() for line in stdout.splitlines() if line.strip())
        if seen == expected:
            return None
        return f"a container run with {gpus} sees {seen or 'no GPU'}, the host lists {expected}"

    return Proof(gpu_proof(args, "--query-gpu=uuid --format=csv,noheader"), check)


def paths(inventory: Inventory) -> tuple[str, ...]:
    return (SOURCES, CDI_SPEC, *(f"~{m.name}/{MEMBER_DAEMON_JSON}" for m in inventory.members))


STEP = Step(NAME, plan, paths, notes, proof,
            needs=("docker",))
