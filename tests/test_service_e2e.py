"""The generation service end to end on a sandbox (CPU, tiny model): converged with
`[service]`, run by systemd in the team image, reached as a member reaches it, through an SSH
port forward to the host's loopback.

Twice on one sandbox: in the system daemon (docker_mode rootful), then switched to
docker_mode rootless, where the container, and the image by its tag, move into the sd35-api
account's own rootless daemon."""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import json
import select
import shlex
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import paramiko
import pytest
import tomlkit

from provision.sandbox import DEMO_MEMBER
from tests.conftest import Host, assert_nothing_to_do, converge, require_modules

require_modules("httpx")

import httpx  # noqa: E402
from PIL import Image  # noqa: E402

pytestmark = pytest.mark.sandbox

PORT = 8000
BUILD_TIMEOUT = 2400  # seconds: a converge here builds the service's image
SERVICE = """
[service]
port = 8000
model = "tiny"
fp8 = "storage"
max_queue = 4
"""


class Forward:
    """`ssh -L`: a local port whose connections go, through the member's SSH connection, to
    127.0.0.1:PORT on the host (the only address the service listens on)."""

    def __init__(self, host: Host, user: str, key: Path, remote_port: int) -> None:
        self.client = paramiko.SSHClient()
        self.client.load_host_keys(str(host.sandbox.known_hosts))
        self.client.set_missing_host_key_policy(paramiko.RejectPolicy())
        self.client.connect("127.0.0.1", host.sandbox.port, username=user,
                            key_filename=str(key), allow_agent=False, look_for_keys=False,
                            timeout=10)
        self.remote_port = remote_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                local, peer = self.listener.accept()
            except OSError:
                return
            transport = self.client.get_transport()
            assert transport is not None
            try:
                channel = transport.open_channel("direct-tcpip",
                                                 ("127.0.0.1", self.remote_port), peer)
            except paramiko.ChannelException:
                local.close()  # nothing listens there now (a restart): as ssh -L, refuse it
                continue
            threading.Thread(target=self._pump, args=(local, channel), daemon=True).start()

    @staticmethod
    def _pump(local: socket.socket, channel: paramiko.Channel) -> None:
        with local, channel:
            while True:
                ready, _, _ = select.select([local, channel], [], [], 60)
                if not ready:
                    return
                for source, sink in ((local, channel), (channel, local)):
                    if source in ready:
                        data = source.recv(65536)
                        if not data:
                            return
                        sink.sendall(data)

    def close(self) -> None:
        self.listener.close()
        self.client.close()




@contextlib.contextmanager
def client_through_ssh(host: Host) -> Iterator[httpx.Client]:
    """An HTTP client to the service as a member reaches it: her SSH connection's forward."""
    key = host.sandbox.identity_file.parent / DEMO_MEMBER / "id_ed25519"
    forward = Forward(host, DEMO_MEMBER, key, PORT)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{forward.port}", timeout=300) as client:
            yield client
    finally:
        forward.close()


@pytest.fixture(scope="module")
def served(make_host) -> Iterator[tuple[Host, dict, httpx.Client]]:
    """`sandbox up` (the demo member, the CPU image's base and wheels), `[service]` added,
    then `provision host`: the image is built on the host and the unit started and proven."""
    host: Host = make_host(try_it=True)
    with host.inventory.open("a") as inventory:
        inventory.write(SERVICE)
    report = converge(host, timeout=BUILD_TIMEOUT)
    assert report["exit"] == 0, report["stderr"][-3000:]
    with client_through_ssh(host) as client:
        yield host, report, client


