"""What the tool sees on a host: one remote script, one round trip, one pure parse.

Like a pyinfra fact, each section is a command whose raw output is kept; `parse_facts` turns
the whole transcript into a frozen `HostFacts` tree. Tests feed it transcripts recorded on
Ubuntu 22.04/24.04 (with and without an H100) and Debian 12.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from provision.connection import Connection
from provision.errors import FactsUnreadable, RemoteCommandFailed
from provision.inventory import SERVICE_NAME, Inventory

SECTION = "@@@provision:"
STATE_FILE = "/var/lib/provision/state.json"
DAEMON_JSON = "/etc/docker/daemon.json"
DPKG_LOCKS = ("/var/lib/dpkg/lock-frontend", "/var/lib/dpkg/lock", "/var/lib/apt/lists/lock")
# How long the facts read may go without a word from the host before it fails (the script bounds
# each read of a member's files far below it; this is for a hung mount, a stuck daemon).
FACTS_TIMEOUT_SECONDS = 120
# The line the paths section prints for a batch that ran past its time limit.
TIMED_OUT = "timed-out"

# POSIX sh: runs on any target, never stops at a failing probe, prints every section.
FACTS_SCRIPT = r"""
set +e
export LC_ALL=C PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH"
sec() { printf '\n@@@provision:%s\n' "$1"; }
home_of() { getent passwd "$1" | cut -d: -f6; }
# Root never looks through a member's link (to the admin's ~/.ssh, to /root) and never opens
# her FIFO or other special file (it would hold the read forever).
# True when no component of her path $2 below her home $1 is a symbolic link.
unlinked() { _p=$1 _r=$2
  while [ -n "$_r" ]; do
    _p="$_p/${_r%%/*}"; [ -L "$_p" ] && return 1
    case $_r in */*) _r=${_r#*/};; *) _r=;; esac
  done; }
# Her file $1, when it is a regular one and no link, on the stdin of "$@", read within 5 s (no
# command: only whether it is); dd never follows a link swapped in since, nor waits on a FIFO.
regular_in='f=$1; shift; [ -f "$f" ] && [ ! -L "$f" ] && { [ $# -eq 0 ] ||
  timeout 5 dd if="$f" iflag=nofollow,nonblock status=none 2>/dev/null | "$@"; }'
# regular_in for her file $3 below her home $2: in this shell where no link of hers is on the
# way (no process more than the read needs: a team has many members), else as her ($1).
member_file() { _u=$1 _f="$2/$3"
  if unlinked "$2" "$3"; then shift 3; set -- "$_f" "$@"; eval "$regular_in"
  else shift 3; (cd / && timeout 5 runuser -u "$_u" -- sh -c "$regular_in" sh "$_f" "$@"); fi; }
# Members a previous run managed stay of interest after they leave the inventory (offboarding).
PROVISION_ACCOUNTS=$(printf '%s\n' $PROVISION_ACCOUNTS $(sed -n 's/.*"members": *\[\([^]]*\)\].*/\1/p' /var/lib/provision/state.json 2>/dev/null | tr -d '",') | sort -u)
sec os-release; cat /etc/os-release 2>/dev/null
sec uname; uname -m; uname -r; hostname
sec init; cat /proc/1/comm 2>/dev/null; systemctl is-system-running 2>/dev/null
sec identity; echo "uid=$(id -u)"; echo "sudo_user=${SUDO_USER:-}"
sec passwd; getent passwd
sec group; getent group
sec account-status
today=$(( $(date +%s) / 86400 ))
for u in $PROVISION_ACCOUNTS; do
  k=$(member_file "$u" "$(home_of "$u")" .ssh/authorized_keys grep -cE '^[^#[:space:]]')
  getent shadow "$u" | awk -F: -v t="$today" -v k="${k:-0}" '{print $1, ($8 != "" && $8 <= t) ? "expired" : "active", k}'
