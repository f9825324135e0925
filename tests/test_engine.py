"""The engine on a scripted host: which steps run when one fails, and what a plan says of the
host's image. No SSH: a Connection whose every round trip answers from a recorded (or, where
named so, SYNTHESIZED) facts transcript, and whose apply scripts fail on demand."""

from __future__ import annotations

import dataclasses

import pytest

from provision.changes import Change
from provision.connection import Connection, Held, LineSink, Result
from provision.engine import HostReport, RunOptions, converge_host
from provision.inventory import Inventory, parse_inventory
from provision.sandbox import new_key_pair
from provision.steps import Step
from provision.steps.order import STEPS
from provision.target import Target
from tests.conftest import FIXTURES, synthesized_h100_transcript


class ScriptedHost(Connection):
    """Facts from `transcript`; an apply script of a step in `failing` exits 5 with `why`."""

    def __init__(self, alias: str, transcript: str, failing: dict[str, str] | None = None) -> None:
        super().__init__(Target(alias=alias))
        self.transcript, self.failing = transcript, failing or {}
        self.applied: list[str] = []
        self.facts_reads = 0

    def _execute(self, command: str, stdin: str, timeout: float | None,
                 on_line: LineSink) -> Result:
        if "@@@provision:os-release" in stdin or "sec os-release" in stdin:
            self.facts_reads += 1
            return Result(self.transcript, "", 0)
        step = next((s.name for s in STEPS if f"apply-{s.name}.log" in stdin), None)
        if step in self.failing:
            return Result("", self.failing[step], 5)
        if step:
            self.applied.append(step)
        return Result("", "", 0)

    def _hold(self, command: str, stdin: str, timeout: float) -> Held:
        return Held("locked", lambda: None)


@pytest.fixture(scope="module")
def team(tmp_path_factory) -> Inventory:
    base = tmp_path_factory.mktemp("engine")
    key = new_key_pair(base)
    return parse_inventory({"members": [{"name": "alice", "keys": [key]}]},
                           base / "provision.toml")


def statuses(report: HostReport) -> dict[str, str]:
    return {step.name: step.status for step in report.steps}


def test_a_failed_step_stops_only_the_steps_that_need_it(team: Inventory) -> None:
    host = ScriptedHost("gpu-01", synthesized_h100_transcript("580.95.05"), failing={
        "users": "could not install sudo: this host has no apt package lists"})
    report = converge_host(host, team, STEPS, RunOptions(apply=True))
    seen = statuses(report)
    assert seen["users"] == "failed"
    assert seen["hf-cache"] == seen["workspace"] == "not run"
    assert next(s for s in report.steps if s.name == "hf-cache").message == \
        "needs users, which did not converge"
    assert "docker" in host.applied and seen["docker"] == "changed", "independent: it ran"
    assert report.error is not None and "no apt package lists" in report.error.line()


def test_a_plan_names_the_image_and_refuses_an_override_the_driver_cannot_run(
        team: Inventory) -> None:
    # SYNTHESIZED driver 550 on the recorded Ubuntu 24.04 H100 host.
    host = ScriptedHost("gpu-02", synthesized_h100_transcript("550.127.05"))
    report = converge_host(host, team, STEPS, RunOptions(apply=False))
    (workspace,) = [s for s in report.steps if s.name == "workspace"]
    assert workspace.status == "pending"
    assert "driver 550.127.05 → cu126 wheels" in workspace.message
    assert "base nvidia/cuda:12.4.1-base-ubuntu22.04" in workspace.message

    pinned = dataclasses.replace(team, image={"cuda": "cu130"})
    report = converge_host(host, pinned, STEPS, RunOptions(apply=False))
    (workspace,) = [s for s in report.steps if s.name == "workspace"]
    assert workspace.status == "failed"
    assert "needs NVIDIA driver 580.65.06 or newer" in workspace.message
    assert statuses(report)["users"] == "pending", "the other steps still plan"


def test_hosts_with_other_drivers_each_get_their_image(team: Inventory) -> None:
    notes = {}
    for driver in ("535.183.01", "570.133.20", "580.95.05"):
        report = converge_host(ScriptedHost(driver, synthesized_h100_transcript(driver)), team,
                               STEPS, RunOptions(apply=False))
        notes[driver] = next(s.message for s in report.steps if s.name == "workspace")
    assert "cu126 wheels" in notes["535.183.01"] and "12.2.2-base" in notes["535.183.01"]
    assert "cu128 wheels" in notes["570.133.20"] and "12.8.1-base" in notes["570.133.20"]
    assert "cu130 wheels" in notes["580.95.05"] and "13.0.0-base" in notes["580.95.05"]


def test_the_recorded_lent_h200_plans_all_but_keepalive(team: Inventory) -> None:
    """The facts recorded on the lent H200 (no sshd, sudo, setfacl or network): every step
    but keepalive has a plan, keepalive says why not, and the image is the one driver 580 runs."""
    host = ScriptedHost("@local", (FIXTURES / "facts" / "ubuntu-24.04-h200.txt").read_text())
    report = converge_host(host, team, STEPS, RunOptions(apply=False))
    assert statuses(report) == {"users": "pending", "keepalive": "skipped",
                                "hf-cache": "pending", "docker": "pending",
                                "rootless": "unchanged", "nvidia": "pending",
                                "workspace": "pending",
                                "service": "unchanged"}  # no [service] in the team's inventory
    messages = {step.name: step.message for step in report.steps}
    assert messages["keepalive"].startswith("skipped: no sshd on this host")
    assert messages["workspace"] == ("image for this host: driver 580.159.04 → cu130 wheels, "
                                     "base nvidia/cuda:13.0.0-base-ubuntu24.04")
    assert report.error is None


def test_a_run_that_changes_nothing_plans_once_and_one_that_applies_confirms(
        team: Inventory) -> None:
    """Plans are pure: with nothing applied the facts are those every step planned on, so the
    confirming re-plan is skipped; after an apply the host is read again and every step is
    re-planned (this scripted host never changes, so the applied step shows as drift)."""
    facts = (FIXTURES / "facts" / "ubuntu-24.04-h200.txt").read_text()
    plans: list[str] = []

    def counted(step: Step) -> Step:
        def plan(*args: object) -> list[Change]:
            plans.append(step.name)
            return step.plan(*args)
        return dataclasses.replace(step, plan=plan)

    unchanged = tuple(counted(s) for s in STEPS if s.name in ("rootless", "service"))
    host = ScriptedHost("@local", facts)
    report = converge_host(host, team, unchanged, RunOptions(apply=True))
    assert set(statuses(report).values()) == {"unchanged"} and report.error is None
    assert plans == ["rootless", "service"] and host.facts_reads == 1 and report.drift == []

    plans.clear()
    docker = tuple(counted(s) for s in STEPS if s.name == "docker")
    host = ScriptedHost("@local", facts)
    report = converge_host(host, team, unchanged + docker, RunOptions(apply=True))
    assert host.applied == ["docker"] and host.facts_reads == 2
    assert plans == ["rootless", "service", "docker"] * 2
    assert report.drift and all(change.step == "docker" for change in report.drift)
