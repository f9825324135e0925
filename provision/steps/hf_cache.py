"""hf-cache: one Hugging Face cache for the team, writable by all, tokens private to each.

The cache directory is `root:<cache_group>` 2775 with default ACLs, so whatever a member
writes there stays group-writable. Each member's `~/.cache/huggingface` becomes a symlink to
it. A real directory already there is merged without losing a byte: it is renamed aside,
every file the shared cache lacks is moved in, the token goes to the member's private token
path, and what is left (files the cache already holds) stays in the renamed directory.
"""

from __future__ import annotations

import shlex
from pathlib import PurePosixPath

from provision import privilege
from provision.changes import REPORT, Change, WriteFile, as_member, run
from provision.contract import CACHE_LINK, TOKEN_DIR, wanted_acl
from provision.facts import HostFacts, MemberCache
from provision.inventory import Inventory, Member
from provision.steps import Step, StepBlocked, apt_install, former_members, home_of
from provision.templating import render

NAME = "hf-cache"
PROFILE = "/etc/profile.d/provision-hf.sh"

def paths(inventory: Inventory) -> tuple[str, ...]:
    per_member = (p for m in inventory.members
                  for p in (f"~{m.name}/.cache", f"~{m.name}/.config", f"~{m.name}/{TOKEN_DIR}"))
    return (inventory.defaults.cache_dir, PROFILE, *per_member)


def plan(facts: HostFacts, inventory: Inventory) -> list[Change]:
    defaults = inventory.defaults
    cache, group = defaults.cache_dir, defaults.cache_group
    q = shlex.quote(cache)
    homes = {a.name: a.home for a in facts.accounts.values()
             if a.uid == 0 or a.uid >= privilege.FIRST_REGULAR_ID}
    if why := privilege.cache_dir_host_problem(cache, homes):
        raise StepBlocked(f"[defaults] cache_dir = {cache!r}: {why}",
                          "set cache_dir to a directory of its own, e.g. /data/cache/huggingface")
    changes = []
    state = facts.path(cache)
    if not state.exists:
        changes.append(run(NAME, f"create {cache} (root:{group}, 2775)",
                           f"mkdir -p {q}\nchown root:{group} {q}\nchmod 2775 {q}"))
    elif state.kind != "directory":
        raise StepBlocked(f"{cache} exists and is not a directory ({state.kind})",
                          "move it away or set another cache_dir")
    elif (state.owner, state.group, state.mode) != ("root", group, "2775"):
        changes.append(run(NAME, f"{cache}: root:{group} 2775 (was {state.owner}:"
                                 f"{state.group} {state.mode})",
                           f"chown root:{group} {q}\nchmod 2775 {q}"))
    profile = render("host/hf-profile.sh.j2", cache_dir=cache, cache_group=group)
    current = facts.path(PROFILE)
    if current.content != profile:
        changes.append(Change(NAME, "HF_TOKEN_PATH per member for login shells (tokens stay "
                                    "out of the shared cache)",
                              (WriteFile(PROFILE, profile, current.content),)))
    # ACLs before the members' links and merges: a merge runs as the member, who must be able
    # to write in every folder of the cache, also those made there before provision managed it.
    if not state.exists or not wanted_acl(group) <= set(facts.cache.acl):
        if "setfacl" not in facts.tools:
            changes.append(run(NAME, "install acl (setfacl is missing) for the cache's default "
                                     "ACLs", apt_install("acl")))
        changes.append(run(NAME, f"{cache}: default ACLs keep members' files group-writable",
                           f"setfacl -R -m g:{group}:rwX,d:g:{group}:rwX,d:g::rwX,d:m::rwX {q}"))
    changes.extend(_named_acls(facts, inventory))
    for member in inventory.members:
        changes.extend(_member(facts, inventory, member))
    return changes


def _named_acls(facts: HostFacts, inventory: Inventory) -> list[Change]:
    """Rootless mode: an ACL entry naming each member, on the cache and as a default.

    A rootless container drops its supplementary groups (moby #40225), so inside her dev
    container the cache group gives her nothing; an entry naming her uid does, and the default
    entries make every file anyone writes there writable by each member. Former members'
    entries go.
    """
    if not inventory.defaults.rootless:
        return []
    q = shlex.quote(inventory.defaults.cache_dir)
    acl = set(facts.cache.acl)
    missing = [m.name for m in inventory.members
               if not {f"user:{m.name}:rwx", f"default:user:{m.name}:rwx"} <= acl]
    former = [n for n in former_members(facts, inventory) if f"user:{n}:rwx" in acl]
    changes = []
    if missing:
        entries = ",".join(f"u:{n}:rwX,d:u:{n}:rwX" for n in missing)
        changes.append(run(NAME, f"{inventory.defaults.cache_dir}: ACL entries naming "
                                 f"{', '.join(missing)} (rootless containers drop the cache "
                                 "group)", f"setfacl -R -m {entries},m::rwX,d:m::rwX {q}"))
    if former:
        entries = ",".join(f"u:{n},d:u:{n}" for n in former)
        changes.append(run(NAME, f"{inventory.defaults.cache_dir}: remove the ACL entries of "
                                 f"former members {', '.join(former)}",
                           f"setfacl -R -x {entries} {q}"))
    return changes


def _member(facts: HostFacts, inventory: Inventory, member: Member) -> list[Change]:
    """Her token directory, cache link and merge, all done as her (`as_member`): whatever
    links she planted in her home, root never writes through them."""
    name, home = member.name, home_of(facts, member.name)
    cache = inventory.defaults.cache_dir
    link, token_dir = f"{home}/{CACHE_LINK}", f"{home}/{TOKEN_DIR}"
    changes = []
    state = facts.path(f"~{name}/{TOKEN_DIR}")
    if (state.kind, state.owner, state.mode) != ("directory", name, "700"):
        changes.append(run(NAME, f"{token_dir}: {name}'s private token directory (0700)",
                           as_member(name, f"mkdir -p -m 0700 {TOKEN_DIR}\n"
                                           f"chmod 0700 {TOKEN_DIR}")))
    current = facts.member_caches.get(name, MemberCache(name, "missing"))
    make_link = as_member(name, f"mkdir -p {PurePosixPath(CACHE_LINK).parent}\n"
                                f"ln -sfn {shlex.quote(cache)} {CACHE_LINK}")
    if current.state == "symlink" and current.detail == cache:
        return changes
    if current.state == "symlink":
        changes.append(run(NAME, f"{link}: point to {cache} (was -> {current.detail})",
                           make_link))
    elif current.state == "missing":
        changes.append(run(NAME, f"{link} -> {cache}", make_link))
    elif current.state == "dir":
        merge = render("host/hf-merge.sh.j2", src=shlex.quote(CACHE_LINK),
                       dst=shlex.quote(cache), group=inventory.defaults.cache_group,
                       token=shlex.quote(f"{TOKEN_DIR}/token"), report=REPORT)
        changes.append(run(NAME, f"{link}: merge {name}'s own cache into {cache} (as her; "
                                 "nothing deleted; the token stays private), then link it",
                           as_member(name, merge), make_link))
    else:
        raise StepBlocked(f"{link} is a {current.state}, not a directory or link",
                          f"move it away so {name}'s cache can link to {cache}")
    return changes


STEP = Step(NAME, plan, paths, needs=("users",))
