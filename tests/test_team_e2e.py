"""Journeys 4-6 on a real sandbox: onboard a teammate end to end, offboard her, and doctor a
healthy host, then the same host broken one way at a time."""

from __future__ import annotations

import json
import subprocess

import pytest

from provision.sandbox import BASE_IMPORTED
from tests.conftest import Host, converge, doctor

pytestmark = pytest.mark.sandbox

CACHE = "/data/cache/huggingface"
FAKE_TORCH_IMAGE = "team/old-torch:2.0"


@pytest.fixture(scope="module")
def team_host(make_host) -> tuple[Host, dict]:
    host: Host = make_host()
    keys = host.add_members(["alice", "bob"])
    assert converge(host)["exit"] == 0
    host.load_image(BASE_IMPORTED)
    return host, keys


def test_onboarding_then_offboarding_a_teammate(team_host, tmp_path) -> None:
    host, _ = team_host
    keys = tmp_path / "carol"
    keys.mkdir()
    from provision.sandbox import new_key_pair

    new_key_pair(keys)
    added = host.cli("team", "add", "carol", "--key", str(keys / "id_ed25519.pub"))
    assert added.exit_code == 0, added.stderr
    report = converge(host)
    assert report["exit"] == 0, report["stderr"]
    touched = {c["summary"].split(" ")[-1] for s in report["hosts"][0]["steps"]
               for c in s["changes"]}
    assert not any("alice" in c["summary"] or "bob" in c["summary"]
                   for s in report["hosts"][0]["steps"] for c in s["changes"]), touched

    bundle = tmp_path / "bundle"
    result = host.cli("onboard", "carol", "--host", host.name, "--out", str(bundle),
                      "--identity-file", str(keys / "id_ed25519"))
    assert result.exit_code == 0, result.stderr
    assert {p.name for p in bundle.iterdir()} >= {"ssh_config", "README.md", "inference.py",
                                                  ".devcontainer", ".vscode"}
    assert "Reopen in Container" in (bundle / "README.md").read_text()

    def ssh(command: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["ssh", "-F", str(bundle / "ssh_config"), "-o", "BatchMode=yes",
             "-o", f"UserKnownHostsFile={host.sandbox.known_hosts}", host.name, command],
            capture_output=True, text=True, timeout=120)

    logged_in = ssh(f"id -un; ls ~/sd35-fp8/.devcontainer; docker run --rm {BASE_IMPORTED} "
                    "echo container-ok")
    assert logged_in.returncode == 0, logged_in.stderr
    assert logged_in.stdout.split()[0] == "carol"
    assert "devcontainer.json" in logged_in.stdout and "container-ok" in logged_in.stdout

    assert host.cli("team", "remove", "carol").exit_code == 0
    assert converge(host)["exit"] == 0
    refused = ssh("true")
    assert refused.returncode == 255 and "Permission denied" in refused.stderr
    assert host.testinfra.file("/home/carol/sd35-fp8/inference.py").exists


def test_doctor_passes_a_healthy_host(team_host) -> None:
    host, _ = team_host
    code, checks = doctor(host)
    assert code == 0, checks
    assert {c["status"] for c in checks.values()} <= {"pass", "skip"}
    assert checks["alice reaches docker"]["status"] == "pass"
    assert checks["bob's cache"]["status"] == "pass"
    assert checks["nvidia runtime"]["status"] == "skip"
    assert "no NVIDIA GPU" in checks["GPU inside a container"]["evidence"]


@pytest.mark.parametrize(("breakage", "repair", "check", "evidence"), [
    ("rm /etc/ssh/sshd_config.d/01-provision-keepalive.conf && systemctl reload ssh", None,
     "ssh keepalive", "ClientAliveInterval 0"),
    ("gpasswd -d alice docker", "gpasswd -a alice docker", "alice reaches docker",
     "permission denied"),
    # GNU chmod keeps a directory's setgid bit through a numeric 0755.
    (f"chmod 0755 {CACHE}", f"chmod 2775 {CACHE}", "shared cache", "root:hfcache 2755"),
    (f"echo hf_leak > {CACHE}/token", f"rm {CACHE}/token", "no token in the shared cache",
     f"{CACHE}/token"),
])
def test_doctor_names_each_problem_with_its_remedy(team_host, breakage, repair, check,
                                                   evidence) -> None:
    host, _ = team_host
    assert host.exec(breakage)[0] == 0
    try:
        code, checks = doctor(host)
        assert code == 13
        assert checks[check]["status"] == "fail", checks[check]
        assert evidence in checks[check]["evidence"]
        assert checks[check]["remedy"]
    finally:
        if repair:
            host.exec(repair)
        assert converge(host)["exit"] == 0
    assert doctor(host)[0] == 0


def test_doctor_sees_a_full_cache_volume(team_host) -> None:
    host, _ = team_host
    result = host.cli("doctor", host.name, "--json", "--min-free-gb", "1000000")
    assert result.exit_code == 13
    disk = next(c for c in json.loads(result.stdout)["checks"]
                if c["name"] == "cache disk space")
    assert disk["status"] == "fail" and "threshold 1e+06 GB" in disk["evidence"]
    assert "free space" in disk["remedy"]
    assert "1 check(s) failed: cache disk space" in result.stderr


def test_doctor_looks_inside_an_image_with_torch_2_0(team_host, tmp_path) -> None:
    host, _ = team_host
    # A stand-in for an image pinned to torch 2.0: what doctor reads is the version and the
    # missing float8 dtype, which the stand-in shows exactly as torch 2.0.1 does.
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text('__version__ = "2.0.1"\n')
    (tmp_path / "Dockerfile").write_text(
        f"FROM {BASE_IMPORTED}\n"
        "RUN apt-get update -qq && apt-get install -y -qq python3 >/dev/null\n"
        "COPY torch /usr/lib/python3/dist-packages/torch\n")
    host.copy_in(tmp_path, "/tmp/old-torch")
    code, output = host.exec(f"docker build -q -t {FAKE_TORCH_IMAGE} /tmp/old-torch")
    assert code == 0, output
    code, checks = doctor(host, "--image", FAKE_TORCH_IMAGE)
    assert code == 13
    image = checks["image: torch float8"]
    assert image["status"] == "fail" and image["evidence"] == \
        "torch 2.0.1: float8_e4m3fn missing"
    assert ">= 2.1" in image["remedy"]
