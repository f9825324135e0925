"""What the tool sees on a host: the facts script's transcript, parsed by one pure function.

Like a pyinfra fact, each section is a command whose raw output is kept; `parse_facts` turns
the whole transcript into a frozen `HostFacts` tree (`gather` runs the script, in one round
trip). Tests feed it transcripts recorded on
Ubuntu 22.04/24.04 (with and without an H100) and Debian 12.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from provision.errors import FactsUnreadable

SECTION = "@@@provision:"
# Shell: `sec NAME` starts a section of a transcript `split_sections` reads (the facts script,
# a plain .sh file, writes it itself).
SECTION_FUNCTION = f"sec() {{ printf '\\n{SECTION}%s\\n' \"$1\"; }}"
STATE_FILE = "/var/lib/provision/state.json"
DAEMON_JSON = "/etc/docker/daemon.json"
SUBUID, SUBGID = "/etc/subuid", "/etc/subgid"  # subordinate ids: rootless daemons' ranges
DOCKER_CONFIG = ".docker/config.json"  # an account's docker CLI config, below its home
DPKG_LOCKS = ("/var/lib/dpkg/lock-frontend", "/var/lib/dpkg/lock", "/var/lib/apt/lists/lock")
# The line the paths section prints for a batch that ran past its time limit.
TIMED_OUT = "timed-out"


@dataclass(frozen=True)
class OSInfo:
    id: str
    version_id: str
    codename: str
    pretty_name: str
    arch: str
    kernel: str
    hostname: str


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int
    home: str
    shell: str
    # Login disabled by account expiry (how offboarding locks); None: not asked, since only
    # accounts of interest are.
    locked: bool | None = None
    authorized_keys: int | None = None  # key lines in ~/.ssh/authorized_keys, when asked


@dataclass(frozen=True)
class Group:
    name: str
    gid: int
    members: tuple[str, ...]


@dataclass(frozen=True)
class PathState:
    """A path on the host: its kind, owner, group, mode, a link's target, a file's text.

    Below a link in a member's home, the path as she sees it (root never looks through her
    link): what she cannot reach reads as missing.
    """

    path: str
    kind: str  # file | directory | link | other | missing
    owner: str = ""
    group: str = ""
    mode: str = ""
    target: str = ""
    content: str | None = None  # a file's text, or "sha256:<hex>" when asked for its digest

    @property
    def exists(self) -> bool:
        return self.kind != "missing"


@dataclass(frozen=True)
class Sshd:
    test_ok: bool
    test_error: str
    effective: dict[str, str]
    includes_dropins: bool
    ports: tuple[int, ...] = ()  # every `port` of `sshd -T` (effective keeps only the last)

    @property
    def client_alive_interval(self) -> int | None:
        value = self.effective.get("clientaliveinterval")
        return int(value) if value and value.isdigit() else None

    @property
    def client_alive_count_max(self) -> int | None:
        value = self.effective.get("clientalivecountmax")
        return int(value) if value and value.isdigit() else None


@dataclass(frozen=True)
class Listener:
    """A TCP socket listening on the host and who holds it (`ss -ltnpe`)."""

    address: str  # "0.0.0.0", "::" or "*" for every address of the host
    port: int
    processes: tuple[str, ...]  # process names; none when the kernel could not say
    uid: int = 0  # the account that opened it

    def overlaps(self, address: str) -> bool:
        """Whether binding `address` on this port would collide with this socket: the same
        address, or either one standing for every address."""
        return bool({self.address, address} & WILDCARDS) or self.address == address


# What ss and the kernel print for "every address" (an IPv6 wildcard takes IPv4 too).
WILDCARDS = frozenset({"0.0.0.0", "::", "*"})


@dataclass(frozen=True)
class CacheDir:
    path: str
    exists: bool
    kind: str = ""
    owner: str = ""
    group: str = ""
    mode: str = ""
    acl: tuple[str, ...] = ()
    token_files: tuple[str, ...] = ()


@dataclass(frozen=True)
class MemberCache:
    name: str
    state: str  # symlink | dir | file | missing
    detail: str = ""  # the link target, or the directory's size in bytes


@dataclass(frozen=True)
class Disk:
    path: str
    total_bytes: int
    free_bytes: int


@dataclass(frozen=True)
class Docker:
    installed: bool
    version: str | None
    active: bool
    enabled: bool
    running_containers: int
    runtimes: tuple[str, ...]
    # docker-ce / docker.io (and containerd.io, nvidia-container-toolkit) → version, if installed
    packages: dict[str, str] = field(default_factory=dict)
    repo_reachable: bool | None = None  # download.docker.com, probed only when it matters


@dataclass(frozen=True)
class Unit:
    """A systemd unit's state as `systemctl is-active` / `is-enabled` print it."""

    active: str
    enabled: str


