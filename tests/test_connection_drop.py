"""A host that hangs up (or says nothing) before the SSH handshake ends: the CLI prints one
line and exits 3, with paramiko's own log (its transport thread's traceback) only under -v.

The hosts here are real TCP servers on 127.0.0.1 that behave as a refusing sshd does
(MaxStartups, a firewall's reset, something else on the port); no sandbox is needed.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import CliResult, run_cli

BANNER = b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n"


def close_at_once(conn: socket.socket) -> None:
    """Hang up before the banner."""


def close_after_banner(conn: socket.socket) -> None:
    """Hang up once the client has said its own banner: during key exchange."""
    conn.sendall(BANNER)
    conn.recv(256)


def say_nothing(conn: socket.socket) -> None:
    """Accept and stay silent until the client gives up."""
    conn.recv(256)
    conn.recv(256)


@pytest.fixture
def dropping_server(request: pytest.FixtureRequest) -> Iterator[int]:
    """A TCP server on a free loopback port that treats each connection with `request.param`;
    yields the port."""
    behave: Callable[[socket.socket], None] = request.param
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            # OSError: the client went away first.
            with conn, contextlib.suppress(OSError):
                conn.settimeout(30)
                behave(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    server.close()


def facts_of(port: int, tmp_path: Path, *flags: str) -> CliResult:
    """`provision facts` against 127.0.0.1:port, with a 3 s connect timeout (ssh config)."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True, exist_ok=True)
    (home / ".ssh" / "config").write_text(
        f"Host dropper\n  HostName 127.0.0.1\n  Port {port}\n  User root\n  ConnectTimeout 3\n")
    inventory = tmp_path / "provision.toml"
    inventory.write_text("[hosts.dropper]\n")
    return run_cli("facts", "dropper", *flags, inventory=inventory, home=home, timeout=60)


@pytest.mark.parametrize("dropping_server", [close_at_once, close_after_banner],
                         indirect=True, ids=["before-banner", "during-kex"])
def test_a_host_that_hangs_up_is_one_line_and_exit_3(dropping_server: int,
                                                     tmp_path: Path) -> None:
    result = facts_of(dropping_server, tmp_path)
    assert result.exit_code == 3, result.stderr
    assert result.stderr == (
        f"error: dropper (root@127.0.0.1:{dropping_server}): unreachable (the host closed the "
        "connection before the SSH handshake ended): check that the host is up, the address "
        "and port are right, and sshd runs\n")
    assert result.stdout == ""


@pytest.mark.parametrize("dropping_server", [close_at_once], indirect=True)
def test_verbose_shows_what_paramiko_logged(dropping_server: int, tmp_path: Path) -> None:
    result = facts_of(dropping_server, tmp_path, "-v")
    assert result.exit_code == 3, result.stderr
    assert result.error_lines[-1].startswith("error: dropper (root@127.0.0.1:")
    assert "Traceback" in result.stderr and "SSH protocol banner" in result.stderr


@pytest.mark.parametrize("dropping_server", [say_nothing], indirect=True)
def test_a_silent_host_is_a_timeout_in_one_line(dropping_server: int, tmp_path: Path) -> None:
    started = time.monotonic()
    result = facts_of(dropping_server, tmp_path)
    assert time.monotonic() - started < 15
    assert result.exit_code == 3, result.stderr
    assert result.stderr == (
        f"error: dropper (root@127.0.0.1:{dropping_server}): unreachable (no answer within "
        "3 s): check that the host is up, the address and port are right, and sshd runs\n")
