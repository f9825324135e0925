"""Load and validate `provision.toml` into plain frozen data.

Everything is checked here, before any host is touched: a bad inventory must never leave a
host half-converged. Errors name the file, the line where it can be found, the key and the fix.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import re
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import paramiko

from provision import privilege, safe
from provision.errors import InventoryError
from provision.versions import ImageError, resolve_image

INVENTORY_ENV = "PROVISION_INVENTORY"
DEFAULT_INVENTORY = "provision.toml"

MEMBER_NAME = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
GPUS = re.compile(r"^(all|none|\d+(,\d+)*)$")

# Accounts that exist on stock Debian/Ubuntu images (base-passwd, systemd, openssh, docker):
# turning one of them into a team member would hand out a system identity.
SYSTEM_ACCOUNTS = frozenset(
    """root daemon bin sys sync games man lp mail news uucp proxy www-data backup list irc
    gnats nobody nogroup _apt messagebus sshd syslog uuidd tcpdump tss landscape pollinate
    lxd ubuntu debian admin sudo docker adm staff users systemd-network systemd-resolve
    systemd-timesync systemd-journal systemd-coredump dnsmasq usbmux fwupd-refresh polkitd
    _chrony ntp postfix""".split()
)
DOCKER_SOURCES = ("auto", "docker-ce", "distro")
# rootless: a Docker daemon per member, nobody in the docker group; rootful: one system daemon
# whose group is root-equivalent. An inventory without the key is rootful, as before it existed.
DOCKER_MODES = ("rootless", "rootful")
HOST_FORMS = {"hostname": safe.HOSTNAME, "user": safe.LOGIN, "identity_file": safe.LOCAL_PATH,
              "known_hosts": safe.LOCAL_PATH, "proxy_jump": safe.JUMPS}
# A mirror URL goes into apt sources, pip options and shell scripts on the host: http(s), a
# host, and a path of plain characters only (no credentials, query, quotes or shell syntax).
MIRROR_URL = re.compile(r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~%+/-]*)?$")
ARMORED_KEY = "-----BEGIN PGP PUBLIC KEY BLOCK-----"
# Private key material in any of its clothes: PEM/OpenSSH armour, a PuTTY key file, or an
# OpenSSH private key's body without its armour ("openssh-key-v1" in base64).
PRIVATE_KEY = re.compile(r"PRIVATE KEY|PuTTY-User-Key-File|b3BlbnNzaC1rZXktdjE")
FP8_MODES = ("off", "storage", "dq")
RANDOM_SIZES = ("tiny", "medium", "large")
# An HF model id (org/name): it becomes a container's environment and a path in the cache.
HF_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class Defaults:
    cache_dir: str = "/data/cache/huggingface"
    cache_group: str = "hfcache"
    keepalive_interval: int = 60
    keepalive_count_max: int = 3
    docker_source: str = "auto"
    docker_mode: str = ""  # empty: not set, which means rootful (see `mode`)
    workspace_dir: str = "sd35-fp8"
    # Keys merged into /etc/docker/daemon.json (keys others set there are kept).
    docker_daemon: dict[str, Any] = field(default_factory=dict)
    nvidia_toolkit_version: str = ""  # empty: the newest in NVIDIA's repository

    @property
    def mode(self) -> str:
        """The Docker mode in force: the inventory's, else rootful (what hosts had before)."""
        return self.docker_mode or "rootful"

    @property
    def rootless(self) -> bool:
        return self.mode == "rootless"


@dataclass(frozen=True)
class AptKey:
    """An apt mirror's signing key: a URL the host fetches it from, or the ASCII-armored text
    of a key file on this machine, read when the inventory loads and shipped to the host."""

    url: str = ""
    text: str = ""
    path: str = ""  # where `text` was read from, for messages

    @property
    def source(self) -> str:
        return self.url or self.path


@dataclass(frozen=True)
class Mirrors:
    """Internal mirrors used instead of the public repositories; empty: the public one.

    docker_apt stands for https://download.docker.com, nvidia_apt for
    https://nvidia.github.io/libnvidia-container, pytorch for https://download.pytorch.org/whl
    and pypi for https://pypi.org/simple: the same trees under another root.
    """

    docker_apt: str = ""
    docker_apt_key: AptKey | None = None  # None: the mirror's copy of the vendor's key
    nvidia_apt: str = ""
    nvidia_apt_key: AptKey | None = None
    pypi: str = ""
    pytorch: str = ""


