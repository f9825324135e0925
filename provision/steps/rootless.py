"""rootless: with `docker_mode = "rootless"`, each member runs her own Docker daemon.

The docker group is root-equivalent (`docker run -v /:/host`), so in rootless mode nobody is in
it (the users step sees to that) and each member gets a daemon that runs as her: a systemd
user service (lingering, so it runs without her logged in), its data under her home,
subordinate uid/gid ranges of her own, and a `rootless` docker context so plain `docker` (and
VS Code's Dev Containers) use it without environment variables. Ranges are given once, disjoint
from every other range on the host, and never changed afterwards: files her containers wrote
are owned by ids from them.

Every command that touches her home runs as her (`as_member`), never as root, so nothing she
planted there (a link to /etc/shadow) can turn a root write into a write outside it.

Packages: Docker's `docker-ce-rootless-extras` where the engine comes from Docker's repository,
Debian's/Ubuntu's `rootlesskit` with `docker.io`; never both (they conflict).

In rootful mode a member's rootless daemon, if any, is stopped and her context set back to the
system daemon; her rootless images and data stay where they are.

The generation service's account (`sd35-api`, steps/service.py) gets its daemon from the same
functions, taking an account's name (`subordinate_ids`, `own_daemon`, `stop_daemon`), in the
service step, which creates that account.
"""

from __future__ import annotations

import shlex

from provision.changes import Change, Run, WriteFile, as_member, run
from provision.contract import engine_source
from provision.facts import (
    DOCKER_CONFIG,
    SUBGID,
    SUBUID,
    HostFacts,
    IdRange,
    MemberDaemon,
    read_ranges,
)
from provision.inventory import Inventory
from provision.steps import Step, StepBlocked, apt_install, home_of
from provision.templating import render

NAME = "rootless"
# Where useradd starts (SUB_UID_MIN) and how many ids it gives (SUB_UID_COUNT): a container
# image's files need uids up to 65535 inside.
SUBID_START = 100000
SUBID_COUNT = 65536
CONTEXT = "rootless"
COMMON_PACKAGES = ("uidmap", "slirp4netns", "dbus-user-session", "fuse-overlayfs")
EXTRAS = "docker-ce-rootless-extras"
# The setup tool finds dockerd-rootless.sh on PATH and calls `docker` beside it. Docker's
# package puts all three in /usr/bin; docker.io keeps the scripts in its contrib folder, without
# `docker`, so the tool runs with a folder of links to both (its systemd unit starts from there).
CONTRIB = "/usr/share/docker.io/contrib"
LINKS = "/usr/local/lib/provision/rootless-bin"
LINKED = {f"{LINKS}/dockerd-rootless.sh": f"{CONTRIB}/dockerd-rootless.sh",
          f"{LINKS}/docker": "/usr/bin/docker"}
SETUPTOOL = {"docker-ce": "/usr/bin/dockerd-rootless-setuptool.sh",
             "distro": f"{CONTRIB}/dockerd-rootless-setuptool.sh"}
TOOL_PATH = {"docker-ce": "", "distro": f"PATH={LINKS}:$PATH "}


def allocate(ranges: list[IdRange], owners: list[str]) -> dict[str, IdRange]:
    """Each owner without a range gets the lowest free block of SUBID_COUNT ids at or above
    SUBID_START, clear of every range already given (in order, so the plan is stable)."""
    taken = list(ranges)
    given = {}
    for owner in owners:
        if any(r.owner == owner for r in taken):
            continue
        candidate = IdRange(owner, SUBID_START, SUBID_COUNT)
        while clash := [r for r in taken if r.overlaps(candidate)]:
            candidate = IdRange(owner, max(r.end for r in clash) + 1, SUBID_COUNT)
        taken.append(candidate)
        given[owner] = candidate
    return given