@dataclass(frozen=True)
class MemberDaemon:
    """A member's (or the service account's) own rootless Docker daemon as root sees it from
    outside."""

    name: str
    linger: bool  # her systemd user manager runs without a login (/var/lib/systemd/linger)
    unit: bool  # ~/.config/systemd/user/docker.service, a regular file
    socket: bool  # /run/user/UID/docker.sock exists
    context: str  # her docker CLI's current context ("" = default: the system socket)
    # provision's images (repository:tag) in this daemon: read for the service account only
    images: tuple[str, ...] = ()


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    driver: str
    compute_capability: str
    memory_mib: int
    uuid: str


@dataclass(frozen=True)
class Nvidia:
    pci_devices: tuple[str, ...]
    gpus: tuple[Gpu, ...]
    smi_error: str
    ctk_version: str | None

    @property
    def has_gpu(self) -> bool:
        return bool(self.pci_devices or self.gpus)

    @property
    def driver(self) -> str | None:
        """The NVIDIA driver version (one per host, whatever its GPUs), when nvidia-smi answers."""
        return self.gpus[0].driver if self.gpus else None


@dataclass(frozen=True)
class IdRange:
    """One line of /etc/subuid or /etc/subgid: `owner` is given `count` ids from `start`."""

    owner: str
    start: int
    count: int

    @property
    def end(self) -> int:
        return self.start + self.count - 1

    def overlaps(self, other: IdRange) -> bool:
        return self.start <= other.end and other.start <= self.end

    def __str__(self) -> str:
        return f"{self.start}-{self.end}"


def read_ranges(text: str | None) -> list[IdRange]:
    """/etc/subuid or /etc/subgid (`owner:start:count` lines) → ranges; junk lines skipped."""
    ranges = []
    for line in (text or "").splitlines():
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit() and int(parts[2]):
            ranges.append(IdRange(parts[0], int(parts[1]), int(parts[2])))
    return ranges


@dataclass(frozen=True)
class HostFacts:
    os: OSInfo
    init: str
    system_state: str
    uid: int
    sudo_user: str
    accounts: dict[str, Account]
    groups: dict[str, Group]
    sshd: Sshd
    cache: CacheDir
    member_caches: dict[str, MemberCache]
    disk: Disk | None
    paths: dict[str, PathState]
    tools: tuple[str, ...]
    sudoers_d: tuple[str, ...]
    docker: Docker
    nvidia: Nvidia
    apt_lock_holder: str | None
    state: dict[str, Any] = field(default_factory=dict)
    cache_models: tuple[str, ...] = ()  # models--org--name folders in the shared cache's hub
    images: tuple[str, ...] = ()  # provision's images (repository:tag) in the host's Docker
    units: dict[str, Unit] = field(default_factory=dict)  # the units provision manages
    member_daemons: dict[str, MemberDaemon] = field(default_factory=dict)
    listeners: tuple[Listener, ...] = ()  # TCP ports in use on the host

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def path(self, path: str) -> PathState:
        """What the facts saw at `path` (asked for through gather.facts_request)."""
        return self.paths.get(path, PathState(path, "missing"))

    def text(self, path: str) -> str | None:
        return self.path(path).content

    def json_object(self, path: str) -> dict[str, Any]:
        """A JSON record provision keeps on the host; missing or unreadable reads as empty."""
        return json_object_or_empty(self.text(path))

    def groups_of(self, user: str) -> set[str]:
        primary = {g.name for g in self.groups.values()
                   if user in self.accounts and g.gid == self.accounts[user].gid}
        return primary | {g.name for g in self.groups.values() if user in g.members}


def split_sections(transcript: str) -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in transcript.splitlines():
        if line.startswith(SECTION):
            current = sections.setdefault(line[len(SECTION):].strip(), [])
        elif current is not None:
            current.append(line)
    if "end" not in sections:
        raise FactsUnreadable("the host's answer ended early (no end marker)",
                              "rerun; if it persists, run with -v to see what the host printed",
                              detail=transcript)
    return {name: [ln for ln in lines if ln.strip()] for name, lines in sections.items()}


