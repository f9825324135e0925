"""The service's port and bind against the host (issue 23, item 7), as pure plans on facts:
the TCP listeners the facts read (ss, or the kernel's tables without it) and sshd's ports; a
port sshd or something else holds blocks the step in one line, the service's own socket does
not (a re-converge, either docker mode); a bind open to the network is a plan warning; and
the health wait after a (re)start ends early when systemd keeps restarting the unit."""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path

import pytest

from provision.facts import HostFacts, Listener, parse_facts
from provision.inventory import Inventory, parse_inventory
from provision.steps import StepBlocked, service
from tests.conftest import FIXTURES, facts_of, service_converged

SANDBOX = "debian-12-sandbox-converged"  # RECORDED: a converged sandbox (Docker, no service)

# RECORDED on 2026-12-03 on this project's development machine: the facts script's fallback
# without ss (a Docker-published port on loopback, and a socket of another namespace's
# process, which the host cannot name).
KERNEL_LINES = ["proc 00000000:07E8 0 ", "proc 0100007F:8000 0 docker-proxy"]


def transcript_with(section: str, body: str) -> HostFacts:
    """The converged sandbox's transcript with one section's output replaced."""
    text = (FIXTURES / "facts" / f"{SANDBOX}.txt").read_text()
    head, _, rest = text.partition(f"@@@provision:{section}\n")
    _, _, tail = rest.partition("\n@@@provision:")
    return parse_facts(f"{head}@@@provision:{section}\n{body}\n\n@@@provision:{tail}",
                       "/data/cache/huggingface")


def inventory(tmp_path: Path, docker_mode: str = "rootful", **table: object) -> Inventory:
    return parse_inventory({"defaults": {"docker_mode": docker_mode}, "service": table},
                           tmp_path / "provision.toml")


def running(facts: HostFacts, inv: Inventory, *listeners: Listener,
            active: str = "active") -> HostFacts:
    """The host once the plan's account, files and image are there, its unit `active`, with
    these sockets (SYNTHESIZED from the plan over recorded facts)."""
    return dataclasses.replace(service_converged(facts, inv, active), listeners=listeners)


# --------------------------------------------------------------------------- the facts


def test_the_sandbox_listeners_are_read_from_ss() -> None:
    assert facts_of(SANDBOX).listeners == (
        Listener("127.0.0.1", 40125, ("containerd",)), Listener("0.0.0.0", 22, ("sshd",)),
        Listener("::", 22, ("sshd",)))
    assert facts_of(SANDBOX).sshd.ports == (22,)


def test_socket_activated_sshd_names_both_holders() -> None:
    ubuntu = facts_of("ubuntu-24.04-h100.synthesized")
    assert Listener("*", 22, ("sshd", "systemd")) in ubuntu.listeners
    assert Listener("127.0.0.53", 53, ("systemd-resolve",), uid=991) in ubuntu.listeners


def test_without_ss_the_kernels_tables_are_read() -> None:
    facts = transcript_with("listening", "\n".join(KERNEL_LINES))
    assert facts.listeners == (Listener("0.0.0.0", 2024, ()),
                               Listener("127.0.0.1", 32768, ("docker-proxy",)))
    # Written by hand: an IPv6 wildcard, and an IPv4-mapped address of a dual-stack socket.
    facts = transcript_with("listening", "proc 00000000000000000000000000000000:0016 0 sshd\n"
                                         "proc 0000000000000000FFFF00000100007F:1F40 998 a,b")
    assert facts.listeners == (Listener("::", 22, ("sshd",)),
                               Listener("127.0.0.1", 8000, ("a", "b"), uid=998))


def test_every_port_sshd_listens_on_is_kept() -> None:
    # Written by hand: sshd_config with two Port lines (`sshd -T` prints each).
    facts = transcript_with("sshd-effective", "port 22\nport 2222\nclientaliveinterval 60")
    assert facts.sshd.ports == (22, 2222)
    assert facts.sshd.client_alive_interval == 60


# --------------------------------------------------------------------------- the plan


