"""`provision gpus`: who holds which GPU on a shared host, and since when.

One round trip per refresh (templates/host/gpu-usage.sh.j2, run as root) reads nvidia-smi's
GPUs and compute processes, then each process's uid, cgroup, age and name from /proc. Parsing
is pure and tested on transcripts:

- A process is in a container when a component of its cgroup path is a container id
  (`docker-<id>.scope`, `/docker/<id>`, or `<id>` under a rootless daemon's cgroup). The
  daemon is the owner of the `user@UID.service` above it (rootless), else the system one. Paths
  are read from where the host's own init sits, so a host that is itself a container (the
  sandbox) does not count as one.
- Whose it is: a rootless container's processes belong to the daemon's owner (their uids are
  her subordinate ids); anything else to its uid, or to the account whose subordinate range
  holds that uid. Then "member NAME", "service" (the generation service's account) or
  "other: USER".
- Idle: nvidia-smi gives utilisation now, per GPU, not its history nor per process. The script
  keeps a record on the host (ACTIVITY_RECORD) of when a refresh first saw each process on its
  GPU and when one last saw that GPU busy (utilisation above 0) with it; a process is idle
  when that moment (or, never seen busy, its first sighting) is `idle_after` ago or more. So
  idleness is measured from what refreshes saw: between refreshes nothing is sampled, and a
  process sharing a GPU with a busy one is never called idle. Nothing is stopped.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import asdict, dataclass

from provision.connection import Connection
from provision.errors import InventoryError, RemoteCommandFailed
from provision.facts import SECTION_FUNCTION, IdRange, read_ranges, split_sections
from provision.inventory import SERVICE_NAME, Inventory
from provision.templating import render

ACTIVITY_RECORD = "/var/lib/provision/gpu-activity.csv"
# A container's record (config.v2.json) is read up to this size: it is a few kB, bounded so a
# member's file cannot flood the answer.
RECORD_BYTES = 1 << 20
NO_GPU = "no NVIDIA GPU on this host"
DEFAULT_IDLE_AFTER = "2h"

# A cgroup path component that names a container: docker's systemd scope, its cgroupfs
# directory, or the bare id (a rootless daemon's cgroupfs driver, under the daemon's service).
CONTAINER_COMPONENT = re.compile(r"^(?:docker-)?([0-9a-f]{64})(?:\.scope)?$")
DAEMON_OWNER = re.compile(r"/user@(\d+)\.service(?:/|$)")
DURATION = re.compile(r"^(\d+)([smhd]?)$")
UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class Container:
    id: str
    name: str | None  # None: no daemon we may ask has a record of it
    image: str | None
    daemon: str  # "system", or "rootless: NAME" (whose own daemon)
    # A dev container in the system daemon: whose workspace folder it was made for (the Dev
    # Containers CLI's devcontainer.local_folder label), whatever user it runs as.
    made_for: str | None = None


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    gpu: int
    memory_mib: int | None
    owner: str  # "member NAME", "service", "other: USER", or "unknown" (it exited meanwhile)
    member: str | None
    comm: str
    running_s: int | None
    container: Container | None
    idle_s: int  # since a refresh last saw its GPU busy (or first saw it, if never busy)
    idle: bool

    def to_json(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str
    name: str
    memory_used_mib: int | None
    memory_total_mib: int | None
    utilisation: int | None  # percent, now; None where the GPU does not report it
    processes: tuple[GpuProcess, ...] = ()

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "processes": [p.to_json() for p in self.processes]}


@dataclass(frozen=True)
class Assignment:
    """A member's `gpus` from the inventory against the GPUs her processes are on."""

    member: str
    assigned: str  # "all", "none", "0", "0,1"
    using: tuple[int, ...]
    outside: tuple[int, ...]  # GPUs she uses that are not hers

    @property
    def line(self) -> str:
        using = _and(self.using) if self.using else "none"
        line = f"{self.member}: assigned {self.assigned}, using {using}"
        return line + (f" (outside her assignment: {_and(self.outside)})" if self.outside else "")