def parse_facts(transcript: str, cache_dir: str) -> HostFacts:
    """Pure: the facts script's output → HostFacts; output it cannot read is one clear error."""
    try:
        return _parse_sections(split_sections(transcript), cache_dir)
    except (ValueError, IndexError) as exc:
        raise FactsUnreadable(f"the host's facts could not be read ({exc})",
                              "run with -v to see what the host printed, and report it",
                              detail=transcript) from None


def _parse_sections(s: dict[str, list[str]], cache_dir: str) -> HostFacts:
    paths = _paths(s.get("paths", []))
    state_text = paths[STATE_FILE].content if STATE_FILE in paths else None
    accounts = _accounts(s.get("passwd", []), s.get("account-status", []), paths)
    identity = _key_values(s.get("identity", []), "=")
    init_lines = s.get("init", [])
    return HostFacts(
        os=_os(s),
        init=init_lines[0].strip() if init_lines else "",
        system_state=init_lines[1].strip() if len(init_lines) > 1 else "",
        uid=int(identity.get("uid", "-1")),
        sudo_user=identity.get("sudo_user", ""),
        accounts=accounts,
        groups=_groups(s.get("group", [])),
        sshd=_sshd(s),
        cache=_cache(cache_dir, s),
        member_caches=_member_caches(s.get("member-caches", [])),
        disk=_disk(s.get("disk", [])),
        paths=paths,
        tools=tuple(ln.strip() for ln in s.get("tools", [])),
        sudoers_d=tuple(ln.strip() for ln in s.get("sudoers-d", [])),
        docker=_docker(s.get("docker", []), s.get("docker-runtimes", []), s.get("packages", []),
                       s.get("docker-repo", [])),
        nvidia=_nvidia(s),
        apt_lock_holder=_apt_lock_holder(s.get("apt-locks", [])),
        state=json_object_or_empty(state_text),
        cache_models=tuple(ln.strip() for ln in s.get("cache-models", [])),
        images=tuple(ln.strip().removeprefix("image=") for ln in s.get("docker", [])
                     if ln.startswith("image=")),
        units={parts[0]: Unit(parts[1], parts[2] if len(parts) > 2 else "")
               for parts in (ln.strip().removeprefix("unit=").split()
                             for ln in s.get("docker", []) if ln.startswith("unit="))
               if len(parts) >= 2},
        member_daemons=_member_daemons(s.get("rootless", []), paths),
        listeners=tuple(_listener(ln) for ln in s.get("listening", [])),
    )


def _key_values(lines: list[str], sep: str) -> dict[str, str]:
    pairs = (ln.partition(sep) for ln in lines if sep in ln)
    return {k.strip(): v.strip().strip('"') for k, _, v in pairs}


def _os(s: dict[str, list[str]]) -> OSInfo:
    release = _key_values(s.get("os-release", []), "=")
    uname = [*s.get("uname", []), "", "", ""]
    return OSInfo(
        id=release.get("ID", "unknown"),
        version_id=release.get("VERSION_ID", ""),
        codename=release.get("VERSION_CODENAME", ""),
        pretty_name=release.get("PRETTY_NAME", ""),
        arch=uname[0].strip(), kernel=uname[1].strip(), hostname=uname[2].strip(),
    )


def _accounts(passwd: list[str], status: list[str],
              paths: dict[str, PathState]) -> dict[str, Account]:
    asked = {p[0]: p for p in (ln.split() for ln in status) if len(p) == 3}
    accounts = {}
    for line in passwd:
        parts = line.split(":")
        if len(parts) < 7:
            continue
        status = asked.get(parts[0])
        keys = None
        if status and status[2] == "-":  # her authorized_keys was read as an asked path
            keys = key_lines(paths.get(f"~{parts[0]}/.ssh/authorized_keys"))
        elif status and status[2].isdigit():
            keys = int(status[2])
        accounts[parts[0]] = Account(parts[0], int(parts[2]), int(parts[3]), parts[5], parts[6],
                                     status[1] == "expired" if status else None, keys)
    return accounts


