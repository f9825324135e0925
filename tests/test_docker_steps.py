"""docker and nvidia steps on real sandboxes (Debian's docker.io, the source reachable here)."""

from __future__ import annotations

import json

import pytest
import tomlkit

from provision.sandbox import BASE_IMPORTED
from tests.conftest import Host, changes_of, converge

pytestmark = pytest.mark.sandbox

DAEMON = "/etc/docker/daemon.json"


def set_docker_daemon(host: Host, options: dict) -> None:
    document = tomlkit.parse(host.inventory.read_text())
    document["defaults"]["docker_daemon"] = options
    host.inventory.write_text(tomlkit.dumps(document))


def step(report: dict, name: str) -> dict:
    return next(s for s in report["hosts"][0]["steps"] if s["step"] == name)


@pytest.fixture(scope="module")
def docker_host(make_host) -> tuple[Host, dict]:
    """Docker installed by the tool, a key set in daemon.json beforehand by someone else."""
    host: Host = make_host()
    keys = host.add_members(["alice"])
    host.exec(f"mkdir -p /etc/docker && echo '{{\"debug\": true, \"log-opts\": "
              f"{{\"max-file\": \"2\"}}}}' > {DAEMON}")
    set_docker_daemon(host, {"log-opts": {"max-size": "10m"}})
    report = converge(host)
    assert report["exit"] == 0, report["stderr"]
    assert any(c.startswith("install docker.io") for c in changes_of(report))
    host.load_image(BASE_IMPORTED)
    return host, keys


def test_docker_is_installed_running_and_members_can_use_it(docker_host) -> None:
    host, keys = docker_host
    service = host.testinfra.service("docker")
    assert service.is_running and service.is_enabled
    code, output = host.ssh("alice", keys["alice"],
                            f"docker run --rm {BASE_IMPORTED} echo hello-from-a-container")
    assert code == 0 and "hello-from-a-container" in output
    assert changes_of(converge(host)) == []


def test_daemon_json_is_merged_not_overwritten(docker_host) -> None:
    host, _ = docker_host
    daemon = json.loads(host.testinfra.file(DAEMON).content_string)
    assert daemon == {"debug": True, "log-opts": {"max-file": "2", "max-size": "10m"}}
    info = host.testinfra.run("docker info --format '{{.Debug}}'").stdout.strip()
    assert info == "true"


def test_nvidia_is_skipped_without_a_gpu_and_required_gpu_fails(docker_host) -> None:
    host, _ = docker_host
    report = converge(host)
    assert step(report, "nvidia") == {**step(report, "nvidia"), "status": "skipped",
                                      "message": "skipped: no NVIDIA GPU"}
    result = host.cli("host", host.name, "--require-gpu")
    assert result.exit_code == 11 and len(result.error_lines) == 1
    assert "no NVIDIA GPU" in result.stderr and "--require-gpu" in result.stderr


def test_no_docker_restart_under_running_containers_without_yes(docker_host) -> None:
    host, _ = docker_host
    code, _ = host.exec(f"docker run -d --name busy {BASE_IMPORTED} sleep 600")
    assert code == 0
    pid = host.exec("systemctl show -p MainPID --value docker")[1]
    before = host.testinfra.file(DAEMON).content_string
    set_docker_daemon(host, {"log-opts": {"max-size": "20m"}})
    try:
        plan = converge(host, "--plan")
        assert step(plan, "docker")["changes"][0]["restarts_docker"] is True
        result = host.cli("host", host.name)
        assert result.exit_code == 11
        assert "would stop 1 running container(s)" in result.stderr
        assert "--yes" in result.stderr
        assert host.exec("systemctl show -p MainPID --value docker")[1] == pid
        assert host.testinfra.file(DAEMON).content_string == before
        assert host.exec("docker inspect -f '{{.State.Running}}' busy")[1].strip() == "true"

        allowed = converge(host, "--yes")
        assert allowed["exit"] == 0, allowed["stderr"]
        assert host.exec("systemctl show -p MainPID --value docker")[1] != pid
        daemon = json.loads(host.testinfra.file(DAEMON).content_string)
        assert daemon["log-opts"] == {"max-file": "2", "max-size": "20m"}
    finally:
        host.exec("docker rm -f busy")
        set_docker_daemon(host, {"log-opts": {"max-size": "10m"}})
        assert converge(host, "--yes")["exit"] == 0


def test_a_malformed_daemon_json_is_reported_and_left_alone(docker_host) -> None:
    host, _ = docker_host
    original = host.testinfra.file(DAEMON).content_string
    host.exec(f"printf '{{\"debug\": true,' > {DAEMON}")
    set_docker_daemon(host, {"log-opts": {"max-size": "30m"}})
    try:
        result = host.cli("host", host.name)
        assert result.exit_code == 11 and len(result.error_lines) == 1
        assert "daemon.json is not valid JSON" in result.stderr
        assert host.testinfra.file(DAEMON).content_string == '{"debug": true,'
    finally:
        host.exec(f"cat > {DAEMON} <<'EOF'\n{original}EOF")
        set_docker_daemon(host, {"log-opts": {"max-size": "10m"}})