def ready(client: httpx.Client, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            answer = client.get("/health")
            if answer.status_code == 200:
                return answer.json()
        except httpx.TransportError:
            pass  # the container is coming back: nothing listens yet
        assert time.monotonic() < deadline, "the service did not come back ready"
        time.sleep(1)


def test_converge_builds_the_image_and_starts_the_unit_under_its_own_account(served) -> None:
    host, report, _ = served
    (entry,) = [s for s in report["hosts"][0]["steps"] if s["step"] == "service"]
    assert entry["status"] == "changed"
    summaries = [c["summary"] for c in entry["changes"]]
    assert summaries[0].startswith("system account sd35-api")
    assert any(s.startswith("build the team image provision/sd35-fp8:") for s in summaries)
    unit_diff = next(c["diff"] for c in entry["changes"]
                     if c["files"] == ["/etc/systemd/system/sd35-api.service"])
    assert "+Restart=always" in unit_diff and "+  --publish 127.0.0.1:8000:8000 \\" in unit_diff
    assert host.exec("systemctl is-active sd35-api.service")[1].strip() == "active"
    assert host.exec("systemctl is-enabled sd35-api.service")[1].strip() == "enabled"
    code, account = host.exec("getent passwd sd35-api")
    assert code == 0 and account.strip().endswith(":/var/lib/sd35-api:/usr/sbin/nologin")
    code, user = host.exec("docker exec sd35-api id -u")
    assert user.strip() == account.split(":")[2]
    # The shared cache is read-only inside, and the port is on the host's loopback only.
    code, _ = host.exec("docker exec sd35-api touch /hf/written-by-the-service")
    assert code != 0
    ports = host.exec("docker port sd35-api")[1]
    assert ports.strip() == "8000/tcp -> 127.0.0.1:8000"
    assert "sd35-api: ready in" in host.exec("journalctl -u sd35-api.service --no-pager")[1]


def test_health_and_a_real_png_through_the_ssh_forward(served) -> None:
    _, _, client = served
    health = ready(client)
    assert (health["status"], health["model"], health["device"]) == ("ready", "tiny", "cpu")
    assert health["fp8_requested"] == health["fp8_applied"] == "storage"
    assert health["compiled"] is False and health["queue"]["max_queue"] == 4
    answer = client.post("/generate", json={"prompt": "a lighthouse at dusk", "steps": 4,
                                            "height": 128, "width": 128, "seed": 7})
    assert answer.status_code == 200, answer.text
    with Image.open(io.BytesIO(answer.content)) as png:
        assert png.format == "PNG" and png.size == (128, 128)
        assert len([n for n in png.convert("L").histogram() if n]) > 10
    metrics = json.loads(answer.headers["x-metrics"])
    assert metrics["fp8_applied"] == "storage" and metrics["latents_shape"] == [1, 16, 16, 16]


@pytest.mark.parametrize(("body", "status", "message"), [
    (b'{"prompt": "a cat", "steps": ', 400, "not valid JSON"),
    (b'{"prompt": "a cat", "width": 10000, "height": 10000}', 422, "at most 1024"),
    (b'{"prompt": "a cat", "steps": -5}', 422, "steps: Input should be greater than"),
])
def test_bad_requests_are_4xx_with_a_message_and_the_service_stays_up(
        served, body: bytes, status: int, message: str) -> None:
    _, _, client = served
    ready(client)
    answer = client.post("/generate", content=body, headers={"content-type": "application/json"})
    assert answer.status_code == status and message in answer.json()["error"]
    assert client.get("/health").status_code == 200


def test_twenty_concurrent_requests_with_max_queue_4_get_a_png_or_a_429(served) -> None:
    host, _, client = served
    ready(client)
    restarts = host.exec("systemctl show -p NRestarts --value sd35-api.service")[1].strip()
    body = {"prompt": "a crowded market", "steps": 60, "height": 256, "width": 256}
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda i: client.post("/generate", json={**body, "seed": i}),
                                range(20)))
    statuses = sorted(a.status_code for a in answers)
    assert set(statuses) <= {200, 429}, statuses
    assert 1 <= statuses.count(200) <= 19 and statuses.count(429) >= 1, statuses
    for answer in answers:
        if answer.status_code == 200:
            assert answer.content.startswith(b"\x89PNG\r\n\x1a\n")
        else:
            assert int(answer.headers["retry-after"]) >= 1
    assert ready(client)["queue"]["admitted"] == 0
    assert host.exec("systemctl show -p NRestarts --value sd35-api.service")[1].strip() == \
        restarts  # it never went down


def service_checks(host: Host) -> dict[str, dict]:
    result = host.cli("doctor", host.name, "--json", "--min-free-gb", "1")
    checks = json.loads(result.stdout)["checks"]
    return {c["name"]: c for c in checks if c["name"].startswith("service")}


