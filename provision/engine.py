"""The one place that locks, applies, re-reads and reports. Safety lives here, once.

Per host: take the host lock → read facts (one round trip) → for each step, plan (pure) and,
when applying, run all of that step's changes as one script, then re-read facts so the next
step plans on what is really there → record state → re-plan everything to confirm that
nothing is left to do. A step that fails (or cannot apply on this host) stops only the steps
that need it (`Step.needs`); the others go on, and so do other hosts.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime

from provision import __version__
from provision.changes import REPORT, Change, WriteFile
from provision.connection import Connection
from provision.errors import (
    HostLocked,
    InventoryError,
    ProvisionError,
    RemoteCommandFailed,
    UnexpectedError,
)
from provision.facts import STATE_FILE, HostFacts
from provision.gather import gather_facts
from provision.inventory import Inventory
from provision.progress import QUIET, Task, follow_log
from provision.steps import NoGpu, Step, StepBlocked, StepSkipped, former_members, paths_of
from provision.templating import raw, render

# The host lock: an applying run holds it exclusively, a planning one shares it.
LOCK_EXCLUSIVE = raw("host/lock-exclusive.sh")
LOCK_SHARED = raw("host/lock-shared.sh")


@dataclass(frozen=True)
class RunOptions:
    apply: bool
    yes: bool = False  # allow what interrupts running work (a Docker restart)
    require_gpu: bool = False  # no NVIDIA GPU is a failure, not a skip
    force: bool = False  # overwrite files members edited (a backup is kept)

    def allowed(self, changes: list[Change]) -> tuple[list[Change], list[Change]]:
        """(to apply, left alone): changes that need --force wait for it."""
        held = [c for c in changes if c.needs_force and not self.force]
        return [c for c in changes if c not in held], held


@dataclass
class StepReport:
    name: str
    status: str  # unchanged | pending | changed | skipped | failed | not run
    changes: list[Change] = field(default_factory=list)
    seconds: float = 0.0
    message: str = ""

    def to_json(self) -> dict[str, object]:
        return {"step": self.name, "status": self.status, "seconds": round(self.seconds, 3),
                "message": self.message, "changes": [c.to_json() for c in self.changes]}


@dataclass
class HostReport:
    host: str
    steps: list[StepReport] = field(default_factory=list)
    error: ProvisionError | None = None
    drift: list[Change] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def pending(self) -> bool:
        return any(s.status == "pending" for s in self.steps)

    @property
    def ok(self) -> bool:
        return self.error is None and not self.drift

    def to_json(self) -> dict[str, object]:
        return {"host": self.host, "ok": self.ok, "seconds": round(self.seconds, 3),
                "error": self.error.line() if self.error else None,
                "drift": [c.to_json() for c in self.drift],
                "steps": [s.to_json() for s in self.steps]}


def apply_script(step: str, changes: list[Change]) -> str:
    """One script for a step's changes (templates/host/apply.sh.j2 says why it is safe to
    lose the connection to), each change announced by its summary."""
    body = "".join(f"echo {json.dumps('== ' + c.summary)}\n{c.script()}" for c in changes)
    return render("host/apply.sh.j2", step=step,
                  body=follow_log(f"set -e\numask 022\n{body}", '"$log"'))


def reported(output: str) -> list[str]:
    """What an apply script asked to be told (lines starting with REPORT): things it met and
    left alone on purpose, e.g. a link a member planted, which the user must hear about."""
    return [ln.removeprefix(REPORT) for ln in output.splitlines() if ln.startswith(REPORT)]


def state_change(facts: HostFacts, inventory: Inventory, applied: list[str]) -> Change | None:
    """The state record, when it would say something new (members, inventory, steps)."""
    members = sorted({m.name for m in inventory.members}
                     | {n for n in former_members(facts, inventory) if n in facts.accounts})
    digest = hashlib.sha256(inventory.path.read_bytes()).hexdigest() if inventory.path.exists() \
        else ""
    old = facts.state
    if not applied and old.get("members") == members and old.get("inventory_digest") == digest:
        return None
    record = {
        "tool_version": __version__, "inventory_digest": digest, "members": members,
        # The group members were put in, so a later cache_group takes them out of it.
        "cache_group": inventory.defaults.cache_group,
        "applied_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "steps_applied": applied,
    }
    # One line: the facts script reads "members" from it with sed.
    content = json.dumps(record) + "\n"
    return Change("state", "record what was applied",
                  (WriteFile(STATE_FILE, content, facts.text(STATE_FILE), mode="0600"),))


def converge_host(conn: Connection, inventory: Inventory, steps: tuple[Step, ...],
                  options: RunOptions, progress: Task = QUIET) -> HostReport:
    """Plan (and apply) `steps` on one connected host; never raises, the report says all."""
    report = HostReport(conn.name)
    started = time.monotonic()
    paths = paths_of(steps, inventory)
    try:
        held = conn.hold(LOCK_EXCLUSIVE if options.apply else LOCK_SHARED)
        if held.first_line != "locked":
            owner = held.first_line.removeprefix("busy").strip() or "another run"
            held.release()
            raise HostLocked(f"{conn.name}: another provision run holds the host lock "
                             f"({owner})", "wait for it to finish, then rerun")
        try:
            _run_steps(conn, inventory, steps, paths, options, report, progress)
        finally:
            held.release()
    except ProvisionError as exc:
        report.error = exc
    report.seconds = time.monotonic() - started
    return report


def _run_steps(conn: Connection, inventory: Inventory, steps: tuple[Step, ...],
               paths: tuple[str, ...], options: RunOptions, report: HostReport,
               progress: Task) -> None:
    progress.status("reading facts")
    facts = planned_on = gather_facts(conn, inventory, paths)
    applied: list[str] = []
    unconverged: set[str] = set()  # steps that failed, or did not run because of one
    for step in steps:
        progress.status(step.name)
        started = time.monotonic()
        entry = StepReport(step.name, "unchanged")
        report.steps.append(entry)
        waiting = [name for name in step.needs if name in unconverged]
        if waiting:
            entry.status, entry.message = "not run", f"needs {', '.join(waiting)}, which did " \
                                                     "not converge"
            unconverged.add(step.name)
            continue
        try:
            entry.changes, held = _plan(step, facts, inventory, options)
            entry.message = "; ".join([*step.notes(facts, inventory),
                                       *(c.summary for c in held)])
            if entry.changes and not options.apply:
                entry.status = "pending"
            elif entry.changes:
                _guard_docker_restart(entry.changes, facts, options)
                applied_output = conn.run(apply_script(step.name, entry.changes),
                                          what=f"step {step.name}",
                                          on_line=progress.output).stdout
                entry.message = "; ".join(filter(None, [entry.message,
                                                        *reported(applied_output)]))
                entry.status = "changed"
                applied.append(step.name)
                facts = gather_facts(conn, inventory, paths)
                _prove(conn, step, facts, inventory, progress)
        except StepSkipped as exc:
            entry.status, entry.message = "skipped", exc.line()
        except (StepBlocked, RemoteCommandFailed, InventoryError) as exc:
            # InventoryError: an [image] override this host's driver cannot run.
            entry.status, entry.message = "failed", exc.line()
            progress.failed()
            unconverged.add(step.name)
            report.error = report.error or exc
            if options.apply:
                facts = gather_facts(conn, inventory, paths)  # what a partial apply changed
        finally:
            entry.seconds = time.monotonic() - started
    if not options.apply:
        return
    record = state_change(facts, inventory, applied)
    if record is not None:
        conn.run(apply_script("state", [record]), what="state record")
    if facts is planned_on:
        # Nothing changed the host since it was read, and plans are pure: every step's re-plan
        # would repeat the empty plan it just made (a no-op run's case).
        return
    progress.status("confirming")
    report.drift = [c for step in steps if step.name not in unconverged
                    for c in _replan(step, facts, inventory, options)]


def _plan(step: Step, facts: HostFacts, inventory: Inventory,
          options: RunOptions) -> tuple[list[Change], list[Change]]:
    """(to apply, left alone); no GPU under --require-gpu is a failure, not a skip."""
    try:
        return options.allowed(step.plan(facts, inventory))
    except NoGpu:
        if options.require_gpu:
            raise StepBlocked(f"{facts.os.hostname}: no NVIDIA GPU",
                              "--require-gpu asks for one") from None
        raise


def _replan(step: Step, facts: HostFacts, inventory: Inventory,
            options: RunOptions) -> list[Change]:
    try:
        return _plan(step, facts, inventory, options)[0]
    except StepSkipped:
        return []


def _guard_docker_restart(changes: list[Change], facts: HostFacts, options: RunOptions) -> None:
    running = facts.docker.running_containers
    if running and not options.yes and any(c.restarts_docker for c in changes):
        raise StepBlocked(f"this restarts Docker, which would stop {running} running "
                          "container(s); nothing was changed", "rerun with --yes to allow it")


def _prove(conn: Connection, step: Step, facts: HostFacts, inventory: Inventory,
           progress: Task) -> None:
    proof = step.proof(facts, inventory)
    if proof is None:
        return
    progress.status(f"{step.name}: proving it")
    result = conn.run(proof.script, what=f"proof of {step.name}", check=False,
                      on_line=progress.output)
    problem = proof.check(result.stdout) if result.ok else (
        (result.stderr.strip().splitlines() or ["failed"])[-1])
    if problem:
        raise StepBlocked(f"{conn.name}: {step.name} applied but not proven: {problem}",
                          "see 'provision doctor' for the GPU path")


def run_hosts(hosts: list[str], work: Callable[[str], HostReport],
              parallel: int = 8) -> list[HostReport]:
    """`work` on every host at once (bounded); one host's failure, even a bug met on that host
    alone, never stops another nor loses the other hosts' reports."""

    def guarded(host: str) -> HostReport:
        try:
            return work(host)
        except ProvisionError as exc:
            return HostReport(host, error=exc)
        except Exception as exc:
            return HostReport(host, error=UnexpectedError.wrap(host, exc))

    pool = ThreadPoolExecutor(max_workers=max(1, min(parallel, len(hosts))))
    try:
        return list(pool.map(guarded, hosts))
    finally:
        # Not `with`: on Ctrl-C its exit would wait for every host to finish first.
        pool.shutdown(wait=False, cancel_futures=True)