done
sec sudoers-d; ls -1 /etc/sudoers.d 2>/dev/null
sec sshd-test; sshd -t 2>&1; echo "exit=$?"
sec sshd-effective; sshd -T 2>/dev/null | grep -iE '^(clientalive|port |permitrootlogin|passwordauthentication|authorizedkeysfile)'
sec sshd-include; grep -iE '^[[:space:]]*Include' /etc/ssh/sshd_config 2>/dev/null
sec listening
# TCP listeners and who holds them (process names, uid): ss, else (no iproute2) the kernel's
# tables joined to each process's sockets, as "proc ADDRESS:PORT UID NAME,…" (kernel hex).
if command -v ss >/dev/null; then ss -ltnpe 2>/dev/null | grep '^LISTEN'; else
  { awk '$4 == "0A" { print "L", $10, $2, $8 }' /proc/net/tcp /proc/net/tcp6 2>/dev/null
    find /proc/[0-9]*/fd -lname 'socket:*' -printf 'S %l %h\n' 2>/dev/null; } | awk '
    $1 == "L" { addr[$2] = $3; uid[$2] = $4; next }
    { ino = $2; gsub(/[^0-9]/, "", ino); if (!(ino in addr)) next
      pid = $3; sub(/^\/proc\//, "", pid); sub(/\/fd$/, "", pid)
      f = "/proc/" pid "/comm"; name = ""; getline name < f; close(f)
      if (name != "" && index("," names[ino] ",", "," name ",") == 0)
        names[ino] = names[ino] (names[ino] == "" ? "" : ",") name }
    END { for (i in addr) print "proc", addr[i], uid[i], names[i] }'
fi
sec cache-dir; stat -c '%F|%U|%G|%a' "$PROVISION_CACHE_DIR" 2>/dev/null
sec cache-acl; getfacl -cp "$PROVISION_CACHE_DIR" 2>/dev/null
sec cache-tokens; find "$PROVISION_CACHE_DIR" -maxdepth 2 -name token -type f 2>/dev/null
sec cache-models; ls -1 "$PROVISION_CACHE_DIR/hub" 2>/dev/null | grep '^models--'
sec disk
p="$PROVISION_CACHE_DIR"; while [ ! -e "$p" ]; do p=$(dirname "$p"); done
df -P -B1 "$p" 2>/dev/null | tail -n 1
sec member-caches
for u in $PROVISION_ACCOUNTS; do
  h=$(home_of "$u"); [ -n "$h" ] || continue; l="$h/.cache/huggingface"
  # Her ~/.cache a link: where it leads is said, never looked into.
  if ! unlinked "$h" .cache; then echo "$u|symlink|$(readlink "$h/.cache")/huggingface"
  elif [ -L "$l" ]; then echo "$u|symlink|$(readlink "$l")"
  elif [ -d "$l" ]; then echo "$u|dir|$(timeout 30 du -sb "$l" 2>/dev/null | cut -f1)"
  elif [ -e "$l" ]; then echo "$u|file|"
  else echo "$u|missing|"; fi
done
sec paths
# Every asked path in a handful of processes (a team asks for hundreds): awk expands "~name/…"
# through the passwd database; one stat, one sha256sum and one reader serve them all.
# "sha256:PATH" asks for a file's digest instead of its content. Only regular files are read,
# never through a last link nor waiting on a FIFO (dd). A path below a link in a member's home
# (or through "..") is looked at as her, with her rights: root never reads through her link.
# Each batch is bounded in time; one that ran out says so, and the read fails rather than take
# the files it did not see for missing.
t=$(mktemp -d); : > "$t/dirs"; : > "$t/her"; : > "$t/late"; limit=30
bounded() { _l=$1; shift; timeout $limit "$@"; [ $? -ne 124 ] || echo "timed-out|$_l|$limit" >> "$t/late"; }
getent passwd > "$t/passwd"
# asked: request, path (and for one in a home: its account, the home); dirs: every directory
# between a home and an asked path.
printf '%s\n' "$PROVISION_PATHS" | awk -F: -v OFS='\t' -v dirs="$t/dirs" '
  FILENAME == ARGV[1] { home[$1] = $6; next }
  $0 == "" { next }
  { p = $0; sub(/^sha256:/, "", p)
    if (p !~ /^~/) { print $0, p; next }
    u = substr(p, 2); sub(/\/.*/, "", u); rest = p; sub(/^~[^\/]*\//, "", rest)
    if (!(u in home)) { print $0, ""; next }
    d = home[u]; n = split(rest, c, "/")
    for (i = 1; i < n; i++) { d = d "/" c[i]; if (!(d in seen)) { seen[d]; print d > dirs } }
    print $0, home[u] "/" rest, u, home[u] }' "$t/passwd" - > "$t/asked"
bounded stat xargs -d '\n' -r stat -c '%n	%F' < "$t/dirs" > "$t/dirkinds" 2>/dev/null
# root: what root looks at itself; her: account, request, path of what is looked at as her.
awk -F'\t' -v OFS='\t' -v her="$t/her" '
  FILENAME == ARGV[1] { kind[$1] = $2; next }
  $3 != "" { d = $4; n = split(substr($2, length($4) + 2), c, "/"); behind = 0
    for (i = 1; i <= n; i++) {
      if (c[i] == "..") behind = 1
      if (i < n) { d = d "/" c[i]; if (kind[d] == "symbolic link") behind = 1 } }
    if (behind) { print $3, $1, $2 > her; next } }
  { print $1, $2 }' "$t/dirkinds" "$t/asked" > "$t/root"
cut -f2 "$t/root" | grep -v '^$' | bounded stat xargs -d '\n' -r stat -c '%n	%F|%U|%G|%a' > "$t/stat" 2>/dev/null
awk -F'\t' 'FILENAME == ARGV[1] { kind[$1] = $2; next }
  kind[$2] ~ /^regular/ { print ($1 ~ /^sha256:/ ? "sum" : "read") "\t" $2 }' "$t/stat" "$t/root" > "$t/regular"
sed -n 's/^sum\t//p' "$t/regular" | bounded sha256sum xargs -d '\n' -r sha256sum > "$t/sums" 2>/dev/null
sed -n 's/^read\t//p' "$t/regular" | bounded read xargs -d '\n' -r sh -c 'for f; do printf "%s\t" "$f"
  dd if="$f" bs=262144 count=1 iflag=nofollow,nonblock,fullblock status=none 2>/dev/null | base64 -w0; echo; done' sh > "$t/content"
awk -F'\t' '$2 ~ /^symbolic link/ { print $1 }' "$t/stat" | bounded readlink xargs -d '\n' -r sh -c 'for f; do
  printf "%s\t%s\n" "$f" "$(readlink -- "$f")"; done' sh > "$t/links"
awk -F'\t' '
  FILENAME ~ /stat$/ { stat[$1] = $2; next }
  FILENAME ~ /sums$/ { h = $0; sub(/ .*/, "", h); f = $0; sub(/^[^ ]*  /, "", f); sum[f] = h; next }
  FILENAME ~ /content$/ { content[$1] = $2; next }
  FILENAME ~ /links$/ { link[$1] = $2; next }
  { if ($2 == "" || !($2 in stat)) { print $1 "|missing"; next }
    split(stat[$2], s, "|"); kind = s[1]; extra = ""
    if (kind ~ /^regular/) { kind = "file"; extra = ($1 ~ /^sha256:/) ? "sha256:" sum[$2] : content[$2] }
    else if (kind == "directory") { kind = "directory" }
    else if (kind == "symbolic link") { kind = "link"; extra = link[$2] }
    else { kind = "other" }
    print $1 "|" kind "|" s[2] "|" s[3] "|" s[4] "|" extra }' \
  "$t/stat" "$t/sums" "$t/content" "$t/links" "$t/root"
# As her, one path at a time (a member's links are few), printed as above.
as_her='tab=$(printf "\t")
while IFS=$tab read -r q f; do
  s=$(stat -c "%F|%U|%G|%a" -- "$f" 2>/dev/null) || { echo "$q|missing"; continue; }
  k=other x=
  case $s in
    regular*) k=file
      case $q in
        sha256:*) x=sha256:$(dd if="$f" iflag=nofollow,nonblock status=none 2>/dev/null | sha256sum | cut -d" " -f1);;
        *) x=$(dd if="$f" bs=262144 count=1 iflag=nofollow,nonblock,fullblock status=none 2>/dev/null | base64 -w0);;
      esac;;
    "directory|"*) k=directory;;
    "symbolic link|"*) k=link x=$(readlink -- "$f");;
  esac
  echo "$q|$k|${s#*|}|$x"
