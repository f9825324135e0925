"""Rootless Docker on a real sandbox, seen by a member over SSH.

One sandbox is converged rootful first (members in the docker group, as every host was before
docker_mode existed), then switched to rootless: the switch is a plan like any other, and a
re-run is a no-op. Then, as alice over SSH: her own daemon answers, the system socket does not,
her containers' root is not the host's, sudo is only hers, and bob's home and daemon are out of
her reach.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import tomlkit

from provision.sandbox import BASE_IMPORTED
from tests.conftest import Host, assert_nothing_to_do, changes_of, converge, doctor

pytestmark = pytest.mark.sandbox

IMAGE_TAR = "/srv/provision-test/base.tar"
# docker 20.10 (Debian 12) has no `docker context show`.
CURRENT_CONTEXT = "docker context ls --format '{{if .Current}}{{.Name}}{{end}}' | grep ."


@pytest.fixture(scope="module")
def rootless_host(make_host) -> tuple[Host, dict[str, Path]]:
    host: Host = make_host(docker_mode="rootful")
    keys = host.add_members(["alice"], sudo=["/usr/bin/true"])
    keys |= host.add_members(["bob"])
    rootful = converge(host, "--yes")
    assert rootful["exit"] == 0, rootful["stderr"]
    assert "docker" in host.testinfra.user("alice").groups

    document = tomlkit.parse(host.inventory.read_text())
    document["defaults"]["docker_mode"] = "rootless"
    host.inventory.write_text(tomlkit.dumps(document))
    plan = host.cli("host", host.name, "--plan")
    assert plan.exit_code == 0, plan.stderr
    assert "docker_mode = rootless" in plan.stdout
    switched = converge(host, "--yes")
    assert switched["exit"] == 0, switched["stderr"]
    summaries = changes_of(switched)
    assert any(s.startswith("alice leaves the docker group") for s in summaries)
    assert any(s.startswith("alice: her own Docker daemon") for s in summaries)

    # No registry in reach: her daemon gets the sandbox's base image from a file.
    host.copy_image_file(BASE_IMPORTED, IMAGE_TAR)
    code, output = host.ssh("alice", keys["alice"], f"docker load -i {IMAGE_TAR}", timeout=300)
    assert code == 0, output
    return host, keys


def test_switching_to_rootless_converges_and_a_rerun_is_a_no_op(rootless_host) -> None:
    host, _ = rootless_host
    assert_nothing_to_do(host)
    for name in ("alice", "bob"):
        assert "docker" not in host.testinfra.user(name).groups
        assert host.testinfra.file(f"/var/lib/systemd/linger/{name}").exists
        assert host.testinfra.file(f"/home/{name}").mode == 0o700
    ranges = host.testinfra.file("/etc/subuid").content_string
    assert "alice:" in ranges and "bob:" in ranges


def test_docker_info_shows_her_own_rootless_daemon(rootless_host) -> None:
    host, keys = rootless_host
    code, output = host.ssh("alice", keys["alice"],
                            f"{CURRENT_CONTEXT}; docker info -f '{{{{.SecurityOptions}}}} "
                            "{{.DockerRootDir}}'")
    assert code == 0, output
    assert output.splitlines()[0] == "rootless"
    assert "name=rootless" in output and "/home/alice/.local/share/docker" in output


def test_the_system_socket_is_refused(rootless_host) -> None:
    host, keys = rootless_host
    code, output = host.ssh("alice", keys["alice"],
                            "docker -H unix:///var/run/docker.sock version")
    assert code != 0 and "permission denied" in output.lower()


def test_her_containers_root_is_not_the_hosts(rootless_host) -> None:
    host, keys = rootless_host
    run = f"docker run --rm -v /:/host {BASE_IMPORTED}"
    code, output = host.ssh("alice", keys["alice"], f"{run} cat /host/etc/shadow")
    assert code != 0 and "Permission denied" in output
    # rootlesskit gives her daemon a private copy of /etc (--copy-up=/etc), so inside the
    # container a write to /host/etc lands in that copy: the host's /etc is what must not move.
    host.ssh("alice", keys["alice"], f"{run} touch /host/etc/x")
    assert not host.testinfra.file("/etc/x").exists
    for target in ("/host/root/x", "/host/usr/x", "/host/home/bob/x"):
        code, output = host.ssh("alice", keys["alice"], f"{run} touch {target}")
        assert code != 0 and "Permission denied" in output, target
    code, output = host.ssh("alice", keys["alice"],
                            f"{run} sh -c 'echo mine > /host/home/alice/from-container' && "
                            "stat -c %U /home/alice/from-container")
    assert code == 0 and output.strip() == "alice", output


def test_sudo_lists_only_her_commands(rootless_host) -> None:
    host, keys = rootless_host
    code, output = host.ssh("alice", keys["alice"], "sudo -n -l")
    assert code == 0, output
    allowed = [ln.strip() for ln in output.splitlines() if "NOPASSWD" in ln or ln.startswith(
        "    (")]
    assert allowed and all(ln.endswith("/usr/bin/true") for ln in allowed), output
    code, output = host.ssh("bob", keys["bob"], "sudo -n -l")
    assert code != 0


def test_another_members_home_and_daemon_are_out_of_reach(rootless_host) -> None:
    host, keys = rootless_host
    uid = host.testinfra.user("bob").uid
    code, output = host.ssh("alice", keys["alice"], "ls /home/bob")
    assert code != 0 and "Permission denied" in output
    code, output = host.ssh("alice", keys["alice"],
                            f"docker -H unix:///run/user/{uid}/docker.sock version")
    assert code != 0 and "permission denied" in output.lower()
    code, output = host.ssh("bob", keys["bob"], f"{CURRENT_CONTEXT} && docker images -q")
    assert code == 0 and output.split() == ["rootless"], output  # alice's images are hers


def test_doctor_passes_her_rootless_setup(rootless_host) -> None:
    host, _ = rootless_host
    code, checks = doctor(host, "--member", "alice")
    assert code == 0, checks
    for name in ("alice reaches docker", "alice's own daemon",
                 "alice is refused the system socket", "alice's lingering",
                 "subordinate ranges"):
        assert checks[name]["status"] == "pass", checks[name]
    assert checks["alice's GPU runtime"]["status"] == "skip"
    assert "alice 1" in checks["subordinate ranges"]["evidence"]


def test_doctor_sees_her_in_the_docker_group_again(rootless_host) -> None:
    host, _ = rootless_host
    host.exec("gpasswd -a alice docker")
    try:
        code, checks = doctor(host, "--member", "alice")
    finally:
        host.exec("gpasswd -d alice docker")
    check = checks["alice is refused the system socket"]
    assert code != 0 and check["status"] == "fail"
    assert "out of the docker group" in check["remedy"]


def test_offboarding_stops_her_daemon_and_keeps_its_data(rootless_host) -> None:
    """Near the end of this module: bob leaves the team."""
    host, _ = rootless_host
    uid = host.testinfra.user("bob").uid
    document = tomlkit.parse(host.inventory.read_text())
    members = document["members"]
    for index in reversed(range(len(members))):
        if members[index]["name"] == "bob":
            del members[index]
    host.inventory.write_text(tomlkit.dumps(document))
    report = converge(host, "--yes")
    assert report["exit"] == 0, report["stderr"]
    assert "offboard bob: lingering off (her own Docker daemon stops; its data stays in her " \
           "home)" in changes_of(report)
    code, _ = host.exec(f"for i in $(seq 40); do [ -S /run/user/{uid}/docker.sock ] || "
                             "exit 0; sleep 0.5; done; exit 1")
    assert code == 0, "bob's daemon still answers"
    assert host.testinfra.file("/home/bob/.local/share/docker").is_directory
    assert changes_of(converge(host)) == []


def test_switching_back_to_rootful_keeps_her_data_and_converges(rootless_host) -> None:
    """Last in this module: it leaves the host rootful."""
    host, keys = rootless_host
    document = tomlkit.parse(host.inventory.read_text())
    document["defaults"]["docker_mode"] = "rootful"
    host.inventory.write_text(tomlkit.dumps(document))
    report = converge(host, "--yes")
    assert report["exit"] == 0, report["stderr"]
    assert "alice: stop her rootless daemon (its images and data stay in /home/alice/.local/" \
           "share/docker) and use the system daemon (docker context default)" in \
        changes_of(report)
    assert changes_of(converge(host)) == []
    assert "docker" in host.testinfra.user("alice").groups
    assert host.testinfra.file("/home/alice/.local/share/docker").is_directory
    code, output = host.ssh("alice", keys["alice"], "docker info -f '{{.SecurityOptions}}'")
    assert code == 0 and "rootless" not in output, output
