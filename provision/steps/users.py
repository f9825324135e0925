"""users: team accounts, their keys (in a managed block), groups and a limited sudo.

Offboarding lives here too: a member who left the inventory is locked (account expiry, which
sshd honours for key logins), her keys are moved aside, her sudo rule and groups go, and her
home stays where it is.
"""

from __future__ import annotations

import shlex

from provision import privilege
from provision.changes import Change, WriteFile, as_member, run
from provision.facts import HostFacts, PathState
from provision.inventory import Inventory, Member
from provision.marked import set_block
from provision.steps import (
    Step,
    StepBlocked,
    apt_install,
    former_members,
    home_of,
    kept_login,
    primary_group,
)
from provision.templating import render

NAME = "users"
BEGIN = "# BEGIN provision managed keys (edits between these lines are overwritten)"
END = "# END provision managed keys"
DOCKER_GROUP = "docker"
DOCKER_WARNING = ("the docker group is root-equivalent: its members can start a container "
                  "that mounts / and act as root on this host")
ROOT_EQUIVALENT_WARNING = ("root_equivalent = true: this sudo list lets {name} act as root "
                           "on this host")


def sudoers_path(name: str) -> str:
    # sudo skips drop-ins whose name holds a '.', so the member name is used as it is.
    return f"/etc/sudoers.d/provision-{name}"


def paths(inventory: Inventory) -> tuple[str, ...]:
    return tuple(p for m in inventory.members for p in (
        f"~{m.name}/", f"~{m.name}/.ssh", f"~{m.name}/.ssh/authorized_keys",
        sudoers_path(m.name)))


def managed_keys(current: str | None, keys: tuple[str, ...]) -> str:
    """The authorized_keys text with our block set to `keys`; lines outside it are kept."""
    return set_block(current, BEGIN, END, list(keys))


def plan(facts: HostFacts, inventory: Inventory) -> list[Change]:
    _check_cache_group(facts, inventory.defaults.cache_group)
    changes = []
    # Rootless mode needs no docker group; rootful mode puts every member in it.
    groups = [(inventory.defaults.cache_group, False)]
    if not inventory.defaults.rootless:
        groups.append((DOCKER_GROUP, True))
    for group, system in groups:
        if group not in facts.groups:
            flag = "--system " if system else ""
            changes.append(run(NAME, f"create group {group}", f"groupadd {flag}{group}"))
    for member in inventory.members:
        changes.extend(_member(facts, inventory, member))
    for name in former_members(facts, inventory):
        changes.extend(_offboard(facts, inventory, name))
    changes.extend(_former_cache_group(facts, inventory))
    # Sudo rules last: when sudo itself cannot be installed, the accounts are already made.
    with_sudo = [m.name for m in inventory.members if m.sudo]
    if with_sudo and "visudo" not in facts.tools:
        changes.append(run(NAME, f"install sudo (visudo is missing) for the sudo rules of "
                                 f"{', '.join(with_sudo)}", apt_install("sudo")))
    for member in inventory.members:
        changes.extend(_sudo(facts, member))
    return changes


def _member(facts: HostFacts, inventory: Inventory, member: Member) -> list[Change]:
    name = member.name
    account = facts.accounts.get(name)
    changes = []
    if account is None:
        changes.append(run(NAME, f"create account {name} (home, bash)",
                           f"useradd --create-home --shell /bin/bash --user-group {name}"))
    elif account.uid < privilege.FIRST_REGULAR_ID:
        raise StepBlocked(f"{name} exists as a system account (uid {account.uid})",
                          "give the member another name in the inventory")
    elif account.locked:
        changes.append(run(NAME, f"unlock returning member {name}",
                           f"usermod --expiredate '' {name}"))
    groups = facts.groups_of(name) if account else set()
    rootless = inventory.defaults.rootless
    wanted = [inventory.defaults.cache_group] + ([] if rootless else [DOCKER_GROUP])
    missing = [g for g in wanted if g not in groups]
    if missing:
        changes.append(run(NAME, f"add {name} to {', '.join(missing)}",
                           f"usermod --append --groups {','.join(missing)} {name}",
                           warning=DOCKER_WARNING if DOCKER_GROUP in missing else None))
    if rootless and DOCKER_GROUP in groups:
        changes.append(run(NAME, f"{name} leaves the docker group (docker_mode = rootless: she "
                                 "gets her own daemon; images she kept in the system daemon "
                                 "stay there, out of her reach; her open sessions keep the "
                                 "group until she logs in again)",
                           f"gpasswd --delete {name} {DOCKER_GROUP} >/dev/null"))
    home = facts.path(f"~{name}/")
    if rootless and (account is None or home.mode != "700"):
        # Without root through Docker, the home's mode is what keeps teammates out of it.
        was = f", was {home.mode}" if home.exists else ""
        path = home_of(facts, name)
        changes.append(run(NAME, f"{path}: {name}'s alone (0700{was})",
                           f"chmod 0700 {shlex.quote(path)}"))
    changes.extend(_keys(facts, member))
    return changes


