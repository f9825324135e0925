"""The service step's pure plan on recorded facts: what a host with `[service]` gets, that an
unchanged inventory on a converged host plans nothing, and that only a changed definition
restarts the unit; in both docker modes, and across a switch between them."""

from __future__ import annotations

import dataclasses
import re
import subprocess
from pathlib import Path

import pytest

from provision.changes import Run, WriteFile
from provision.contract import SERVICE_UNIT
from provision.engine import apply_script
from provision.facts import HostFacts, MemberDaemon, PathState, Unit, parse_facts
from provision.inventory import Inventory, Service, load_inventory, parse_inventory
from provision.render import MACHINERY
from provision.steps import StepBlocked, service
from tests.conftest import FIXTURES, facts_of, service_converged

SANDBOX = "debian-12-sandbox-converged"  # RECORDED: a converged sandbox, no GPU, docker.io
# RECORDED: a sandbox converged rootless (members dev, alice, bob, each her own daemon)
ROOTLESS = "debian-12-sandbox-rootless"
H200 = "ubuntu-24.04-h200"  # RECORDED: the lent H200 (no Docker there)


def inventory(tmp_path: Path, **table: object) -> Inventory:
    return parse_inventory({"service": table}, tmp_path / "provision.toml")


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
    # inference.py with every module of its sd35/ package: what the API imports.
    assert set(written) == {"/opt/sd35-api/sd35_api.py", "/opt/sd35-api/healthcheck.py",
                            "/opt/sd35-api/inference.py", "/etc/sd35-api/env",
                            "/etc/systemd/system/sd35-api.service",
                            *(f"/opt/sd35-api/{path}" for path in MACHINERY)}
    assert "/opt/sd35-api/sd35/fp8.py" in written
    env = written["/etc/sd35-api/env"].content
    assert "SD35_MODEL=tiny\nSD35_FP8=dq\nSD35_MAX_QUEUE=2\n" in env
    assert "HF_HUB_OFFLINE=1" in env
    # Its uid has no passwd entry in the image: compiling on the GPU asks getpass.getuser().
    assert "\nUSER=sd35-api\n" in env
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
                    service.plan(service_converged(facts, inventory(tmp_path)),
                                 parse_inventory({}, tmp_path / "provision.toml"))):
        script = tmp_path / "apply.sh"
        script.write_text(apply_script("service", changes))
        checked = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stderr


def test_a_converged_service_plans_nothing_and_restarts_only_on_a_changed_definition(
        tmp_path: Path) -> None:
    facts = facts_of(SANDBOX)
    inv = inventory(tmp_path, model="tiny", max_queue=4)
    done = service_converged(facts, inv)
    assert service.plan(done, inv) == []
    changed = service.plan(done, inventory(tmp_path, model="tiny", max_queue=8))
    assert [c.summary for c in changed] == [
        "update /etc/sd35-api/env",
        "(re)start sd35-api.service on 127.0.0.1:8000: its definition changed"]
    assert "-SD35_MAX_QUEUE=4\n+SD35_MAX_QUEUE=8" in changed[0].diff()
    stopped = dataclasses.replace(done, units={SERVICE_UNIT: Unit("failed", "enabled")})
    assert [c.summary for c in service.plan(stopped, inv)] == [
        "start sd35-api.service on 127.0.0.1:8000 (it was failed)"]


def test_removing_the_service_table_stops_and_removes_the_unit(tmp_path: Path) -> None:
    facts = facts_of(SANDBOX)
    assert service.plan(facts, parse_inventory({}, tmp_path / "provision.toml")) == []
    done = service_converged(facts, inventory(tmp_path))
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
    assert " --device=nvidia.com/gpu=1 --device=nvidia.com/gpu=2 " in unit  # CDI, as a member's
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
    from provision.doctor import checks, decide_image

    inv, facts = inventory(tmp_path, model="tiny"), facts_of(SANDBOX)
    found = {c.name: c for c in checks(facts, probe, inv, (), 1.0, {}, decide_image(facts, inv))}
    assert {name: found[name].status for name in verdicts} == verdicts
    if verdicts["service health"] == "pass":
        assert found["service health"].evidence == ("ready: tiny on cpu, --fp8 storage, "
                                                    "compiled False")
    if verdicts["service restarts"] == "warn":
        assert "journalctl -u sd35-api --since -24h" in found["service restarts"].remedy


