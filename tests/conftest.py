"""The test bed: real target hosts made by `provision.sandbox`, reached over SSH on 127.0.0.1.

Each sandbox lives in its own temporary inventory directory; every one made in a session is
removed at its end, by name, whatever the tests did to it.
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import paramiko
import pytest
import tomlkit

from provision import sandbox as sandboxes
from provision.changes import WriteFile
from provision.contract import SERVICE_UNIT
from provision.errors import DockerUnavailable
from provision.facts import Account, HostFacts, PathState, Unit, parse_facts
from provision.inventory import Inventory
from provision.sandbox import new_key_pair

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures"


def require(available: object, what: str) -> None:
    """A tool a test needs is missing: a failure under CI, where .ci/setup must have installed
    it (a skipped check proves nothing), a skip anywhere else."""
    if available:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI needs {what}: .ci/setup installs it", pytrace=False)
    pytest.skip(f"{what} is not installed here", allow_module_level=True)


def require_modules(*names: str) -> None:
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            require(False, f"the Python module {name!r}")


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        return [ln for ln in self.stderr.splitlines() if ln.strip()]


def run_cli(*args: str, inventory: Path, home: Path, stdin: str | None = None,
            timeout: float = 600) -> CliResult:
    """The real CLI in a subprocess, with its own HOME so no user file leaks in."""
    env = {**os.environ, "HOME": str(home), "PROVISION_INVENTORY": str(inventory),
           "COLUMNS": "200"}
    done = subprocess.run([sys.executable, "-m", "provision", *args], input=stdin,
                          capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=inventory.parent, check=False)
    return CliResult(done.returncode, done.stdout, done.stderr)


@dataclass
class Host:
    """A running sandbox, the inventory that names it, and a home for the CLI's user files."""

    sandbox: sandboxes.Sandbox
    inventory: Path
    home: Path

    @property
    def name(self) -> str:
        return self.sandbox.name

    def cli(self, *args: str, **kwargs) -> CliResult:
        return run_cli(*args, inventory=self.inventory, home=self.home, **kwargs)

    @property
    def testinfra(self):
        """testinfra's view of the host (through Docker), to assert state as the field does."""
        import testinfra

        return testinfra.get_host(f"docker://{self.sandbox.container}")

    def add_members(self, names: list[str], **fields: object) -> dict[str, Path]:
        """Append [[members]] with fresh key pairs; returns each member's private key path."""
        keys = {}
        lines = []
        for name in names:
            directory = self.inventory.parent / "keys" / name
            directory.mkdir(parents=True, exist_ok=True)
            new_key_pair(directory)
            keys[name] = directory / "id_ed25519"
            extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in fields.items())
            lines.append(f'\n[[members]]\nname = "{name}"\n'
                         f'keys = ["keys/{name}/id_ed25519.pub"]\n{extra}')
        with self.inventory.open("a") as inventory:
            inventory.write("".join(lines))
        return keys

    def ssh(self, user: str, key: Path, command: str, timeout: float = 60) -> tuple[int, str]:
        """Log in as `user` with `key` over real SSH (host key checked) and run `command`."""
        client = paramiko.SSHClient()
        client.load_host_keys(str(self.sandbox.known_hosts))
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        client.connect("127.0.0.1", self.sandbox.port, username=user, key_filename=str(key),
                       allow_agent=False, look_for_keys=False, timeout=10)
        try:
            _, stdout, stderr = client.exec_command(command, timeout=timeout)
            output = stdout.read().decode() + stderr.read().decode()
            return stdout.channel.recv_exit_status(), output
        finally:
            client.close()

    def load_image(self, tag: str) -> None:
        """Copy a local image into the sandbox's own Docker engine (no registry is reachable)."""
        save = subprocess.Popen(["docker", "save", tag], stdout=subprocess.PIPE)
        subprocess.run(["docker", "exec", "-i", self.sandbox.container, "docker", "load"],
                       stdin=save.stdout, check=True, capture_output=True)
        assert save.wait() == 0

    def copy_image_file(self, tag: str, remote: str) -> None:
        """A local image saved into the sandbox as a tar file anyone may `docker load` there
        (a member's own daemon cannot reach this machine's images, nor a registry)."""
        with tempfile.TemporaryDirectory() as tmp:
            saved = Path(tmp) / "image.tar"
            subprocess.run(["docker", "save", "-o", str(saved), tag], check=True)
            self.exec(f"mkdir -p {Path(remote).parent}")
            subprocess.run(["docker", "cp", str(saved), f"{self.sandbox.container}:{remote}"],
                           check=True, capture_output=True)
        self.exec(f"chmod 0644 {remote}")

    def copy_in(self, local: Path, remote: str) -> None:
        """A local file or folder into the sandbox (docker cp), as root."""
        self.exec(f"mkdir -p {remote}")
        subprocess.run(["docker", "cp", f"{local}/.", f"{self.sandbox.container}:{remote}"],
                       check=True, capture_output=True)

    def install_devcontainer_cli(self) -> None:
        """The official Dev Containers CLI inside the sandbox, where a member runs it over SSH
        as VS Code does (node 20 and the CLI from this machine: the sandbox has neither)."""
        root = subprocess.run(["npm", "root", "-g"], capture_output=True, text=True,
                              check=True).stdout.strip()
        cli = Path(root) / "@devcontainers" / "cli"
        node = shutil.which("node")
        require(node and cli.is_dir(), "the Dev Containers CLI (npm i -g @devcontainers/cli)")
        assert node
        self.copy_in(cli, "/usr/local/lib/devcontainers-cli")
        subprocess.run(["docker", "cp", str(Path(node).resolve()),
                        f"{self.sandbox.container}:/usr/local/bin/node"], check=True)
        code, output = self.exec("ln -sf /usr/local/lib/devcontainers-cli/devcontainer.js "
                                 "/usr/local/bin/devcontainer && devcontainer --version")
        assert code == 0, output

    def exec(self, command: str, user: str = "root") -> tuple[int, str]:
        """Run a command inside the sandbox through Docker (the test's back door, not SSH)."""
        container = sandboxes.docker_client().containers.get(self.sandbox.container)
        code, output = container.exec_run(["sh", "-c", command], user=user)
        return code, output.decode(errors="replace")


