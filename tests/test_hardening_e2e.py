"""No inventory value may hand out root, lock the admin out or echo a secret (issue 23), tried on
real sandboxes over SSH as a careless or hostile admin would.

Each refusal is one line naming the field, exit 2, before any connection, and the host does not
change; the host-dependent rules (a system group, the connecting login) are said by the plan.
"""

from __future__ import annotations

import json

import pytest
import tomlkit

from provision.sandbox import new_key_pair
from tests.conftest import SNAPSHOT, Host, assert_nothing_to_do, changes_of, converge

pytestmark = pytest.mark.sandbox

# What a wrong cache directory or group would have changed (issue 23: /etc became hfcache's).
SYSTEM = ("stat -c '%n %U %G %a' / /etc /etc/shadow /etc/sudoers.d /tmp /home; "
          "getfacl -cp /etc /etc/shadow 2>/dev/null")


def refused(host: Host, addition: str, *command: str) -> str:
    """Run `command` with `addition` in the inventory: exit 2, one line, host unchanged."""
    original = host.inventory.read_text()
    host.inventory.write_text(original + addition)
    before = host.exec(SNAPSHOT + "; " + SYSTEM)
    try:
        result = host.cli(*(command or ("host", host.name)))
    finally:
        host.inventory.write_text(original)
    assert result.exit_code == 2 and len(result.error_lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert host.exec(SNAPSHOT + "; " + SYSTEM) == before
    return result.error_lines[0]


def with_defaults(host: Host, **values: str) -> str:
    """The inventory's text with [defaults] keys set (tomlkit keeps the rest as it was)."""
    document = tomlkit.parse(host.inventory.read_text())
    for key, value in values.items():
        document["defaults"][key] = value
    return tomlkit.dumps(document)


@pytest.mark.parametrize("cache_dir", ["/etc", "/", "/tmp", "/home", "/etc/hf", "/usr/share/hf",
                                       "/var/lib/hf", "/tmp/hf", "/home/dev", "/data"])
def test_a_cache_dir_the_system_owns_is_refused(shared_host: Host, cache_dir: str) -> None:
    original = shared_host.inventory.read_text()
    try:
        shared_host.inventory.write_text(with_defaults(shared_host, cache_dir=cache_dir))
        before = shared_host.exec(SYSTEM)
        result = shared_host.cli("host", shared_host.name, "--only", "users,hf-cache")
    finally:
        shared_host.inventory.write_text(original)
    assert result.exit_code == 2 and len(result.error_lines) == 1, result.stderr
    assert f"cache_dir: {cache_dir} is" in result.error_lines[0]
    assert shared_host.exec(SYSTEM) == before


@pytest.mark.parametrize("group", ["shadow", "root", "sudo", "docker", "disk", "adm"])
def test_a_privileged_cache_group_is_refused(shared_host: Host, group: str) -> None:
    original = shared_host.inventory.read_text()
    try:
        shared_host.inventory.write_text(with_defaults(shared_host, cache_group=group))
        result = shared_host.cli("host", shared_host.name, "--only", "users,hf-cache")
    finally:
        shared_host.inventory.write_text(original)
    assert result.exit_code == 2 and len(result.error_lines) == 1, result.stderr
    assert f"cache_group: {group!r} is a system group" in result.error_lines[0]


@pytest.mark.parametrize("entry", ["/bin/bash", "/usr/bin/*", "/usr/bin/vim", "/usr/bin/env",
                                   "/usr/bin/python3 -c print(1)", "/usr/bin/less /var/log/syslog",
                                   "/home/dev/bin/tool"])
def test_a_root_equivalent_sudo_entry_is_refused(shared_host: Host, entry: str,
                                                 tmp_path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    new_key_pair(keys)
    line = refused(shared_host, f'\n[[members]]\nname = "dev"\nkeys = ["{keys}/id_ed25519.pub"]\n'
                                f'sudo = [{json.dumps(entry)}]\n')
    assert "sudo:" in line and "root-equivalent" in line and "root_equivalent = true" in line


def test_team_add_refuses_a_root_shell_and_leaves_the_inventory(shared_host: Host,
                                                                tmp_path) -> None:
    new_key_pair(tmp_path)
    before = shared_host.inventory.read_text()
    result = shared_host.cli("team", "add", "bob", "--key", str(tmp_path / "id_ed25519.pub"),
                             "--sudo", "/bin/bash")
    assert result.exit_code == 2 and len(result.error_lines) == 1, result.stderr
    assert "/bin/bash is root-equivalent" in result.error_lines[0]
    assert shared_host.inventory.read_text() == before


# A private key's body without its BEGIN line, an inline PuTTY key, a token in a mirror's
# query: each is refused without a character of it in the message.
SECRET_BODY = "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW"
PUTTY = "PuTTY-User-Key-File-3: ssh-ed25519\\nEncryption: none\\nPrivate-Lines: 1\\nQUJDREVG"


@pytest.mark.parametrize(("addition", "secret"), [
    (f'\n[[members]]\nname = "dev"\nkeys = ["{SECRET_BODY}\\n{SECRET_BODY}"]\n', SECRET_BODY),
    (f'\n[[members]]\nname = "dev"\nkeys = ["{PUTTY}"]\n', "QUJDREVG"),
    ('\n[mirrors]\npypi = "https://mirror.example/simple?token=hf_s3cr3tS3cr3t"\n', "s3cr3t"),
    ('\n[mirrors]\npypi = "https://me:hf_s3cr3tS3cr3t@mirror.example/simple"\n', "s3cr3t"),
])
def test_a_secret_in_the_wrong_field_is_never_echoed(shared_host: Host, addition: str,
                                                     secret: str) -> None:
    line = refused(shared_host, addition)
    assert secret not in line and "not shown" in line


def test_the_connecting_login_is_never_offboarded(own_host: Host) -> None:
    """The admin connects as `lead` (sudo), was a member, and leaves the team: she is kept."""
    host = own_host
    code, output = host.exec(
        "useradd --create-home --shell /bin/bash --user-group lead && "
        "install -d -o lead -g lead -m 700 /home/lead/.ssh && "
        "cp /home/admin/.ssh/authorized_keys /home/lead/.ssh/ && "
        "chown lead:lead /home/lead/.ssh/authorized_keys && "
        "echo 'lead ALL=(ALL) NOPASSWD:ALL' > /etc/sudoers.d/lead && chmod 440 /etc/sudoers.d/lead")
    assert code == 0, output
    document = tomlkit.parse(host.inventory.read_text())
    document["hosts"][host.name]["user"] = "lead"
    host.inventory.write_text(tomlkit.dumps(document))
    host.add_members(["lead", "dev"])
    first = converge(host, "--only", "users")
    assert first["exit"] == 0, first["stderr"]
    document = tomlkit.parse(host.inventory.read_text())
    document["members"] = [m for m in document["members"] if m["name"] != "lead"]
    host.inventory.write_text(tomlkit.dumps(document))

    plan = host.cli("host", host.name, "--only", "users", "--plan")
    assert "lead left the inventory's members but is the login provision connects as" in \
        plan.stdout, plan.stdout
    second = converge(host, "--only", "users")
    assert second["exit"] == 0, second["stderr"]
    assert not any("offboard lead" in c for c in changes_of(second))
    # She still logs in and runs sudo; the next run has nothing to say about her.
    assert host.exec("getent shadow lead | cut -d: -f8")[1].strip() == ""
    assert host.cli("facts", host.name).exit_code == 0
    assert_nothing_to_do(host, "--only", "users")


def test_a_system_group_or_changed_cache_group(own_host: Host) -> None:
    """An existing system group as the cache group is refused by the plan; a cache group
    changed in the inventory takes the members out of the old one."""
    host = own_host
    host.add_members(["dev"])
    assert host.exec("groupadd --system gpuops")[0] == 0
    original = host.inventory.read_text()
    host.inventory.write_text(with_defaults(host, cache_group="gpuops"))
    before = host.exec(SNAPSHOT)
    blocked = converge(host, "--only", "users")
    assert blocked["exit"] != 0
    assert "cache_group = 'gpuops': group gpuops is a system group" in json.dumps(blocked)
    assert host.exec(SNAPSHOT) == before

    host.inventory.write_text(original)
    assert converge(host, "--only", "users")["exit"] == 0
    assert "hfcache" in host.exec("id -nG dev")[1].split()
    host.inventory.write_text(with_defaults(host, cache_group="teamcache"))
    moved = converge(host, "--only", "users")
    assert moved["exit"] == 0, moved["stderr"]
    groups = host.exec("id -nG dev")[1].split()
    assert "teamcache" in groups and "hfcache" not in groups


def test_root_equivalent_sudo_said_aloud_when_the_inventory_says_so(shared_host: Host,
                                                                     tmp_path) -> None:
    new_key_pair(tmp_path)
    original = shared_host.inventory.read_text()
    shared_host.inventory.write_text(
        original + f'\n[[members]]\nname = "ops"\nkeys = ["{tmp_path}/id_ed25519.pub"]\n'
                   'sudo = ["/usr/bin/systemctl"]\nroot_equivalent = true\n')
    try:
        plan = shared_host.cli("host", shared_host.name, "--only", "users", "--plan", "--json")
    finally:
        shared_host.inventory.write_text(original)
    warnings = [c["warning"] for step in json.loads(plan.stdout)["hosts"][0]["steps"]
                for c in step["changes"] if c["warning"]]
    assert any("lets ops act as root" in w for w in warnings), warnings
