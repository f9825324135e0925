"""What the host, its containers and the checks agree on, said once, below all of them.

The rendered workspace (`render`), `verify`'s runs, the generation service (steps/service.py),
the steps that prepare the host and `doctor`, which checks it, each need the same paths, the
same `docker run` arguments and the same rules; each takes them from here. Pure: constants
and small functions, no I/O. How GPUs reach a container is the same kind of contract, kept in
`gpu_access` with its reasons.
"""

from __future__ import annotations

from provision.changes import as_member
from provision.facts import HostFacts
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
# daemon gets GPUs depends on it (`gpu_access.rootless_gpu_blocker`).
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
