"""A local, signed apt repository for tests, laid out like Docker's and NVIDIA's.

Stub packages named like theirs (`dpkg-deb --build`) install a recognisable file each, a
stand-in `docker` CLI with a `docker.service` that runs nothing, and a stand-in `nvidia-ctk`
(tests/fixtures/standins). The toolkit comes in two versions, so a pin shows. The repositories
are signed with a GPG key made for the test; a second key, which signed nothing, plays the
wrong key. Nothing is fetched from anywhere.

    docker/linux/debian/{gpg,dists/bookworm/…,pool/stable/*.deb}   as download.docker.com
    nvidia/{gpgkey,stable/deb/amd64/*}                             as libnvidia-container
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path

STANDINS = Path(__file__).parent / "fixtures" / "standins"
MARKER = "/usr/share/provision-stub"
DOCKER_VERSION = "27.0.0-1"
TOOLKIT_VERSIONS = ("1.17.8-1", "1.18.0-1")
CODENAME = "bookworm"
DOCKER_SERVICE = """[Unit]
Description=Stand-in Docker daemon (provision's test repository: no engine)

[Service]
ExecStart=/bin/sleep infinity

[Install]
WantedBy=multi-user.target
"""


@dataclass(frozen=True)
class Stub:
    name: str
    version: str
    depends: str = ""
    files: dict[str, tuple[str, int]] = field(default_factory=dict)  # path: (text, mode)

    def marker(self) -> tuple[str, tuple[str, int]]:
        """The recognisable file every stub installs: its name and version."""
        return f"{MARKER}/{self.name}", (f"provision test stub {self.name} {self.version}\n",
                                         0o644)


@dataclass(frozen=True)
class Repositories:
    root: Path  # docker/ and nvidia/ under it
    key: Path  # the signing key, ASCII-armored
    wrong_key: Path  # another key, which signed nothing


def docker_stubs() -> list[Stub]:
    return [
        Stub("docker-ce", DOCKER_VERSION, "docker-ce-cli, containerd.io",
             {"/lib/systemd/system/docker.service": (DOCKER_SERVICE, 0o644)}),
        Stub("docker-ce-cli", DOCKER_VERSION, "",
             {"/usr/bin/docker": ((STANDINS / "docker").read_text(), 0o755)}),
        Stub("containerd.io", "1.7.20-1"),
        Stub("docker-buildx-plugin", "0.16.1-1"),
        Stub("docker-compose-plugin", "2.29.1-1"),
    ]


def toolkit_stubs(version: str) -> list[Stub]:
    """The toolkit's four packages, each requiring the others at exactly its version."""
    ctk = (STANDINS / "nvidia-ctk").read_text().replace("@VERSION@", version) \
        .replace("@UPSTREAM@", version.split("-")[0])
    return [
        Stub("libnvidia-container1", version),
        Stub("libnvidia-container-tools", version, f"libnvidia-container1 (= {version})"),
        Stub("nvidia-container-toolkit-base", version, "",
             {"/usr/bin/nvidia-ctk": (ctk, 0o755)}),
        Stub("nvidia-container-toolkit", version,
             f"nvidia-container-toolkit-base (= {version}), "
             f"libnvidia-container-tools (= {version})"),
    ]


def build(out: Path) -> Repositories:
    """Both repositories under `out`, signed; the key files beside them."""
    with signing_keys() as gpg:
        key, wrong = out / "repo-key.asc", out / "wrong-key.asc"
        key.write_text(gpg.export("repo"))
        wrong.write_text(gpg.export("wrong"))
        root = out / "mirror"
        docker = root / "docker" / "linux" / "debian"
        pool, dist = docker / "pool" / "stable", docker / "dists" / CODENAME
        debs = [build_deb(stub, pool) for stub in docker_stubs()]
        write_index(debs, docker, dist / "stable" / "binary-amd64" / "Packages")
        write_release(dist, {"Suite": CODENAME, "Codename": CODENAME, "Components": "stable"},
                      gpg)
        (docker / "gpg").write_text(key.read_text())
        flat = root / "nvidia" / "stable" / "deb" / "amd64"
        debs = [build_deb(stub, flat) for v in TOOLKIT_VERSIONS for stub in toolkit_stubs(v)]
        write_index(debs, flat, flat / "Packages")
        write_release(flat, {}, gpg)
        (root / "nvidia" / "gpgkey").write_text(key.read_text())
    return Repositories(root, key, wrong)


def build_deb(stub: Stub, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="stub-") as tmp:
        tree = Path(tmp)
        control = [f"Package: {stub.name}", f"Version: {stub.version}", "Architecture: all",
                   "Maintainer: provision tests <tests@provision.invalid>",
                   f"Description: stand-in for {stub.name} (provision's test repository)"]
        if stub.depends:
            control.insert(3, f"Depends: {stub.depends}")
        (tree / "DEBIAN").mkdir()
        (tree / "DEBIAN" / "control").write_text("\n".join(control) + "\n")
        for path, (text, mode) in dict([stub.marker(), *stub.files.items()]).items():
            target = tree / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
            target.chmod(mode)
        deb = directory / f"{stub.name}_{stub.version}_all.deb"
        subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(tree), str(deb)],
                       check=True, capture_output=True)
    return deb