def test_doctor_has_no_service_checks_without_a_service_table(tmp_path: Path) -> None:
    from provision.doctor import checks, decide_image, probe_script

    inv, facts = parse_inventory({}, tmp_path / "provision.toml"), facts_of(SANDBOX)
    assert "sd35-api" not in probe_script(inv, (), None, [])
    names = [c.name for c in checks(facts, "\n@@@provision:end\n", inv, (), 1.0, {},
                                    decide_image(facts, inv))]
    assert not [n for n in names if n.startswith("service")]


# docker_mode = "rootless": the service in the sd35-api account's own daemon.

def rootless_inventory(**table: object) -> Inventory:
    """The recorded rootless sandbox's inventory with a [service] table."""
    inv = load_inventory(FIXTURES / "facts" / f"{ROOTLESS}.toml")
    return dataclasses.replace(inv, service=Service(**table))  # type: ignore[arg-type]


def as_rootful(inv: Inventory) -> Inventory:
    return dataclasses.replace(inv, defaults=dataclasses.replace(inv.defaults,
                                                                 docker_mode="rootful"))


# `as_member`'s shell: runuser, then the script single-quoted (a quote inside as '"'"').
AS_ACCOUNT = re.compile(r"runuser -u sd35-api -- [^\n]*? sh -ec '(?:[^']|'\"'\"')*'")


def commands(changes: list) -> list[str]:
    return [a.command for c in changes for a in c.actions if isinstance(a, Run)]


def converged_rootless(facts: HostFacts, inv: Inventory) -> HostFacts:
    """What a re-read shows once the rootless plan applied: the account with its ranges, its
    daemon (lingering, unit, socket, context) holding the image, the files written
    (SYNTHESIZED from the plan over the recorded rootless facts)."""
    done = service_converged(facts, as_rootful(inv))  # account, files, unit state
    changes = service.plan(facts, inv)
    paths = dict(done.paths)
    for change in changes:
        for action in change.actions:
            if isinstance(action, WriteFile):
                paths[action.path] = PathState(action.path, "file", content=action.content)
    paths[service.ROOTLESS_STATE] = PathState(service.ROOTLESS_STATE, "directory")
    for path, flag in (("/etc/subuid", "--add-subuids"), ("/etc/subgid", "--add-subgids")):
        given = next(c.split(flag)[1].split()[0] for c in commands(changes) if flag in c)
        start, end = (int(x) for x in given.split("-"))
        text = (facts.text(path) or "") + f"sd35-api:{start}:{end - start + 1}\n"
        paths[path] = PathState(path, "file", content=text)
    tag = next(c.split("docker build -t ")[1].split()[0] for c in commands(changes)
               if "docker build -t " in c)
    daemon = MemberDaemon(service.SERVICE_NAME, True, True, True, "rootless", (tag,))
    return dataclasses.replace(done, paths=paths, images=facts.images,
                               member_daemons={**facts.member_daemons,
                                               service.SERVICE_NAME: daemon})


def test_rootless_the_account_gets_its_own_daemon_as_a_member_does() -> None:
    facts = facts_of(ROOTLESS)
    inv = rootless_inventory(model="tiny")
    changes = service.plan(facts, inv)
    summaries = [c.summary for c in changes]
    # Subordinate ranges after every member's (admin, dev, alice, bob hold 100000-362143).
    assert "sd35-api: subordinate uids 362144-427679 (given once, never changed)" in summaries
    assert "sd35-api: subordinate gids 362144-427679 (given once, never changed)" in summaries
    assert "sd35-api: lingering on (her daemon runs while she is logged out)" in summaries
    assert any(s.startswith("sd35-api: her own Docker daemon, a systemd user service (data in "
                            "/var/lib/sd35-api/.local/share/docker)") for s in summaries)
    assert "sd35-api: docker context 'rootless' in use, so plain docker and VS Code reach " \
           "her daemon" in summaries
    build = next(c for c in changes if c.summary.startswith("build the team image"))
    assert "in its own daemon, as sd35-api" in build.summary
    assert {c.step for c in changes} == {"service"}
    # Root never writes into the account's home: whatever touches it runs as the account
    # (only the home itself is made by root, with install -d, before the account has it).
    as_root = AS_ACCOUNT.sub("", "\n".join(commands(changes)))
    assert "useradd --system" in as_root and "loginctl enable-linger sd35-api" in as_root
    for what in ("/var/lib/sd35-api/", "setuptool", "docker build", "docker context"):
        assert what not in as_root, what
    assert any(c.startswith("runuser -u sd35-api -- ") and "mkdir -p -m 0700 "
               "/var/lib/sd35-api/container" in c for c in commands(changes))


