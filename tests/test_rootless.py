"""docker_mode: the inventory key, and the rootless plan on recorded facts.

debian-12-sandbox-rootless.txt was recorded (`provision facts --raw`) on a sandbox converged in
rootless mode; debian-12-sandbox-converged.txt on one converged before the mode existed
(rootful: every member in the docker group).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from provision.errors import InventoryError
from provision.facts import MemberDaemon
from provision.inventory import load_inventory, parse_inventory
from provision.sandbox import new_inventory
from provision.steps import rootless, users
from provision.steps.rootless import IdRange, allocate, read_ranges
from provision.templating import render
from tests.conftest import FIXTURES
from tests.test_plans import facts_of, summaries

ROOTLESS = "debian-12-sandbox-rootless"
ROOTFUL = "debian-12-sandbox-converged"


def inventory_in(mode: str | None, base: Path = FIXTURES / "facts"):
    """The recorded rootful sandbox's inventory, with docker_mode set to `mode` (None: unset)."""
    inventory = load_inventory(base / "debian-12-sandbox.toml")
    defaults = dataclasses.replace(inventory.defaults, docker_mode=mode or "")
    return dataclasses.replace(inventory, defaults=defaults)


def test_docker_mode_is_validated_where_it_is_written(tmp_path) -> None:
    path = tmp_path / "provision.toml"
    path.write_text('[defaults]\ncache_group = "hfcache"\ndocker_mode = "rootles"\n')
    with pytest.raises(InventoryError) as error:
        load_inventory(path)
    assert error.value.line().startswith(f"{path}:3: docker_mode: must be one of rootless, "
                                         "rootful")


def test_an_inventory_without_docker_mode_stays_rootful_and_the_plan_says_so() -> None:
    inventory = parse_inventory({}, Path("provision.toml"))
    assert inventory.defaults.mode == "rootful" and not inventory.defaults.rootless
    notes = rootless.notes(facts_of(ROOTFUL), inventory_in(None))
    assert "docker_mode = rootful (docker_mode is not set" in notes[0]
    assert "root-equivalent" in notes[0]


def test_new_inventories_are_rootless() -> None:
    for text in (render("provision.toml.j2"), new_inventory().as_string()):
        inventory = parse_inventory(__import__("tomllib").loads(text), Path("provision.toml"))
        assert inventory.defaults.mode == "rootless"


def test_ranges_are_given_once_lowest_free_first_and_never_overlap() -> None:
    given = read_ranges("admin:100000:65536\nbob:300000:65536\njunk\n")
    new = allocate(given, ["admin", "alice", "carol", "dave"])
    assert "admin" not in new  # a range once given is kept as it is
    # carol fits in the gap below bob's range; dave does not, and goes above it.
    assert (new["alice"].start, new["carol"].start, new["dave"].start) == (165536, 231072,
                                                                           365536)
    everything = [*given, *new.values()]
    assert not [(a, b) for a in everything for b in everything
                if a is not b and a.overlaps(b)]
    assert allocate([*given, *new.values()], ["alice", "carol"]) == {}


def test_overlapping_ranges_are_refused_not_rewritten() -> None:
    facts = facts_of(ROOTLESS)
    text = "admin:100000:65536\ndev:165536:65536\nalice:200000:65536\nbob:296608:65536\n"
    paths = {**facts.paths, "/etc/subuid": dataclasses.replace(facts.paths["/etc/subuid"],
                                                               content=text)}
    inventory = load_inventory(FIXTURES / "facts" / f"{ROOTLESS}.toml")
    with pytest.raises(rootless.StepBlocked, match="dev's subordinate uids 165536-231071 "
                                                   "overlap alice's 200000-265535"):
        rootless.plan(dataclasses.replace(facts, paths=paths), inventory)


def test_a_host_converged_rootless_plans_nothing_and_shows_the_ranges() -> None:
    facts = facts_of(ROOTLESS)
    inventory = load_inventory(FIXTURES / "facts" / f"{ROOTLESS}.toml")
    assert rootless.plan(facts, inventory) == []
    assert users.plan(facts, inventory) == []
    assert not facts.groups["docker"].members
    note = rootless.notes(facts, inventory)[0]
    assert "subordinate ids dev 165536-231071, alice 231072-296607, bob 296608-362143" in note


