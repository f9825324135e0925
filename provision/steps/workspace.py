"""workspace: each member's workspace on the host seeded with her rendered files.

A missing file is written; one still as provision wrote it is brought up to date; one the
member edited is drift: reported and left alone (`--force` overwrites it, keeping a backup).
What provision wrote is remembered by digest in a record per member under /var/lib/provision,
and the facts carry digests, not contents, so a team's no-op converge stays small.

The Dockerfile and requirements.txt are for this host's NVIDIA driver (`host_image`): the plan
says which flavour and base it got, and an `[image]` override the driver cannot run fails the
step at plan time, naming the driver it needs.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from collections.abc import Iterable
from pathlib import PurePosixPath

from provision.changes import Change, Run, WriteFile, as_member, run
from provision.contract import WHEELHOUSE
from provision.facts import HostFacts
from provision.image import host_image
from provision.inventory import Inventory, Member
from provision.models import debug_model
from provision.render import LAUNCH_JSON, WORKSPACE_FILES, render_for_host
from provision.steps import Step, StepBlocked, home_of, primary_group
from provision.versions import ImageSpec, resolve_image

NAME = "workspace"


def record_path(member: str) -> str:
    return f"/var/lib/provision/workspace-{member}.json"


def _directories(files: Iterable[str]) -> list[str]:
    parents = {str(p) for path in files for p in PurePosixPath(path).parents if str(p) != "."}
    return ["", *sorted(parents)]


def paths(inventory: Inventory) -> tuple[str, ...]:
    found: list[str] = []
    # Which files, not their contents: naming them renders nothing (the plan renders them
    # once, against the host's facts).
    for member in inventory.members:
        base = f"~{member.name}/{inventory.defaults.workspace_dir}"
        found += [f"{base}/{d}".rstrip("/") for d in _directories(WORKSPACE_FILES)]
        found += [f"sha256:{base}/{path}" for path in WORKSPACE_FILES]
        found.append(record_path(member.name))
    wheelhouse = resolve_image(inventory.image).wheelhouse
    if wheelhouse and inventory.members:
        found += [wheelhouse, *(f"~{m.name}/{inventory.defaults.workspace_dir}/{WHEELHOUSE}"
                                for m in inventory.members)]
    return tuple(found)


def digest(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def plan(facts: HostFacts, inventory: Inventory) -> list[Change]:
    if not inventory.members:
        return []
    image = host_image(facts, inventory)
    changes = []
    for member in inventory.members:
        changes.extend(_member(facts, inventory, member, image))
    return changes


def _member(facts: HostFacts, inventory: Inventory, member: Member,
            image: ImageSpec) -> list[Change]:
    name, group = member.name, primary_group(facts, member.name)
    relative = inventory.defaults.workspace_dir
    root = f"{home_of(facts, name)}/{relative}"
    files = render_for_host(inventory, member, facts, image,
                            host_alias=facts.os.hostname or None, target=None)
    # Unreadable (hand-edited, cut short): nothing counts as provision's, so edits stay drift.
    recorded = facts.json_object(record_path(name))
    record = dict(recorded)
    changes: list[Change] = []
    model = debug_model(member, facts)
    missing_dirs = [d for d in _directories(files)
                    if not facts.path(f"~{name}/{relative}/{d}".rstrip("/")).exists]
    if missing_dirs:
        changes.append(run(NAME, f"{root}: {name}'s workspace directories", as_member(
            name, "mkdir -p " + " ".join(shlex.quote(f"{root}/{d}".rstrip("/"))
                                         for d in missing_dirs))))
    for path, content in files.items():
        wanted = digest(content)
        current = facts.path(f"sha256:~{name}/{relative}/{path}").content
        target = f"{root}/{path}"
        # Written as her: a workspace path she made a link (to /etc) is never followed by root.
        write = WriteFile(target, content, None, owner=name, group=group, member=name)
        # Says which model her debug configurations run, and why (the cache, her GPU).
        what = f"{target} (--model {model.model}: {model.why})" if path == LAUNCH_JSON else target
        if current == wanted:
            record[path] = wanted
        elif current is None:
            changes.append(Change(NAME, f"seed {what}", (write,)))
            record[path] = wanted
        elif current == recorded.get(path):
            changes.append(Change(NAME, f"update {what} (not edited since provision wrote it)",
                                  (write,)))
            record[path] = wanted
        else:
            backup = f"{shlex.quote(target)} {shlex.quote(target)}.provision-backup-$(date +%s)"
            changes.append(Change(
                NAME, f"{target} was edited by {name}: drifted, left alone (--force "
                      "overwrites it, keeping a backup)",
                (Run(as_member(name, f"cp -p {backup}")), write), needs_force=True))
            # Right once forced; while not, her digest still differs from it: still drift.
            record[path] = wanted
    changes.extend(_wheelhouse(facts, inventory, member, root, image.wheelhouse))
    if record != recorded:
        changes.append(Change(NAME, f"remember what provision wrote in {name}'s workspace", (
            WriteFile(record_path(name), json.dumps(record, sort_keys=True) + "\n",
                      facts.text(record_path(name)), mode="0600"),)))
    return changes


def _wheelhouse(facts: HostFacts, inventory: Inventory, member: Member, root: str,
                source: str) -> list[Change]:
    """Air-gapped hosts: the image builds from the wheels in the build context (`source`, the
    image's wheelhouse on the host), so her workspace gets them (hard links where the
    filesystem allows)."""
    here = facts.path(f"~{member.name}/{inventory.defaults.workspace_dir}/{WHEELHOUSE}")
    if not source or here.exists:
        return []
    if facts.path(source).kind != "directory":
        raise StepBlocked(f"[image] wheelhouse {source} is not a directory on this host",
                          "copy the wheels there first (pip download -r requirements.txt)")
    target = shlex.quote(f"{root}/{WHEELHOUSE}")
    # As her: hard links where she may make them, else copies that are hers.
    return [run(NAME, f"{root}/{WHEELHOUSE}: the wheels from {source}", as_member(
        member.name, f"mkdir -p {target}\n"
                     f"cp -l -R {shlex.quote(source)}/. {target}/ 2>/dev/null || "
                     f"cp -R {shlex.quote(source)}/. {target}/"))]


def notes(facts: HostFacts, inventory: Inventory) -> list[str]:
    return [f"image for this host: {host_image(facts, inventory).choice}"] \
        if inventory.members else []


STEP = Step(NAME, plan, paths, notes, needs=("users",))