done'
cut -f1 "$t/her" | sort -u | while IFS= read -r u; do
  awk -F'\t' -v u="$u" -v OFS='\t' '$1 == u { print $2, $3 }' "$t/her" |
    (cd / && bounded "as $u" runuser -u "$u" -- sh -c "$as_her")
done
cat "$t/late"
rm -rf "$t"
sec tools; for c in setfacl visudo flock sshd systemctl apt-get; do command -v "$c" >/dev/null && echo "$c"; done
sec docker
command -v docker
info=$(docker info --format '{{.ServerVersion}} {{.ContainersRunning}}' 2>/dev/null)
echo "${info% *}"
echo "active=$(systemctl is-active docker 2>/dev/null)"
echo "enabled=$(systemctl is-enabled docker 2>/dev/null)"
echo "running=${info#* }"
# provision's images and units (lines a host recorded before they were asked for lacks: none).
docker image ls --format 'image={{.Repository}}:{{.Tag}}' 2>/dev/null | grep '^image=provision/'
for u in $PROVISION_UNITS; do echo "unit=$u $(systemctl is-active "$u" 2>/dev/null) $(systemctl is-enabled "$u" 2>/dev/null)"; done
sec docker-runtimes; docker info --format '{{json .Runtimes}}' 2>/dev/null
sec packages; dpkg-query -W -f '${Package} ${Version} ${db:Status-Status}\n' docker-ce docker.io containerd.io nvidia-container-toolkit docker-ce-rootless-extras rootlesskit uidmap slirp4netns dbus-user-session fuse-overlayfs 2>/dev/null | grep ' installed$'
sec rootless
# Per account of interest (the service account too): lingering, its daemon's unit and socket,
# its docker context; for the service account also provision's images in its own daemon,
# asked as that account (root never talks to a socket an account controls).
for u in $PROVISION_ACCOUNTS $PROVISION_SERVICE_ACCOUNT; do
  id=$(id -u "$u" 2>/dev/null) || continue; h=$(home_of "$u")
  linger=no; [ -e "/var/lib/systemd/linger/$u" ] && linger=yes
  unit=no; member_file "$u" "$h" .config/systemd/user/docker.service && unit=yes
  sock=no; [ -S "/run/user/$id/docker.sock" ] && sock=yes
  ctx=$(member_file "$u" "$h" .docker/config.json sed -n 's/.*"currentContext": *"\([^"]*\)".*/\1/p' | head -n 1)
  images=
  if [ "$u" = "$PROVISION_SERVICE_ACCOUNT" ] && [ "$sock" = yes ]; then
    images=$(cd / && timeout 30 runuser -u "$u" -- env -i HOME="$h" PATH="$PATH" XDG_RUNTIME_DIR="/run/user/$id" docker -H "unix:///run/user/$id/docker.sock" image ls --format '{{.Repository}}:{{.Tag}}' 2>/dev/null | grep '^provision/' | paste -sd, -)
  fi
  echo "$u|$linger|$unit|$sock|$ctx|$images"
