"""Run scripts on a host as root: over SSH (Fabric/paramiko) or on this machine (@local).

Every call is one round trip: the script travels on stdin to `sh -s`, wrapped so that a
non-root admin goes through sudo. A sudo password, when one is given, is the first line of
stdin; the wrapper reads it into its own environment and sudo fetches it through its askpass
helper only when the policy asks for one. So it never reaches a command line, a process list, a
file or a log, and under NOPASSWD (when `sudo -S` would leave it unread) never the root shell.
"""

from __future__ import annotations

import codecs
import contextlib
import itertools
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import fabric
import paramiko

from provision.errors import (
    AuthenticationFailed,
    HostKeyChanged,
    HostKeyUnknown,
    HostUnreachable,
    RemoteCommandFailed,
    SudoPasswordRequired,
)
from provision.target import Target

KEEPALIVE_SECONDS = 15
LineSink = Callable[[str], None]
# Root runs the script directly; anyone else goes through sudo, never prompting on a terminal.
_AS_ROOT = 'if [ "$(id -u)" -eq 0 ]; then {root}; else {sudo}; fi'
_SUDO_NO_PASSWORD = "exec sudo -n -H -- sh -s"
# sudo runs its askpass helper with the prompt as the only argument: with printenv as the helper
# and the variable's name as the prompt, the helper prints the password. env_reset keeps the
# variable out of the root shell; the script unsets it too, for hosts that turned env_reset off.
PASSWORD_VARIABLE = "PROVISION_SUDO_PASSWORD"
_SUDO_ASKPASS = (f"IFS= read -r {PASSWORD_VARIABLE}; export {PASSWORD_VARIABLE}; "
                 f"SUDO_ASKPASS=$(command -v printenv) exec sudo -A -p {PASSWORD_VARIABLE} "
                 "-H -- sh -s")
# How much of a failed script's output its one-line error carries (-v shows all of it).
ERROR_TAIL_LINES = 3
# What is kept of a connection's paramiko log (its -v detail): the last lines say the cause.
TRANSPORT_LOG_LINES = 200
# Each SSH connection's transports log on a channel of their own (see TransportLog).
_log_channels = itertools.count(1)


@dataclass(frozen=True)
class Result:
    stdout: str
    stderr: str
    exit_code: int

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def output(self) -> str:
        """Everything the script printed, stdout then stderr."""
        return "\n".join(part.rstrip("\n") for part in (self.stdout, self.stderr) if part.strip())

    def tail(self, lines: int = ERROR_TAIL_LINES) -> str:
        """The last lines it printed, on one line: where a failure usually says its cause."""
        last = [ln.strip() for ln in self.output().splitlines() if ln.strip()][-lines:]
        return " | ".join(last) or "no output"


@dataclass
class Held:
    """A script left running on the host; `first_line` is what it reported."""

    first_line: str
    release: Callable[[], None]


