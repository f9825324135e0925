"""Converge steps: each a pure `plan(facts, inventory) -> list[Change]`, no I/O.

A step also names the paths it needs to see (`paths(inventory)`), so the engine can read them
all in its one facts round trip. What every step shares is here; the steps, in the order they
run, are `steps.order.STEPS`.
"""

from __future__ import annotations

import base64
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath

from provision.changes import Change, Run, WriteFile, temporary_beside
from provision.errors import ProvisionError
from provision.facts import HostFacts
from provision.inventory import SERVICE_HOME, SERVICE_NAME, AptKey, Inventory
from provision.templating import render


class StepBlocked(ProvisionError):
    """The host is in a state the step must not touch; the message says what to fix."""

    exit_code = 11


class StepSkipped(ProvisionError):
    """The step does not apply to this host (said, never silent)."""


class NoGpu(StepSkipped):
    """No NVIDIA GPU: a skip, or a failure under --require-gpu."""


@dataclass(frozen=True)
class Proof:
    """A check run on the host after the step applied: `check(stdout)` says what is wrong."""

    script: str
    check: Callable[[str], str | None]


def _no_paths(inventory: Inventory) -> tuple[str, ...]:
    return ()


def _no_notes(facts: HostFacts, inventory: Inventory) -> list[str]:
    return []


def _no_proof(facts: HostFacts, inventory: Inventory) -> Proof | None:
    return None


@dataclass(frozen=True)
class Step:
    name: str
    plan: Callable[[HostFacts, Inventory], list[Change]]
    paths: Callable[[Inventory], tuple[str, ...]] = _no_paths
    # What the user should know even when nothing changes (e.g. FP8 limits of this GPU).
    notes: Callable[[HostFacts, Inventory], list[str]] = _no_notes
    proof: Callable[[HostFacts, Inventory], Proof | None] = _no_proof
    # Steps whose result this one builds on: when one of them fails, this one does not run
    # (its own errors would only hide the real cause); every other step still does.
    needs: tuple[str, ...] = ()


def home_of(facts: HostFacts, name: str) -> str:
    """The account's home, or where `useradd` will put it (the service account's is set)."""
    account = facts.accounts.get(name)
    if account:
        return account.home
    return SERVICE_HOME if name == SERVICE_NAME else f"/home/{name}"


def primary_group(facts: HostFacts, name: str) -> str:
    """The account's primary group (`useradd --user-group` makes one named like it)."""
    account = facts.accounts.get(name)
    if account is None:
        return name
    return next((g.name for g in facts.groups.values() if g.gid == account.gid), str(account.gid))


def former_members(facts: HostFacts, inventory: Inventory) -> list[str]:
    """Accounts an earlier run managed that the inventory no longer lists (to offboard).

    Never the login provision connects as: locking her would lock the admin out mid-run.
    """
    return sorted(set(_left(facts, inventory)) - {facts.sudo_user})


def kept_login(facts: HostFacts, inventory: Inventory) -> str | None:
    """The connecting login, when she left the inventory's members (kept, not offboarded)."""
    return facts.sudo_user if facts.sudo_user in _left(facts, inventory) else None


def _left(facts: HostFacts, inventory: Inventory) -> set[str]:
    return set(facts.state.get("members", [])) - {m.name for m in inventory.members}


# apt waits (bounded) for a dpkg lock held by e.g. unattended-upgrades instead of failing.
APT_UPDATE = "apt-get -o DPkg::Lock::Timeout=300 update -q >/dev/null"


def apt_install(*packages: str) -> str:
    """Shell that installs packages (templates/host/apt-install.sh.j2 says how and why)."""
    names = " ".join(shlex.quote(p) for p in packages)
    return render("host/apt-install.sh.j2", packages=names, update=APT_UPDATE,
                  install=("DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 "
                           f"install -y -q --no-install-recommends {names} >/dev/null"))


def signed_repository(step: str, summary: str, *, what: str, uri: str, key: AptKey,
                      setting: str, keyring: str, sources: str, content: str,
                      current: str | None) -> Change:
    """An apt repository trusted only with its own key, proven before it stays.

    The key (fetched from its URL on the host, or a key file's text shipped from here) goes to
    `keyring`, the source `content` to `sources`; then `apt-get update` of that source alone
    must accept the signature. When it does not (a wrong key, a mirror that does not answer),
    keyring and source go back to what they were and the step fails naming the repository,
    the key and `setting` (the inventory key to fix): the host's apt keeps working.
    """
    keyring_path, sources_path = PurePosixPath(keyring), PurePosixPath(sources)
    shared = {"what": what, "keyring": keyring, "sources": sources, "setting": setting,
              "backup": f"/var/lib/provision/apt-backup/{sources_path.stem}"}
    fetch = render("host/apt-key.sh.j2", **shared, key_url=key.url, key_path=key.path,
                   key_base64=base64.b64encode(key.text.encode()).decode(),
                   keyring_dir=str(keyring_path.parent),
                   temporary_keyring=temporary_beside(keyring),
                   dearmor=keyring_path.suffix != ".asc",
                   install_curl=apt_install("curl", "ca-certificates"),
                   install_gpg=apt_install("gnupg"))
    check = render("host/apt-source-check.sh.j2", **shared, uri=uri, key_source=key.source,
                   keyring_name=keyring_path.name, sources_name=sources_path.name)
    return Change(step, summary, (Run(fetch), WriteFile(sources, content, current), Run(check)))


def paths_of(steps: tuple[Step, ...], inventory: Inventory) -> tuple[str, ...]:
    """Every path these steps read, asked for in the one facts round trip."""
    return tuple(p for step in steps for p in step.paths(inventory))