@pytest.fixture(scope="session")
def docker_engine() -> None:
    try:
        sandboxes.docker_client()
    except DockerUnavailable as exc:
        require(False, f"a Docker engine ({exc.line()})")


_names = itertools.count(1)


@pytest.fixture(scope="session")
def make_host(docker_engine, tmp_path_factory) -> Iterator[Callable[..., Host]]:
    """Start fresh sandboxes on demand; all are removed when the session ends.

    `docker_mode` is written into the sandbox's inventory (rootful unless asked otherwise).
    `try_it=True` is `provision sandbox up` for journey 1: its own inventory with a demo member
    and the CPU image, whose base and wheels the sandbox then holds. `one_filesystem=True`:
    /home on the sandbox's root, with /etc (a one-disk server).
    """
    made: list[Host] = []

    def make(try_it: bool = False, docker_mode: str = "rootful",
             one_filesystem: bool = False) -> Host:
        name = f"t{os.getpid()}-{next(_names)}"
        base = tmp_path_factory.mktemp(name)
        inventory, home = base / "provision.toml", base / "home"
        home.mkdir()
        host = Host(sandboxes.up(name, inventory, log=lambda *_: None, try_it=try_it,
                                 one_filesystem=one_filesystem), inventory, home)
        # `sandbox up` writes docker_mode = "rootless"; the tests written before the mode
        # existed exercise the docker group, and ask for rootful. Rootless tests ask for it.
        document = tomlkit.parse(inventory.read_text())
        document["defaults"]["docker_mode"] = docker_mode
        inventory.write_text(tomlkit.dumps(document))
        made.append(host)
        # sudo leaves this marker on its first use: sudo's doing, which host snapshots ignore.
        host.exec("touch ~/.sudo_as_admin_successful", user="admin")
        return host

    yield make
    for host in made:
        sandboxes.down(host.name, host.inventory, log=lambda *_: None)


@pytest.fixture
def own_host(make_host) -> Iterator[Host]:
    """A sandbox for one test alone, removed when the test ends: fewer hosts alive at once."""
    host = make_host()
    yield host
    sandboxes.down(host.name, host.inventory, log=lambda *_: None)


@pytest.fixture(scope="session")
def shared_host(make_host) -> Host:
    """One sandbox for tests that only read."""
    return make_host()



# Helpers the test modules share (one home each, not imported from one test module by another).