class Connection:
    """A host the tool can run root scripts on. Subclasses move the bytes."""

    def __init__(self, target: Target, sudo_password: str | None = None) -> None:
        self.target = target
        self.sudo_password = sudo_password
        self.round_trips = 0

    @property
    def name(self) -> str:
        return self.target.alias

    def run(self, script: str, *, env: dict[str, str] | None = None, root: bool = True,
            timeout: float | None = None, check: bool = True, what: str = "script",
            on_line: LineSink | None = None) -> Result:
        """Run `script` with sh on the host, as root unless told otherwise.

        `on_line` sees each line it prints, stdout's and stderr's, as it arrives (progress of
        long work, e.g. a build); a carriage return ends a line too (a progress bar's redraw).
        """
        command, stdin = self._command(script, env, root)
        self.round_trips += 1
        result = self._execute(command, stdin, timeout, on_line or _ignore)
        if root:
            self._raise_for_sudo(result)
        if check and not result.ok:
            raise RemoteCommandFailed(
                f"{self.name}: {what} failed with exit code {result.exit_code}: "
                f"{result.tail()}", "rerun with -v for the full output",
                detail=result.output())
        return result

    def hold(self, script: str, timeout: float = 30) -> Held:
        """Start `script` as root and keep its stdin open until the handle is released.

        For host-side locks: the script reports on its first line, then waits for stdin to
        close, which happens on release or when this connection dies, never later.
        """
        command, stdin = self._command(script, None, True)
        self.round_trips += 1
        return self._hold(command, stdin, timeout)

    def _command(self, script: str, env: dict[str, str] | None, root: bool) -> tuple[str, str]:
        preamble = f"unset {PASSWORD_VARIABLE}\n" + "".join(
            f"export {k}={shlex.quote(v)}\n" for k, v in (env or {}).items())
        # sh runs a function only once it has read all of it: a script cut short in transit
        # (a dropped connection) is a syntax error, never half a script run.
        stdin = f"{preamble}provision_main() {{\n{script}\n}}\nprovision_main\n"
        return self._root_command(stdin) if root else ("sh -s", stdin)

    def _root_command(self, stdin: str) -> tuple[str, str]:
        if self.sudo_password is None:
            return _AS_ROOT.format(root="exec sh -s", sudo=_SUDO_NO_PASSWORD), stdin
        # Root has no use for the password line: read it off stdin before the script starts.
        command = _AS_ROOT.format(root="read -r _; exec sh -s", sudo=_SUDO_ASKPASS)
        return command, f"{self.sudo_password}\n{stdin}"

    def _raise_for_sudo(self, result: Result) -> None:
        sudo_lines = [ln for ln in result.stderr.splitlines() if ln.startswith("sudo:")]
        if result.exit_code != 1 or not sudo_lines:
            return
        message = sudo_lines[-1]
        if "password is required" in message:
            raise SudoPasswordRequired(
                f"{self.name}: sudo needs a password for {self.target.user}",
                "rerun with --ask-sudo-pass, or allow NOPASSWD sudo for this admin",
            )
        if "incorrect password" in message:
            raise AuthenticationFailed(f"{self.name}: sudo rejected the password",
                                       "rerun with --ask-sudo-pass and the right password")
        raise AuthenticationFailed(f"{self.name}: {message}",
                                   f"give {self.target.user} sudo rights or log in as root")

    def _execute(self, command: str, stdin: str, timeout: float | None,
                 on_line: LineSink) -> Result:
        raise NotImplementedError

    def _hold(self, command: str, stdin: str, timeout: float) -> Held:
        raise NotImplementedError

    def tunnel(self, address: str, port: int) -> Any:
        """A stream socket to `address:port` as seen from the host (`ssh -L`'s channel): how
        the tool reaches a service published on the host's loopback only."""
        raise NotImplementedError

    def open(self) -> Connection:
        return self

    def close(self) -> None:
        """Nothing to release by default."""

    def __enter__(self) -> Connection:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalConnection(Connection):
    """@local: the tool runs on the host itself (e.g. on the GPU server, or a lent machine)."""

    def _execute(self, command: str, stdin: str, timeout: float | None,
                 on_line: LineSink) -> Result:
        # A session of its own: the time limit (or Ctrl-C) ends the command and everything it
        # started, which may hold its output open (a read stuck on a FIFO, a hung mount).
        process = subprocess.Popen(["sh", "-c", command], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   start_new_session=True)
        assert process.stdin and process.stdout and process.stderr
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            _end_session(process)

        timer = threading.Timer(timeout, expire) if timeout else None
        try:
            if timer:
                timer.start()
            with ThreadPoolExecutor(2) as pool:
                pool.submit(_write_and_close, process.stdin, stdin.encode())
                stderr = pool.submit(_read_lines, process.stderr.read1, on_line)
                stdout = _read_lines(process.stdout.read1, on_line)
                exit_code = process.wait()
                result = Result(stdout, stderr.result(), exit_code)
        except BaseException:
            _end_session(process)
            raise
        finally:
            if timer:
                timer.cancel()
        if expired.is_set():
            raise RemoteCommandFailed(f"@local: command ran past {timeout} s")
        return result

    def _hold(self, command: str, stdin: str, timeout: float) -> Held:
        process = subprocess.Popen(["sh", "-c", command], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert process.stdin and process.stdout
        process.stdin.write(stdin)
        process.stdin.flush()
        line = process.stdout.readline().strip()

        def release() -> None:
            process.stdin.close()
            process.wait(timeout)

        return Held(line, release)

    def tunnel(self, address: str, port: int) -> socket.socket:
        """@local: the host is here, so its loopback is ours."""
        return socket.create_connection((address, port), timeout=30)


class KnownHostsPolicy(paramiko.MissingHostKeyPolicy):
    """Refuse unknown host keys, or (trust on first use) record them when the user says so.

    Fabric installs AutoAddPolicy, which accepts any key silently (fabric #2071); this replaces it.
    """

    def __init__(self, record_in: str | None, accept_new: bool) -> None:
        self.record_in = record_in
        self.accept_new = accept_new

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str,
                         key: paramiko.PKey) -> None:
        fingerprint = key.fingerprint
        if not self.accept_new or not self.record_in:
            raise HostKeyUnknown(
                f"{hostname}: host key {fingerprint} is not in known_hosts",
                "check the fingerprint with the host's owner, then rerun with "
                "--accept-new-host-key to trust and record it",
            )
        path = Path(self.record_in)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with path.open("a") as known:
            known.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
        client.get_host_keys().add(hostname, key.get_name(), key)