def _keys(facts: HostFacts, member: Member) -> list[Change]:
    name, home = member.name, home_of(facts, member.name)
    group = primary_group(facts, name)
    changes = []
    ssh_dir = facts.path(f"~{name}/.ssh")
    if (ssh_dir.kind, ssh_dir.owner, ssh_dir.mode) != ("directory", name, "700"):
        # As her: a ~/.ssh she made a link (to /root/.ssh) is never followed by root.
        changes.append(run(NAME, f"{home}/.ssh for {name} (0700)",
                           as_member(name, "mkdir -p .ssh\nchmod 0700 .ssh"),
                           warning=_link_warning(ssh_dir, f"{home}/.ssh", name)))
    current = facts.path(f"~{name}/.ssh/authorized_keys")
    wanted = managed_keys(current.content, member.keys)
    if current.content != wanted or (current.owner, current.mode) != (name, "600"):
        verb = "set" if current.exists else "create"
        changes.append(Change(NAME, f"{verb} {name}'s managed authorized_keys block "
                                    f"({len(member.keys)} key(s); lines outside it kept)",
                              (WriteFile(f"{home}/.ssh/authorized_keys", wanted, current.content,
                                         owner=name, group=group, mode="0600", member=name),),
                              warning=_link_warning(current, f"{home}/.ssh/authorized_keys",
                                                    name)))
    return changes


def _link_warning(state: PathState, path: str, name: str) -> str | None:
    """A link where provision writes in her home: said, and written through with her rights."""
    if state.kind != "link":
        return None
    return (f"{path} is a link to {state.target}: written as {name}, so only where she "
            "may write herself (root never follows it)")


def _sudo(facts: HostFacts, member: Member) -> list[Change]:
    path = sudoers_path(member.name)
    current = facts.path(path)
    if not member.sudo:
        if current.exists:
            return [run(NAME, f"remove {member.name}'s sudo rule", f"rm -f {path}")]
        return []
    wanted = render("host/sudoers.j2", name=member.name, commands=member.sudo)
    if current.content == wanted and current.mode == "440":
        return []
    return [Change(NAME, f"sudo for {member.name}: only {', '.join(member.sudo)}",
                   (WriteFile(path, wanted, current.content, mode="0440",
                              validate="visudo -cf {}"),),
                   warning=ROOT_EQUIVALENT_WARNING.format(name=member.name)
                   if member.root_equivalent else None)]


def _check_cache_group(facts: HostFacts, group: str) -> None:
    """Every member joins the cache group: on this host it must be a group of its own."""
    existing = facts.groups.get(group)
    if existing is None:
        return
    personal_of = next((a.name for a in facts.accounts.values() if a.gid == existing.gid), None)
    if why := privilege.group_host_problem(group, existing.gid, personal_of):
        raise StepBlocked(f"[defaults] cache_group = {group!r}: {why}",
                          "members would get what it guards: set cache_group to a new group "
                          "name, e.g. hfcache")


def _former_cache_group(facts: HostFacts, inventory: Inventory) -> list[Change]:
    """Members leave the cache group an earlier run used when the inventory names another:
    a changed cache_group must not leave them in the old one."""
    old = facts.state.get("cache_group")
    if not isinstance(old, str) or old == inventory.defaults.cache_group or \
            old not in facts.groups:
        return []
    managed = {m.name for m in inventory.members} | set(former_members(facts, inventory))
    return [run(NAME, f"{name} leaves {old} (the cache group before "
                      f"{inventory.defaults.cache_group})",
                f"gpasswd --delete {name} {old} >/dev/null")
            for name in sorted(managed & set(facts.groups[old].members))]


def notes(facts: HostFacts, inventory: Inventory) -> list[str]:
    login = kept_login(facts, inventory)
    if login is None:
        return []
    return [f"{login} left the inventory's members but is the login provision connects as: "
            "she is not offboarded (connect as another admin to offboard her)"]


def _offboard(facts: HostFacts, inventory: Inventory, name: str) -> list[Change]:
    account = facts.accounts.get(name)
    if account is None:
        return []
    changes = []
    if not account.locked:
        changes.append(run(NAME, f"offboard {name}: lock the account (home kept)",
                           f"usermod --lock --expiredate 1 {name}"))
    if account.authorized_keys:
        # As her (runuser works for a locked account): her ~/.ssh may be a link to root's.
        changes.append(run(NAME, f"offboard {name}: move her SSH keys aside",
                           as_member(name, "mv -f .ssh/authorized_keys "
                                           ".ssh/authorized_keys.offboarded-"
                                           "$(date +%Y%m%d%H%M%S)")))
    if f"provision-{name}" in facts.sudoers_d:
        changes.append(run(NAME, f"offboard {name}: remove her sudo rule",
                           f"rm -f {sudoers_path(name)}"))
    daemon = facts.member_daemons.get(name)
    if daemon is not None and daemon.linger:
        changes.append(run(NAME, f"offboard {name}: lingering off (her own Docker daemon stops; "
                                 "its data stays in her home)",
                           f"loginctl disable-linger {name}"))
    member_of = facts.groups_of(name)
    for group in (inventory.defaults.cache_group, DOCKER_GROUP):
        if group in member_of:
            changes.append(run(NAME, f"offboard {name}: leave group {group}",
                               f"gpasswd --delete {name} {group} >/dev/null"))
    return changes


STEP = Step(NAME, plan, paths, notes=notes)
