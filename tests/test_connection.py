"""The connection layer against real sandboxes: host keys, authentication, reachability, sudo,
and the one-round-trip facts. Each failure must be one line, its own exit code, no traceback."""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest
import tomlkit

from provision.connection import SSHConnection, connect
from provision.errors import AuthenticationFailed, SudoPasswordRequired
from provision.gather import gather_facts
from provision.inventory import load_inventory
from provision.sandbox import new_key_pair
from provision.target import resolve_target
from tests.conftest import CliResult, Host

pytestmark = pytest.mark.sandbox


def assert_one_line_error(result: CliResult, exit_code: int, *needles: str) -> None:
    assert result.exit_code == exit_code, result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.error_lines) == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


def edit_host_entry(host: Host, **values: object) -> None:
    document = tomlkit.parse(host.inventory.read_text())
    for key, value in values.items():
        document["hosts"][host.name][key] = value
    host.inventory.write_text(tomlkit.dumps(document))


def open_connection(host: Host) -> SSHConnection:
    inventory = load_inventory(host.inventory)
    target = resolve_target(host.name, inventory, host.home / "no-ssh-config")
    return connect(target)


def test_facts_json_over_ssh_has_every_field(shared_host: Host) -> None:
    result = shared_host.cli("facts", shared_host.name, "--json")
    assert result.exit_code == 0, result.stderr
    facts = json.loads(result.stdout)
    assert facts["os"]["id"] == "debian" and facts["os"]["codename"] == "bookworm"
    assert facts["os"]["arch"] == "x86_64" and facts["os"]["hostname"] == shared_host.name
    assert facts["init"] == "systemd" and facts["system_state"] in ("running", "degraded")
    assert facts["uid"] == 0 and facts["sudo_user"] == "admin"
    assert facts["accounts"]["admin"]["home"] == "/home/admin"
    assert "sudo" in facts["groups"]
    assert facts["sshd"]["test_ok"] is True
    assert facts["sshd"]["effective"]["clientalivecountmax"] == "3"
    assert facts["sshd"]["includes_dropins"] is True
    assert facts["cache"] == {"path": "/data/cache/huggingface", "exists": False, "kind": "",
                              "owner": "", "group": "", "mode": "", "acl": [],
                              "token_files": []}
    assert facts["disk"]["free_bytes"] > 0 and facts["disk"]["path"] == "/"
    assert facts["docker"]["installed"] is False
    assert facts["nvidia"]["gpus"] == [] and facts["nvidia"]["pci_devices"] == []
    assert facts["apt_lock_holder"] is None
    assert facts["paths"]["/var/lib/provision/state.json"]["kind"] == "missing"
    assert {"flock", "sshd", "visudo", "systemctl", "apt-get"} <= set(facts["tools"])


def test_facts_take_one_round_trip(shared_host: Host) -> None:
    conn = open_connection(shared_host)
    opened: list[str] = []
    open_session = conn.transport.open_session

    def counting_open_session(*args, **kwargs):
        opened.append("session")
        return open_session(*args, **kwargs)

    conn.transport.open_session = counting_open_session
    try:
        facts = gather_facts(conn, load_inventory(shared_host.inventory))
    finally:
        conn.close()
    assert facts.os.id == "debian"
    assert opened == ["session"]
    assert conn.round_trips == 1


def test_apt_lock_holder_is_seen(shared_host: Host) -> None:
    shared_host.exec("apt-get install -y -qq util-linux >/dev/null 2>&1 || true")
    code, _ = shared_host.exec(
        "nohup python3 -c \"import fcntl,time; f=open('/var/lib/dpkg/lock-frontend','w'); "
        "fcntl.lockf(f, fcntl.LOCK_EX); time.sleep(30)\" >/dev/null 2>&1 &")
    assert code == 0
    deadline = time.monotonic() + 10
    holder = None
    while holder is None and time.monotonic() < deadline:
        conn = open_connection(shared_host)
        holder = gather_facts(conn, load_inventory(shared_host.inventory)).apt_lock_holder
        conn.close()
    shared_host.exec("pkill -f lock-frontend")
    assert holder is not None and "python3" in holder and "lock-frontend" in holder


def test_unknown_host_key_is_refused_then_trusted_on_first_use(make_host) -> None:
    host: Host = make_host()
    fresh = host.inventory.parent / "empty_known_hosts"
    fresh.write_text("")
    edit_host_entry(host, known_hosts=str(fresh))

    refused = host.cli("facts", host.name)
    assert_one_line_error(refused, 5, "not in known_hosts", "--accept-new-host-key")
    assert fresh.read_text() == ""

    trusted = host.cli("--accept-new-host-key", "facts", host.name)
    assert trusted.exit_code == 0, trusted.stderr
    recorded = fresh.read_text().split()
    assert recorded[0] == f"[127.0.0.1]:{host.sandbox.port}"

    again = host.cli("facts", host.name)
    assert again.exit_code == 0, again.stderr
    assert fresh.read_text().split() == recorded