def key_lines(path: PathState | None) -> int:
    """Key lines of an authorized_keys file read as a path, counted as the facts script's grep
    counts them elsewhere (a line that starts with neither '#' nor blank space); 0 when it is
    no regular file (a link she planted is never read)."""
    return sum(1 for line in _file_lines(path) if line and line[0] not in "# \t\r\f\v")


def _file_lines(path: PathState | None) -> list[str]:
    """The lines of a regular file read as an asked path; none for anything else (a link she
    planted is never read, a missing file has no lines)."""
    content = path.content if path is not None and path.kind == "file" else None
    return (content or "").split("\n")


def _groups(lines: list[str]) -> dict[str, Group]:
    groups = {}
    for line in lines:
        parts = line.split(":")
        if len(parts) == 4:
            members = tuple(m for m in parts[3].split(",") if m)
            groups[parts[0]] = Group(parts[0], int(parts[2]), members)
    return groups


def _sshd(s: dict[str, list[str]]) -> Sshd:
    test = s.get("sshd-test", [])
    exit_line = next((ln for ln in reversed(test) if ln.startswith("exit=")), "exit=1")
    effective = {}
    for line in s.get("sshd-effective", []):
        key, _, value = line.partition(" ")
        effective[key.lower()] = value.strip()
    includes = any("sshd_config.d" in ln for ln in s.get("sshd-include", []))
    ports = tuple(int(value) for key, _, value in (ln.strip().partition(" ")
                                                   for ln in s.get("sshd-effective", []))
                  if key.lower() == "port" and value.isdigit())
    return Sshd(test_ok=exit_line == "exit=0",
                test_error="\n".join(ln for ln in test if not ln.startswith("exit=")),
                effective=effective, includes_dropins=includes, ports=ports)


def _listener(line: str) -> Listener:
    """One line of `ss -ltnpe` ("LISTEN 0 4096 127.0.0.1:8000 0.0.0.0:* users:(("docker-proxy",
    pid=9,fd=4)) uid:999 ino:…"), or of the facts script's fallback without ss ("proc
    0100007F:1F40 999 docker-proxy", the kernel's hex of /proc/net/tcp)."""
    if line.startswith("proc "):
        _, local, uid, *names = line.split(maxsplit=3)
        address_hex, port_hex = local.split(":")
        raw = bytes.fromhex(address_hex)
        # The kernel prints each 32-bit word of the address in host (little-endian) order.
        address = ipaddress.ip_address(b"".join(raw[i:i + 4][::-1]
                                                for i in range(0, len(raw), 4)))
        # A dual-stack socket bound to one IPv4 address shows it IPv4-mapped.
        address = getattr(address, "ipv4_mapped", None) or address
        return Listener(str(address), int(port_hex, 16),
                        tuple(names[0].split(",")) if names else (), int(uid))
    local = line.split()[3]
    address, _, port = local.rpartition(":")
    uid = re.search(r"\buid:(\d+)", line)
    return Listener(address.strip("[]").partition("%")[0], int(port),
                    tuple(dict.fromkeys(re.findall(r'\("([^"]*)",pid=', line))),
                    int(uid.group(1)) if uid else 0)


def _cache(path: str, s: dict[str, list[str]]) -> CacheDir:
    stat = s.get("cache-dir", [])
    tokens = tuple(s.get("cache-tokens", []))
    if not stat:
        return CacheDir(path=path, exists=False, token_files=tokens)
    kind, owner, group, mode = ([*stat[0].split("|"), "", "", "", ""])[:4]
    acl = tuple(ln for ln in s.get("cache-acl", []) if not ln.startswith("#"))
    return CacheDir(path, True, kind, owner, group, mode, acl, tokens)


def _member_caches(lines: list[str]) -> dict[str, MemberCache]:
    caches = {}
    for line in lines:
        name, state, detail = ([*line.split("|", 2), "", ""])[:3]
        caches[name] = MemberCache(name, state, detail)
    return caches


def _member_daemons(lines: list[str], paths: dict[str, PathState]) -> dict[str, MemberDaemon]:
    daemons = {}
    for line in lines:
        name, linger, unit, socket, context, images = ([*line.split("|", 5), "", "", "", "",
                                                        ""])[:6]
        if context.strip() == "-":  # her docker config was read as an asked path
            context = docker_context(paths.get(f"~{name}/{DOCKER_CONFIG}"))
        daemons[name] = MemberDaemon(name, linger == "yes", unit == "yes", socket == "yes",
                                     context.strip(),
                                     tuple(i for i in images.strip().split(",") if i))
    return daemons