@dataclass(frozen=True)
class GpuReport:
    host: str
    idle_after_s: int
    gpus: tuple[Gpu, ...] = ()
    assignments: tuple[Assignment, ...] = ()
    no_gpu: bool = False
    taken_at: int = 0  # the host's clock, epoch seconds

    @property
    def unused(self) -> tuple[int, ...]:
        return tuple(g.index for g in self.gpus if not g.processes)

    @property
    def processes(self) -> tuple[GpuProcess, ...]:
        return tuple(p for g in self.gpus for p in g.processes)

    def to_json(self) -> dict[str, object]:
        return {"host": self.host, "taken_at": self.taken_at, "no_gpu": self.no_gpu,
                "idle_after_s": self.idle_after_s,
                "idle_measured_from": "the last refresh that saw the process's GPU busy, else "
                                      "the first refresh that saw the process",
                "gpus": [g.to_json() for g in self.gpus], "unused": list(self.unused),
                "assignments": [{**asdict(a), "line": a.line} for a in self.assignments]}


def _and(indexes: tuple[int, ...]) -> str:
    words = [str(i) for i in indexes]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def parse_duration(text: str) -> int:
    """`--idle-after`: 90m, 2h, 1d, 45s or plain seconds → seconds."""
    match = DURATION.match(text.strip())
    if not match:
        raise InventoryError(f"--idle-after {text!r}", "give a duration like 30m, 2h or 1d")
    return int(match[1]) * UNITS[match[2]]


def usage_script(inventory: Inventory) -> str:
    readers = " ".join([*(m.name for m in inventory.members), SERVICE_NAME])
    return render("host/gpu-usage.sh.j2", section_function=SECTION_FUNCTION, readers=readers,
                  record_bytes=RECORD_BYTES, activity=shlex.quote(ACTIVITY_RECORD))


def read_usage(conn: Connection, inventory: Inventory, host: str,
               idle_after_s: int) -> GpuReport:
    result = conn.run(usage_script(inventory), what="gpu usage", check=False, timeout=120)
    if not result.ok:
        raise RemoteCommandFailed(f"{host}: the gpu usage script failed: {result.tail()}",
                                  "rerun with -v for the full output", detail=result.output())
    return parse_usage(result.stdout, inventory, host, idle_after_s)


def parse_usage(transcript: str, inventory: Inventory, host: str,
                idle_after_s: int) -> GpuReport:
    """Pure: the script's output → who uses which GPU."""
    sections = split_sections(transcript)
    now = int(sections["now"][0])
    smi = sections.get("smi", [])
    if smi == ["missing"] or (smi and smi[0] != "exit=0" and _no_devices(smi)):
        return GpuReport(host, idle_after_s, no_gpu=True, taken_at=now)
    if not smi or smi[0] != "exit=0":
        raise RemoteCommandFailed(f"{host}: nvidia-smi failed: {' '.join(smi[1:])[:200]}",
                                  f"provision doctor {host} (the driver, the nvidia step)")
    accounts = _accounts(sections.get("accounts", []))
    context = _Context(
        inventory=inventory, accounts=accounts,
        ranges=read_ranges("\n".join(sections.get("subuid", []))),
        init=_cgroups(sections.get("init-cgroup", [])),
        system=_system_containers(sections.get("system-containers", [])),
        rootless=_rootless_records(sections, accounts),
        activity=_activity(sections.get("activity", [])),
        now=now, idle_after_s=idle_after_s)
    by_uuid: dict[str, list[GpuProcess]] = {}
    gpus = [_gpu(line) for line in smi[1:]]
    index_of = {g.uuid: g.index for g in gpus}
    utilisation = {g.uuid: g.utilisation for g in gpus}
    for line in sections.get("apps", []):
        fields = [f.strip() for f in line.split(",")]
        if len(fields) < 3 or not fields[1].isdigit() or fields[0] not in index_of:
            continue
        uuid, pid = fields[0], int(fields[1])
        by_uuid.setdefault(uuid, []).append(context.process(
            pid, index_of[uuid], uuid, _number(fields[2]), utilisation[uuid],
            sections.get(f"pid {pid}", ["gone"])))
    held = tuple(Gpu(g.index, g.uuid, g.name, g.memory_used_mib, g.memory_total_mib,
                     g.utilisation, tuple(by_uuid.get(g.uuid, ()))) for g in gpus)
    return GpuReport(host, idle_after_s, held, assignments(held, inventory), taken_at=now)