def test_changed_host_key_is_refused_as_possible_mitm(make_host) -> None:
    host: Host = make_host()
    before = host.sandbox.known_hosts.read_text()
    code, output = host.exec("rm -f /etc/ssh/ssh_host_* && ssh-keygen -A >/dev/null && "
                             "systemctl restart ssh")
    assert code == 0, output

    result = host.cli("--accept-new-host-key", "facts", host.name)
    assert_one_line_error(result, 6, "host key changed", "man-in-the-middle")
    assert host.sandbox.known_hosts.read_text() == before


def test_wrong_client_key_is_an_authentication_error(shared_host: Host, tmp_path) -> None:
    new_key_pair(tmp_path)
    inventory = tmp_path / "provision.toml"
    document = tomlkit.parse(shared_host.inventory.read_text())
    entry = document["hosts"][shared_host.name]
    entry["identity_file"] = str(tmp_path / "id_ed25519")
    entry["known_hosts"] = str(shared_host.sandbox.known_hosts)
    inventory.write_text(tomlkit.dumps(document))

    result = shared_host.cli("--inventory", str(inventory), "facts", shared_host.name)
    assert_one_line_error(result, 4, "authentication failed")


def test_closed_port_is_unreachable_within_the_timeout(shared_host: Host) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    edit_inventory = shared_host.inventory.parent / "closed.toml"
    document = tomlkit.parse(shared_host.inventory.read_text())
    document["hosts"][shared_host.name]["port"] = closed_port
    edit_inventory.write_text(tomlkit.dumps(document))

    started = time.monotonic()
    result = shared_host.cli("--inventory", str(edit_inventory), "facts", shared_host.name)
    assert time.monotonic() - started < 10
    assert_one_line_error(result, 3, "unreachable", f":{closed_port}")


def test_sudo_with_a_password(make_host) -> None:
    host: Host = make_host()
    code, output = host.exec("echo 'admin:s3cret-pass' | chpasswd && "
                             "echo 'admin ALL=(ALL) ALL' > /etc/sudoers.d/90-admin")
    assert code == 0, output

    result = host.cli("facts", host.name)
    assert_one_line_error(result, 7, "sudo needs a password", "--ask-sudo-pass")

    inventory = load_inventory(host.inventory)
    target = resolve_target(host.name, inventory, host.home / "no-ssh-config")
    with pytest.raises(SudoPasswordRequired):
        gather_facts(connect(target), inventory)
    conn = connect(target, sudo_password="s3cret-pass")
    # The password travels on stdin only: never in the command sshd runs.
    listing = conn.run("ps -eo args", what="process list").stdout
    facts = gather_facts(conn, inventory)
    conn.close()
    assert facts.uid == 0 and facts.sudo_user == "admin"
    assert "s3cret-pass" not in listing

    wrong = connect(target, sudo_password="wrong")
    with pytest.raises(AuthenticationFailed, match="sudo rejected the password"):
        wrong.run("true")
    wrong.close()



def test_a_sudo_password_for_a_nopasswd_admin_reaches_no_shell_and_no_output(own_host) -> None:
    """sudo under NOPASSWD reads no password: with `sudo -S` the line went on to the root shell
    as a command ("sh: 1: <password>: not found"). Now nothing but sudo's askpass ever sees it."""
    host: Host = own_host
    canary = "Pw-canary-5e1f0c"
    snapshots: list[str] = []
    done = threading.Event()

    def watch_process_list() -> None:
        while not done.is_set() and len(snapshots) < 2000:
            snapshots.append(host.exec("ps -eo user,args")[1])

    watcher = threading.Thread(target=watch_process_list)
    watcher.start()
    try:
        result = host.cli("--ask-sudo-pass", "host", host.name, "--only", "keepalive",
                          stdin=canary + "\n", timeout=300)
    finally:
        done.set()
        watcher.join()
    assert result.exit_code == 0, result.stderr
    assert len(snapshots) > 3
    _, logs = host.exec("cat /var/lib/provision/*.log; journalctl --no-pager -q; "
                        "cat /var/log/auth.log /var/log/syslog 2>/dev/null")
    assert "keepalive" in logs  # the apply log is there to search
    for seen in (result.stdout, result.stderr, logs, *snapshots):
        assert canary not in seen


def test_a_local_command_past_its_time_limit_ends_with_all_it_started(tmp_path) -> None:
    """@local: a child that keeps the output open (a read stuck on a FIFO) cannot hold the run
    past its limit; the limit ends the whole session and says so in one line."""
    from provision.connection import LocalConnection
    from provision.errors import RemoteCommandFailed
    from provision.target import LOCAL, Target

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    conn = LocalConnection(Target(alias=LOCAL, user="me"))
    started = time.monotonic()
    with pytest.raises(RemoteCommandFailed, match="ran past 2 s"):
        conn.run(f"(cat {fifo}) & wait", root=False, timeout=2)
    assert time.monotonic() - started < 10
    assert conn.run("echo fine", root=False, timeout=2).stdout == "fine\n"