@pytest.mark.parametrize("port", [22, 2222])
def test_sshds_port_blocks_the_step(tmp_path: Path, port: int) -> None:
    facts = transcript_with("sshd-effective", "port 22\nport 2222")
    with pytest.raises(StepBlocked) as blocked:
        service.plan(facts, inventory(tmp_path, port=port))
    assert blocked.value.line() == (
        f"[service] port = {port}: sshd listens there (its Port): the service could never "
        "start: set [service] port to one nothing listens on")


def test_a_port_something_else_listens_on_blocks_the_step(tmp_path: Path) -> None:
    facts = facts_of(SANDBOX)
    with pytest.raises(StepBlocked) as blocked:
        service.plan(facts, inventory(tmp_path, port=40125))
    assert blocked.value.line() == (
        "[service] port = 40125: 127.0.0.1:40125 is in use by containerd: set [service] port "
        "to one nothing listens on")
    # Another address of the host is no collision; every address is.
    assert service.plan(facts, inventory(tmp_path, port=40125, bind="10.0.0.5"))
    with pytest.raises(StepBlocked, match=r"127\.0\.0\.1:40125 is in use by containerd"):
        service.plan(facts, inventory(tmp_path, port=40125, bind="0.0.0.0"))


def test_a_members_rootless_container_on_the_port_is_named_with_her(tmp_path: Path) -> None:
    facts = facts_of(SANDBOX)
    alice = facts.accounts["alice"].uid
    facts = dataclasses.replace(facts, listeners=(
        Listener("*", 8000, ("rootlesskit",), uid=alice),))  # SYNTHESIZED: her published port
    with pytest.raises(StepBlocked) as blocked:
        service.plan(facts, inventory(tmp_path, docker_mode="rootless"))
    assert "*:8000 is in use by rootlesskit (of alice)" in blocked.value.line()


def test_the_services_own_port_is_no_conflict_on_a_reconverge(tmp_path: Path) -> None:
    facts = facts_of(SANDBOX)
    rootful = inventory(tmp_path)
    proxy = Listener("127.0.0.1", 8000, ("docker-proxy",))
    assert service.port_conflict(running(facts, rootful, proxy), rootful.service) is None
    # Rootless: the account's rootlesskit holds it, on every address of its namespace.
    rootless = inventory(tmp_path, docker_mode="rootless")
    uid, _ = service.service_ids(facts)
    kit = Listener("*", 8000, ("rootlesskit",), uid=uid)
    assert service.port_conflict(running(facts, rootless, kit), rootless.service) is None
    # Switching docker_mode: the socket of the unit that runs now is still the service's.
    assert service.port_conflict(running(facts, rootless, kit), rootful.service) is None
    # Another bind for the same port frees the old one when the unit restarts.
    wide = inventory(tmp_path, bind="0.0.0.0")
    assert service.port_conflict(running(facts, rootful, proxy), wide.service) is None


def test_a_docker_proxy_is_not_the_services_unless_its_unit_runs_and_publishes_it(
        tmp_path: Path) -> None:
    facts = facts_of(SANDBOX)
    rootful = inventory(tmp_path)
    proxy = Listener("127.0.0.1", 8000, ("docker-proxy",))
    # Crash-looping (another container holds the port): the proxy is that container's.
    crashing = running(facts, rootful, proxy, active="activating")
    assert service.port_conflict(crashing, rootful.service) == (
        "127.0.0.1:8000 is in use by docker-proxy")
    # The unit publishes 8000; the inventory moves it to 9000, where a container is.
    other = Listener("127.0.0.1", 9000, ("docker-proxy",))
    assert service.port_conflict(running(facts, rootful, proxy, other),
                                 inventory(tmp_path, port=9000).service) == (
        "127.0.0.1:9000 is in use by docker-proxy")


@pytest.mark.parametrize(("bind", "where"), [("0.0.0.0", "every address of the host"),
                                             ("::", "every address of the host"),
                                             ("10.0.0.5", "10.0.0.5")])
