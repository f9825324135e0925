"""Output and records a run reads back, when they are cut short or garbled: one clear error (or
a safe reading), never an exception that escapes as a traceback or loses other hosts' reports.

Pure: no host. Each case is one a review found escaping (KeyError in verify's transcript,
JSONDecodeError in the workspace record, any exception inside one host's converge).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from provision.engine import HostReport, run_hosts
from provision.errors import HostUnreachable, RemoteCommandFailed, UnexpectedError
from provision.facts import PathState
from provision.inventory import Inventory, Member
from provision.steps import workspace
from provision.verify import read_runs
from tests.conftest import facts_of

RUN_OUTPUT = ('{"runs": {"storage": {"step_ms_mean": 200.0}, "off": {"step_ms_mean": 180.0}}, '
              '"compare": {"cosine": 0.99}}\n')


def test_a_whole_run_report_reads() -> None:
    runs, comparison = read_runs(RUN_OUTPUT, "see the logs")
    assert runs == {"storage": {"step_ms_mean": 200.0}, "off": {"step_ms_mean": 180.0}}
    assert comparison == {"cosine": 0.99}


@pytest.mark.parametrize(("output", "reason"), [
    (RUN_OUTPUT[:RUN_OUTPUT.index(', "compare"')], "not JSON"),
    (RUN_OUTPUT.replace('"compare"', '"other"'), "no compare in the report"),
    ('{"runs": [], "compare": {"cosine": 0.99}}\n', "no runs in the report"),
    ("[1, 2]\n", "no runs in the report"),
    ("", "no report"),
])
def test_a_cut_or_garbled_run_report_is_one_clear_error(output: str, reason: str) -> None:
    with pytest.raises(RemoteCommandFailed, match=reason) as caught:
        read_runs(output, "see /var/lib/provision/verify/alice/*.log on the host")
    assert "\n" not in caught.value.line() and caught.value.detail == output


def test_a_garbled_workspace_record_makes_edits_drift_not_a_crash(tmp_path: Path) -> None:
    """The record of what provision wrote is unreadable: nothing counts as provision's own,
    so a file that differs is left alone as drift (never overwritten)."""
    member = Member("alice", ("ssh-ed25519 AAAA alice",), gpus="0")
    inventory = Inventory(path=tmp_path / "provision.toml", members=(member,))
    seen = facts_of("ubuntu-24.04-h100.synthesized")
    base = f"~alice/{inventory.defaults.workspace_dir}"
    paths = {**seen.paths, workspace.record_path("alice"): PathState(
        workspace.record_path("alice"), "file", "root", "root", "600", "", '{"inference.py": "sha')}
    for name in workspace.paths(inventory):
        if name.startswith(f"sha256:{base}/"):
            paths[name] = PathState(name, "file", "alice", "alice", "644", "", "sha256:edited")
    changes = workspace.plan(dataclasses.replace(seen, paths=paths), inventory)
    edited = [c for c in changes if "was edited by alice" in c.summary]
    assert edited and all(c.needs_force for c in edited)
    assert not [c for c in changes if c.summary.startswith(("seed ", "update "))]


def test_a_bug_on_one_host_keeps_the_other_hosts_reports() -> None:
    def work(host: str) -> HostReport:
        if host == "gpu-02":
            raise KeyError("compare")
        if host == "gpu-03":
            raise HostUnreachable("gpu-03: unreachable", "check it")
        return HostReport(host)

    reports = run_hosts(["gpu-01", "gpu-02", "gpu-03"], work)
    assert [r.host for r in reports] == ["gpu-01", "gpu-02", "gpu-03"]
    assert reports[0].ok
    assert isinstance(reports[1].error, UnexpectedError)
    assert reports[1].error.line().startswith("gpu-02: unexpected KeyError: 'compare'")
    assert "Traceback" in reports[1].error.detail
    assert isinstance(reports[2].error, HostUnreachable)