@dataclass(frozen=True)
class HostEntry:
    """A host table; None means 'take it from ~/.ssh/config, then SSH's defaults'."""

    alias: str
    hostname: str | None = None
    user: str | None = None
    port: int | None = None
    identity_file: str | None = None
    known_hosts: str | None = None
    proxy_jump: str | None = None


@dataclass(frozen=True)
class Member:
    name: str
    keys: tuple[str, ...]
    sudo: tuple[str, ...] = ()
    gpus: str = "all"
    # The admin says her sudo list makes her root (privilege.sudo_problem), and knows it.
    root_equivalent: bool = False


# The generation service's system account, its systemd unit and its container: one name.
SERVICE_NAME = "sd35-api"
# Its home, created with the account: its state (the compile cache) and, when rootless, its
# own daemon's data.
SERVICE_HOME = f"/var/lib/{SERVICE_NAME}"


@dataclass(frozen=True)
class Service:
    """[service]: the team's generation API on each host (absent: no service).

    `bind` is the host address its port is published on: loopback unless set, so members reach
    it through their SSH connection (a LocalForward) and nothing else does. `model` empty: the
    host decides, as for a member's launch.json (`models.debug_model`).
    """

    port: int = 8000
    bind: str = "127.0.0.1"
    model: str = ""
    fp8: str = "dq"
    gpus: str = "all"
    # Requests waiting behind the one being generated; one more gets 429 with Retry-After.
    max_queue: int = 4


@dataclass(frozen=True)
class Inventory:
    path: Path
    defaults: Defaults = field(default_factory=Defaults)
    hosts: dict[str, HostEntry] = field(default_factory=dict)
    members: tuple[Member, ...] = ()
    # The [image] table (base image, version overrides, wheelhouse), checked by versions.py.
    image: dict[str, str] = field(default_factory=dict)
    mirrors: Mirrors = field(default_factory=Mirrors)
    service: Service | None = None

    def member(self, name: str) -> Member:
        for member in self.members:
            if member.name == name:
                return member
        raise InventoryError(
            f"{self.path}: no member named {name!r}",
            f"members are {', '.join(m.name for m in self.members) or 'none yet'}",
        )


def inventory_path(given: str | os.PathLike[str] | None) -> Path:
    """The inventory the user means: the flag, else $PROVISION_INVENTORY, else ./provision.toml."""
    return Path(given or os.environ.get(INVENTORY_ENV) or DEFAULT_INVENTORY)


def load_inventory(path: Path, *, missing_ok: bool = False) -> Inventory:
    """Read and validate the inventory; a missing file is an empty one only when allowed."""
    if not path.exists():
        if missing_ok:
            return Inventory(path=path)
        raise InventoryError(
            f"{path}: no such inventory",
            "run 'provision init' to write one, or pass --inventory PATH",
        )
    text = path.read_text()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InventoryError(f"{path}: not valid TOML ({exc})", "fix the syntax") from None
    return parse_inventory(data, path, text)


def parse_inventory(data: dict[str, Any], path: Path, text: str = "") -> Inventory:
    """Validate parsed TOML; pure, so tests can feed it dictionaries."""
    where = _Locator(path, text)
    where.unknown_keys(data, {"defaults", "hosts", "members", "image", "mirrors", "service"},
                       table=None)
    defaults = _parse_defaults(data.get("defaults", {}), where)
    hosts_data = data.get("hosts", {})
    if not isinstance(hosts_data, dict):
        raise where.error("hosts", "must be a table of [hosts.ALIAS] tables")
    hosts = {alias: _parse_host(alias, table, where) for alias, table in hosts_data.items()}
    members_data = data.get("members", [])
    if not isinstance(members_data, list):
        raise where.error("members", "must be an array of [[members]] tables")
    members = tuple(_parse_member(i, m, path.parent, where) for i, m in enumerate(members_data))
    seen: set[str] = set()
    for member in members:
        if member.name in seen:
            raise where.error("name", f"member {member.name!r} is listed twice", needle=member.name)
        seen.add(member.name)
    image = data.get("image", {})
    if not isinstance(image, dict) or not all(isinstance(v, str) for v in image.values()):
        raise where.error("image", "must be a table of strings, e.g. torch = \"2.9.1\"")
    try:
        resolve_image(image)
    except ImageError as exc:
        raise where.error(exc.key, exc.line()) from None
    mirrors = parse_mirrors(data.get("mirrors", {}), where)
    service = parse_service(data["service"], where) if "service" in data else None
    return Inventory(path=path, defaults=defaults, hosts=hosts, members=members, image=image,
                     mirrors=mirrors, service=service)


