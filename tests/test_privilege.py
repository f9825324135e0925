"""The rules that keep members from root (issue 23): the cache's place, the cache group, sudo
entries, secrets in messages; and the plans that apply the host-dependent half, on recorded
and synthesized facts (tests/fixtures/facts, each file says which)."""

from __future__ import annotations

import dataclasses
import re

import pytest

from provision import privilege, safe
from provision.errors import InventoryError
from provision.facts import Group
from provision.inventory import Inventory, parse_inventory
from provision.sandbox import new_key_pair
from provision.steps import StepBlocked, hf_cache, users
from tests.conftest import facts_of, summaries

H100 = "ubuntu-24.04-h100.synthesized"


@pytest.fixture(scope="module")
def team(tmp_path_factory) -> Inventory:
    """alice and dave, as the synthesized H100 host knows alice (and carol, who left)."""
    base = tmp_path_factory.mktemp("team")
    new_key_pair(base)
    key = (base / "id_ed25519.pub").read_text().strip()
    return parse_inventory({"members": [{"name": "alice", "keys": [key]},
                                        {"name": "dave", "keys": [key]}]},
                           base / "provision.toml")


@pytest.mark.parametrize("value", ["/", "/etc", "/data", "/tmp", "/home", "/etc/hf",
                                   "/usr/local/hf", "/var/lib/docker/hf", "/root/hf", "/tmp/hf",
                                   "/var/tmp/hf", "/dev/shm/hf", "/home/alice", "/run/hf",
                                   "/var/log/hf", "/boot/hf", "/proc/hf"])
def test_a_cache_dir_in_the_system_or_at_the_top_is_refused(value: str) -> None:
    assert privilege.cache_dir_problem(value)


@pytest.mark.parametrize("value", ["/data/cache/huggingface", "/srv/hf", "/mnt/models/hf",
                                   "/opt/hf-cache", "/var/cache/huggingface", "/home/shared/hf",
                                   "/data/etc"])
def test_a_cache_dir_of_its_own_is_accepted(value: str) -> None:
    assert privilege.cache_dir_problem(value) is None


def test_a_cache_dir_inside_an_accounts_home_is_refused_on_the_host() -> None:
    homes = {"ubuntu": "/home/ubuntu", "root": "/root", "alice": "/home/alice"}
    assert "ubuntu's home" in privilege.cache_dir_host_problem("/home/ubuntu/hf", homes)
    assert privilege.cache_dir_host_problem("/home/shared/hf", homes) is None


def test_hf_cache_refuses_a_cache_dir_in_a_home(team: Inventory) -> None:
    inventory = dataclasses.replace(team, defaults=dataclasses.replace(
        team.defaults, cache_dir="/home/ubuntu/hf"))
    with pytest.raises(StepBlocked, match="inside ubuntu's home /home/ubuntu"):
        hf_cache.plan(facts_of(H100), inventory)


@pytest.mark.parametrize("group", ["shadow", "root", "sudo", "docker", "disk", "kmem", "adm",
                                   "wheel", "lxd", "systemd-journal", "video"])
def test_a_privileged_group_is_refused_by_name(group: str) -> None:
    assert privilege.group_problem(group)
    assert privilege.group_problem("hfcache") is None


def test_users_refuses_a_system_or_personal_group_on_the_host(team: Inventory) -> None:
    facts = facts_of(H100)
    for name, why in (("gpuops", "a system group (GID 990)"), ("ubuntu", "ubuntu's own group")):
        groups = {**facts.groups, "gpuops": Group("gpuops", 990, ())}
        inventory = dataclasses.replace(team, defaults=dataclasses.replace(
            team.defaults, cache_group=name))
        with pytest.raises(StepBlocked, match=re.escape(why)):
            users.plan(dataclasses.replace(facts, groups=groups), inventory)


def test_users_takes_members_out_of_the_cache_group_used_before(team: Inventory) -> None:
    facts = facts_of(H100)
    facts = dataclasses.replace(facts, state={**facts.state, "cache_group": "oldcache"},
                                groups={**facts.groups,
                                        "oldcache": Group("oldcache", 1200, ("alice", "carol",
                                                                             "ubuntu"))})
    text = summaries(users.plan(facts, team))
    assert "alice leaves oldcache (the cache group before hfcache)" in text
    assert "carol leaves oldcache (the cache group before hfcache)" in text
    assert not any("ubuntu leaves" in s for s in text)  # not an account provision manages


@pytest.mark.parametrize(("entry", "why"), [
    ("/bin/bash", "bash can start a root shell"),
    ("/usr/bin/*", "wildcard"),
    ("/usr/bin/vim /etc/hosts", "vim can start"),
    ("/usr/bin/env", "env can start"),
    ("/usr/bin/python3.12", "python3.12 can start"),
    ("/usr/bin/systemctl status sd35-api", "systemctl can start"),
    ("/usr/bin/find", "find can start"),
    ("/home/alice/bin/tool", "where a member may replace it"),
    ("/tmp/tool", "where a member may replace it"),
    ("/usr/bin/nvidia-smi -i [0-9]", "wildcard"),
])
def test_root_equivalent_sudo_entries_are_named(entry: str, why: str) -> None:
    assert why in (privilege.sudo_problem(entry) or "")


@pytest.mark.parametrize("entry", ["/usr/bin/nvidia-smi", "/usr/bin/nvidia-smi -r",
                                   "/usr/sbin/reboot", "/usr/local/bin/sd35-restart"])
def test_limited_sudo_entries_pass(entry: str) -> None:
    assert privilege.sudo_problem(entry) is None


def test_root_equivalent_sudo_needs_the_inventory_to_say_so(team: Inventory) -> None:
    key = team.members[0].keys[0]
    data = {"members": [{"name": "ops", "keys": [key], "sudo": ["/usr/bin/systemctl"]}]}
    with pytest.raises(InventoryError, match=r"root-equivalent .* root_equivalent = true"):
        parse_inventory(data, team.path)
    data["members"][0]["root_equivalent"] = True
    inventory = parse_inventory(data, team.path)
    (sudo,) = [c for c in users.plan(facts_of(H100), inventory)
               if c.summary.startswith("sudo for ops")]
    assert sudo.warning == users.ROOT_EQUIVALENT_WARNING.format(name="ops")


def test_the_connecting_login_is_kept_and_said(team: Inventory) -> None:
    """carol left the inventory; the admin connects as carol: she is not offboarded."""
    facts = dataclasses.replace(facts_of(H100), sudo_user="carol")
    assert not any("offboard carol" in s for s in summaries(users.plan(facts, team)))
    assert users.notes(facts, team) == [
        "carol left the inventory's members but is the login provision connects as: she is "
        "not offboarded (connect as another admin to offboard her)"]
    assert users.notes(facts_of(H100), team) == []


@pytest.mark.parametrize("value", [
    "-----BEGIN OPENSSH PRIVATE KEY-----", "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAA",
    "https://mirror.example/simple?token=abc", "https://me:pw@mirror.example/", "a\nb",
    "PuTTY-User-Key-File-3: ssh-ed25519", "x" * 200])
def test_a_value_that_may_be_a_secret_is_not_shown(value: str) -> None:
    assert "not shown" in safe.shown(value) and value not in safe.shown(value)


def test_a_plain_value_is_shown() -> None:
    assert safe.shown("~/keys/dev.pub") == "'~/keys/dev.pub'"
