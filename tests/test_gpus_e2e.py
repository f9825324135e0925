"""`provision gpus` on a real sandbox over SSH, rootless mode.

The sandbox has no GPU: nvidia-smi there is a STAND-IN (tests/fixtures/standins/nvidia-smi)
that reports four H100s and, as their compute processes, the pids of real processes this test
starts: a `sleep` in alice's container of her own rootless daemon, bob's native `sleep`, a
`sleep` of the service account and one of root (no member). Everything else — uid, cgroup,
age, the container's name and image from her daemon's record — the command reads from the host
as it would on a GPU server; `doctor` warns of alice's GPU outside her assignment and of root's.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from provision.gpus import ACTIVITY_RECORD
from provision.inventory import SERVICE_NAME
from provision.sandbox import BASE_IMPORTED
from tests.conftest import Host, converge

pytestmark = pytest.mark.sandbox

STANDIN_SMI = Path(__file__).parent / "fixtures" / "standins" / "nvidia-smi"
IMAGE_TAR = "/srv/provision-test/base.tar"
UUIDS = [f"GPU-{n}{n}{n}{n}{n}{n}{n}{n}-{n}{n}{n}{n}-4{n}{n}{n}-8{n}{n}{n}-{n * 12}"
         for n in "0123"]
# index, name, driver, compute capability, memory total, uuid, memory used, utilisation
GPUS = [f"{i}, NVIDIA H100 80GB HBM3, 535.183.01, 9.0, 81559, {uuid}, {used}, {util}"
        for i, (uuid, used, util) in enumerate(zip(UUIDS, (16384, 6144, 2048, 0), (0, 40, 0, 0),
                                                   strict=True))]


def start(host: Host, user: str) -> int:
    """A long `sleep` of `user`, native, detached from the exec that starts it: its pid."""
    pidfile = f"/tmp/{user}.sleep.pid"
    code, output = host.exec(
        f"setsid runuser -u {user} -- sh -c 'echo $$ > {pidfile}; exec sleep 3600' </dev/null "
        f">/dev/null 2>&1 & for i in $(seq 50); do [ -s {pidfile} ] && break; sleep 0.1; done; "
        f"cat {pidfile}")
    assert code == 0, output
    return int(output.strip())


@pytest.fixture(scope="module")
def gpu_host(make_host) -> tuple[Host, dict[str, int]]:
    host: Host = make_host(docker_mode="rootless")
    keys = host.add_members(["alice"], gpus="0")
    host.add_members(["bob"], gpus="1")
    report = converge(host, "--only", "users,docker,rootless")
    assert report["exit"] == 0, report["stderr"]

    # No registry in reach: her daemon gets the sandbox's base image from a file.
    host.copy_image_file(BASE_IMPORTED, IMAGE_TAR)
    code, output = host.ssh("alice", keys["alice"],
                            f"docker load -i {IMAGE_TAR} >/dev/null && docker run -d --name "
                            f"napper {BASE_IMPORTED} sleep 3600 >/dev/null && "
                            "docker inspect -f '{{.State.Pid}}' napper", timeout=300)
    assert code == 0, output
    pids = {"alice": int(output.strip().splitlines()[-1]), "bob": start(host, "bob")}
    host.exec(f"id {SERVICE_NAME} || useradd --system --create-home --home-dir "
              f"/var/lib/{SERVICE_NAME} {SERVICE_NAME}")
    pids["service"] = start(host, SERVICE_NAME)
    pids["root"] = start(host, "root")
    subprocess.run(["docker", "cp", str(STANDIN_SMI),
                    f"{host.sandbox.container}:/usr/local/bin/nvidia-smi.standin"], check=True)
    # alice on GPU 0 (hers) and GPU 2 (not hers); bob, the service and root (no member) on
    # GPU 1; GPU 3 unused.
    apps = [f"{UUIDS[0]}, {pids['alice']}, 16384", f"{UUIDS[2]}, {pids['alice']}, 2048",
            f"{UUIDS[1]}, {pids['bob']}, 2048", f"{UUIDS[1]}, {pids['service']}, 4096",
            f"{UUIDS[1]}, {pids['root']}, 10"]
    host.exec("printf '%s\\n' " + " ".join(f"'{line}'" for line in GPUS)
              + " > /etc/nvidia-smi-standin.csv && printf '%s\\n' "
              + " ".join(f"'{line}'" for line in apps) + " > /etc/nvidia-smi-standin-apps.csv")
    return host, pids


def test_without_nvidia_smi_it_says_so_in_one_line(gpu_host) -> None:
    host, _ = gpu_host
    result = host.cli("gpus", host.name)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == f"{host.name}: no NVIDIA GPU on this host"


def test_the_table_and_json_name_each_member_container_and_daemon(gpu_host) -> None:
    host, pids = gpu_host
    host.exec("install -m 0755 /usr/local/bin/nvidia-smi.standin /usr/local/bin/nvidia-smi")
    try:
        table = host.cli("gpus", host.name)
        as_json = host.cli("gpus", host.name, "--json", "--idle-after", "0s")
        doctor = host.cli("doctor", host.name, "--json", "--min-free-gb", "1")
    finally:
        host.exec("rm -f /usr/local/bin/nvidia-smi")
    assert table.exit_code == 0, table.stderr
    rows = {line.split("│")[4].strip(): line for line in table.stdout.splitlines()
            if line.count("│") > 5 and line.split("│")[4].strip().isdigit()}
    alice = rows[str(pids["alice"])]
    assert "member alice (sleep)" in alice
    assert f"napper ({BASE_IMPORTED}), rootless: alice" in alice
    assert "member bob (sleep)" in rows[str(pids["bob"])]
    assert "service (sleep)" in rows[str(pids["service"])]
    assert "other: root (sleep)" in rows[str(pids["root"])]
    for line in ("unused: GPU 3", "alice: assigned 0, using 0 and 2 (outside her assignment: 2)",
                 "bob: assigned 1, using 1"):
        assert line in table.stdout

    assert as_json.exit_code == 0, as_json.stderr
    report = json.loads(as_json.stdout)["hosts"][0]
    found = {(p["gpu"], p["pid"]): p for g in report["gpus"] for p in g["processes"]}
    napper = found[(0, pids["alice"])]
    assert (napper["owner"], napper["member"]) == ("member alice", "alice")
    assert napper["container"]["name"] == "napper"
    assert napper["container"]["image"] == BASE_IMPORTED
    assert napper["container"]["daemon"] == "rootless: alice"
    assert found[(1, pids["bob"])]["owner"] == "member bob"
    assert found[(1, pids["bob"])]["container"] is None
    assert found[(1, pids["service"])]["owner"] == "service"
    assert report["unused"] == [3]
    assert [a["line"] for a in report["assignments"]] == [
        "alice: assigned 0, using 0 and 2 (outside her assignment: 2)",
        "bob: assigned 1, using 1"]
    # --idle-after 0s: at 0 % (GPUs 0 and 2) idle at once; GPU 1 is busy (40 %).
    assert napper["idle"] and found[(2, pids["alice"])]["idle"]
    assert not found[(1, pids["bob"])]["idle"]
    record = host.testinfra.file(ACTIVITY_RECORD)
    assert (record.user, record.mode) == ("root", 0o600)
    assert f"{UUIDS[1]},{pids['bob']}," in record.content_string

    checks = {c["name"]: c for c in json.loads(doctor.stdout)["checks"]}
    assert checks["GPUs within assignments"]["status"] == "warn"
    assert "alice: assigned 0, using 0 and 2" in checks["GPUs within assignments"]["evidence"]
    held = checks["GPU memory held by the team"]
    assert held["status"] == "warn"
    assert f"GPU 1: pid {pids['root']} (sleep) of other: root" in held["evidence"]