# Ubuntu 24.04 lets no unprivileged process make a user namespace unless an AppArmor profile
# allows it; its apparmor package ships one for the packaged rootlesskit, older ones do not.
USERNS_RESTRICTED = "/proc/sys/kernel/apparmor_restrict_unprivileged_userns"
SHIPPED_PROFILE = "/etc/apparmor.d/rootlesskit"
PROFILE = "/etc/apparmor.d/provision-rootlesskit"
ROOTLESSKIT = "/usr/bin/rootlesskit"


def paths(inventory: Inventory) -> tuple[str, ...]:
    """Each member's docker config too: its context read with the paths, not by a process of
    its own for each member."""
    return (SUBUID, SUBGID, *LINKED, USERNS_RESTRICTED, SHIPPED_PROFILE, PROFILE,
            *(f"~{member.name}/{DOCKER_CONFIG}" for member in inventory.members))


def plan(facts: HostFacts, inventory: Inventory) -> list[Change]:
    if not inventory.defaults.rootless:
        return [c for m in inventory.members if (c := stop_daemon(facts, m.name)) is not None]
    source = engine_source(facts, inventory)
    changes = _packages(facts, source)
    changes.extend(_apparmor(facts))
    changes.extend(subordinate_ids(facts, [m.name for m in inventory.members]))
    for member in inventory.members:
        changes.extend(own_daemon(facts, member.name, source))
    return changes


def notes(facts: HostFacts, inventory: Inventory) -> list[str]:
    """Which mode the host is in, and each member's subordinate ranges (given once)."""
    defaults = inventory.defaults
    if not defaults.rootless:
        unset = "" if defaults.docker_mode else (" (docker_mode is not set in [defaults]: "
                                                 "rootful, as before the setting existed)")
        return [f"docker_mode = rootful{unset}: members use the system daemon through the "
                "docker group, which is root-equivalent; set docker_mode = \"rootless\" to "
                "give each her own daemon"]
    ranges = {r.owner: r for r in read_ranges(facts.text(SUBUID))}
    given = ", ".join(f"{m.name} {ranges[m.name]}" for m in inventory.members
                      if m.name in ranges)
    return ["docker_mode = rootless: each member her own Docker daemon, no one in the docker "
            "group" + (f"; subordinate ids {given}" if given else "")]


def _packages(facts: HostFacts, source: str) -> list[Change]:
    installed = facts.docker.packages
    rootlesskit = EXTRAS if source == "docker-ce" else "rootlesskit"
    other = "rootlesskit" if rootlesskit == EXTRAS else EXTRAS
    if other in installed:
        raise StepBlocked(f"{other} is installed, but this engine ({source}) needs "
                          f"{rootlesskit}, and the two conflict",
                          f"apt-get remove {other}, then rerun")
    missing = [p for p in (rootlesskit, *COMMON_PACKAGES) if p not in installed]
    changes = []
    if missing:
        changes.append(run(NAME, f"install {', '.join(missing)} (rootless Docker: user "
                                 "namespaces, networking, storage)", apt_install(*missing)))
    if source == "distro" and any(facts.path(link).target != target
                                  for link, target in LINKED.items()):
        changes.append(run(NAME, f"{LINKS}: docker.io's rootless scripts beside docker, "
                                 "where its setup tool looks for them",
                           f"mkdir -p {LINKS}\n" + "\n".join(
                               f"ln -sfn {target} {link}" for link, target in LINKED.items())))
    return changes


def _apparmor(facts: HostFacts) -> list[Change]:
    """Where the kernel restricts unprivileged user namespaces and no profile covers
    rootlesskit, one that does (Docker's documented profile), loaded at once."""
    if (facts.text(USERNS_RESTRICTED) or "").strip() != "1" or facts.path(
            SHIPPED_PROFILE).exists:
        return []
    wanted = render("host/apparmor-rootlesskit.j2", rootlesskit=ROOTLESSKIT)
    current = facts.path(PROFILE).content
    if current == wanted:
        return []
    return [Change(NAME, f"{PROFILE}: let {ROOTLESSKIT} make user namespaces (this kernel "
                         "restricts them: kernel.apparmor_restrict_unprivileged_userns = 1)",
                   (WriteFile(PROFILE, wanted, current), Run(f"apparmor_parser -r {PROFILE}")))]


