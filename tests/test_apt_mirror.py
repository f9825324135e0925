"""Docker's and NVIDIA's repositories through `[mirrors]`, run for real: a local signed apt
repository (tests/apt_repo.py) served inside a sandbox, which has no other apt source and whose
stand-in `nvidia-smi` reports an H100 on driver 535. No internet is used.

Shown: the keyring lands where the source names it, `apt-get update` verifies the signature,
the pinned toolkit version is what gets installed, a wrong key fails the nvidia step with one
clear line and leaves apt working; and for driver 535 the rendered image and the plan name a
CUDA flavour that driver runs.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import tomlkit

from provision import sandbox as sandboxes
from tests import apt_repo
from tests.conftest import Host

pytestmark = pytest.mark.sandbox

MIRROR = "http://127.0.0.1:8080"
STANDIN_SMI = Path(__file__).parent / "fixtures" / "standins" / "nvidia-smi"
KEYRING = "/usr/share/keyrings/nvidia-container-toolkit-keyring.gpg"
NVIDIA_LIST = "/etc/apt/sources.list.d/nvidia-container-toolkit.list"
PINNED = apt_repo.TOOLKIT_VERSIONS[0]  # the older one: the newest would come unpinned


@pytest.fixture(scope="module")
def mirrored(make_host, tmp_path_factory) -> tuple[Host, apt_repo.Repositories]:
    """A sandbox whose only apt source is the test mirror, served on its own loopback."""
    repos = apt_repo.build(tmp_path_factory.mktemp("apt"))
    host = make_host()
    host.copy_in(repos.root, "/srv/mirror")
    subprocess.run(["docker", "cp", str(STANDIN_SMI),
                    f"{host.sandbox.container}:/usr/local/bin/nvidia-smi"], check=True)
    host.exec(
        "mkdir -p /root/apt-sources-off && mv /etc/apt/sources.list /etc/apt/sources.list.d/* "
        "/root/apt-sources-off/ 2>/dev/null; rm -rf /var/lib/apt/lists/*; "
        "chmod 755 /usr/local/bin/nvidia-smi")
    container = sandboxes.docker_client().containers.get(host.sandbox.container)
    container.exec_run(["python3", "-m", "http.server", "8080", "--bind", "127.0.0.1",
                        "--directory", "/srv/mirror"], detach=True)
    for _ in range(50):
        if host.exec(f"curl -fsS {MIRROR}/nvidia/gpgkey >/dev/null")[0] == 0:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the test mirror did not answer inside the sandbox")
    return host, repos


def configure(host: Host, nvidia_key: Path, image: dict[str, str] | None = None) -> None:
    """The inventory: Docker and NVIDIA from the mirror (Docker's key by URL, NVIDIA's from a
    key file here), the toolkit pinned to the older of its two versions."""
    document = tomlkit.parse(host.inventory.read_text())
    document["defaults"]["docker_source"] = "auto"
    document["defaults"]["nvidia_toolkit_version"] = PINNED
    document["mirrors"] = {"docker_apt": f"{MIRROR}/docker",
                           "docker_apt_key": f"{MIRROR}/docker/linux/debian/gpg",
                           "nvidia_apt": f"{MIRROR}/nvidia", "nvidia_apt_key": str(nvidia_key)}
    if image is not None:
        document["image"] = image
    host.inventory.write_text(tomlkit.dumps(document))


def said(text: str) -> str:
    """Output as one line of single spaces: the terminal wraps long lines anywhere."""
    return " ".join(text.split())


def apt_update_is_clean(host: Host) -> str:
    code, output = host.exec("apt-get update 2>&1")
    assert code == 0, output
    assert not re.search(r"^(W|E|Err):", output, re.M), output
    return output


def test_a_wrong_key_fails_clearly_then_the_right_one_converges(mirrored) -> None:
    host, repos = mirrored
    configure(host, repos.wrong_key)
    result = host.cli("host", host.name, "--only", "docker,nvidia")
    assert result.exit_code != 0
    out = said(result.stdout)
    assert "[nvidia] failed: " in out, result.stdout
    assert ("apt did not accept NVIDIA's container toolkit repository at "
            f"{MIRROR}/nvidia with the key from {repos.wrong_key} (NO_PUBKEY") in out, out
    assert ("check [mirrors] nvidia_apt_key; the source and key were taken back, apt works "
            "as before") in out
    # Taken back: no source, no keyring; apt works (Docker's source, signed, stays).
    assert not host.testinfra.file(NVIDIA_LIST).exists
    assert not host.testinfra.file(KEYRING).exists
    apt_update_is_clean(host)
    # Docker came from the mirror: its keyring is where its source names it.
    sources = host.testinfra.file("/etc/apt/sources.list.d/docker.sources").content_string
    assert f"URIs: {MIRROR}/docker/linux/debian\n" in sources
    keyring = re.search(r"^Signed-By: (\S+)$", sources, re.M).group(1)
    assert host.testinfra.file(keyring).content_string == repos.key.read_text()
    assert host.testinfra.file("/usr/share/provision-stub/docker-ce").exists
    assert host.testinfra.service("docker").is_running

    configure(host, repos.key)
    result = host.cli("host", host.name, "--only", "docker,nvidia")
    assert result.exit_code == 0, result.stdout + result.stderr
    listing = host.testinfra.file(NVIDIA_LIST).content_string
    assert f"deb [signed-by={KEYRING}] {MIRROR}/nvidia/stable/deb/$(ARCH) /" in listing
    code, dearmored = host.exec(f"gpg --show-keys {KEYRING} 2>&1")
    assert code == 0 and "repo@provision.invalid" in dearmored, dearmored
    # apt verifies the mirror's signature with that keyring, and fetched its index through it.
    updated = apt_update_is_clean(host)
    assert f"{MIRROR}/nvidia/stable/deb/amd64  InRelease" in updated, updated
    assert host.exec("dpkg-query -W -f '${Version}' nvidia-container-toolkit")[1] == PINNED
    policy = host.exec("apt-cache policy nvidia-container-toolkit")[1]
    assert f"Candidate: {apt_repo.TOOLKIT_VERSIONS[1]}" in policy, "the pin is what held it"
    assert host.exec("nvidia-ctk --version")[1].startswith(
        f"NVIDIA Container Toolkit CLI version {PINNED.split('-')[0]}")
    daemon = json.loads(host.testinfra.file("/etc/docker/daemon.json").content_string)
    assert daemon["runtimes"]["nvidia"]["path"] == "nvidia-container-runtime"

    again = host.cli("host", host.name, "--only", "docker,nvidia", "--check")
    assert again.exit_code == 0, again.stdout + again.stderr


def test_driver_535_gets_an_image_it_runs(mirrored, tmp_path: Path) -> None:
    """The stand-in nvidia-smi reports an H100 on driver 535 (CUDA 12.2): the default cu130
    would need 580. render --host and the plan both give cu126 on a CUDA 12.2 base."""
    host, repos = mirrored
    host.add_members(["alice"])
    rendered = host.cli("render", "--host", host.name, "--member", "alice", "--out",
                        str(tmp_path / "alice"))
    assert rendered.exit_code == 0, rendered.stderr
    choice = ("driver 535.183.01 → cu126 wheels (CUDA 12.6 on a CUDA 12.2 driver: "
              "minor-version compatibility), base nvidia/cuda:12.2.2-base-ubuntu22.04")
    assert choice in said(rendered.stderr)
    dockerfile = (tmp_path / "alice" / ".devcontainer" / "Dockerfile").read_text()
    requirements = (tmp_path / "alice" / ".devcontainer" / "requirements.txt").read_text()
    assert "ARG BASE_IMAGE=nvidia/cuda:12.2.2-base-ubuntu22.04\n" in dockerfile
    assert "torch==2.11.0+cu126\n" in requirements and "cu130" not in requirements

    plan = host.cli("host", host.name, "--plan", "--only", "workspace")
    assert plan.exit_code == 0, plan.stdout + plan.stderr
    assert f"image for this host: {choice}" in said(plan.stdout)

    configure(host, repos.key, image={"cuda": "cu130"})
    try:
        refused = host.cli("host", host.name, "--plan", "--only", "workspace")
        assert refused.exit_code != 0
        out = said(refused.stdout)
        assert "[workspace] failed: [image] cuda = 'cu130': needs NVIDIA driver 580.65.06 " \
               "or newer" in out, out
        assert "this host's driver 535.183.01" in out
    finally:
        configure(host, repos.key, image={})
