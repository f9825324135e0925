"""The service step's pure plan on recorded facts: what a host with `[service]` gets, that an
unchanged inventory on a converged host plans nothing, and that only a changed definition
restarts the unit."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest

from provision.changes import Run, WriteFile
from provision.engine import apply_script
from provision.facts import HostFacts, PathState, Unit, parse_facts
from provision.inventory import Inventory, parse_inventory
from provision.steps import StepBlocked, service
from tests.conftest import FIXTURES

SANDBOX = "debian-12-sandbox-converged"  # RECORDED: a converged sandbox, no GPU, docker.io
H200 = "ubuntu-24.04-h200"  # RECORDED: the lent H200 (no Docker there)


def facts_of(host: str) -> HostFacts:
    return parse_facts((FIXTURES / "facts" / f"{host}.txt").read_text(),
                       "/data/cache/huggingface")


def inventory(tmp_path: Path, **table: object) -> Inventory:
    return parse_inventory({"service": table}, tmp_path / "provision.toml")


def converged(facts: HostFacts, inv: Inventory) -> HostFacts:
    """The facts once the plan's files, account, image and running unit are there: what a
    re-read after applying it shows (SYNTHESIZED from the plan over recorded facts)."""
    paths = dict(facts.paths)
    images = list(facts.images)
    for change in service.plan(facts, inv):
        for action in change.actions:
            if isinstance(action, WriteFile):
                paths[action.path] = PathState(action.path, "file", content=action.content)
            elif "docker build -t " in action.command:
                images.append(action.command.split("docker build -t ")[1].split()[0])
    uid, gid = service.service_ids(facts)
    account = dataclasses.replace(next(iter(facts.accounts.values())),
                                  name=service.SERVICE_NAME, uid=uid, gid=gid)
    paths[service.STATE_DIR] = PathState(service.STATE_DIR, "directory")
    return dataclasses.replace(
        facts, paths=paths, images=tuple(images),
        accounts={**facts.accounts, service.SERVICE_NAME: account},
        units={service.UNIT: Unit("active", "enabled")})


def test_a_host_gets_the_account_the_files_the_image_and_a_started_unit(tmp_path: Path) -> None:
    facts = facts_of(SANDBOX)
    changes = service.plan(facts, inventory(tmp_path, model="tiny", max_queue=2))
    summaries = [c.summary for c in changes]
    uid, gid = service.service_ids(facts)
    assert summaries[0] == (f"system account sd35-api (uid {uid}, gid {gid}; not a member: "
                            "no login)")
    assert uid < 1000 and uid not in {a.uid for a in facts.accounts.values()}
    assert summaries[1] == "/var/lib/sd35-api: the service's home and compile cache"
    written = {a.path: a for c in changes for a in c.actions if isinstance(a, WriteFile)}
    assert set(written) == {"/opt/sd35-api/sd35_api.py", "/opt/sd35-api/healthcheck.py",
                            "/opt/sd35-api/inference.py", "/etc/sd35-api/env",
                            "/etc/systemd/system/sd35-api.service"}
    env = written["/etc/sd35-api/env"].content
    assert "SD35_MODEL=tiny\nSD35_FP8=dq\nSD35_MAX_QUEUE=2\n" in env
    assert "HF_HUB_OFFLINE=1" in env
    unit = written["/etc/systemd/system/sd35-api.service"].content
    cache_gid = facts.groups["hfcache"].gid
    for line in ("Restart=always", "Requires=docker.service",
                 "ExecStartPre=-/usr/bin/docker rm --force sd35-api",
                 f"--user {uid}:{gid} --group-add {cache_gid}",
                 "--publish 127.0.0.1:8000:8000",  # loopback: reached through SSH
                 "--volume /data/cache/huggingface:/hf:ro",
                 "--volume /opt/sd35-api:/app:ro",
                 '--health-cmd "python /app/healthcheck.py"',
                 "WantedBy=multi-user.target"):
        assert line in unit, line
    assert "--gpus" not in unit  # no GPU on this host
    assert any(s.startswith("build the team image provision/sd35-fp8:") for s in summaries)
    assert summaries[-1] == "(re)start sd35-api.service on 127.0.0.1:8000: its definition changed"
    # The diffs the plan shows: unit and env in full, the API files by size.
    assert "+Restart=always" in written["/etc/systemd/system/sd35-api.service"].diff()


def test_every_service_script_parses_as_posix_sh(tmp_path: Path) -> None:
    facts = facts_of(SANDBOX)
    for changes in (service.plan(facts, inventory(tmp_path)),
                    service.plan(converged(facts, inventory(tmp_path)),
                                 parse_inventory({}, tmp_path / "provision.toml"))):
        script = tmp_path / "apply.sh"
        script.write_text(apply_script("service", changes))
        checked = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stderr


def test_a_converged_service_plans_nothing_and_restarts_only_on_a_changed_definition(
        tmp_path: Path) -> None:
    facts = facts_of(SANDBOX)
    inv = inventory(tmp_path, model="tiny", max_queue=4)
    done = converged(facts, inv)
    assert service.plan(done, inv) == []
    changed = service.plan(done, inventory(tmp_path, model="tiny", max_queue=8))
    assert [c.summary for c in changed] == [
        "update /etc/sd35-api/env",
        "(re)start sd35-api.service on 127.0.0.1:8000: its definition changed"]
    assert "-SD35_MAX_QUEUE=4\n+SD35_MAX_QUEUE=8" in changed[0].diff()
    stopped = dataclasses.replace(done, units={service.UNIT: Unit("failed", "enabled")})
    assert [c.summary for c in service.plan(stopped, inv)] == [
        "start sd35-api.service on 127.0.0.1:8000 (it was failed)"]


def test_removing_the_service_table_stops_and_removes_the_unit(tmp_path: Path) -> None:
    facts = facts_of(SANDBOX)
    assert service.plan(facts, parse_inventory({}, tmp_path / "provision.toml")) == []
    done = converged(facts, inventory(tmp_path))
    (change,) = service.plan(done, parse_inventory({}, tmp_path / "provision.toml"))
    assert change.summary.startswith("no [service] in the inventory: stop, disable and remove")
    assert [a.command for a in change.actions if isinstance(a, Run)] == [
        "systemctl disable --quiet --now sd35-api.service || true",
        "rm -f /etc/systemd/system/sd35-api.service", "systemctl daemon-reload"]


def test_gpus_bind_and_model_reach_the_unit_on_the_h200(tmp_path: Path) -> None:
    facts = dataclasses.replace(facts_of(H200), docker=dataclasses.replace(
        facts_of(H200).docker, installed=True))  # SYNTHESIZED: Docker there
    facts = dataclasses.replace(facts, groups={**facts.groups, "hfcache": dataclasses.replace(
        next(iter(facts.groups.values())), name="hfcache", gid=4242)})
    changes = service.plan(facts, inventory(tmp_path, gpus="1,2", bind="::1", port=7860))
    files = {a.path: a.content for c in changes for a in c.actions if isinstance(a, WriteFile)}
    unit = files["/etc/systemd/system/sd35-api.service"]
    assert "--publish [::1]:7860:8000" in unit
    assert "'--gpus=\"device=1,2\"'" in unit  # one word for systemd, CSV-quoted for docker
    # No model given: what the GPU holds, as for a member (no SD3.5 weights cached there).
    assert "SD35_MODEL=large\n" in files["/etc/sd35-api/env"]


def test_without_docker_the_step_is_blocked(tmp_path: Path) -> None:
    with pytest.raises(StepBlocked, match="Docker is not installed"):
        service.plan(facts_of(H200), inventory(tmp_path))


def test_facts_read_provision_images_and_units_from_the_docker_section() -> None:
    text = (FIXTURES / "facts" / f"{SANDBOX}.txt").read_text().replace(
        "\n@@@provision:docker-runtimes\n",
        "\nimage=provision/sd35-fp8:0123456789ab\nunit=sd35-api.service active enabled"
        "\n@@@provision:docker-runtimes\n")
    facts = parse_facts(text, "/data/cache/huggingface")
    assert facts.images == ("provision/sd35-fp8:0123456789ab",)
    assert facts.units == {"sd35-api.service": Unit("active", "enabled")}
    assert facts.docker.installed  # the other lines of the section still read as before


def doctor_probe(unit: str, health: str, restarts: str) -> str:
    """A doctor probe transcript's service sections (SYNTHESIZED, in the probe's format)."""
    return (f"\n@@@provision:service-unit\n{unit}\n@@@provision:service-health\n{health}\n"
            f"@@@provision:service-restarts\n{restarts}\n@@@provision:end\n")


@pytest.mark.parametrize(("probe", "verdicts"), [
    (doctor_probe("active", '{"status": "ready", "model": "tiny", "device": "cpu", "gpu": null, '
                            '"fp8_applied": "storage", "compiled": false}', "0"),
     {"service unit": "pass", "service health": "pass", "service restarts": "pass"}),
    (doctor_probe("active", '{"status": "loading", "error": null}', "2"),
     {"service unit": "pass", "service health": "warn", "service restarts": "warn"}),
    (doctor_probe("activating", "Error: No such container: sd35-api", "7"),
     {"service unit": "fail", "service health": "fail", "service restarts": "warn"}),
    (doctor_probe("active", '{"status": "failed", "error": "OSError: no such model"}', "0"),
     {"service unit": "pass", "service health": "fail", "service restarts": "pass"}),
])
def test_doctor_reads_the_unit_the_health_and_the_restarts(tmp_path: Path, probe: str,
                                                          verdicts: dict[str, str]) -> None:
    from provision.doctor import checks

    inv = inventory(tmp_path, model="tiny")
    found = {c.name: c for c in checks(facts_of(SANDBOX), probe, inv, (), 1.0, {})}
    assert {name: found[name].status for name in verdicts} == verdicts
    if verdicts["service health"] == "pass":
        assert found["service health"].evidence == ("ready: tiny on cpu, --fp8 storage, "
                                                    "compiled False")
    if verdicts["service restarts"] == "warn":
        assert "journalctl -u sd35-api --since -24h" in found["service restarts"].remedy


def test_doctor_has_no_service_checks_without_a_service_table(tmp_path: Path) -> None:
    from provision.doctor import checks, probe_script

    inv = parse_inventory({}, tmp_path / "provision.toml")
    assert "sd35-api" not in probe_script(inv, (), None, False)
    names = [c.name for c in checks(facts_of(SANDBOX), "\n@@@provision:end\n", inv, (), 1.0,
                                    {})]
    assert not [n for n in names if n.startswith("service")]