def test_rootless_unit_runs_as_the_account_in_its_daemon() -> None:
    facts = facts_of(ROOTLESS)
    changes = service.plan(facts, rootless_inventory(model="tiny"))
    unit = next(a.content for c in changes for a in c.actions
                if isinstance(a, WriteFile) and a.path == service.UNIT_FILE)
    uid, _ = service.service_ids(facts)
    for line in (f"Requires=user@{uid}.service", f"After=user@{uid}.service",
                 "User=sd35-api", "Group=sd35-api",
                 f"Environment=XDG_RUNTIME_DIR=/run/user/{uid} "
                 f"DOCKER_HOST=unix:///run/user/{uid}/docker.sock",
                 "--user 0:0 \\",  # its root is the account on the host
                 "--volume /var/lib/sd35-api/container:/state", "Restart=always"):
        assert line in unit, line
    assert "Requires=docker.service" not in unit and "--group-add" not in unit
    assert service.runs_rootless(unit)


def test_rootless_converged_plans_nothing_and_images_come_from_its_daemon() -> None:
    facts = facts_of(ROOTLESS)
    inv = rootless_inventory(model="tiny")
    done = converged_rootless(facts, inv)
    assert service.plan(done, inv) == []
    # The tag in the system daemon does not count: the unit runs in the account's own one,
    # where the image is copied from the system daemon (a build's result, by its tag) ...
    (tag,) = done.member_daemons["sd35-api"].images
    own = dataclasses.replace(done.member_daemons["sd35-api"], images=())
    elsewhere = dataclasses.replace(done, images=(tag,),
                                    member_daemons={**done.member_daemons, "sd35-api": own})
    copy, restart = service.plan(elsewhere, inv)
    assert [copy.summary, restart.summary.split(" (")[0]] == [
        f"copy the team image {tag} for the service from the system daemon into its own "
        "daemon, as sd35-api (the same build inputs: no build)",
        "(re)start sd35-api.service on 127.0.0.1:8000: its definition changed"]
    script = copy.script().strip()
    assert script.startswith(f"docker save {tag} | runuser -u sd35-api -- ")
    assert script.endswith("docker load'")
    # ... and built there when no daemon of the host has it.
    nowhere = dataclasses.replace(elsewhere, images=())
    assert service.plan(nowhere, inv)[0].summary.startswith(
        f"build the team image {tag} for the service in its own daemon, as sd35-api (")


def test_switching_rootful_to_rootless_moves_the_container_between_daemons() -> None:
    facts = facts_of(ROOTLESS)
    inv = rootless_inventory(model="tiny")
    rootful = service_converged(facts, as_rootful(inv))
    assert not service.runs_rootless(rootful.text(service.UNIT_FILE))
    changes = service.plan(rootful, inv)
    restart = changes[-1]
    assert restart.summary == ("(re)start sd35-api.service on 127.0.0.1:8000: its definition "
                               "changed (docker_mode switched: its container moves to its own "
                               "daemon)")
    assert [a.command for a in restart.actions] == [
        "systemctl daemon-reload", "systemctl enable --quiet sd35-api.service",
        "systemctl stop sd35-api.service",
        "docker rm --force sd35-api >/dev/null 2>&1 || true",  # the system daemon, as root
        "systemctl start sd35-api.service"]


def test_switching_rootless_to_rootful_stops_the_accounts_daemon_after_the_move() -> None:
    facts = facts_of(ROOTLESS)
    inv = rootless_inventory(model="tiny")
    done = converged_rootless(facts, inv)
    changes = service.plan(done, as_rootful(inv))
    summaries = [c.summary for c in changes]
    assert summaries[-2].endswith("(docker_mode switched: its container moves to the system "
                                  "daemon)")
    leave = changes[-2].actions[3].command
    assert leave.startswith("runuser -u sd35-api -- ") and "docker rm --force sd35-api" in leave
    assert summaries[-1].startswith("sd35-api: stop her rootless daemon (its images and data "
                                    "stay in /var/lib/sd35-api/.local/share/docker)")
    # The system daemon lacks the image: it is copied from the account's, which has it.
    (tag,) = done.member_daemons["sd35-api"].images
    copy = next(c for c in changes if c.summary.startswith("copy the team image"))
    assert copy.summary.startswith(f"copy the team image {tag} for the service from its own "
                                   "daemon into the system daemon")
    script = copy.script().strip()
    assert script.startswith("runuser -u sd35-api -- ")
    assert script.endswith(f"docker save {tag}' | docker load")


