"""Converging real sandboxes over real SSH: users, keepalive, hf-cache, and the engine's safety
(plan changes nothing, idempotence, lock, a connection killed mid-apply, bad inventories)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import paramiko
import pytest
import tomlkit

from provision.connection import connect
from provision.engine import LOCK_EXCLUSIVE
from provision.inventory import load_inventory
from provision.target import resolve_target
from tests.conftest import SNAPSHOT, Host, assert_nothing_to_do, changes_of, converge

pytestmark = pytest.mark.sandbox

TEAM = [f"m{i:02d}" for i in range(10)]
CACHE = "/data/cache/huggingface"
@pytest.fixture(scope="module")
def team_host(make_host) -> tuple[Host, dict]:
    """A sandbox converged once for a 10-member team (shared by the read-mostly tests)."""
    host: Host = make_host()
    keys = host.add_members(TEAM[:2], sudo=["/usr/bin/true"], gpus="0")
    keys |= host.add_members(TEAM[2:])
    first = converge(host)
    assert first["exit"] == 0, first["stderr"]
    return host, keys


def test_a_ten_member_team_converges_then_nothing_is_left(team_host) -> None:
    host, _ = team_host
    assert_nothing_to_do(host)
    assert host.cli("host", host.name, "--check").exit_code == 0
    for name in TEAM:
        user = host.testinfra.user(name)
        assert user.exists and user.shell == "/bin/bash" and user.home == f"/home/{name}"
        assert {"hfcache", "docker"} <= set(user.groups)
        keys = host.testinfra.file(f"/home/{name}/.ssh/authorized_keys")
        assert keys.user == name and keys.mode == 0o600
    assert host.testinfra.file("/etc/sudoers.d/provision-m00").mode == 0o440
    assert not host.testinfra.file("/etc/sudoers.d/provision-m05").exists
    state = json.loads(host.testinfra.file("/var/lib/provision/state.json").content_string)
    assert state["members"] == TEAM and state["tool_version"]


def test_members_log_in_with_their_keys_and_only_the_listed_sudo(team_host) -> None:
    host, keys = team_host
    code, output = host.ssh("m00", keys["m00"], "sudo -n /usr/bin/true && echo ok")
    assert code == 0 and "ok" in output
    code, output = host.ssh("m00", keys["m00"], "sudo -n /usr/bin/id")
    assert code != 0 and "password is required" in output
    with pytest.raises(paramiko.AuthenticationException):
        host.ssh("m01", keys["m00"], "true")


def test_keepalive_is_in_effect_and_the_admin_session_survives(team_host) -> None:
    host, _ = team_host
    effective = host.testinfra.run("sshd -T").stdout
    assert "clientaliveinterval 60" in effective and "clientalivecountmax 3" in effective

    inventory = load_inventory(host.inventory)
    admin = connect(resolve_target(host.name, inventory, host.home / "none"))
    original = host.inventory.read_text()
    document = tomlkit.parse(original)
    document["defaults"]["keepalive_interval"] = 45
    host.inventory.write_text(tomlkit.dumps(document))
    try:
        report = converge(host, "--only", "keepalive")
        assert report["exit"] == 0, report["stderr"]
        assert any("ClientAliveInterval 45" in c for c in changes_of(report))
        assert admin.run("echo still-here", root=False).stdout == "still-here\n"
        assert "clientaliveinterval 45" in host.testinfra.run("sshd -T").stdout
    finally:
        admin.close()
        host.inventory.write_text(original)
        assert converge(host, "--only", "keepalive")["exit"] == 0


def test_changing_one_key_plans_exactly_that_change(team_host, tmp_path) -> None:
    host, _ = team_host
    from provision.sandbox import new_key_pair

    new_key_pair(tmp_path)
    original = host.inventory.read_text()
    host.inventory.write_text(original.replace('"keys/m03/id_ed25519.pub"',
                                               f'"{tmp_path / "id_ed25519.pub"}"'))
    try:
        plan = converge(host, "--plan")
        assert changes_of(plan) == ["set m03's managed authorized_keys block (1 key(s); "
                                    "lines outside it kept)"]
        diff = plan["hosts"][0]["steps"][0]["changes"][0]["diff"]
        assert diff.count("\n-ssh-ed25519") == 1 and diff.count("\n+ssh-ed25519") == 1
        assert host.cli("host", host.name, "--check").exit_code == 12
    finally:
        host.inventory.write_text(original)


def test_plan_changes_nothing_on_the_host(make_host) -> None:
    host: Host = make_host()
    host.add_members(["alice", "bob"], sudo=["/usr/bin/nvidia-smi"])
    before = host.exec(SNAPSHOT)
    plan = converge(host, "--plan")
    assert plan["exit"] == 0 and len(changes_of(plan)) > 10
    assert plan["applied"] is False
    assert host.exec(SNAPSHOT) == before
    assert not host.testinfra.file("/var/lib/provision").exists


def test_keys_outside_the_block_survive_and_offboarding_locks_but_keeps_home(make_host,
                                                                            tmp_path) -> None:
    host: Host = make_host()
    keys = host.add_members(["alice", "bob"])
    assert converge(host)["exit"] == 0
    from provision.sandbox import new_key_pair

    own = new_key_pair(tmp_path)
    code, _ = host.ssh("alice", keys["alice"], f"echo '{own}' >> ~/.ssh/authorized_keys && "
                                               "echo precious > ~/notes.txt")
    assert code == 0
    assert converge(host)["exit"] == 0
    assert own in host.testinfra.file("/home/alice/.ssh/authorized_keys").content_string
    assert host.ssh("alice", tmp_path / "id_ed25519", "true")[0] == 0

    text = host.inventory.read_text()
    start = text.index('[[members]]\nname = "alice"')
    host.inventory.write_text(text[:start] + text[text.index("[[members]]", start + 5):])
    report = converge(host)
    assert report["exit"] == 0, report["stderr"]
    assert any("offboard alice: lock" in c for c in changes_of(report))
    assert converge(host)["exit"] == 0 and changes_of(converge(host)) == []

    alice = host.testinfra.user("alice")
    assert alice.exists and "hfcache" not in alice.groups and "docker" not in alice.groups
    assert host.testinfra.file("/home/alice/notes.txt").content_string == "precious\n"
    assert not host.testinfra.file("/home/alice/.ssh/authorized_keys").exists
    for key in (keys["alice"], tmp_path / "id_ed25519"):
        with pytest.raises(paramiko.AuthenticationException):
            host.ssh("alice", key, "true")
    assert host.ssh("bob", keys["bob"], "true")[0] == 0


def test_shared_cache_is_group_writable_and_tokens_stay_private(make_host) -> None:
    host: Host = make_host()
    keys = host.add_members(["alice", "bob"])
    # alice already has a cache of her own: a model blob, a snapshot link and a token.
    host.exec("useradd --create-home --shell /bin/bash alice && "
              "mkdir -p /home/alice/.cache/huggingface/hub/models--org--m/blobs "
              "/home/alice/.cache/huggingface/hub/models--org--m/snapshots/abc && "
              "cd /home/alice/.cache/huggingface && "
              "head -c 3000000 /dev/urandom > hub/models--org--m/blobs/b1 && "
              "ln -s ../../blobs/b1 hub/models--org--m/snapshots/abc/model.bin && "
              "echo hf_secret_alice > token && echo v1 > hub/version.txt && "
              "chown -R alice:alice /home/alice/.cache")
    # The shared cache already holds a different version.txt: alice's copy must not be lost.
    host.exec(f"mkdir -p {CACHE}/hub && echo v0 > {CACHE}/hub/version.txt")
    checksum = "cd {} && find . -type f -exec sha256sum {{}} + | sort -k2"
    before = host.exec(checksum.format("/home/alice/.cache/huggingface"))[1]

    report = converge(host)
    assert report["exit"] == 0, report["stderr"]
    for name in ("alice", "bob"):
        link = host.testinfra.file(f"/home/{name}/.cache/huggingface")
        assert link.is_symlink and link.linked_to == CACHE
    cache = host.testinfra.file(CACHE)
    assert (cache.user, cache.group, cache.mode) == ("root", "hfcache", 0o2775)

    # Every byte of alice's old cache is somewhere: merged, private token, or left beside.
    after = {}
    for line in before.splitlines():
        digest, path = line.split(maxsplit=1)
        after[path] = digest
    merged = host.exec(checksum.format(CACHE))[1]
    leftovers = host.exec("cd /home/alice/.cache && for d in huggingface.provision-leftovers-*; "
                          "do (cd $d && find . -type f -exec sha256sum {} +); done")[1]
    token = host.exec("sha256sum /home/alice/.config/huggingface/token")[1].split()[0]
    found = {line.split(maxsplit=1)[1]: line.split()[0]
             for line in (merged + leftovers).splitlines()}
    for path, digest in after.items():
        if path == "./token":
            assert digest == token
        else:
            assert found.get(path) == digest or digest in (merged + leftovers), path
    assert "./hub/version.txt" in leftovers and "v0" in host.exec(f"cat {CACHE}/hub/version.txt")[1]
    assert host.exec(f"readlink {CACHE}/hub/models--org--m/snapshots/abc/model.bin")[1].strip() \
        == "../../blobs/b1"
    assert host.exec(f"find {CACHE} -name token")[1] == ""

    # A file one member makes is writable by another.
    assert host.ssh("alice", keys["alice"], f"echo a > {CACHE}/from-alice.txt")[0] == 0
    assert host.ssh("bob", keys["bob"], f"echo b >> {CACHE}/from-alice.txt")[0] == 0
    assert host.ssh("bob", keys["bob"], f"mkdir {CACHE}/hub/bobs && touch {CACHE}/hub/bobs/x")[0] \
        == 0
    assert host.ssh("alice", keys["alice"], f"rm {CACHE}/hub/bobs/x")[0] == 0

    # `hf auth login` writes to $HF_TOKEN_PATH: inside each member's own 0700 directory.
    code, output = host.ssh("bob", keys["bob"], 'bash -lc \'mkdir -p "$(dirname "$HF_TOKEN_PATH")"'
                                                ' && echo hf_bob > "$HF_TOKEN_PATH" && '
                                                'echo "$HF_TOKEN_PATH"\'')
    assert code == 0 and output.strip() == "/home/bob/.config/huggingface/token"
    code, output = host.ssh("alice", keys["alice"], "cat /home/bob/.config/huggingface/token")
    assert code != 0 and "Permission denied" in output
    code, output = host.ssh("bob", keys["bob"], "cat /home/alice/.config/huggingface/token")
    assert code != 0 and "hf_secret_alice" not in output
    assert changes_of(converge(host)) == []


def test_sshd_config_that_already_fails_is_left_alone(make_host) -> None:
    host: Host = make_host()
    host.exec("echo 'Bogus yes' >> /etc/ssh/sshd_config")
    pid = host.exec("systemctl show -p MainPID --value ssh")[1]
    before = host.exec(SNAPSHOT)
    result = host.cli("host", host.name, "--only", "keepalive")
    assert result.exit_code == 11
    assert "already fails 'sshd -t'" in result.stderr and "Bogus" in result.stderr
    assert len(result.error_lines) == 1
    assert host.exec(SNAPSHOT) == before
    assert host.exec("systemctl show -p MainPID --value ssh")[1] == pid
    assert not host.testinfra.file("/etc/ssh/sshd_config.d/01-provision-keepalive.conf").exists


def test_a_config_without_the_include_line_gets_it(make_host) -> None:
    host: Host = make_host()
    host.exec("sed -i '/^Include/d' /etc/ssh/sshd_config && systemctl reload ssh")
    plan = converge(host, "--plan", "--only", "keepalive")
    assert any("does not include sshd_config.d" in c for c in changes_of(plan))
    assert converge(host, "--only", "keepalive")["exit"] == 0
    assert "clientaliveinterval 60" in host.testinfra.run("sshd -T").stdout
    assert host.testinfra.file("/etc/ssh/sshd_config").content_string.startswith("Include ")


def test_a_second_run_fails_cleanly_while_the_lock_is_held(team_host) -> None:
    host, _ = team_host
    inventory = load_inventory(host.inventory)
    conn = connect(resolve_target(host.name, inventory, host.home / "none"))
    held = conn.hold(LOCK_EXCLUSIVE)
    assert held.first_line == "locked"
    try:
        result = host.cli("host", host.name)
        assert result.exit_code == 9
        assert "another provision run holds the host lock (admin since" in result.stderr
    finally:
        held.release()
        conn.close()
    runs = [subprocess.Popen([sys.executable, "-m", "provision", "host", host.name],
                             env={**host_env(host)}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    codes = sorted(run.wait(timeout=120) for run in runs)
    assert codes in ([0, 0], [0, 9])
    assert host.cli("host", host.name, "--check").exit_code == 0


def host_env(host: Host) -> dict[str, str]:
    import os

    return {**os.environ, "HOME": str(host.home), "PROVISION_INVENTORY": str(host.inventory)}


def test_a_connection_killed_while_applying_then_rerun_converges(make_host) -> None:
    host: Host = make_host()
    keys = host.add_members(TEAM)
    run = subprocess.Popen([sys.executable, "-m", "provision", "host", host.name],
                           env=host_env(host), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while host.exec("test -e /var/lib/provision/apply-users.log")[0] != 0:
        assert time.monotonic() < deadline and run.poll() is None
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    run.wait()

    report = converge(host)
    assert report["exit"] == 0, report["stderr"]
    assert changes_of(converge(host)) == []
    leftovers = host.exec("find / -xdev -name '.provision.*' 2>/dev/null")[1]
    assert leftovers == ""
    for name in TEAM:
        assert host.ssh(name, keys[name], "echo hi")[1] == "hi\n"


@pytest.mark.parametrize("bad", [
    '\n[[members]]\nname = "Eve"\nkeys = ["ssh-ed25519 AAAA"]\n',
    '\n[[members]]\nname = "daemon"\nkeys = ["keys/x.pub"]\n',
    '\n[[members]]\nname = "eve"\nkeys = ["keys/admin"]\n',
    '\n[[members]]\nname = "eve"\nkeys = ["keys/x.pub"]\nshell = "zsh"\n',
])
def test_a_bad_inventory_leaves_the_host_untouched(shared_host: Host, bad: str) -> None:
    keys = shared_host.inventory.parent / "keys"
    keys.mkdir(exist_ok=True)
    from provision.sandbox import new_key_pair

    new_key_pair(keys)
    (keys / "admin").write_text((keys / "id_ed25519").read_text())
    (keys / "x.pub").write_text((keys / "id_ed25519.pub").read_text())
    original = shared_host.inventory.read_text()
    shared_host.inventory.write_text(original + bad)
    before = shared_host.exec(SNAPSHOT)
    try:
        result = shared_host.cli("host", shared_host.name)
    finally:
        shared_host.inventory.write_text(original)
    assert result.exit_code == 2 and len(result.error_lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and "PRIVATE" not in result.stderr
    assert shared_host.exec(SNAPSHOT) == before


def test_many_hosts_converge_in_parallel_and_one_failure_stops_no_other(make_host,
                                                                       tmp_path) -> None:
    first, second = make_host(), make_host()
    document = tomlkit.parse(first.inventory.read_text())
    for host in (first, second):
        entry = tomlkit.parse(host.inventory.read_text())["hosts"][host.name]
        entry["identity_file"] = str(host.sandbox.identity_file)
        entry["known_hosts"] = str(host.sandbox.known_hosts)
        document["hosts"][host.name] = entry
    document["hosts"]["gone"] = {"hostname": "127.0.0.1", "port": 1, "user": "admin"}
    inventory = tmp_path / "provision.toml"
    inventory.write_text(tomlkit.dumps(document))
    team = Host(first.sandbox, inventory, first.home)
    team.add_members(["alice"])

    result = team.cli("host", first.name, "gone", second.name, "--json")
    assert result.exit_code == 11, result.stderr
    assert "1 of 3 host(s) failed: gone" in result.stderr and len(result.error_lines) == 1
    reports = {r["host"]: r for r in json.loads(result.stdout)["hosts"]}
    assert reports["gone"]["ok"] is False and "unreachable" in reports["gone"]["error"]
    for host in (first, second):
        assert reports[host.name]["ok"] is True
        assert team.cli("host", host.name, "--check").exit_code == 0
        assert host.testinfra.user("alice").exists


def test_workspace_is_seeded_and_a_members_edit_is_drift_left_alone(make_host) -> None:
    host: Host = make_host()
    keys = host.add_members(["alice"], gpus="0")
    assert converge(host, "--only", "users,workspace")["exit"] == 0
    settings = "/home/alice/sd35-fp8/.vscode/settings.json"
    seeded = host.testinfra.file(settings)
    original = seeded.content_string
    assert seeded.user == "alice" and '"files.watcherExclude"' in original
    launch = json.loads(host.testinfra.file("/home/alice/sd35-fp8/.vscode/launch.json")
                        .content_string)
    assert launch["configurations"][0]["type"] == "debugpy"

    code, _ = host.ssh("alice", keys["alice"], f"echo '// mine' >> {settings}")
    assert code == 0
    report = assert_nothing_to_do(host, "--only", "workspace")
    message = report["hosts"][0]["steps"][0]["message"]
    assert "was edited by alice: drifted, left alone" in message
    assert host.testinfra.file(settings).content_string.endswith("// mine\n")

    forced = converge(host, "--only", "workspace", "--force")
    assert forced["exit"] == 0, forced["stderr"]
    assert host.testinfra.file(settings).content_string == original
    backups = host.exec(f"cat {settings}.provision-backup-*")[1]
    assert backups.endswith("// mine\n")
    assert changes_of(converge(host, "--only", "workspace")) == []
