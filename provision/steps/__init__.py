"""Converge steps: each a pure `plan(facts, inventory) -> list[Change]`, no I/O.

A step also names the paths it needs to see (`paths(inventory)`), so the engine can read them
all in its one facts round trip. Order matters: later steps use what earlier ones create.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass

from provision.changes import Change
from provision.errors import InventoryError, ProvisionError
from provision.facts import HostFacts
from provision.inventory import Inventory


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


def home_of(facts: HostFacts, name: str) -> str:
    """The account's home, or where `useradd --create-home` will put it."""
    account = facts.accounts.get(name)
    return account.home if account else f"/home/{name}"


def primary_group(facts: HostFacts, name: str) -> str:
    """The account's primary group (`useradd --user-group` makes one named like it)."""
    account = facts.accounts.get(name)
    if account is None:
        return name
    return next((g.name for g in facts.groups.values() if g.gid == account.gid), str(account.gid))


def former_members(facts: HostFacts, inventory: Inventory) -> list[str]:
    """Accounts an earlier run managed that the inventory no longer lists (to offboard)."""
    current = {m.name for m in inventory.members}
    return sorted(set(facts.state.get("members", [])) - current)


def apt_install(*packages: str) -> str:
    """Install packages, refreshing the package lists only when the first try fails.

    apt waits (bounded) for a dpkg lock held by e.g. unattended-upgrades instead of failing.
    """
    names = " ".join(shlex.quote(p) for p in packages)
    install = ("DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -q "
               f"--no-install-recommends {names} >/dev/null")
    return f"{install} 2>&1 || {{ apt-get -o DPkg::Lock::Timeout=300 update -q >/dev/null\n" \
           f"{install}; }}"


def all_steps() -> tuple[Step, ...]:
    from provision.steps import docker, hf_cache, keepalive, nvidia, users, workspace

    return (users.STEP, keepalive.STEP, hf_cache.STEP, docker.STEP, nvidia.STEP, workspace.STEP)


def select_steps(only: list[str] | None, skip: list[str] | None) -> tuple[Step, ...]:
    steps = all_steps()
    names = [s.name for s in steps]
    for name in (only or []) + (skip or []):
        if name not in names:
            raise InventoryError(f"unknown step {name!r}", f"steps are {', '.join(names)}")
    return tuple(s for s in steps
                 if (not only or s.name in only) and s.name not in (skip or []))