class TransportLog(logging.Handler):
    """What one connection's paramiko transports logged, kept as the detail of its errors.

    paramiko's transport thread logs a handshake the host cut short as an ERROR with a
    traceback; with no handler anywhere, Python's last-resort handler prints that on stderr
    above the one-line error. A handler on the connection's own log channel (below
    `paramiko.transport`) keeps it for -v instead; it does not stop propagation, so logging
    configured by a caller still sees every record.
    """

    def __init__(self) -> None:
        super().__init__()
        self.lines: deque[str] = deque(maxlen=TRANSPORT_LOG_LINES)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def text(self) -> str:
        return "\n".join(self.lines)


class SSHConnection(Connection):
    """A host reached over SSH, host keys checked, with transport keepalive."""

    def __init__(self, target: Target, *, sudo_password: str | None = None,
                 accept_new_host_key: bool = False) -> None:
        super().__init__(target, sudo_password)
        self.accept_new_host_key = accept_new_host_key
        self.transport_log = TransportLog()
        self._fabric = self._connection_for(target)

    def _connection_for(self, target: Target) -> fabric.Connection:
        gateway = None
        for hop in target.jumps:
            gateway = self._hardened(hop, gateway)
        return self._hardened(target, gateway)

    def _hardened(self, target: Target, gateway: fabric.Connection | None) -> fabric.Connection:
        config = fabric.Config(overrides={"load_ssh_configs": False})
        connect_kwargs: dict[str, object] = {"banner_timeout": target.connect_timeout,
                                             "auth_timeout": target.connect_timeout}
        if target.identity_files:
            connect_kwargs["key_filename"] = [str(Path(p).expanduser())
                                              for p in target.identity_files]
        conn = fabric.Connection(
            host=target.hostname, user=target.user, port=target.port, config=config,
            gateway=gateway, connect_timeout=int(target.connect_timeout),
            connect_kwargs=connect_kwargs,
        )
        for path in target.known_hosts:
            if Path(path).is_file():
                conn.client.load_host_keys(path)
        conn.client.set_missing_host_key_policy(KnownHostsPolicy(
            target.known_hosts[0] if target.known_hosts else None, self.accept_new_host_key))
        channel = f"paramiko.transport.provision-{next(_log_channels)}"
        logging.getLogger(channel).addHandler(self.transport_log)
        conn.client.set_log_channel(channel)
        return conn

    def open(self) -> SSHConnection:
        where = self.target.describe()
        try:
            self._fabric.open()
        except (HostKeyUnknown, HostKeyChanged):
            raise
        except paramiko.BadHostKeyException as exc:
            raise HostKeyChanged(
                f"{where}: host key changed ({exc.key.fingerprint}, expected "
                f"{exc.expected_key.fingerprint}): possible man-in-the-middle attack",
                "if the host was really reinstalled, remove its old line from known_hosts "
                f"({', '.join(self.target.known_hosts[:1])}) and check the new fingerprint",
            ) from None
        except paramiko.AuthenticationException as exc:
            raise AuthenticationFailed(
                f"{where}: authentication failed ({exc})",
                "check the user and IdentityFile in ~/.ssh/config or the inventory, or load "
                "the key into ssh-agent",
            ) from None
        except (OSError, paramiko.SSHException, EOFError) as exc:
            reason = str(exc) or type(exc).__name__
            cause = _handshake_cause(exc, self._fabric.client.get_transport())
            if isinstance(cause, socket.timeout):
                reason = f"no answer within {self.target.connect_timeout:g} s"
            elif isinstance(cause, (EOFError, ConnectionError)):
                # Before the banner or during key exchange: sshd's MaxStartups, a firewall or
                # something that is not sshd on that port hung up.
                reason = "the host closed the connection before the SSH handshake ended"
            raise HostUnreachable(
                f"{where}: unreachable ({reason})",
                "check that the host is up, the address and port are right, and sshd runs",
                detail=self.transport_log.text(),
            ) from None
        transport = self._fabric.transport
        transport.set_keepalive(KEEPALIVE_SECONDS)
        if isinstance(transport.sock, socket.socket):
            # Without it, Nagle meets delayed ACKs: each small channel exchange waits 40 ms.
            transport.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self

    def _execute(self, command: str, stdin: str, timeout: float | None,
                 on_line: LineSink) -> Result:
        """One exec channel. Not Fabric's `run`: invoke feeds stdin one byte per 10 ms."""
        try:
            channel = self.transport.open_session(timeout=self.target.connect_timeout)
            channel.settimeout(timeout)
            channel.exec_command(command)
            with ThreadPoolExecutor(2) as pool:
                # Feed stdin and drain stderr beside stdout, so no full window can stall us.
                sent = pool.submit(_send_and_close, channel, stdin.encode())
                stderr = pool.submit(_read_lines, channel.recv_stderr, on_line)
                try:
                    stdout = _read_lines(channel.recv, on_line)
                    sent.result()
                    exit_code = channel.recv_exit_status()
                except BaseException:
                    # Ctrl-C or the time limit: closed, the channel ends the stderr reader, so
                    # leaving this block never waits on a host that does not answer.
                    channel.close()
                    raise
                return Result(stdout, stderr.result(), exit_code)
        except TimeoutError:
            raise RemoteCommandFailed(f"{self.name}: command ran past {timeout} s",
                                      "check the host's load, or rerun") from None
        except (OSError, paramiko.SSHException, EOFError) as exc:
            raise HostUnreachable(f"{self.name}: connection lost ({exc or type(exc).__name__})",
                                  "rerun; every step is safe to repeat",
                                  detail=self.transport_log.text()) from None

    def _hold(self, command: str, stdin: str, timeout: float) -> Held:
        try:
            channel = self.transport.open_session(timeout=self.target.connect_timeout)
            channel.settimeout(timeout)
            channel.exec_command(command)
            channel.sendall(stdin.encode())
            line = channel.makefile("rb").readline().decode(errors="replace").strip()
        except (TimeoutError, OSError, paramiko.SSHException) as exc:
            raise HostUnreachable(f"{self.name}: lost while taking the host lock ({exc})",
                                  "rerun", detail=self.transport_log.text()) from None
        return Held(line, channel.close)

    def tunnel(self, address: str, port: int) -> paramiko.Channel:
        try:
            return self.transport.open_channel("direct-tcpip", (address, port), ("127.0.0.1", 0),
                                               timeout=self.target.connect_timeout)
        except (paramiko.SSHException, OSError) as exc:
            raise HostUnreachable(f"{self.name}: no SSH forward to {address}:{port} ({exc})",
                                  "check that the service runs there (provision doctor) and "
                                  "that sshd allows TCP forwarding") from None

    @property
    def transport(self) -> paramiko.Transport:
        if not self._fabric.is_connected:
            self.open()
        return self._fabric.transport

    def close(self) -> None:
        self._fabric.close()