def parse_service(table: Any, where: _Locator) -> Service:
    """[service]: each value reaches a unit file, a container's environment or docker's -p."""
    if not isinstance(table, dict):
        raise where.error("service", "must be a table")
    where.unknown_keys(table, set(Service.__dataclass_fields__), table="service")

    def error(key: str, message: str) -> InventoryError:
        return where.error(key, message, needle="[service]")  # its line, not a host's `port`

    values = {**asdict(Service()), **table}
    for key, low, high in (("port", 1, 65535), ("max_queue", 0, 1000)):
        value = values[key]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise error(key, f"must be a whole number from {low} to {high}, not {value!r}")
    for key in ("bind", "model", "fp8", "gpus"):
        if not isinstance(values[key], str):
            raise error(key, "must be a string")
    try:
        ipaddress.ip_address(values["bind"])
    except ValueError:
        raise error("bind", f"{values['bind']!r} must be an IP address of the host, e.g. "
                            "127.0.0.1 (the default: reached through SSH only)") from None
    model = values["model"]
    if model and model not in RANDOM_SIZES and not HF_ID.match(model):
        raise error("model", f"{model!r} must be {', '.join(RANDOM_SIZES)} (random weights) "
                             "or an HF id like stabilityai/stable-diffusion-3.5-large in the "
                             "shared cache")
    if values["fp8"] not in FP8_MODES:
        raise error("fp8", f"must be one of {', '.join(FP8_MODES)}")
    if not GPUS.match(values["gpus"]):
        raise error("gpus", f"must be 'all', 'none' or indexes like \"0\" or \"0,1\", "
                            f"not {values['gpus']!r}")
    return Service(**values)


def parse_mirrors(table: Any, where: _Locator) -> Mirrors:
    """[mirrors]: each a strict http(s) URL; an apt mirror's key a URL or an absolute key file."""
    if not isinstance(table, dict):
        raise where.error("mirrors", "must be a table of URLs")
    keys = {"docker_apt", "docker_apt_key", "nvidia_apt", "nvidia_apt_key", "pypi", "pytorch"}
    where.unknown_keys(table, keys, table="mirrors")
    for key, value in table.items():
        if not isinstance(value, str) or not value:
            raise where.error(key, "must be a non-empty string")
    urls = {key: mirror_url(key, table[key], where) for key in keys - {"docker_apt_key",
                                                                       "nvidia_apt_key"}
            if key in table}
    apt_keys = {}
    for repository in ("docker_apt", "nvidia_apt"):
        key = f"{repository}_key"
        if key in table and repository not in table:
            raise where.error(key, f"is the key of the {repository} mirror: set {repository} too")
        if key in table:
            apt_keys[key] = apt_key(key, table[key], where)
    return Mirrors(**urls, **apt_keys)


def mirror_url(key: str, value: str, where: _Locator) -> str:
    """The URL without a trailing slash (paths are appended to it), or a refusal saying why."""
    if "@" in value or "?" in value:
        raise where.error(key, "holds credentials or a query (not shown): keep them out of "
                               "the inventory (apt: /etc/apt/auth.conf.d on the host; pip: a "
                               "netrc file)")
    if not MIRROR_URL.match(value):
        raise where.error(key, f"{safe.shown(value)} is not a plain http(s) URL: use scheme://host[:port]"
                               "/path with letters, digits and . _ ~ % + - / only (no "
                               "credentials, query, spaces, quotes or shell characters)")
    return value.rstrip("/")


def apt_key(key: str, value: str, where: _Locator) -> AptKey:
    """A key URL, or an absolute path to an ASCII-armored public key file (read now)."""
    if value.startswith(("http://", "https://")):
        return AptKey(url=mirror_url(key, value, where))
    if not value.startswith("/"):
        raise where.error(key, f"{safe.shown(value)} must be a key URL (http/https) or an "
                               "absolute path "
                               "to an ASCII-armored key file")
    path = Path(value)
    if not path.is_file():
        raise where.error(key, f"key file {value} not found")
    text = path.read_text(errors="replace")
    if "PRIVATE KEY BLOCK" in text:
        raise where.error(key, f"{value} is a private key; give the public key (gpg --armor "
                               "--export) instead (its content is not shown)")
    if ARMORED_KEY not in text:
        raise where.error(key, f"{value} is not an ASCII-armored public key (it must hold "
                               f"'{ARMORED_KEY}'; gpg --armor --export writes one)")
    return AptKey(text=text, path=value)


