"""What would hand a member root, stated once: the shared cache's place, the groups a member may
be put in, and the sudo entries that are root-equivalent.

The inventory is checked against these rules when it loads (before any connection); the steps
ask the host-dependent half (who owns what there) from the same module. "Limited sudo" and
"members are not root-equivalent" are the promises these rules keep.
"""

from __future__ import annotations

from pathlib import PurePosixPath

# Trees the system owns: a cache there is chowned, chmodded 2775 and given group ACLs
# recursively (a cache_dir of /etc once made /etc/shadow writable by every member).
SYSTEM_TREES = tuple(PurePosixPath(p) for p in (
    "/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/root",
    "/run", "/sbin", "/snap", "/sys", "/usr", "/var/lib", "/var/log", "/var/spool", "/var/mail",
    "/var/run", "/var/lock", "/var/backups", "/var/www", "/var/cache/apt", "/var/cache/debconf",
    "/lost+found",
))
# Cleared at boot or by systemd-tmpfiles, and any account may create a name there first.
SCRATCH_TREES = tuple(PurePosixPath(p) for p in ("/tmp", "/var/tmp", "/dev/shm"))
HOMES = PurePosixPath("/home")

# Groups whose members can read or become what only root should (GIDs below 1000 are checked
# on the host too: this list is what the inventory alone can refuse).
PRIVILEGED_GROUPS = frozenset(
    """root daemon bin sys adm tty disk lp kmem dialout cdrom floppy tape sudo audio video
    operator src shadow utmp staff users wheel admin docker lxd libvirt kvm render input
    systemd-journal netdev plugdev crontab ssh _ssh messagebus syslog sgx""".split()
)
FIRST_REGULAR_ID = 1000

# Programs that give a root shell, or a write anywhere, when sudo runs them — whatever fixed
# arguments follow (pagers and editors have shell escapes, `systemctl status` pages). Taken
# from GTFOBins' "sudo" functions, narrowed to what a GPU server may carry.
ROOT_EQUIVALENT_PROGRAMS = frozenset(
    """sh bash dash zsh ksh mksh csh tcsh fish ash busybox su sudo doas runuser setsid env nice
    ionice timeout stdbuf taskset chroot nsenter unshare setarch strace ltrace gdb script xargs
    find flock watch run-parts start-stop-daemon node nodejs tclsh wish expect irb julia R
    Rscript awk gawk mawk nawk sed ed vi vim nvim view rvim vimdiff nano pico emacs joe mg less
    more most pg man journalctl systemctl tar zip unzip rsync scp sftp ssh git make cp mv
    install ln chmod chown chgrp dd tee mount docker podman ctr nerdctl kubectl crontab at
    passwd chpasswd useradd usermod gpasswd visudo vipw vigr apt apt-get aptitude dpkg snap npm
    gem cargo openssl socat nc ncat curl wget tcpdump gcc cc ld.so dmesg""".split()
)
# Interpreters and package installers in every version a host may carry (python3.12, pip3, ...).
INTERPRETERS = ("python", "perl", "ruby", "php", "lua", "pip")
# Entries whose program may be a file a member can write, or that sudo matches as a pattern.
MEMBER_WRITABLE_TREES = (HOMES, *SCRATCH_TREES, PurePosixPath("/run/user"))
SUDO_WILDCARDS = "*?[]"


def _within(path: PurePosixPath, trees: tuple[PurePosixPath, ...]) -> PurePosixPath | None:
    return next((tree for tree in trees if path == tree or tree in path.parents), None)


def cache_dir_problem(value: str) -> str | None:
    """Why `value` may not be the shared cache directory, or None.

    The hf-cache step makes the directory root:<group> 2775 and gives the group write access
    to everything in it, so it must be a directory of its own: not the root, not a top-level
    directory, not in a tree the system owns, not scratch space, not someone's home.
    """
    path = PurePosixPath(value)
    if len(path.parts) < 3:
        return (f"{value} is a top-level directory: the cache gets group write access to "
                "everything in it; use a directory of its own, e.g. /data/cache/huggingface")
    if tree := _within(path, SYSTEM_TREES):
        return f"{value} is in {tree}, which the system owns; use e.g. /data/cache/huggingface"
    if tree := _within(path, SCRATCH_TREES):
        return (f"{value} is in {tree}: cleared at boot, and any account may create the name "
                "first; use e.g. /data/cache/huggingface")
    if path.parent == HOMES:
        return f"{value} is a home directory; use e.g. /data/cache/huggingface"
    return None


def cache_dir_host_problem(value: str, homes: dict[str, str]) -> str | None:
    """Why `value` may not be the shared cache on this host (`homes`: account → home), or None:
    inside an account's home it would hand her files to the group (and her links to root)."""
    path = PurePosixPath(value)
    for account, home in sorted(homes.items()):
        if home not in ("", "/") and _within(path, (PurePosixPath(home),)):
            return f"{value} is inside {account}'s home {home}"
    return None


def group_problem(name: str) -> str | None:
    """Why members may not all be put in group `name` (by its name alone), or None."""
    if name in PRIVILEGED_GROUPS or name.startswith("systemd-"):
        return (f"{name!r} is a system group with privileges (its members read or write what "
                "only root should); use a group of its own, e.g. hfcache")
    return None


def group_host_problem(name: str, gid: int | None, personal_of: str | None) -> str | None:
    """Why the existing group `name` may not be the cache group on this host, or None:
    a system group (GID below 1000) or an account's own group hands out what it guards."""
    if gid is not None and gid < FIRST_REGULAR_ID:
        return f"group {name} is a system group (GID {gid})"
    if personal_of:
        return f"group {name} is {personal_of}'s own group"
    return None


def sudo_problem(entry: str) -> str | None:
    """Why sudo `entry` (an absolute program path and its fixed arguments) is root-equivalent,
    or None when it is limited."""
    program = PurePosixPath(entry.split()[0])
    if any(c in entry for c in SUDO_WILDCARDS):
        return "a wildcard lets her choose the program or its arguments"
    if program.name in ROOT_EQUIVALENT_PROGRAMS or program.name.startswith(INTERPRETERS):
        return f"{program.name} can start a root shell or write any file"
    if tree := _within(program, MEMBER_WRITABLE_TREES):
        return f"{program} is in {tree}, where a member may replace it"
    return None