def _handshake_cause(exc: BaseException, transport: paramiko.Transport | None) -> BaseException:
    """What ended a handshake, under paramiko's wrapping of it."""
    if isinstance(exc, paramiko.SSHException) and exc.__context__ is not None:
        return exc.__context__  # "Error reading SSH protocol banner"
    died = transport.get_exception() if transport is not None else None
    if died is not None:
        return _handshake_cause(died, None)
    if (isinstance(exc, paramiko.SSHException) and transport is not None
            and not transport.remote_version):
        # The caller stopped waiting for the banner a moment before the transport's thread
        # did (the same timeout), went on to authenticate: "No existing session".
        return TimeoutError()
    return exc


def _ignore(line: str) -> None:
    """No one is watching the output as it comes."""


# What one read of a command's output asks for: what has arrived, up to this much.
READ_BYTES = 65536
_LINE_END = re.compile(r"\r\n|\r|\n")


def _read_lines(read: Callable[[int], bytes], on_line: LineSink) -> str:
    """All a stream's text, read as it arrives; each line to `on_line` once it is whole."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    parts: list[str] = []
    pending = ""
    while True:
        chunk = read(READ_BYTES)
        part = decoder.decode(chunk, final=not chunk)
        parts.append(part)
        *lines, pending = _LINE_END.split(pending + part)
        for line in lines:
            on_line(line)
        if not chunk:
            break
    if pending:
        on_line(pending)
    return "".join(parts)


def _end_session(process: subprocess.Popen[bytes]) -> None:
    """Kill a local command's whole session (it was started in one of its own)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def _write_and_close(stream: IO[bytes], data: bytes) -> None:
    try:
        stream.write(data)
    except BrokenPipeError:
        pass  # the command ended without reading all of its input
    finally:
        stream.close()


def _send_and_close(channel: paramiko.Channel, data: bytes) -> None:
    channel.sendall(data)
    channel.shutdown_write()


def connect(target: Target, *, sudo_password: str | None = None,
            accept_new_host_key: bool = False) -> Connection:
    """The right connection for the target, opened (so a bad host fails here, not later)."""
    if target.is_local:
        return LocalConnection(target, sudo_password)
    return SSHConnection(target, sudo_password=sudo_password,
                         accept_new_host_key=accept_new_host_key).open()
