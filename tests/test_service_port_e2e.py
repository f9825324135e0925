"""The service's port and bind checked against a real host over SSH (issue 23, item 7): sshd's
port or a port something else listens on blocks the plan in one line naming `[service] port`,
the value and who holds it, and the host does not change; a bind open to the network is a
warning in the plan."""

from __future__ import annotations

import json

import pytest

from tests.conftest import Host

pytestmark = pytest.mark.sandbox

# What a plan must not touch: accounts, the unit, provision's state record.
STATE = ("getent passwd; getent group; ls -l /etc/systemd/system/sd35-api.service "
         "/var/lib/provision 2>&1; systemctl is-active sd35-api.service")


def plan_with(host: Host, service: str, *args: str):
    """`provision host --plan` with a [service] table added to the inventory for the run."""
    original = host.inventory.read_text()
    host.inventory.write_text(original + f"\n[service]\n{service}")
    try:
        return host.cli("host", host.name, "--plan", *args)
    finally:
        host.inventory.write_text(original)


def test_a_taken_port_blocks_the_plan_and_an_open_bind_is_a_warning(own_host: Host) -> None:
    before = own_host.exec(STATE)

    result = plan_with(own_host, "port = 22\n")
    assert result.exit_code == 11, result.stderr
    assert result.error_lines == [
        "error: [service] port = 22: sshd listens there (its Port): the service could never "
        "start: set [service] port to one nothing listens on"]

    # Something else on the port: a server of the host's own, on loopback.
    code, output = own_host.exec("nohup python3 -m http.server 8000 --bind 127.0.0.1 "
                                 ">/dev/null 2>&1 & sleep 1; ss -ltnH 'sport = :8000'")
    assert code == 0 and ":8000" in output, output
    try:
        result = plan_with(own_host, "port = 8000\n")
    finally:
        own_host.exec("pkill -f 'http.server 8000'")
    assert result.exit_code == 11, result.stderr
    assert result.error_lines == [
        "error: [service] port = 8000: 127.0.0.1:8000 is in use by python3: set [service] "
        "port to one nothing listens on"]
    assert own_host.exec(STATE) == before

    # Free again, with Docker there: the plan goes on, and warns of a bind open to the network.
    converged = own_host.cli("host", own_host.name, "--only", "users,docker")
    assert converged.exit_code == 0, converged.stderr
    for bind, warned in (('bind = "0.0.0.0"\n', True), ("", False)):
        result = plan_with(own_host, "port = 8000\n" + bind, "--only", "service", "--json")
        assert result.exit_code == 0, result.stderr
        changes = json.loads(result.stdout)["hosts"][0]["steps"][0]["changes"]
        warnings = [c["warning"] for c in changes if c["warning"]]
        if warned:
            assert warnings == [
                "[service] bind = 0.0.0.0: the API has no authentication and is open to the "
                "network on every address of the host, port 8000: anyone who reaches it "
                "generates with this host's GPUs; keep the loopback default (members reach it "
                "through SSH) or firewall the port"]
        else:
            assert warnings == []
    shown = plan_with(own_host, 'port = 8000\nbind = "0.0.0.0"\n', "--only", "service")
    assert "warning: [service] bind = 0.0.0.0: the API has no authentication" in shown.stdout