def _no_devices(smi: list[str]) -> bool:
    """nvidia-smi installed, no GPU: what it says on a host whose card is gone."""
    return any("No devices were found" in line for line in smi)


def _gpu(line: str) -> Gpu:
    index, uuid, name, used, total, util = (f.strip() for f in line.split(",", 5))
    return Gpu(int(index), uuid, name, _number(used), _number(total), _number(util))


def _number(text: str) -> int | None:
    """nvidia-smi's numbers; "[N/A]" or "[Not Supported]" (MIG, some boards) is None."""
    try:
        return int(float(text))
    except ValueError:
        return None


def _accounts(lines: list[str]) -> dict[int, str]:
    return {int(uid): name for name, _, uid in (ln.partition(":") for ln in lines)
            if uid.isdigit()}


def _cgroups(lines: list[str]) -> dict[str, str]:
    """/proc/PID/cgroup (`id:controllers:path`) → path by hierarchy."""
    paths = {}
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3:
            paths[f"{parts[0]}:{parts[1]}"] = parts[2]
    return paths


def _system_containers(lines: list[str]) -> dict[str, tuple[str, str, str | None]]:
    """id → (name, image, the owner of its dev container folder or None)."""
    found = {}
    for line in lines:
        parts = line.split()
        if len(parts) in (3, 4):
            found[parts[0]] = (parts[1], parts[2], parts[3] if len(parts) == 4 else None)
    return found


def _rootless_records(sections: dict[str, list[str]], accounts: dict[int, str]
                      ) -> dict[tuple[str, str], tuple[str | None, str | None]]:
    """(owner, container id) → (name, image), from her daemon's config.v2.json."""
    records = {}
    for title, lines in sections.items():
        kind, _, rest = title.partition(" ")
        owner, _, cid = rest.partition(" ")
        if kind != "container" or not owner.isdigit():
            continue
        try:
            config = json.loads("\n".join(lines))
        except json.JSONDecodeError:
            continue  # cut at RECORD_BYTES, or not a record: the id is all we say
        name = str(config.get("Name", "")).lstrip("/") or None
        image = (config.get("Config") or {}).get("Image")
        records[(accounts.get(int(owner), owner), cid)] = (name, image)
    return records


def _activity(lines: list[str]) -> dict[tuple[str, str, str], tuple[int, int]]:
    """The host's record: `uuid,pid,start,first_seen,last_busy` → (first_seen, last_busy) by
    (uuid, pid, start: a pid used again is another process); last_busy 0: never seen busy."""
    found = {}
    for line in lines:
        parts = line.split(",")
        if len(parts) == 5 and all(p.isdigit() for p in parts[1:]):
            found[(parts[0], parts[1], parts[2])] = (int(parts[3]), int(parts[4]))
    return found