def test_verify_service_calls_it_through_the_ssh_connection(served, tmp_path: Path) -> None:
    host, _, _ = served
    result = host.cli("verify", host.name, "--service", "--json", "--out", str(tmp_path))
    assert result.exit_code == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["address"] == "127.0.0.1:8000" and report["health"]["status"] == "ready"
    assert report["metrics"]["fp8_applied"] == "storage"
    with Image.open(report["png"]) as png:
        assert png.size == (128, 128)


def test_doctor_checks_the_unit_the_health_and_the_restarts(served) -> None:
    host, _, _ = served
    found = service_checks(host)
    assert {name: c["status"] for name, c in found.items()} == {
        "service unit": "pass", "service health": "pass", "service restarts": "pass"}
    assert found["service health"]["evidence"].startswith("ready: tiny on cpu")


def kill_server_and_await_restart(host: Host, client: httpx.Client,
                                  in_its_daemon: Callable[[str], tuple[int, str]],
                                  timeout: float) -> None:
    """`kill -9` the server's process (its pid asked of the daemon its container runs in),
    then wait for systemd to count a restart and for /health to answer ready again."""
    ready(client)
    before = int(host.exec("systemctl show -p NRestarts --value sd35-api.service")[1])
    pid = in_its_daemon("docker inspect --format '{{.State.Pid}}' sd35-api")[1].strip()
    assert pid.isdigit() and pid != "0"
    code, output = host.exec(f"kill -9 {pid}")
    assert code == 0, output
    deadline = time.monotonic() + timeout
    while int(host.exec("systemctl show -p NRestarts --value sd35-api.service")[1]) == before:
        assert time.monotonic() < deadline, "systemd did not restart the service"
        time.sleep(1)
    assert ready(client)["status"] == "ready"
    assert host.exec("systemctl is-active sd35-api.service")[1].strip() == "active"


def test_a_killed_server_is_restarted_by_systemd(served) -> None:
    host, _, client = served
    kill_server_and_await_restart(host, client, host.exec, timeout=120)
    restarts = service_checks(host)["service restarts"]
    assert restarts["status"] == "warn" and restarts["evidence"].startswith("1 restart(s)")


def test_a_second_converge_changes_nothing(served) -> None:
    host, _, client = served
    assert_nothing_to_do(host, timeout=BUILD_TIMEOUT)
    assert ready(client)["status"] == "ready"


# docker_mode = "rootless": the service in the sd35-api account's own daemon.

def as_service(host: Host, command: str) -> tuple[int, str]:
    """`command` as the sd35-api account with its user session's runtime dir: plain docker is
    its own rootless daemon (its `rootless` context)."""
    return host.exec(f"cd / && runuser -u sd35-api -- env XDG_RUNTIME_DIR=/run/user/"
                     f"$(id -u sd35-api) HOME=/var/lib/sd35-api sh -c {shlex.quote(command)}")


@pytest.fixture(scope="module")
def served_rootless(served) -> Iterator[tuple[Host, dict, httpx.Client]]:
    """The rootful tests' sandbox, after them (the tests above ran there): docker_mode switched
    to rootless and converged again, so the service moves into the sd35-api account's own
    daemon, and its image with it (copied from the system daemon, not built again)."""
    host: Host = served[0]
    assert host.exec("docker ps --filter name=^sd35-api$ --format '{{.Names}}'")[1].strip() \
        == "sd35-api"
    document = tomlkit.parse(host.inventory.read_text())
    document["defaults"]["docker_mode"] = "rootless"
    host.inventory.write_text(tomlkit.dumps(document))
    switched = converge(host, timeout=BUILD_TIMEOUT)
    assert switched["exit"] == 0, switched["stderr"][-3000:]
    with client_through_ssh(host) as client:
        yield host, switched, client