def test_a_bind_open_to_the_network_is_a_warning_on_the_start(tmp_path: Path, bind: str,
                                                              where: str) -> None:
    facts = facts_of(SANDBOX)
    changes = service.plan(facts, inventory(tmp_path, bind=bind))
    warned = [c for c in changes if c.warning]
    assert [c.summary.split(" on ")[0] for c in warned] == ["(re)start sd35-api.service"]
    assert warned[0].warning == (
        f"[service] bind = {bind}: the API has no authentication and is open to the network "
        f"on {where}, port 8000: anyone who reaches it generates with this host's GPUs; keep "
        "the loopback default (members reach it through SSH) or firewall the port")
    # A stopped unit with nothing else to change: its start opens the port, and warns.
    inv = inventory(tmp_path, bind=bind)
    start = service.plan(running(facts, inv, active="inactive"), inv)
    assert [(c.summary, c.warning) for c in start] == [
        (f"start sd35-api.service on {bind}:8000 (it was inactive)", warned[0].warning)]
    assert service.plan(running(facts, inv), inv) == []


@pytest.mark.parametrize("bind", ["127.0.0.1", "::1"])
def test_a_loopback_bind_is_no_warning(tmp_path: Path, bind: str) -> None:
    changes = service.plan(facts_of(SANDBOX), inventory(tmp_path, bind=bind))
    assert [c.warning for c in changes if c.warning] == []


# --------------------------------------------------------------------------- the health wait


def poll(tmp_path: Path, health: str, states: str, restarts_per_call: int) -> tuple[str, int]:
    """HEALTH_POLL run by sh -e against stand-ins written by hand: docker (prints `health`),
    systemctl (`states` one per is-active call, the last repeated; NRestarts grows by
    `restarts_per_call` per call) and sleep (returns at once). Returns its output and how
    many times it polled."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    stand_ins = {
        "docker": f'echo "{health}"',
        "systemctl": f"""cd {tmp_path}
case "$1" in
  show) n=$(cat n 2>/dev/null || echo 0); echo $((n + {restarts_per_call})) > n; echo "$n";;
  is-active) echo poll >> polls; k=$(wc -l < polls); set -- {states}
        [ "$k" -le $# ] || k=$#; eval "state=\\${{$k}}"; echo "$state"; [ "$state" = active ];;
esac""",
        "sleep": ":",
    }
    for name, body in stand_ins.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    done = subprocess.run(["sh", "-ec", service.HEALTH_POLL], capture_output=True, text=True,
                          env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
                          timeout=60, check=True)
    polls = tmp_path / "polls"
    return done.stdout, len(polls.read_text().splitlines()) if polls.exists() else 0


def test_the_health_wait_stops_when_systemd_keeps_restarting_the_unit(tmp_path: Path) -> None:
    output, polls = poll(tmp_path, "", "activating", restarts_per_call=1)
    assert polls == service.CRASH_RESTARTS
    assert output.startswith(f"sd35-api.service is crash-looping: systemd restarted it "
                             f"{service.CRASH_RESTARTS} times in ")
    assert output.endswith(" s and it never answered /health\n")
    proof = service.proof(facts_of(SANDBOX), inventory(tmp_path))
    assert proof is not None
    assert proof.check(output + "docker: Error response from daemon: address already in use\n"
                       ) == output.strip() + "; docker: Error response from daemon: address " \
                                             "already in use"


def test_the_health_wait_ends_at_healthy_and_at_a_stopped_unit(tmp_path: Path) -> None:
    assert poll(tmp_path / "a", "healthy", "active", restarts_per_call=0) == ("healthy\n", 0)
    assert poll(tmp_path / "b", "starting", "active active failed",
                restarts_per_call=0) == ("sd35-api.service is failed\n", 3)


def test_the_health_wait_is_bounded(tmp_path: Path) -> None:
    output, polls = poll(tmp_path, "starting", "active", restarts_per_call=0)
    assert polls == service.HEALTH_POLLS
    assert output == "health: starting after 30 min\n"