# Everything a converge may touch, as a root `find` prints it (path, owner, mode, size, link);
# /var/lib/provision (the tool's own lock and state) is checked on its own where it matters.
SNAPSHOT = ("getent passwd; getent group; getent shadow | cut -d: -f1,8; "
            "find /etc/ssh /etc/sudoers.d /etc/profile.d /home /data "
            "-printf '%p %u %g %m %s %l\\n' 2>/dev/null | sort; md5sum /etc/ssh/sshd_config")


def converge(host: Host, *args: str, timeout: float = 600) -> dict:
    """`provision host NAME --json ARGS`: its report, exit code and stderr. `timeout`: a
    converge that builds an image (the service's) takes longer than the default."""
    result = host.cli("host", host.name, "--json", *args, timeout=timeout)
    assert result.stdout, result.stderr
    return {"exit": result.exit_code, "stderr": result.stderr, **json.loads(result.stdout)}


def changes_of(report: dict) -> list[str]:
    return [c["summary"] for step in report["hosts"][0]["steps"] for c in step["changes"]]


def assert_nothing_to_do(host: Host, *args: str, timeout: float = 600) -> dict:
    """Converge a host that already matches and expect success with no change: the promise a
    re-run rests on (each step plans nothing when the host is as it would make it). Returns
    the report, for what a test checks beyond that."""
    report = converge(host, *args, timeout=timeout)
    assert report["exit"] == 0, report["stderr"][-3000:]
    assert changes_of(report) == [], changes_of(report)
    return report


def step_of(report: dict, name: str) -> dict:
    return next(s for s in report["hosts"][0]["steps"] if s["step"] == name)


def plant(host: Host, name: str, script: str) -> None:
    """Her account made by hand (as a host has it before provision), then `script` run in her
    home as root (root can make a hard link to /etc/shadow where she cannot: the worst case)."""
    code, output = host.exec(f"useradd --create-home --shell /bin/bash --user-group {name} && "
                             f"cd /home/{name} && {script}")
    assert code == 0, output


def doctor(host: Host, *args: str) -> tuple[int, dict[str, dict]]:
    """`provision doctor NAME --json`: its exit code and its checks by name."""
    result = host.cli("doctor", host.name, "--json", "--min-free-gb", "1", *args)
    assert result.stdout, result.stderr
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    return result.exit_code, checks


def facts_of(host: str) -> HostFacts:
    """A facts fixture (tests/fixtures/facts/HOST.txt: recorded, or synthesized as its name and
    header say), parsed."""
    return parse_facts((FIXTURES / "facts" / f"{host}.txt").read_text(),
                       "/data/cache/huggingface")


def summaries(changes) -> list[str]:
    return [c.summary for c in changes]


def synthesized_h100_transcript(driver: str) -> str:
    """SYNTHESIZED: ubuntu-24.04-h100's transcript with nvidia-smi reporting `driver`."""
    text = (FIXTURES / "facts" / "ubuntu-24.04-h100.synthesized.txt").read_text()
    recorded = "0, NVIDIA H100 80GB HBM3, 560.35.03, 9.0, 81559, "
    assert recorded in text
    return text.replace(recorded, f"0, NVIDIA H100 80GB HBM3, {driver}, 9.0, 81559, ")


def service_converged(facts: HostFacts, inv: Inventory, active: str = "active") -> HostFacts:
    """The facts once the service plan's files, account and image are there and its unit is
    `active`: what a re-read after applying it shows (SYNTHESIZED from the plan over recorded
    facts)."""
    from provision.steps import service  # the step under test, imported where it is used

    paths = dict(facts.paths)
    images = list(facts.images)
    for change in service.plan(facts, inv):
        for action in change.actions:
            if isinstance(action, WriteFile):
                paths[action.path] = PathState(action.path, "file", content=action.content)
            elif "docker build -t " in action.command:
                images.append(action.command.split("docker build -t ")[1].split()[0])
    uid, gid = service.service_ids(facts)
    account = Account(service.SERVICE_NAME, uid, gid, service.STATE_DIR, "/usr/sbin/nologin")
    paths[service.STATE_DIR] = PathState(service.STATE_DIR, "directory")
    return dataclasses.replace(
        facts, paths=paths, images=tuple(images),
        accounts={**facts.accounts, service.SERVICE_NAME: account},
        units={SERVICE_UNIT: Unit(active, "enabled")})