_CURRENT_CONTEXT = re.compile(r'.*"currentContext": *"([^"]*)"')


def docker_context(path: PathState | None) -> str:
    """The current context of a docker CLI config read as a path, found as the facts script's
    sed finds it elsewhere (on the first line that names one, its last mention there); "" when
    none, or when it is no regular file (a link she planted is never read)."""
    found = (_CURRENT_CONTEXT.match(line) for line in _file_lines(path))
    return next((m.group(1) for m in found if m), "")


def _disk(lines: list[str]) -> Disk | None:
    if not lines:
        return None
    parts = lines[-1].split()
    if len(parts) < 6 or not parts[1].isdigit():
        return None
    return Disk(path=parts[5], total_bytes=int(parts[1]), free_bytes=int(parts[3]))


def _paths(lines: list[str]) -> dict[str, PathState]:
    paths = {}
    for line in lines:
        parts = line.split("|")
        if parts[0] == TIMED_OUT:
            # What the batch did not see would read as missing, and be planned as new files.
            what, seconds = ([*parts[1:], "", ""])[:2]
            raise FactsUnreadable(f"reading the asked paths ({what}) ran past {seconds} s "
                                  "on the host", "a member's special file or a hung mount may "
                                  "hold it: rerun, and with -v see what the host printed")
        if len(parts) == 6:
            name, kind, owner, group, mode, extra = parts
            content = (extra if extra.startswith("sha256:") else
                       base64.b64decode(extra).decode("utf-8", errors="replace")
                       ) if kind == "file" else None
            target = extra if kind == "link" else ""
            paths[name] = PathState(name, kind, owner, group, mode, target, content)
        elif parts[0]:
            paths[parts[0]] = PathState(parts[0], "missing")
    return paths


def _docker(lines: list[str], runtime_lines: list[str], packages: list[str],
            repo: list[str]) -> Docker:
    values = _key_values([ln for ln in lines if "=" in ln], "=")
    plain = [ln.strip() for ln in lines if "=" not in ln]
    installed = any(ln.endswith("/docker") for ln in plain)
    version = next((ln for ln in plain if re.match(r"^\d+\.\d+", ln)), None)
    try:
        runtimes = tuple(sorted(json.loads(runtime_lines[0]))) if runtime_lines else ()
    except (json.JSONDecodeError, TypeError):
        runtimes = ()
    running = values.get("running", "0")
    return Docker(installed=installed, version=version, active=values.get("active") == "active",
                  enabled=values.get("enabled") == "enabled",
                  running_containers=int(running) if running.isdigit() else 0,
                  runtimes=runtimes,
                  packages={p[0]: p[1] for p in (ln.split() for ln in packages) if len(p) >= 2},
                  repo_reachable={"reachable": True, "unreachable": False}.get(
                      repo[0].strip() if repo else ""))


def _nvidia(s: dict[str, list[str]]) -> Nvidia:
    smi = s.get("nvidia-smi", [])
    ok = bool(smi) and smi[-1] == "exit=0"
    gpus = []
    if ok:
        for line in smi[:-1]:
            cells = [c.strip() for c in line.split(",")]
            if len(cells) >= 6 and cells[0].isdigit():
                memory = cells[4].split()[0]
                gpus.append(Gpu(int(cells[0]), cells[1], cells[2], cells[3],
                                int(memory) if memory.isdigit() else 0, cells[5]))
    error = "" if ok else "\n".join(ln for ln in smi if not ln.startswith("exit="))
    ctk = s.get("nvidia-ctk", [])
    ctk_version = ctk[0].split()[-1] if ctk else None
    return Nvidia(tuple(s.get("nvidia-pci", [])), tuple(gpus), error, ctk_version)


def _apt_lock_holder(lines: list[str]) -> str | None:
    """Match the dpkg/apt lock files' inodes against /proc/locks: who holds apt right now."""
    inodes = {p[2]: p[1] for p in (ln.split() for ln in lines if ln.startswith("inode "))
              if len(p) == 3}
    for line in lines:
        parts = line.split(maxsplit=4)
        if parts[0] == "lock" and len(parts) >= 3 and parts[2] in inodes:
            comm = parts[3] if len(parts) > 3 else "?"
            return f"{comm} (pid {parts[1]}) holds {inodes[parts[2]]}"
    return None


def json_object_or_empty(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}
