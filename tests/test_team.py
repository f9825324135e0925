"""`provision team`: edits keep the admin's comments and order, and validate like a load."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from provision.inventory import load_inventory
from provision.sandbox import new_key_pair
from tests.conftest import FIXTURES, run_cli


@pytest.fixture
def inventory(tmp_path: Path) -> Path:
    path = tmp_path / "provision.toml"
    shutil.copy(FIXTURES / "team" / "before.toml", path)
    for name in ("alice", "bob"):
        new_key_pair(tmp_path)
        (tmp_path / "keys").mkdir(exist_ok=True)
        (tmp_path / "id_ed25519.pub").rename(tmp_path / "keys" / f"{name}.pub")
    (tmp_path / "id_ed25519").rename(tmp_path / "keys" / "bob")
    return path


def team(inventory: Path, *args: str):
    return run_cli("team", *args, inventory=inventory, home=inventory.parent)


def test_add_keeps_comments_and_order(inventory: Path) -> None:
    result = team(inventory, "add", "bob", "--key", str(inventory.parent / "keys/bob.pub"),
                  "--gpus", "1,2", "--sudo", "/usr/bin/nvidia-smi")
    assert result.exit_code == 0, result.stderr
    assert inventory.read_text() == (FIXTURES / "team" / "after-add.toml").read_text()
    bob = load_inventory(inventory).member("bob")
    assert bob.gpus == "1,2" and bob.sudo == ("/usr/bin/nvidia-smi",)


def test_remove_then_list(inventory: Path) -> None:
    team(inventory, "add", "bob", "--key", str(inventory.parent / "keys/bob.pub"))
    assert team(inventory, "remove", "alice").exit_code == 0
    text = inventory.read_text()
    assert 'name = "alice"' not in text and "# on the big NVMe" in text
    listing = team(inventory, "list", "--json")
    assert listing.exit_code == 0 and '"name": "bob"' in listing.stdout
    assert "alice" not in listing.stdout


@pytest.mark.parametrize(("args", "needle"), [
    (("add", "Bob", "--key", "keys/bob.pub"), "not a valid account name"),
    (("add", "root", "--key", "keys/bob.pub"), "is a system account"),
    (("add", "alice", "--key", "keys/bob.pub"), "member 'alice' exists"),
    (("add", "bob", "--key", "keys/bob"), "is a private key"),
    (("add", "bob", "--key", "keys/bob.pub", "--gpus", "first"), "gpus must be"),
    (("add", "bob", "--key", "keys/bob.pub", "--sudo", "nvidia-smi"), "absolute path"),
    (("remove", "carol"), "no member named 'carol'"),
])
def test_bad_edits_are_one_line_and_leave_the_file(inventory: Path, args, needle) -> None:
    before = inventory.read_text()
    result = team(inventory, *args)
    assert result.exit_code == 2 and needle in result.stderr, result.stderr
    assert len([ln for ln in result.stderr.splitlines() if ln.strip()]) == 1
    assert "PRIVATE KEY" not in result.stderr
    assert inventory.read_text() == before


def test_merging_the_ssh_block_is_idempotent_and_keeps_a_backup(tmp_path: Path) -> None:
    from provision.onboard import merge_ssh_block

    config = tmp_path / "config"
    mine = "Host work\n    HostName 192.0.2.1\n"
    config.write_text(mine)
    block = "Host sd-server\n    User carol\n    ServerAliveInterval 60\n"
    assert merge_ssh_block(config, block, "carol", "sd-server") is True
    merged = config.read_text()
    assert merged.startswith(mine) and "# BEGIN provision carol@sd-server\nHost sd-server" in merged
    assert merge_ssh_block(config, block, "carol", "sd-server") is False
    assert config.read_text() == merged
    assert merge_ssh_block(config, block.replace("60", "30"), "carol", "sd-server") is True
    assert config.read_text().count("# BEGIN provision carol@sd-server") == 1
    assert "ServerAliveInterval 30" in config.read_text()
    assert (tmp_path / "config.provision-backup").read_text() == mine
    assert oct(config.stat().st_mode & 0o777) == "0o600"