def test_switching_a_rootful_host_to_rootless_is_a_plan() -> None:
    facts = facts_of(ROOTFUL)
    inventory = inventory_in("rootless")
    plan = summaries(users.plan(facts, inventory))
    assert [s for s in plan if "leaves the docker group" in s and "images" in s] == [
        s for s in plan if s.startswith(("alice leaves", "bob leaves"))]
    assert len([s for s in plan if "leaves the docker group" in s]) == 2
    # (Recorded before the users step asked for the home's mode: it says no "was".)
    assert {s for s in plan if "alone (0700" in s} == {
        "/home/alice: alice's alone (0700)", "/home/bob: bob's alone (0700)"}
    assert not [s for s in plan if "add" in s and "docker" in s]
    steps = summaries(rootless.plan(facts, inventory))
    assert steps[0] == ("install rootlesskit, uidmap, slirp4netns, dbus-user-session, "
                        "fuse-overlayfs (rootless Docker: user namespaces, networking, storage)")
    assert "docker-ce-rootless-extras" not in " ".join(steps)
    for name in ("alice", "bob"):
        assert f"{name}: lingering on (her daemon runs while she is logged out)" in steps
        assert any(s.startswith(f"{name}: her own Docker daemon") for s in steps)
        assert any(s.startswith(f"{name}: docker context 'rootless' in use") for s in steps)


def test_the_daemon_is_set_up_as_her_never_as_root() -> None:
    changes = rootless.plan(facts_of(ROOTFUL), inventory_in("rootless"))
    daemon = next(c for c in changes if c.summary.startswith("alice: her own Docker daemon"))
    script = daemon.script()
    assert "runuser -u alice -- env -i" in script
    assert "dockerd-rootless-setuptool.sh install" in script
    assert "--force" not in script and "--skip-iptables" not in script


def test_docker_ce_hosts_take_dockers_rootless_extras_never_debians_rootlesskit() -> None:
    facts = facts_of(ROOTFUL)
    docker = dataclasses.replace(facts.docker, packages={"docker-ce": "5:27.0"})
    changes = rootless.plan(dataclasses.replace(facts, docker=docker), inventory_in("rootless"))
    assert changes[0].summary.startswith("install docker-ce-rootless-extras, uidmap")
    assert "rootlesskit" not in changes[0].summary
    assert "/usr/bin/dockerd-rootless-setuptool.sh install" in "".join(
        c.script() for c in changes)
    both = dataclasses.replace(docker, packages={"docker-ce": "5:27.0", "rootlesskit": "1.1"})
    with pytest.raises(rootless.StepBlocked, match="conflict"):
        rootless.plan(dataclasses.replace(facts, docker=both), inventory_in("rootless"))


def test_switching_back_to_rootful_stops_her_daemon_and_keeps_its_data() -> None:
    facts = facts_of(ROOTLESS)
    inventory = load_inventory(FIXTURES / "facts" / f"{ROOTLESS}.toml")
    rootful = dataclasses.replace(inventory, defaults=dataclasses.replace(
        inventory.defaults, docker_mode="rootful"))
    steps = summaries(rootless.plan(facts, rootful))
    assert steps == [f"{n}: stop her rootless daemon (its images and data stay in /home/{n}/"
                     ".local/share/docker) and use the system daemon (docker context default)"
                     for n in ("dev", "alice", "bob")]
    assert "rm " not in "".join(c.script() for c in rootless.plan(facts, rootful))
    plan = summaries(users.plan(facts, rootful))
    assert {"create group docker"} <= set(plan) or "docker" in facts.groups
    assert "add alice to docker" in plan


def test_offboarding_a_rootless_member_stops_her_daemon() -> None:
    facts = facts_of(ROOTLESS)
    inventory = load_inventory(FIXTURES / "facts" / f"{ROOTLESS}.toml")
    without_bob = dataclasses.replace(inventory, members=inventory.members[:2])
    state = {**facts.state, "members": ["alice", "bob", "dev"]}
    plan = summaries(users.plan(dataclasses.replace(facts, state=state), without_bob))
    assert "offboard bob: lingering off (her own Docker daemon stops; its data stays in her " \
           "home)" in plan


def test_member_daemons_are_read_from_the_facts() -> None:
    assert facts_of(ROOTLESS).member_daemons["alice"] == MemberDaemon(
        "alice", linger=True, unit=True, socket=True, context="rootless")
    assert IdRange("a", 1, 2).end == 2
