"""Where a host alias points: the inventory's host table over ~/.ssh/config over SSH defaults.

Pure resolution into a `Target`; nothing here opens a socket.
"""

from __future__ import annotations

import getpass
from dataclasses import dataclass
from pathlib import Path

import paramiko

from provision.errors import InventoryError
from provision.inventory import Inventory

LOCAL = "@local"
DEFAULT_CONNECT_TIMEOUT = 10.0


@dataclass(frozen=True)
class Target:
    alias: str
    hostname: str = "localhost"
    port: int = 22
    user: str = "root"
    identity_files: tuple[str, ...] = ()
    # Checked in order; a newly trusted key is recorded in the first.
    known_hosts: tuple[str, ...] = ()
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    jumps: tuple[Target, ...] = ()

    @property
    def is_local(self) -> bool:
        return self.alias == LOCAL

    def describe(self) -> str:
        if self.is_local:
            return "this machine (@local)"
        return f"{self.alias} ({self.user}@{self.hostname}:{self.port})"


def load_ssh_config(path: Path) -> paramiko.SSHConfig:
    return paramiko.SSHConfig.from_path(str(path)) if path.is_file() else paramiko.SSHConfig()


def resolve_target(alias: str, inventory: Inventory, ssh_config_path: Path) -> Target:
    """Combine the inventory host table and the ssh config block for `alias`."""
    if alias == LOCAL:
        return Target(alias=LOCAL, user=getpass.getuser())
    ssh_config = load_ssh_config(ssh_config_path)
    entry = inventory.hosts.get(alias)
    if entry is None and alias not in ssh_config.get_hostnames():
        known = [*sorted(inventory.hosts), "@local"]
        raise InventoryError(
            f"unknown host {alias!r}",
            f"add [hosts.{alias}] to {inventory.path} or a 'Host {alias}' block to "
            f"{ssh_config_path} (known: {', '.join(known)})",
        )
    base = inventory.path.parent
    options = ssh_config.lookup(alias)
    identity = (
        (str(_relative_to(base, entry.identity_file)),)
        if entry and entry.identity_file
        else tuple(options.get("identityfile", []))
    )
    known_hosts = [str(Path(p).expanduser()) for p in
                   options.get("userknownhostsfile", "~/.ssh/known_hosts").split()]
    if entry and entry.known_hosts:
        known_hosts.insert(0, str(_relative_to(base, entry.known_hosts)))
    jump_spec = (entry.proxy_jump if entry and entry.proxy_jump else options.get("proxyjump"))
    return Target(
        alias=alias,
        hostname=(entry.hostname if entry and entry.hostname else options["hostname"]),
        port=(entry.port if entry and entry.port else int(options.get("port", 22))),
        user=(entry.user if entry and entry.user else options.get("user", getpass.getuser())),
        identity_files=identity,
        known_hosts=tuple(known_hosts),
        connect_timeout=float(options.get("connecttimeout", DEFAULT_CONNECT_TIMEOUT)),
        jumps=_jump_hosts(jump_spec, ssh_config, tuple(known_hosts)),
    )


def _jump_hosts(spec: str | None, ssh_config: paramiko.SSHConfig,
                known_hosts: tuple[str, ...]) -> tuple[Target, ...]:
    """ProxyJump `[user@]host[:port],…` → hops, each resolved through the ssh config."""
    if not spec or spec.lower() == "none":
        return ()
    hops = []
    for hop in spec.split(","):
        user, _, hostport = hop.strip().rpartition("@")
        host, _, port = hostport.partition(":")
        options = ssh_config.lookup(host)
        hops.append(Target(
            alias=host,
            hostname=options["hostname"],
            port=int(port or options.get("port", 22)),
            user=user or options.get("user", getpass.getuser()),
            identity_files=tuple(options.get("identityfile", [])),
            known_hosts=known_hosts,
        ))
    return tuple(hops)


def _relative_to(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base / path).resolve()