done
sec docker-repo
# Only when Docker is missing and the inventory lets the tool choose its source (auto).
if [ -n "$PROVISION_PROBE_DOCKER_REPO" ] && ! command -v docker >/dev/null; then
  timeout 5 bash -c 'exec 3<>/dev/tcp/download.docker.com/443' 2>/dev/null && echo reachable || echo unreachable
fi
sec nvidia-pci
for d in /sys/bus/pci/devices/*; do
  [ "$(cat "$d/vendor" 2>/dev/null)" = 0x10de ] || continue
  case "$(cat "$d/class" 2>/dev/null)" in 0x03*) echo "${d##*/}";; esac
done
sec nvidia-smi
nvidia-smi --query-gpu=index,name,driver_version,compute_cap,memory.total,uuid --format=csv,noheader,nounits 2>&1
echo "exit=$?"
sec nvidia-ctk; nvidia-ctk --version 2>/dev/null | head -n 1
sec apt-locks
for f in /var/lib/dpkg/lock-frontend /var/lib/dpkg/lock /var/lib/apt/lists/lock; do
  [ -e "$f" ] && echo "inode $f $(stat -c %i "$f")"
done
awk '{print "lock " $5 " " $6}' /proc/locks 2>/dev/null | while read -r _ pid dev; do
  echo "lock $pid ${dev##*:} $(cat "/proc/$pid/comm" 2>/dev/null)"
