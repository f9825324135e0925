"""What a step wants done on a host: plain data a user can read before anything happens.

A `Change` is a sentence, the ordered actions that carry it out (files written atomically,
shell commands run as root) and, for files, a unified diff of old against new. Steps build
them; only the engine turns them into a script.
"""

from __future__ import annotations

import base64
import difflib
import shlex
from dataclasses import dataclass

NEW_FILE_LINES_SHOWN = 40
# An apply script's line starting with this is shown to the user with the step's result
# (the engine collects them): what it met and left alone on purpose.
REPORT = "provision-report: "


def as_member(name: str, script: str) -> str:
    """Shell (run as root) that runs `script` as the member, from her home, in her systemd user
    session's environment. What runs as her can write only where she can: a link she planted
    in her home cannot turn it into a write to /etc or /root, as it could as root."""
    uid = f"$(id -u {name})"
    body = shlex.quote(f"cd\n{script}")
    return (f"runuser -u {name} -- env -i HOME=\"$(getent passwd {name} | cut -d: -f6)\" "
            f"USER={name} LOGNAME={name} PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin "
            f"XDG_RUNTIME_DIR=\"/run/user/{uid}\" "
            f"DBUS_SESSION_BUS_ADDRESS=\"unix:path=/run/user/{uid}/bus\" sh -ec {body}\n")


def temporary_beside(path: str) -> str:
    """Shell that sets `tmp` to a new file (mode 0600) beside `path` (quoted for the shell):
    in its directory, so on its filesystem, where `mv -f "$tmp" PATH` replaces the file in one
    step. A random name, where a fixed one could meet the leftover of a run cut short."""
    return f"tmp=$(mktemp \"$(dirname {path})/.provision.XXXXXX\")"


@dataclass(frozen=True)
class WriteFile:
    """Write `content` to `path` atomically: temp file, owner and mode, validate, rename.

    With `member`, the whole write runs as that account (the file is hers, in her group): a
    path under her home is only ever written with her rights, whatever links she put there.
    """

    path: str
    content: str
    old: str | None  # what is there now (None: no file), for the diff
    owner: str = "root"
    group: str = "root"
    mode: str = "0644"
    # A command run on the temp file before it replaces the old one; `{}` is its path.
    validate: str | None = None
    member: str | None = None

    def diff(self) -> str:
        new = self.content.splitlines(keepends=True)
        if self.old is None and len(new) > NEW_FILE_LINES_SHOWN:
            # A whole new script in a plan hides the changes around it: its size says enough.
            return f"--- /dev/null\n+++ {self.path}\n@@ new file, {len(new)} lines @@\n"
        old = (self.old or "").splitlines(keepends=True)
        before = self.path if self.old is not None else "/dev/null"
        return "".join(difflib.unified_diff(old, new, before, self.path))

    def script(self) -> str:
        data = base64.b64encode(self.content.encode()).decode()
        validate = ""
        if self.validate:
            # A missing checker is said as such, not as a file it could not judge.
            checker = self.validate.split()[0]
            check = self.validate.replace("{}", '"$tmp"')
            validate = (f"command -v {checker} >/dev/null || {{ rm -f \"$tmp\"; echo \"{checker} "
                        f"is not installed: cannot check the new {self.path} before it is "
                        f"installed\" >&2; exit 3; }}\n"
                        f"{check} >&2 || {{ rm -f \"$tmp\"; "
                        f"echo \"invalid new {self.path}\" >&2; exit 3; }}\n")
        path = shlex.quote(self.path)
        chown = "" if self.member else f"chown {self.owner}:{self.group} \"$tmp\"\n"
        script = (
            f"mkdir -p \"$(dirname {path})\"\n"
            f"{temporary_beside(path)}\n"
            f"printf %s {data} | base64 -d > \"$tmp\"\n"
            f"{chown}"
            f"chmod {self.mode} \"$tmp\"\n"
            f"{validate}"
            f"mv -f \"$tmp\" {path}\n"
        )
        return as_member(self.member, script) if self.member else script


@dataclass(frozen=True)
class Run:
    """A shell command (or a few lines of sh) run as root."""

    command: str

    def script(self) -> str:
        return self.command.rstrip("\n") + "\n"


Action = WriteFile | Run


@dataclass(frozen=True)
class Change:
    step: str
    summary: str
    actions: tuple[Action, ...]
    warning: str | None = None
    # Restarting Docker stops running containers: the engine asks for --yes before doing it.
    restarts_docker: bool = False
    # Overwrites what a member made her own: applied only with --force, else reported.
    needs_force: bool = False

    def diff(self) -> str:
        return "".join(a.diff() for a in self.actions if isinstance(a, WriteFile))

    def script(self) -> str:
        return "".join(a.script() for a in self.actions)

    def to_json(self) -> dict[str, object]:
        return {"step": self.step, "summary": self.summary, "warning": self.warning,
                "restarts_docker": self.restarts_docker, "needs_force": self.needs_force,
                "diff": self.diff(),
                "commands": [a.command for a in self.actions if isinstance(a, Run)],
                "files": [a.path for a in self.actions if isinstance(a, WriteFile)]}


def run(step: str, summary: str, *commands: str, warning: str | None = None,
        restarts_docker: bool = False) -> Change:
    """A change made of shell commands only."""
    return Change(step, summary, tuple(Run(c) for c in commands), warning, restarts_docker)