def write_index(debs: list[Path], base: Path, packages: Path) -> None:
    """A Packages file: each deb's control fields and where it lies relative to `base`."""
    stanzas = []
    for deb in debs:
        fields = subprocess.run(["dpkg-deb", "-f", str(deb)], check=True, capture_output=True,
                                text=True).stdout.strip()
        data = deb.read_bytes()
        stanzas.append(f"{fields}\nFilename: ./{deb.relative_to(base)}\nSize: {len(data)}\n"
                       f"SHA256: {hashlib.sha256(data).hexdigest()}\n")
    packages.parent.mkdir(parents=True, exist_ok=True)
    packages.write_text("\n".join(stanzas))


def write_release(directory: Path, fields: dict[str, str], gpg: _Gpg) -> None:
    """Release (hashes of every index below it), then InRelease and Release.gpg signed."""
    indexes = sorted(p for p in directory.rglob("Packages"))
    lines = ["Origin: provision-tests", "Label: provision-tests", "Architectures: amd64",
             f"Date: {formatdate(usegmt=True)}", *(f"{k}: {v}" for k, v in fields.items()),
             "SHA256:"]
    lines += [f" {hashlib.sha256(p.read_bytes()).hexdigest()} {p.stat().st_size} "
              f"{p.relative_to(directory)}" for p in indexes]
    release = directory / "Release"
    release.write_text("\n".join(lines) + "\n")
    gpg.sign("repo", release, directory / "InRelease", clear=True)
    gpg.sign("repo", release, directory / "Release.gpg", clear=False)


class _Gpg:
    """gpg with a home of its own (short path: the agent's socket lives there)."""

    def __init__(self, home: str) -> None:
        self.home = home

    def run(self, *args: str) -> str:
        return subprocess.run(["gpg", "--homedir", self.home, "--batch", "--yes",
                               "--pinentry-mode", "loopback", "--passphrase", "", *args],
                              check=True, capture_output=True, text=True).stdout

    def new_key(self, name: str) -> None:
        self.run("--quick-gen-key", f"{name} <{name}@provision.invalid>", "ed25519", "sign",
                 "never")

    def export(self, name: str) -> str:
        return self.run("--armor", "--export", f"{name}@provision.invalid")

    def sign(self, name: str, source: Path, target: Path, *, clear: bool) -> None:
        self.run("--local-user", f"{name}@provision.invalid", "--digest-algo", "SHA256",
                 "--clearsign" if clear else "--detach-sign", *([] if clear else ["--armor"]),
                 "--output", str(target), str(source))


@contextlib.contextmanager
def signing_keys() -> Iterator[_Gpg]:
    home = tempfile.mkdtemp(prefix="gpg", dir="/tmp")
    gpg = _Gpg(home)
    try:
        gpg.new_key("repo")
        gpg.new_key("wrong")
        yield gpg
    finally:
        subprocess.run(["gpgconf", "--homedir", home, "--kill", "gpg-agent"],
                       capture_output=True, check=False)
        shutil.rmtree(home, ignore_errors=True)
