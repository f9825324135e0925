"""Failures a user can act on.

Each type carries the remedy and its own exit code, so the CLI can turn any of them into
one line on stderr and a distinct status without knowing where it came from.
"""

from __future__ import annotations

import traceback


class ProvisionError(Exception):
    """Base of every error the CLI reports as one line (never with a traceback)."""

    exit_code = 1

    def __init__(self, problem: str, remedy: str = "", detail: str = "") -> None:
        self.problem = problem
        self.remedy = remedy
        # What -v adds below the line: a remote script's whole output, a traceback.
        self.detail = detail
        super().__init__(self.line())

    def line(self) -> str:
        return f"{self.problem}: {self.remedy}" if self.remedy else self.problem


class InventoryError(ProvisionError):
    """The inventory (provision.toml) or an argument naming part of it is invalid."""

    exit_code = 2


class HostUnreachable(ProvisionError):
    exit_code = 3


class AuthenticationFailed(ProvisionError):
    exit_code = 4


class HostKeyUnknown(ProvisionError):
    exit_code = 5


class HostKeyChanged(ProvisionError):
    exit_code = 6


class SudoPasswordRequired(ProvisionError):
    exit_code = 7


class RemoteCommandFailed(ProvisionError):
    """A script on the host exited non-zero where the tool needed it to succeed."""

    exit_code = 8


class FactsUnreadable(RemoteCommandFailed):
    """The facts script ran but its output could not be read (cut short, or garbled)."""


class HostLocked(ProvisionError):
    """Another provision run holds the host-side lock."""

    exit_code = 9


class DockerUnavailable(ProvisionError):
    """The local Docker engine the sandbox needs does not answer."""

    exit_code = 10


class StepFailed(ProvisionError):
    """A converge step failed on a host; the message says what was and was not applied."""

    exit_code = 11


class PendingChanges(ProvisionError):
    """`--check` found changes to make (drift), for CI to act on."""

    exit_code = 12


class ChecksFailed(ProvisionError):
    """`provision doctor` found problems (each printed with its remedy)."""

    exit_code = 13


class Interrupted(ProvisionError):
    """Ctrl-C. Raised from the SIGINT handler, so typer never turns it into a silent exit."""

    exit_code = 130


class UnexpectedError(ProvisionError):
    """A bug, not a state of the host: reported for its host alone, the traceback kept for -v."""

    @classmethod
    def wrap(cls, where: str, exc: BaseException) -> UnexpectedError:
        trace = "".join(traceback.format_exception(exc))
        return cls(f"{where}: unexpected {type(exc).__name__}: {exc}",
                   "rerun with -v for the traceback, and report it", detail=trace)