done
sec end
"""


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
        """What the facts saw at `path` (asked for through facts_request)."""
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


def facts_request(inventory: Inventory, paths: tuple[str, ...] = ()) -> dict[str, str]:
    """The environment the facts script reads: which accounts, cache dir and paths matter."""
    return {
        "PROVISION_ACCOUNTS": " ".join(sorted(m.name for m in inventory.members)),
        "PROVISION_CACHE_DIR": inventory.defaults.cache_dir,
        # Probed with or without [service]: a service removed from the inventory is stopped.
        "PROVISION_UNITS": f"{SERVICE_NAME}.service",
        # Its own daemon (rootless mode) is looked at like a member's, its images listed too.
        "PROVISION_SERVICE_ACCOUNT": SERVICE_NAME,
        "PROVISION_PATHS": "\n".join((STATE_FILE, DAEMON_JSON, *paths)),
        # Only when the tool chooses Docker's source and no mirror stands for the repository.
        "PROVISION_PROBE_DOCKER_REPO": "1" if inventory.defaults.docker_source == "auto"
        and not inventory.mirrors.docker_apt else "",
    }


def gather_facts(conn: Connection, inventory: Inventory, paths: tuple[str, ...] = ()) -> HostFacts:
    """One round trip: run the facts script as root and parse what it printed.

    `paths` (absolute, or `~name/…` inside an account's home) are stat'ed, files also read.
    """
    return parse_facts(read_transcript(conn, inventory, paths), inventory.defaults.cache_dir)


def read_transcript(conn: Connection, inventory: Inventory, paths: tuple[str, ...] = ()) -> str:
    """What the facts script prints, unparsed: what recorded fixtures and bug reports hold.

    Bounded in time, so nothing on the host (a member's special file, a hung mount) can hold
    a plan or a converge: past the limit the read fails with one line.
    """
    try:
        result = conn.run(FACTS_SCRIPT, env=facts_request(inventory, paths), what="facts",
                          timeout=FACTS_TIMEOUT_SECONDS, check=False)
    except RemoteCommandFailed:  # unchecked, a run raises it only when out of time
        raise FactsUnreadable(f"{conn.name}: the facts read got no answer for "
                              f"{FACTS_TIMEOUT_SECONDS} s",
                              "check the host's mounts and load (a hung NFS or FUSE mount, a "
                              "stuck nvidia-smi or Docker daemon), then rerun") from None
    if not result.ok:
        raise FactsUnreadable(f"{conn.name}: the facts script failed with exit code "
                              f"{result.exit_code}: {result.tail()}",
                              "rerun with -v for the full output", detail=result.output())
    return result.stdout


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
    accounts = _accounts(s.get("passwd", []), s.get("account-status", []))
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
        member_daemons=_member_daemons(s.get("rootless", [])),
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


def _accounts(passwd: list[str], status: list[str]) -> dict[str, Account]:
    asked = {p[0]: p for p in (ln.split() for ln in status) if len(p) == 3}
    accounts = {}
    for line in passwd:
        parts = line.split(":")
        if len(parts) < 7:
            continue
        status = asked.get(parts[0])
        accounts[parts[0]] = Account(parts[0], int(parts[2]), int(parts[3]), parts[5], parts[6],
                                     status[1] == "expired" if status else None,
                                     int(status[2]) if status and status[2].isdigit() else None)
    return accounts


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


def _member_daemons(lines: list[str]) -> dict[str, MemberDaemon]:
    daemons = {}
    for line in lines:
        name, linger, unit, socket, context, images = ([*line.split("|", 5), "", "", "", "",
                                                        ""])[:6]
        daemons[name] = MemberDaemon(name, linger == "yes", unit == "yes", socket == "yes",
                                     context.strip(),
                                     tuple(i for i in images.strip().split(",") if i))
    return daemons


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