def _parse_defaults(table: Any, where: _Locator) -> Defaults:
    if not isinstance(table, dict):
        raise where.error("defaults", "must be a table")
    fields = Defaults.__dataclass_fields__
    where.unknown_keys(table, set(fields), table="defaults")
    values = {**asdict(Defaults()), **table}
    for key in ("cache_dir", "cache_group", "docker_source", "docker_mode", "workspace_dir",
                "nvidia_toolkit_version"):
        if not isinstance(values[key], str):
            raise where.error(key, "must be a string")
    for key, low, high in (("keepalive_interval", 1, 3600), ("keepalive_count_max", 1, 100)):
        value = values[key]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise where.error(key, f"must be a whole number from {low} to {high}, not {value!r}")
    for key, form in (("cache_dir", safe.ABSOLUTE_PATH), ("workspace_dir", safe.RELATIVE_PATH),
                      ("nvidia_toolkit_version", safe.DEBIAN_VERSION)):
        if values[key] and (why := safe.problem(values[key], form)):
            raise where.error(key, why)
    if why := privilege.cache_dir_problem(values["cache_dir"]):
        raise where.error("cache_dir", why)
    if not MEMBER_NAME.match(values["cache_group"]):
        raise where.error("cache_group", f"must match {MEMBER_NAME.pattern}")
    if why := privilege.group_problem(values["cache_group"]):
        raise where.error("cache_group", why)
    if values["docker_source"] not in DOCKER_SOURCES:
        raise where.error("docker_source", f"must be one of {', '.join(DOCKER_SOURCES)}")
    if "docker_mode" in table and values["docker_mode"] not in DOCKER_MODES:
        raise where.error("docker_mode", f"must be one of {', '.join(DOCKER_MODES)}, not "
                                         f"{values['docker_mode']!r}")
    if not isinstance(values["docker_daemon"], dict):
        raise where.error("docker_daemon", "must be a table of daemon.json keys")
    if not values["workspace_dir"]:
        raise where.error("workspace_dir", "must be a path relative to the member's home")
    return Defaults(**values)


def _parse_host(alias: str, table: Any, where: _Locator) -> HostEntry:
    if not isinstance(table, dict):
        raise where.error(alias, "a host must be a [hosts.ALIAS] table")
    fields = HostEntry.__dataclass_fields__
    where.unknown_keys(table, set(fields) - {"alias"}, table=f"hosts.{alias}")
    if alias.startswith("@"):
        raise where.error(alias, "host aliases may not start with '@' (reserved for @local)")
    if why := safe.problem(alias, safe.HOSTNAME):
        raise where.error(alias, f"host alias {why}")
    port = table.get("port")
    if port is not None and (isinstance(port, bool) or not isinstance(port, int)
                             or not 1 <= port <= 65535):
        raise where.error("port", f"must be a port number from 1 to 65535, not {port!r}")
    for key in sorted(set(table) - {"port"}):
        if not isinstance(table[key], str) or not table[key]:
            raise where.error(key, "must be a non-empty string")
        if why := safe.problem(table[key], HOST_FORMS[key]):
            raise where.error(key, why, needle=alias)
    return HostEntry(alias=alias, **table)


def _parse_member(index: int, table: Any, base: Path, where: _Locator) -> Member:
    label = f"[[members]] #{index + 1}"
    if not isinstance(table, dict):
        raise where.error("members", f"{label} must be a table")
    where.unknown_keys(table, {"name", "keys", "sudo", "gpus", "root_equivalent"},
                       table="members")
    name = table.get("name")
    if not isinstance(name, str):
        raise where.error("name", f"{label} needs a name (a string)")
    validate_member_name(name, where)
    keys = table.get("keys", [])
    if not isinstance(keys, list) or not keys or not all(isinstance(k, str) for k in keys):
        raise where.error("keys", f"member {name!r} needs keys = [\"path or public key\", …]",
                          needle=name)
    sudo = table.get("sudo", [])
    if not isinstance(sudo, list) or not all(isinstance(c, str) and c.startswith("/")
                                             for c in sudo):
        raise where.error("sudo", f"member {name!r}: sudo must list commands by absolute path",
                          needle=name)
    if any(bad in c for c in sudo for bad in ("\n", ",", "\\", ":")):
        raise where.error("sudo", f"member {name!r}: a sudo command may not hold ',', ':', "
                                  "'\\' or a newline", needle=name)
    root_equivalent = table.get("root_equivalent", False)
    if not isinstance(root_equivalent, bool):
        raise where.error("root_equivalent", f"member {name!r}: must be true or false",
                          needle=name)
    for entry in sudo:
        if not root_equivalent and (why := privilege.sudo_problem(entry)):
            raise where.error("sudo", f"member {name!r}: {entry} is root-equivalent ({why}); "
                                      "list exact, limited commands, or say "
                                      "root_equivalent = true for her", needle=name)
    gpus = table.get("gpus", "all")
    if not isinstance(gpus, str) or not GPUS.match(gpus):
        raise where.error("gpus", f"member {name!r}: gpus must be 'all', 'none' or indexes "
                                  f"like \"0\" or \"0,1\", not {gpus!r}", needle=name)
    parsed = tuple(read_public_key(k, base, where, name) for k in keys)
    return Member(name=name, keys=parsed, sudo=tuple(sudo), gpus=gpus,
                  root_equivalent=root_equivalent)


