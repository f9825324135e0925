"""A member's workspace files and `~/.ssh/config` block, rendered from the inventory.

Pure functions: the inventory, the member and what the caller knows of the host (its alias,
the cache group's gid, the image its driver runs) in, file contents out; only `write_files`
touches the disk. The image comes resolved from the version table (`image.host_image`), so a
broken pin has stopped the caller before any file or image exists.

Decisions a reader would otherwise have to rediscover:

- GPUs reach the container through `runArgs` only, as CDI devices (`--device=nvidia.com/gpu=N`)
  or, on a rootful Docker older than 25, the nvidia runtime asked for the same CDI names
  (`provision.contract`, which says why not `--gpus`). The container then sees exactly her
  GPUs, numbered from 0, so CUDA_VISIBLE_DEVICES inside it (the debug launch) is "0,1" for gpus
  "1,2": the host's indexes would pick another GPU, or none.
- No `hostRequirements.gpu`: with it, the Dev Containers CLI appends `--gpus all` whenever the
  daemon lists an nvidia runtime, which would hand her every GPU (the contract again).
- The Hugging Face token never enters the shared cache: HF_TOKEN_PATH points into her own
  `~/.config/huggingface` (0700 on the host, made by the hf-cache step, where her login shells
  keep the token too), bind-mounted into the container; one `hf auth login` serves both.
- pip installs from PyTorch's index for the flavour and PyPI, or from the inventory's
  `[mirrors]` pytorch (decided with the image) and pypi (a plain-http mirror is named a trusted
  host: pip refuses it otherwise), unless the image builds from a wheelhouse.
- The Inductor cache lives in the workspace (`.cache/torchinductor`): on the host's disk, so it
  survives image rebuilds (a cold FP8 compile takes minutes), and private to her; the file
  watcher, search and git all skip it.
- launch.json has two launch configurations with the same model, size and FP8 mode: "Debug"
  (F5: inference.py sees the debugger and stays eager, so breakpoints fire anywhere) and "Run
  ... (compiled)" with `noDebug`, since a configuration F5 starts under debugpy never compiles.
  The model is the host's (`models.debug_model`: cached SD3.5 weights, else the random-weight
  architecture her GPU holds); the workspace README says which and why.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from provision.contract import (
    CACHE_LINK,
    INDUCTOR_CACHE,
    SHM_SIZE,
    TOKEN_DIR,
    WHEELHOUSE,
    container_cuda_devices,
    gpu_run_args,
    host_gpu_path,
    reach_address,
)
from provision.errors import InventoryError
from provision.facts import HostFacts
from provision.files import atomic_write
from provision.inventory import Inventory, Member
from provision.models import debug_model
from provision.target import Target
from provision.templating import raw, render, templates_dir
from provision.versions import PYPI_INDEX, ImageSpec, resolve_image

LAUNCH_JSON = ".vscode/launch.json"
# Rendered from `templates/workspace/<path>.j2`, in this order; COPIED as they are.
RENDERED = (
    ".devcontainer/devcontainer.json",
    ".devcontainer/Dockerfile",
    ".devcontainer/requirements.txt",
    LAUNCH_JSON,
    ".vscode/settings.json",
    ".gitignore",
    "README.md",
)
INFERENCE = "inference.py"
ATTENTION_MAPS = "attention_maps.py"  # inference.py --attention-maps, and the debug console's
# inference.py's machinery (FP8, compiling, debugger, pipelines, metrics): a package beside it,
# every module of `templates/workspace/sd35/`, so a module added there travels too.
GENERATION_PACKAGE = "sd35"
MACHINERY = tuple(sorted(f"{GENERATION_PACKAGE}/{module.name}" for module in
                         (templates_dir() / "workspace" / GENERATION_PACKAGE).glob("*.py")))
GENERATION = (INFERENCE, *MACHINERY)  # what running inference.py needs (verify, the service)
COPIED = (INFERENCE, ATTENTION_MAPS, *MACHINERY)
WORKSPACE_FILES = (*RENDERED, *COPIED)  # the paths `render_workspace` returns, in its order
DEBUG_LAUNCH, RUN_LAUNCH = "Debug SD3.5 FP8", "Run SD3.5 FP8 (compiled)"
VENV = "/opt/venv"  # the image's environment, root-owned: its pins change through a rebuild
OUTPUTS = "outputs"  # inference.py's default output directory
DEBUGPY_PORT = 5678
# Workspace directories of generated or bulky files: the file watcher (which otherwise exhausts
# inotify watches and CPU on the remote host), search and git leave them alone.
GENERATED = (Path(INDUCTOR_CACHE).parts[0], "__pycache__", OUTPUTS, "checkpoints", WHEELHOUSE)
PROMPT = "a photo of an astronaut riding a horse on the moon"
# The repository's own .devcontainer/ is this member's: every GPU, the default image.
REPO_MEMBER = Member(name="dev", keys=())


def render_workspace(inventory: Inventory, member: Member, *, host_alias: str | None,
                     target: Target | None, cache_gid: int | None, image: ImageSpec,
                     facts: HostFacts | None = None) -> dict[str, str]:
    """Every workspace file, by path relative to the workspace.

    `cache_gid` is the cache group's gid on the host (from its facts): the container gets it as
    a supplementary group, without which the shared cache is read-only inside. `host_alias`
    (else the target's alias) names the container after where it runs. `image` is the one
    decided for the host (`image.host_image`; for no particular host, the defaults). `facts`,
    when the host was read, choose the model her launch.json runs (its cached weights, her
    GPU's memory) and how her GPUs reach the container (its Docker).
    """
    where = host_alias or (target.alias if target else None)
    context = workspace_context(inventory, member, image, where=where, cache_gid=cache_gid,
                                facts=facts)
    files = {path: render(f"workspace/{path}.j2", **context)
             for path in RENDERED}
    files.update({path: raw(f"workspace/{path}") for path in COPIED})
    return files


def workspace_context(inventory: Inventory, member: Member, image: ImageSpec, *,
                      where: str | None, cache_gid: int | None,
                      facts: HostFacts | None = None) -> dict[str, Any]:
    """The variables of the workspace templates, each meaning one thing in all of them."""
    home = f"/home/{member.name}"
    # Rootless: the container's root is her on the host (uid 0 inside maps to her uid), so she
    # works as root inside and workspace and cache files stay hers. Her own user inside would
    # map to one of her subordinate uids, which owns nothing of hers (so no
    # updateRemoteUserUID either), and a --group-add of the cache group maps to nothing: the
    # shared cache is writable inside through ACLs naming each member (the hf-cache step).
    rootless = inventory.defaults.rootless
    container_user, container_home = ("root", "/root") if rootless else (member.name, home)
    on_gpu = member.gpus != "none"
    model = debug_model(member, facts)
    # A GPU runs SD3.5's own size in FP8 matmuls; a CPU the tiny model, smaller, in FP8 storage.
    pixels, steps, fp8 = ("1024", "28", "dq") if on_gpu else ("256", "8", "storage")
    shared = [("--prompt", PROMPT), ("--height", pixels), ("--width", pixels),
              ("--steps", steps), ("--model", model.model), ("--fp8", fp8)]
    return {
        "name": f"SD3.5 FP8 ({member.name} on {where})" if where else f"SD3.5 FP8 ({member.name})",
        "user": member.name,
        "home": home,
        "rootless": rootless,
        "container_user": container_user,
        "container_home": container_home,
        "image": image,
        "venv": VENV,
        "wheelhouse": Path(WHEELHOUSE).name,  # relative to the build context
        "torch_index": image.torch_index,
        # Offline, pip sees only the wheelhouse copied into the build context.
        "pip_source": f"--no-index --find-links /{Path(WHEELHOUSE).name}" if image.wheelhouse
        else pip_indexes(image.torch_index, inventory.mirrors.pypi or PYPI_INDEX),
        "run_args": [*gpu_run_args(member.gpus, host_gpu_path(facts, rootless=rootless)),
                     f"--shm-size={SHM_SIZE}",
                     *([f"--group-add={cache_gid}"] if cache_gid is not None and not rootless
                       else [])],
        "on_gpu": on_gpu,
        "cache_dir": inventory.defaults.cache_dir,
        "hf_home": f"{container_home}/{CACHE_LINK}",
        "token_dir": TOKEN_DIR,
        "inductor_cache": INDUCTOR_CACHE,
        "launches": [
            {"name": DEBUG_LAUNCH, "no_debug": False,
             "args": [*shared, ("--output", f"{OUTPUTS}/debug.png")]},
            {"name": RUN_LAUNCH, "no_debug": True,
             "args": [*shared, ("--output", f"{OUTPUTS}/run.png"), ("--compile", None)]},
        ],
        "model": model,
        "outputs": OUTPUTS,
        "cuda_visible_devices": container_cuda_devices(member.gpus),
        "debugpy_port": DEBUGPY_PORT,
        "generated": GENERATED,
    }


def pip_indexes(torch_index: str, pypi_index: str) -> str:
    """pip's options for the image build: PyTorch's index for the flavour first (its +cuXYZ
    wheels), the PyPI one for the rest; a plain-http one named a trusted host."""
    plain = sorted({urlsplit(url).netloc for url in (torch_index, pypi_index)
                    if url.startswith("http://")})
    return " ".join([f"--index-url {torch_index}", f"--extra-index-url {pypi_index}",
                     *(f"--trusted-host {host}" for host in plain)])


def ssh_config_block(inventory: Inventory, member: Member, host_alias: str, target: Target,
                     identity_file: str) -> str:
    """Her `~/.ssh/config` block for the host, with the team's keepalive (and a forward to the
    generation service when there is one).

    A ProxyJump hop is written as the resolved host and port, without a user: the admin's alias
    and login on the jump host are not hers.
    """
    hops = ",".join(hop.hostname if hop.port == 22 else f"{hop.hostname}:{hop.port}"
                    for hop in target.jumps)
    values = {"host alias": host_alias, "hostname": target.hostname,
              "identity file": identity_file, "jump host": hops}
    for what, value in values.items():
        if re.search(r"\s", value) or (not value and what != "jump host"):
            raise InventoryError(f"{what} {value!r} cannot go into an ssh config line",
                                 "give a value without spaces")
    return render(
        "workspace/ssh_config.j2",
        alias=host_alias,
        hostname=target.hostname,
        user=member.name,
        port=target.port,
        identity_file=identity_file,
        keepalive_interval=inventory.defaults.keepalive_interval,
        keepalive_count_max=inventory.defaults.keepalive_count_max,
        proxy_jump=hops,
        service_forward=service_forward(inventory),
    )


def service_forward(inventory: Inventory) -> str:
    """Her `LocalForward` to the host's generation service, or "" without [service]: the same
    port on her machine, to where the service listens on the host (its loopback by default)."""
    service = inventory.service
    if service is None:
        return ""
    address = reach_address(service.bind)
    return f"{service.port} {f'[{address}]' if ':' in address else address}:{service.port}"


def render_for_host(inventory: Inventory, member: Member, facts: HostFacts, image: ImageSpec, *,
                    host_alias: str | None, target: Target | None) -> dict[str, str]:
    """Every workspace file for a host that was read: its facts give the cache group's gid and
    her launch.json's model; `image` is the one its driver runs (`image.host_image`)."""
    group = facts.groups.get(inventory.defaults.cache_group)
    return render_workspace(inventory, member, host_alias=host_alias, target=target,
                            cache_gid=group.gid if group else None, image=image, facts=facts)


def member_files(inventory: Inventory, member: Member, image: ImageSpec, *,
                 host_alias: str | None, target: Target | None, facts: HostFacts | None,
                 identity_file: str) -> dict[str, str]:
    """Her workspace files and, when the host is known, her `ssh_config` block beside them.

    `facts`, when the host was read, give the cache group's gid and her launch.json's model;
    `image` is the one its driver runs (`image.host_image`).
    """
    files = (render_for_host(inventory, member, facts, image, host_alias=host_alias,
                             target=target)
             if facts else render_workspace(inventory, member, host_alias=host_alias,
                                            target=target, cache_gid=None, image=image))
    if host_alias and target:
        files["ssh_config"] = ssh_config_block(inventory, member, host_alias, target,
                                               identity_file)
    return files


def repo_devcontainer() -> dict[str, str]:
    """This repository's own `.devcontainer/` files, as the tool renders them for REPO_MEMBER."""
    inventory = Inventory(path=Path("provision.toml"), members=(REPO_MEMBER,))
    files = render_workspace(inventory, REPO_MEMBER, host_alias=None, target=None, cache_gid=None,
                             image=resolve_image(inventory.image))
    return {path: text for path, text in files.items() if path.startswith(".devcontainer/")}


def write_files(files: dict[str, str], out: Path) -> list[Path]:
    """Write each file under `out`, atomically; scripts (`#!`) are made executable."""
    written = []
    for relative, content in files.items():
        if Path(relative).is_absolute() or ".." in Path(relative).parts:
            raise ValueError(f"{relative!r} is not a path inside the output directory")
        path = out / relative
        atomic_write(path, content, 0o755 if content.startswith("#!") else 0o644)
        written.append(path)
    return written