def test_rootless_scripts_parse_as_posix_sh(tmp_path: Path) -> None:
    facts = facts_of(ROOTLESS)
    inv = rootless_inventory(model="tiny")
    done = converged_rootless(facts, inv)
    switched = service_converged(facts, as_rootful(inv))
    for changes in (service.plan(facts, inv), service.plan(switched, inv),
                    service.plan(done, as_rootful(inv))):
        script = tmp_path / "apply.sh"
        script.write_text(apply_script("service", changes))
        checked = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stderr
    proof = service.proof(facts, inv)
    assert proof is not None and "runuser -u sd35-api -- " in proof.script
    script.write_text(proof.script)
    assert subprocess.run(["sh", "-n", str(script)]).returncode == 0
    assert proof.check("healthy\n") is None
    assert proof.check("health: starting\nTraceback\n") == "health: starting; Traceback"


def test_rootless_gpus_come_as_cdi_devices_in_its_daemon_on_the_h200(tmp_path: Path) -> None:
    h200 = facts_of(H200)
    facts = dataclasses.replace(h200, docker=dataclasses.replace(
        h200.docker, installed=True, version="28.0.4"),  # SYNTHESIZED: Docker 28.0 there
        groups={**h200.groups, "hfcache": dataclasses.replace(
            next(iter(h200.groups.values())), name="hfcache", gid=4242)})
    inv = parse_inventory({"defaults": {"docker_mode": "rootless"},
                           "service": {"gpus": "1,2"}}, tmp_path / "provision.toml")
    changes = service.plan(facts, inv)
    unit = next(a.content for c in changes for a in c.actions
                if isinstance(a, WriteFile) and a.path == service.UNIT_FILE)
    assert "--device=nvidia.com/gpu=1 --device=nvidia.com/gpu=2" in unit
    assert "--gpus" not in unit
    (cdi,) = [c for c in changes if c.summary.startswith("sd35-api: GPUs in her own daemon")]
    (written,) = [a for a in cdi.actions if isinstance(a, WriteFile)]
    assert written.member == "sd35-api"  # written as the account, never as root
    assert written.path == "/var/lib/sd35-api/.config/docker/daemon.json"  # where useradd puts it
    assert '"cdi": true' in written.content
    # From Docker 28.2 CDI is on by default: nothing to write.
    recent = dataclasses.replace(facts, docker=dataclasses.replace(facts.docker,
                                                                   version="28.5.1"))
    assert not [c for c in service.plan(recent, inv) if "CDI" in c.summary]
    # Docker 20.10 cannot hand a rootless daemon GPUs: blocked with the remedy, not GPU-less.
    old = dataclasses.replace(facts, docker=dataclasses.replace(facts.docker,
                                                                version="20.10.24"))
    with pytest.raises(StepBlocked, match="cannot hand GPUs to a rootless daemon"):
        service.plan(old, inv)


def test_facts_read_the_service_accounts_daemon_and_its_images() -> None:
    """The recorded rootless facts with a line for sd35-api's daemon added (SYNTHESIZED, in
    the facts script's format)."""
    text = (FIXTURES / "facts" / f"{ROOTLESS}.txt").read_text().replace(
        "dev|yes|yes|yes|rootless\n",
        "dev|yes|yes|yes|rootless\n"
        "sd35-api|yes|yes|yes|rootless|provision/sd35-fp8:0123456789ab,provision/x:1\n")
    facts = parse_facts(text, "/data/cache/huggingface")
    assert facts.member_daemons["sd35-api"] == MemberDaemon(
        "sd35-api", True, True, True, "rootless",
        ("provision/sd35-fp8:0123456789ab", "provision/x:1"))
    assert facts.member_daemons["dev"].images == ()  # a member's images are not listed


def test_rootless_doctor_asks_the_accounts_daemon_for_the_health() -> None:
    from provision.doctor import probe_script

    script = probe_script(rootless_inventory(), (), None, [])
    health = script.split("sec service-health\n")[1].split("\nsec ")[0]
    assert health.startswith("{ runuser -u sd35-api -- ") and "docker exec sd35-api" in health
    rootful = probe_script(as_rootful(rootless_inventory()), (), None, [])
    assert "{ docker exec sd35-api python -c " in rootful