def subordinate_ids(facts: HostFacts, owners: list[str],
                    given_to: tuple[str, ...] | None = None, step: str = NAME) -> list[Change]:
    """Subordinate ranges for `owners`, checked for overlaps and allocated in their order.

    Changes only for `given_to` (default: all): the service step allocates its account's
    ranges after the members' (`[*members, account]`), so both plans, made on the same facts,
    agree on the members' ranges and give the account one clear of them."""
    changes = []
    for path, flag, kind in ((SUBUID, "--add-subuids", "uids"), (SUBGID, "--add-subgids",
                                                                   "gids")):
        ranges = read_ranges(facts.text(path))
        for mine in (r for r in ranges if r.owner in owners):
            for other in ranges:
                if other is not mine and other.owner != mine.owner and mine.overlaps(other):
                    raise StepBlocked(
                        f"{path}: {mine.owner}'s subordinate {kind} {mine} overlap "
                        f"{other.owner}'s {other}: her containers' files could be another's",
                        f"fix {path} by hand (provision never changes a range once given)")
        for owner, given in allocate(ranges, owners).items():
            if given_to is not None and owner not in given_to:
                continue
            changes.append(run(step, f"{owner}: subordinate {kind} {given} (given once, never "
                                     "changed)",
                               f"usermod {flag} {given.start}-{given.end} {owner}"))
    return changes


def own_daemon(facts: HostFacts, name: str, source: str, step: str = NAME) -> list[Change]:
    """The account's own daemon, as a member has it (the service account's too): lingering,
    the setup tool's user service, and the `rootless` context in use."""
    daemon = facts.member_daemons.get(name, MemberDaemon(name, False, False, False, ""))
    changes = []
    if not daemon.linger:
        changes.append(run(step, f"{name}: lingering on (her daemon runs while she is logged "
                                 "out)", f"loginctl enable-linger {name}"))
    if not (daemon.unit and daemon.socket):
        setuptool = SETUPTOOL[source]
        changes.append(run(
            step, f"{name}: her own Docker daemon, a systemd user service (data in "
                  f"{home_of(facts, name)}/.local/share/docker), set up as her by {setuptool}",
            user_manager(name),
            as_member(name, f"{TOOL_PATH[source]}{setuptool} install >&2")))
    if daemon.context != CONTEXT:
        socket = "unix:///run/user/$(id -u)/docker.sock"
        changes.append(run(
            step, f"{name}: docker context {CONTEXT!r} in use, so plain docker and VS Code "
                  f"reach her daemon",
            user_manager(name),
            as_member(name, f"docker context inspect {CONTEXT} >/dev/null 2>&1 || "
                            f"docker context create {CONTEXT} --docker host={socket} >/dev/null"
                            f"\ndocker context use {CONTEXT} >/dev/null")))
    return changes


def stop_daemon(facts: HostFacts, name: str, step: str = NAME) -> Change | None:
    """Rootful mode: the account's rootless daemon stopped and its context back to the system
    daemon (a member is in the docker group again); its images and data are kept."""
    daemon = facts.member_daemons.get(name)
    if daemon is None or not (daemon.socket or daemon.context == CONTEXT):
        return None
    return run(step, f"{name}: stop her rootless daemon (its images and data stay in "
                     f"{home_of(facts, name)}/.local/share/docker) and use the system "
                     "daemon (docker context default)",
               user_manager(name),
               as_member(name, "systemctl --user disable --now docker.service "
                               ">/dev/null 2>&1 || true\n"
                               "docker context use default >/dev/null"))


def user_manager(name: str) -> str:
    """Her systemd user manager running, with its D-Bus socket (the setup tool needs both)."""
    return (f"systemctl start \"user@$(id -u {name}).service\"\n"
            f"[ -S \"/run/user/$(id -u {name})/bus\" ] || "
            f"systemctl --user -M {shlex.quote(name + '@')} start dbus.socket")


STEP = Step(NAME, plan, paths, notes, needs=("users", "docker"))