@dataclass(frozen=True)
class _Context:
    """What one transcript says about accounts, daemons and activity, to attribute a pid."""

    inventory: Inventory
    accounts: dict[int, str]
    ranges: list[IdRange]
    init: dict[str, str]
    system: dict[str, tuple[str, str, str | None]]
    rootless: dict[tuple[str, str], tuple[str | None, str | None]]
    activity: dict[tuple[str, str, str], tuple[int, int]]
    now: int
    idle_after_s: int

    @property
    def members(self) -> frozenset[str]:
        return frozenset(m.name for m in self.inventory.members)

    def process(self, pid: int, gpu: int, uuid: str, memory: int | None,
                utilisation: int | None, lines: list[str]) -> GpuProcess:
        facts = dict(ln.split("=", 1) for ln in lines if "=" in ln and
                     not ln.startswith("cgroup="))
        first_seen, last_busy = self.activity.get((uuid, str(pid), facts.get("start", "")),
                                                  (self.now, 0))
        idle_s = max(0, self.now - (last_busy or first_seen))
        # At 0 % now, and long enough; utilisation unknown: nothing says it is idle.
        idle = utilisation == 0 and idle_s >= self.idle_after_s
        if lines == ["gone"] or "uid" not in facts:
            return GpuProcess(pid, gpu, memory, "unknown", None, "exited", None, None,
                              idle_s, False)
        container, daemon_owner = self.container(
            _cgroups([ln[len("cgroup="):] for ln in lines if ln.startswith("cgroup=")]))
        account = daemon_owner or self.account(int(facts["uid"]))
        owner, member = self.owner(account, container)
        etimes = facts.get("etimes", "")
        return GpuProcess(pid, gpu, memory, owner, member, facts.get("comm", "?"),
                          int(etimes) if etimes.isdigit() else None, container, idle_s, idle)

    def account(self, uid: int) -> str:
        """Its account, or the account whose subordinate range holds it (a rootless
        container's user), or the bare uid."""
        if uid in self.accounts:
            return self.accounts[uid]
        for span in self.ranges:
            if span.start <= uid <= span.end:
                return span.owner
        return str(uid)

    def container(self, cgroups: dict[str, str]) -> tuple[Container | None, str | None]:
        """The innermost container on any hierarchy's path below the host's own root, and
        the rootless daemon's owner when it is one of hers."""
        for hierarchy, path in cgroups.items():
            root = self.init.get(hierarchy, "").removesuffix("/init.scope")
            if root and (path == root or path.startswith(root + "/")):
                path = path[len(root):] or "/"
            ids = [m[1] for c in path.split("/") if (m := CONTAINER_COMPONENT.match(c))]
            if not ids:
                continue
            cid = ids[-1]
            above = path[:path.rindex(cid)]
            if owner := DAEMON_OWNER.search(above):
                name = self.account(int(owner[1]))
                record = self.rootless.get((name, cid), (None, None))
                return Container(cid, *record, daemon=f"rootless: {name}"), name
            named = self.system.get(cid) or (None, None, None)
            return Container(cid, named[0], named[1], daemon="system", made_for=named[2]), None
        return None, None

    def owner(self, account: str, container: Container | None) -> tuple[str, str | None]:
        if account in self.members:
            return f"member {account}", account
        if container and container.made_for in self.members:
            return f"member {container.made_for}", container.made_for
        if account == SERVICE_NAME or (container and container.daemon == "system"
                                       and container.name == SERVICE_NAME):
            return "service", None
        return f"other: {account}", None


def assigned_indexes(gpus: str, all_gpus: tuple[int, ...]) -> tuple[int, ...]:
    """A member's `gpus` ("all", "none", "0,1") as indexes on this host."""
    if gpus == "all":
        return all_gpus
    if gpus == "none":
        return ()
    return tuple(int(i) for i in gpus.split(","))


def assignments(gpus: tuple[Gpu, ...], inventory: Inventory) -> tuple[Assignment, ...]:
    """Every member: her assignment against the GPUs her processes are on."""
    indexes = tuple(g.index for g in gpus)
    found = []
    for member in inventory.members:
        using = tuple(sorted({g.index for g in gpus for p in g.processes
                              if p.member == member.name}))
        allowed = assigned_indexes(member.gpus, indexes)
        found.append(Assignment(member.name, member.gpus, using,
                                tuple(i for i in using if i not in allowed)))
    return tuple(found)


def unowned(report: GpuReport) -> tuple[GpuProcess, ...]:
    """GPU memory held by a process neither a member's nor the service's (one that exited
    between nvidia-smi and /proc is nobody's to blame)."""
    return tuple(p for p in report.processes
                 if p.member is None and p.owner not in ("service", "unknown"))
