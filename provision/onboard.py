"""A new member's bundle, and her ssh block merged into an ssh config without harm.

The merge is idempotent: the block sits between markers naming member and host, is replaced in
place on the next merge, and the file as it was is kept beside it once.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from provision.facts import HostFacts
from provision.image import host_image
from provision.inventory import Inventory, Member
from provision.marked import set_block
from provision.render import DEBUG_LAUNCH, member_files, write_files
from provision.target import Target
from provision.templating import render


def bundle(inventory: Inventory, member: Member, host: str, target: Target,
           facts: HostFacts | None, identity_file: str, out: Path) -> list[Path]:
    """Her workspace files, her ssh block and the three steps, written under `out`; the image
    is the one the host's driver runs (`image.host_image`).

    The bundle's README.md is the three steps, then her workspace's README.md.
    """
    image = host_image(facts, inventory)
    files = member_files(inventory, member, image, host_alias=host, target=target, facts=facts,
                         identity_file=identity_file)
    welcome = render("onboard/README.md.j2", name=member.name, host=host,
                     workspace_dir=inventory.defaults.workspace_dir,
                     torch=image.torch, diffusers=image.diffusers, launch_name=DEBUG_LAUNCH)
    files["README.md"] = f"{welcome}\n---\n\n{files['README.md']}"
    return write_files(files, out)


def merge_ssh_block(config: Path, block: str, member: str, host: str) -> bool:
    """Put `block` between markers in `config`; True when the file changed."""
    begin, end = f"# BEGIN provision {member}@{host}", f"# END provision {member}@{host}"
    text = config.read_text() if config.exists() else ""
    new = set_block(text, begin, end, block.rstrip("\n").splitlines())
    if new == text:
        return False
    backup = config.with_name(config.name + ".provision-backup")
    if config.exists() and not backup.exists():
        shutil.copy2(config, backup)
    config.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_files({config.name: new}, config.parent)
    config.chmod(0o600)
    return True