def validate_member_name(name: str, where: _Locator | None = None) -> None:
    where = where or _Locator(Path(DEFAULT_INVENTORY), "")
    if not MEMBER_NAME.match(name):
        raise where.error("name", f"{name!r} is not a valid account name: use lowercase "
                                  f"letters, digits, '-' and '_' ({MEMBER_NAME.pattern})",
                          needle=name)
    if name in SYSTEM_ACCOUNTS or name.startswith("systemd-"):
        raise where.error("name", f"{name!r} is a system account; pick the person's own login",
                          needle=name)


def read_public_key(value: str, base: Path, where: _Locator, owner: str) -> str:
    """An inline key or a path to a .pub file → the normalised `type base64 comment` line.

    A private key is refused without echoing any of it.
    """
    text, source = value, "inline key"
    if not _looks_inline(value):
        if safe.SECRET.search(value):
            # Not a path: likely key material pasted without its first line, never echoed.
            raise where.error("keys", f"member {owner!r}: {safe.shown(value)} is neither an "
                                      "SSH public key line nor the path of a .pub file",
                              needle=owner)
        path = Path(value).expanduser()
        path = path if path.is_absolute() else base / path
        if not path.is_file():
            raise where.error("keys", f"member {owner!r}: key file {safe.shown(str(path))} not "
                                      "found", needle=value)
        text, source = path.read_text(errors="replace"), str(path)
    if PRIVATE_KEY.search(text):
        raise where.error("keys", f"member {owner!r}: {source} is a private key; give the "
                                  "public key (.pub) instead (its content is not shown)",
                          needle=value if source != "inline key" else owner)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    if len(lines) != 1:
        raise where.error("keys", f"member {owner!r}: {source} must hold exactly one public key",
                          needle=owner)
    return parse_public_key_line(lines[0], source, where, owner)


def parse_public_key_line(line: str, source: str, where: _Locator, owner: str) -> str:
    parts = line.split(None, 2)
    try:
        blob = base64.b64decode(parts[1], validate=True)
        paramiko.PKey.from_type_string(parts[0], blob)
    except (IndexError, binascii.Error, ValueError, paramiko.SSHException) as exc:
        reason = str(exc) or type(exc).__name__
        raise where.error("keys", f"member {owner!r}: {source} is not an SSH public key "
                                  f"({reason[:60]})", needle=owner) from None
    comment = parts[2] if len(parts) > 2 else f"{owner}@provision"
    return f"{parts[0]} {parts[1]} {comment}"


def _looks_inline(value: str) -> bool:
    return value.startswith(("ssh-", "ecdsa-", "sk-")) or bool(PRIVATE_KEY.search(value))


class _Locator:
    """Finds the line a key sits on, so errors point where the user must look."""

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.lines = text.splitlines()

    def line_of(self, key: str, needle: str | None = None) -> int | None:
        pattern = re.compile(rf"^\s*\"?{re.escape(key)}\"?\s*=")
        candidates = [i for i, ln in enumerate(self.lines, 1) if pattern.search(ln)]
        if needle:
            near = [i for i, ln in enumerate(self.lines, 1) if needle in ln]
            if near:
                # The key occurrence closest to (at or after the start of) the needle's table.
                after = [c for c in candidates if c >= near[0]]
                return after[0] if after else near[0]
        header = [i for i, ln in enumerate(self.lines, 1)
                  if re.match(rf"^\s*\[+\s*(hosts\.)?\"?{re.escape(key)}\"?\s*\]", ln)]
        return (candidates or header or [None])[0]

    def error(self, key: str, message: str, needle: str | None = None) -> InventoryError:
        line = self.line_of(key, needle)
        place = f"{self.path}:{line}" if line else str(self.path)
        return InventoryError(f"{place}: {key}: {message}")

    def unknown_keys(self, data: dict[str, Any], known: set[str], *, table: str | None) -> None:
        for key in sorted(set(data) - known):
            scope = f"[{table}]" if table else "the top level"
            raise self.error(key, f"unknown key in {scope}; known keys are "
                                  f"{', '.join(sorted(known))}")
