"""The team image on a host: what its driver runs, its tag, and the shell that builds it there
once.

The image is tagged by the hash of what it is built from (the rendered Dockerfile and
requirements.txt), so whoever needs it (`verify`, `doctor`, the generation service) finds the
one already built, and a change of pins is a new tag, never a stale image under an old name.
"""

from __future__ import annotations

import base64
import hashlib
import shlex
from pathlib import PurePosixPath

from provision.contract import WHEELHOUSE
from provision.facts import HostFacts
from provision.inventory import Inventory
from provision.versions import PYTORCH_INDEX, ImageSpec, resolve_image

ROOT = "/var/lib/provision"
IMAGE_REPOSITORY = "provision/sd35-fp8"
CONTEXT_FILES = (".devcontainer/Dockerfile", ".devcontainer/requirements.txt")


def host_image(facts: HostFacts | None, inventory: Inventory) -> ImageSpec:
    """The image for this host: its NVIDIA driver picks the CUDA flavour and base (None: no
    host read, the defaults), the inventory's `[mirrors] pytorch` where its wheels come from.
    Decided once where a host is read (the workspace and service steps' plans, the `render`
    and `verify` commands, `onboard`, `doctor`) and handed to what renders or builds it."""
    return resolve_image(inventory.image, facts.nvidia.driver if facts else None,
                         inventory.mirrors.pytorch or PYTORCH_INDEX)


def image_tag(files: dict[str, str]) -> str:
    digest = hashlib.sha256("".join(files[p] for p in CONTEXT_FILES).encode()).hexdigest()
    return f"{IMAGE_REPOSITORY}:{digest[:12]}"


def upload_script(files: dict[str, str], directory: str) -> str:
    """Shell that writes `files` under `directory` (contents travel base64 in the script)."""
    folders = sorted({str(PurePosixPath(directory, path).parent) for path in files})
    lines = [f"rm -rf {directory}", f"mkdir -p {' '.join(folders)}"]
    for path, content in files.items():
        data = base64.b64encode(content.encode()).decode()
        lines.append(f"printf %s {data} | base64 -d > {directory}/{path}")
    return "\n".join(lines) + "\n"


def build_script(files: dict[str, str], tag: str, image: ImageSpec, root: str = ROOT) -> str:
    """Shell that builds `tag` from the rendered `files` unless the daemon it runs against has
    it ("cached"); its build context goes under `root` (a member's own, in rootless mode)."""
    context = f"{root}/build/{tag.split(':')[1]}"
    wheelhouse = image.wheelhouse
    script = f"if docker image inspect {tag} >/dev/null 2>&1; then echo cached; exit 0; fi\n"
    if image.base_archive:
        base, archive = shlex.quote(image.base), shlex.quote(image.base_archive)
        script += (f"docker image inspect {base} >/dev/null 2>&1 || {{ echo loading {base} "
                   f"from {archive}; docker load -i {archive}; }}\n")
    script += upload_script({p: files[p] for p in CONTEXT_FILES}, context)
    if wheelhouse:
        quoted = shlex.quote(wheelhouse)
        script += (f"[ -d {quoted} ] || {{ echo 'wheelhouse {wheelhouse} missing' >&2; "
                   f"exit 3; }}\nmkdir -p {context}/{WHEELHOUSE}\n"
                   f"cp -al {quoted}/. {context}/{WHEELHOUSE}/ 2>/dev/null || "
                   f"cp -a {quoted}/. {context}/{WHEELHOUSE}/\n")
    return script + build_command(tag, f"{context}/.devcontainer") + " 2>&1\n"


def build_command(tag: str, context: str, *, cache: bool = True) -> str:
    """`docker build` of `context` as `tag`. --force-rm: a failed build leaves no stopped
    container behind (the legacy builder keeps the failed step's, and its layer, otherwise)."""
    return f"docker build -t {tag} --force-rm{'' if cache else ' --no-cache'} {context}"
