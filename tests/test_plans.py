"""Pure plans against recorded facts: given this host and this inventory, expect these changes.

Recorded hosts (tests/fixtures/facts): Ubuntu 22.04/24.04 with H100s, without a GPU or its
driver, and Debian 12. Every generated apply script must also parse as POSIX sh.
"""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest

from provision.changes import Run, WriteFile
from provision.engine import apply_script
from provision.facts import Account, HostFacts, PathState, parse_facts
from provision.inventory import Inventory, parse_inventory
from provision.sandbox import new_key_pair
from provision.steps import StepBlocked, all_steps, hf_cache, keepalive, users
from tests.conftest import FIXTURES

HOSTS = sorted(p.stem for p in (FIXTURES / "facts").glob("*.txt"))


def facts_of(host: str) -> HostFacts:
    return parse_facts((FIXTURES / "facts" / f"{host}.txt").read_text(),
                       "/data/cache/huggingface")


@pytest.fixture(scope="module")
def team(tmp_path_factory) -> Inventory:
    base = tmp_path_factory.mktemp("team")
    new_key_pair(base)
    key = (base / "id_ed25519.pub").read_text().strip()
    data = {"members": [{"name": "alice", "keys": [key], "sudo": ["/usr/bin/nvidia-smi"]},
                        {"name": "dave", "keys": [key]}]}
    return parse_inventory(data, base / "provision.toml")


def summaries(changes) -> list[str]:
    return [c.summary for c in changes]


def test_users_on_a_provisioned_host_adds_dave_and_offboards_carol(team: Inventory) -> None:
    changes = users.plan(facts_of("ubuntu-24.04-h100"), team)
    text = summaries(changes)
    assert "create account dave (home, bash)" in text
    assert not any("create account alice" in s for s in text)
    assert "offboard carol: lock the account (home kept)" in text
    assert "offboard carol: move her SSH keys aside" in text
    dave_keys = next(c for c in changes if c.summary.startswith("create dave's managed"))
    (write,) = dave_keys.actions
    assert isinstance(write, WriteFile) and write.path == "/home/dave/.ssh/authorized_keys"
    assert (write.owner, write.mode) == ("dave", "0600")
    assert write.content.startswith(users.BEGIN) and write.content.rstrip().endswith(users.END)
    sudo = next(c for c in changes if c.summary.startswith("sudo for alice"))
    assert sudo.actions[0].validate == "visudo -cf {}"
    assert "alice ALL=(root) NOPASSWD: /usr/bin/nvidia-smi" in sudo.actions[0].content


def test_users_warns_that_docker_is_root_equivalent(team: Inventory) -> None:
    changes = users.plan(facts_of("ubuntu-22.04-h100"), team)
    joins = [c for c in changes if "docker" in c.summary and c.summary.startswith("add ")]
    assert joins and all(c.warning == users.DOCKER_WARNING for c in joins)


def test_users_unlocks_a_returning_member(team: Inventory) -> None:
    facts = facts_of("ubuntu-22.04-h100")
    assert facts.accounts["bob"].locked is True
    bob = parse_inventory({"members": [{"name": "bob", "keys": list(team.members[0].keys)}]},
                          team.path)
    assert "unlock returning member bob" in summaries(users.plan(facts, bob))


def test_users_refuses_to_take_over_a_system_account(team: Inventory) -> None:
    facts = facts_of("ubuntu-24.04-nogpu")
    taken = {**facts.accounts, "dave": Account("dave", 120, 120, "/var/lib/dave", "/bin/false")}
    with pytest.raises(StepBlocked, match="system account"):
        users.plan(dataclasses.replace(facts, accounts=taken), team)


def test_managed_block_keeps_the_members_own_lines() -> None:
    own = "ssh-ed25519 AAAAOWN alice@laptop\n"
    first = users.managed_keys(own, ("ssh-ed25519 AAAA1 a",))
    second = users.managed_keys(first + "# her note\n", ("ssh-ed25519 AAAA2 a",))
    assert second.startswith(own)
    assert "AAAA1" not in second and "AAAA2" in second and "# her note" in second
    assert users.managed_keys(second, ("ssh-ed25519 AAAA2 a",)) == second


def test_keepalive_refuses_a_host_whose_sshd_already_fails(team: Inventory) -> None:
    with pytest.raises(StepBlocked, match=r"already fails 'sshd -t'.*Bad configuration option"):
        keepalive.plan(facts_of("debian-12"), team)


def test_keepalive_adds_the_missing_include_line(team: Inventory) -> None:
    facts = facts_of("debian-12")
    main = PathState(keepalive.MAIN, "file", "root", "root", "644", content="Port 22\n")
    fixed = dataclasses.replace(facts, sshd=dataclasses.replace(facts.sshd, test_ok=True),
                                paths={**facts.paths, keepalive.MAIN: main})
    first, dropin = keepalive.plan(fixed, team)
    assert "does not include sshd_config.d" in first.summary
    assert first.actions[0].content == f"{keepalive.INCLUDE}\nPort 22\n"
    assert first.actions[0].validate == "sshd -t -f {}"
    assert isinstance(dropin.actions[1], Run) and "systemctl reload ssh" in \
        dropin.actions[1].command
    assert "restart" not in dropin.script()


def test_keepalive_on_ubuntu_writes_a_validated_dropin_then_reloads(team: Inventory) -> None:
    (change,) = keepalive.plan(facts_of("ubuntu-22.04-h100"), team)
    write, reload = change.actions
    assert write.path == keepalive.DROPIN and write.validate == "sshd -t -f {}"
    assert "ClientAliveInterval 60\nClientAliveCountMax 3\n" in write.content
    assert "rm -f " + keepalive.DROPIN in reload.command


def test_hf_cache_merges_an_existing_cache_and_installs_acl(team: Inventory) -> None:
    facts = facts_of("ubuntu-22.04-h100")
    text = summaries(hf_cache.plan(facts, team))
    assert "create /data/cache/huggingface (root:hfcache, 2775)" in text
    assert any(s.startswith("/home/alice/.cache/huggingface: merge alice's own cache") for s in
               text)
    assert any(s.startswith("/home/dave/.cache/huggingface -> ") for s in text)
    assert ("install acl (setfacl) for the cache's default ACLs" in text) == \
        ("setfacl" not in facts.tools)


def test_hf_cache_leaves_a_right_link_alone(team: Inventory) -> None:
    text = summaries(hf_cache.plan(facts_of("ubuntu-24.04-h100"), team))
    assert not any(s.startswith("/home/alice/.cache/huggingface") for s in text)


@pytest.mark.parametrize("host", HOSTS)
def test_every_apply_script_parses_as_posix_sh(host: str, team: Inventory,
                                               tmp_path: Path) -> None:
    facts = facts_of(host)
    for step in all_steps():
        try:
            changes = step.plan(facts, team)
        except StepBlocked:
            continue
        script = tmp_path / f"{step.name}.sh"
        script.write_text(apply_script(step.name, changes))
        checked = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stderr