def test_rootless_switch_moves_the_service_into_the_accounts_own_daemon(served_rootless
                                                                        ) -> None:
    host, report, _ = served_rootless
    (entry,) = [s for s in report["hosts"][0]["steps"] if s["step"] == "service"]
    summaries = [c["summary"] for c in entry["changes"]]
    assert entry["status"] == "changed", entry["message"]
    assert any(s.startswith("sd35-api: subordinate uids ") for s in summaries), summaries
    assert "sd35-api: lingering on (her daemon runs while she is logged out)" in summaries
    assert any(s.startswith("sd35-api: her own Docker daemon") for s in summaries)
    # The system daemon's image, by its tag, copied into the account's daemon: no build.
    (copied,) = [s for s in summaries if s.startswith("copy the team image ")]
    assert "from the system daemon into its own daemon, as sd35-api" in copied, copied
    tag = copied.split()[4]
    assert not [s for s in summaries if s.startswith("build the team image")], summaries
    assert as_service(host, f"docker image inspect --format ok {tag}")[1].strip() == "ok"
    assert summaries[-1].endswith("(docker_mode switched: its container moves to its own "
                                  "daemon)"), summaries
    assert host.exec("systemctl is-active sd35-api.service")[1].strip() == "active"
    unit = host.exec("systemctl cat sd35-api.service")[1]
    uid = host.exec("id -u sd35-api")[1].strip()
    assert "User=sd35-api" in unit and f"DOCKER_HOST=unix:///run/user/{uid}/docker.sock" in unit
    # Nothing of it in the system daemon: the container, as root sees Docker, is gone.
    assert host.exec("docker ps -a --filter name=sd35-api --format '{{.Names}}'")[1].strip() \
        == ""
    code, names = as_service(host, "docker ps --format '{{.Names}}'")
    assert code == 0 and names.split() == ["sd35-api"], names
    # Its root is the account on the host, not root: the server's process belongs to sd35-api.
    code, pid = as_service(host, "docker inspect --format '{{.State.Pid}}' sd35-api")
    assert code == 0 and pid.strip().isdigit(), pid
    assert host.exec(f"ps -o user= -p {pid.strip()}")[1].strip() == "sd35-api"
    assert host.testinfra.file("/var/lib/systemd/linger/sd35-api").exists
    ranges = {line.split(":")[0]: line for line in
              host.testinfra.file("/etc/subuid").content_string.split()}
    assert "sd35-api" in ranges and DEMO_MEMBER in ranges
    code, _ = as_service(host, "docker exec sd35-api touch /hf/written-by-the-service")
    assert code != 0  # the shared cache is read-only inside
    assert as_service(host, "docker port sd35-api")[1].strip() == \
        "8000/tcp -> 127.0.0.1:8000"
    assert "sd35-api: ready in" in host.exec("journalctl -u sd35-api.service --no-pager")[1]


def test_rootless_health_and_a_png_through_the_ssh_forward(served_rootless) -> None:
    _, _, client = served_rootless
    health = ready(client)
    assert (health["status"], health["model"], health["device"]) == ("ready", "tiny", "cpu")
    answer = client.post("/generate", json={"prompt": "a lighthouse at dusk", "steps": 4,
                                            "height": 128, "width": 128, "seed": 7})
    assert answer.status_code == 200, answer.text
    with Image.open(io.BytesIO(answer.content)) as png:
        assert png.format == "PNG" and png.size == (128, 128)


def test_rootless_doctor_and_verify_look_in_the_accounts_daemon(served_rootless,
                                                                tmp_path: Path) -> None:
    host, _, _ = served_rootless
    found = service_checks(host)
    # The unit's journal spans the switch: a restart the rootful tests caused (the killed
    # server) is still within doctor's 24 hours, and must be counted, not forgotten.
    journal = host.exec("journalctl -u sd35-api.service --no-pager")[1]
    restarted = journal.count("Scheduled restart job")
    assert {name: c["status"] for name, c in found.items()} == {
        "service unit": "pass", "service health": "pass",
        "service restarts": "warn" if restarted else "pass"}, found
    assert found["service restarts"]["evidence"].startswith(f"{restarted} restart(s)")
    result = host.cli("verify", host.name, "--service", "--json", "--out", str(tmp_path))
    assert result.exit_code == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["health"]["status"] == "ready"


def test_rootless_killed_server_is_restarted_by_systemd(served_rootless) -> None:
    host, _, client = served_rootless
    kill_server_and_await_restart(host, client, lambda command: as_service(host, command),
                                  timeout=180)
    assert as_service(host, "docker ps --format '{{.Names}}'")[1].split() == ["sd35-api"]
    assert host.exec("docker ps -a --filter name=sd35-api -q")[1].strip() == ""


def test_rootless_second_converge_changes_nothing(served_rootless) -> None:
    host, _, client = served_rootless
    assert_nothing_to_do(host, timeout=BUILD_TIMEOUT)
    assert ready(client)["status"] == "ready"
