"""A throwaway local target host: a container with systemd, a real sshd and room for Docker.

Reachable only on 127.0.0.1. `up` makes a fresh admin key pair, records the host's own keys
in a known_hosts file of its own, and registers the host under its name in the inventory, so
`provision host NAME` works next. `down` removes exactly what `up` made. The same code is the
test bed (tests/conftest.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import docker
import docker.errors
import tomlkit
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from provision.errors import DockerUnavailable, InventoryError, ProvisionError
from provision.files import atomic_write
from provision.progress import QUIET, Task
from provision.templating import raw, render

ADMIN_USER = "admin"
LABEL = "io.provision.sandbox"
INVENTORY_LABEL = "io.provision.inventory"
BASE_PULL = "debian:bookworm"
BASE_IMPORTED = "provision/debian:bookworm-minbase"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
BOOT_TIMEOUT = 90.0

# What TESTBED.md found to run systemd and a Docker engine inside a container where plain
# --privileged fails ("unable to apply caps"): every capability but SYS_RESOURCE, and
# `--security-opt systempaths=unconfined`, which the API spells as empty masked/read-only paths.
HOST_CONFIG = {
    "cap_add": ["ALL"],
    "cap_drop": ["SYS_RESOURCE"],
    "security_opt": ["seccomp=unconfined", "apparmor=unconfined"],
    "device_cgroup_rules": ["a *:* rwm"],
    "cgroupns": "host",
    "tmpfs": {"/run": "", "/run/lock": ""},
}
UNMASKED_PATHS = {"MaskedPaths": [], "ReadonlyPaths": []}
# Named volumes, by the path each holds in the sandbox. /var/lib/docker: the system daemon's
# overlay2 cannot sit on the container's own overlay root. /home: nor can a member's rootless
# daemon's (~/.local/share/docker); on that root it falls back to fuse-overlayfs, and building
# the team image in her daemon took twice as long (bench/results/main-job/). Homes on a
# filesystem of their own are a server whose /home is its own disk. `one_filesystem` leaves
# /home on the root, one filesystem with /etc as on a one-disk server: only there can a member
# plant a hard link to root's files (tests/test_planted_links_e2e.py).
VOLUMES = {"docker": "/var/lib/docker", "home": "/home"}


def volume_names(name: str, one_filesystem: bool = False) -> dict[str, str]:
    """Sandbox `name`'s named volumes, each to the path it is mounted at."""
    return {f"{container_name(name)}-{suffix}": path for suffix, path in VOLUMES.items()
            if not (one_filesystem and path == "/home")}


# Copied into the host image beside its Dockerfile (templates/sandbox/).
SANDBOX_FILES = ("provision-hostkeys.service", "provision-devices.service", "provision-devices")


@dataclass(frozen=True)
class Sandbox:
    name: str
    container: str
    port: int
    image: str
    state_dir: str
    inventory: str
    created_inventory: bool

    @property
    def identity_file(self) -> Path:
        return Path(self.state_dir) / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return Path(self.state_dir) / "known_hosts"


def docker_client() -> docker.DockerClient:
    try:
        client = docker.from_env(timeout=300)
        client.ping()
    except docker.errors.DockerException as exc:
        raise DockerUnavailable(
            f"the local Docker engine does not answer ({str(exc)[:80]})",
            "install Docker and start it (systemctl start docker, or dockerd &)",
        ) from None
    return client


def state_dir_for(inventory: Path, name: str) -> Path:
    return inventory.resolve().parent / ".provision" / "sandboxes" / name


def container_name(name: str) -> str:
    return f"provision-sandbox-{name}"


def base_image(client: docker.DockerClient, log=print, progress: Task = QUIET) -> str:
    """debian:bookworm when a registry answers, else one built offline with debootstrap."""
    for tag in (BASE_IMPORTED, BASE_PULL):
        if _image_exists(client, tag):
            return tag
    try:
        progress.status(f"pulling {BASE_PULL}")
        repository, tag = BASE_PULL.split(":")
        for event in client.api.pull(repository, tag, stream=True, decode=True):
            if "error" in event:
                raise docker.errors.APIError(event["error"])
            progress.output(" ".join(str(event.get(k, "")) for k in ("id", "status",
                                                                       "progress")))
        return BASE_PULL
    except docker.errors.APIError:
        log(f"no registry answers: building {BASE_IMPORTED} offline with debootstrap")
    if shutil.which("debootstrap") is None:
        raise ProvisionError("no registry answers and debootstrap is not installed",
                             "apt-get install debootstrap (or give Docker registry access)")
    with tempfile.TemporaryDirectory(prefix="provision-rootfs-") as tmp:
        rootfs, archive = Path(tmp) / "rootfs", Path(tmp) / "rootfs.tar"
        progress.status(f"debootstrap: Debian bookworm from {DEBIAN_MIRROR}")
        run_streamed(["debootstrap", "--variant=minbase", "bookworm", str(rootfs),
                      DEBIAN_MIRROR], progress)
        progress.status(f"importing the root file system as {BASE_IMPORTED}")
        subprocess.run(["tar", "-C", str(rootfs), "-cf", str(archive), "."], check=True)
        repository, tag = BASE_IMPORTED.split(":")
        client.api.import_image_from_file(str(archive), repository=repository, tag=tag)
    return BASE_IMPORTED


def run_streamed(command: list[str], progress: Task) -> None:
    """A local command, its output lines to `progress` as they come (CalledProcessError, with
    that output, when it fails)."""
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace") as process:
        assert process.stdout
        lines = []
        for line in process.stdout:
            lines.append(line)
            progress.output(line.rstrip("\n"))
    if process.returncode:
        raise subprocess.CalledProcessError(process.returncode, command, "".join(lines))


def sandbox_host_image(client: docker.DockerClient, base: str, log=print,
                       progress: Task = QUIET) -> str:
    """The sandbox host image, tagged by the hash of what it is built from (a cache key)."""
    files = {"Dockerfile": render("sandbox/Dockerfile.j2", base_image=base,
                                  admin_user=ADMIN_USER),
             **{name: raw(f"sandbox/{name}") for name in SANDBOX_FILES}}
    digest = hashlib.sha256("".join(files.values()).encode()).hexdigest()[:12]
    tag = f"provision/sandbox-host:{digest}"
    if _image_exists(client, tag):
        return tag
    log(f"building {tag}")
    progress.status(f"building {tag}")
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o755 if "." not in name else 0o644
            tar.addfile(info, io.BytesIO(data))
    context.seek(0)
    log_lines: list[str] = []
    for event in client.api.build(fileobj=context, custom_context=True, tag=tag, rm=True,
                                  decode=True):
        if "error" in event:
            tail = [*log_lines[-2:], str(event["error"]).strip()]
            raise ProvisionError(f"sandbox image build failed: {' '.join(tail)}",
                                 "check that the Debian archive is reachable from Docker")
        for line in str(event.get("stream", "")).splitlines():
            if line.strip():
                log_lines.append(line.strip())
                progress.output(line)
    return tag


def _image_exists(client: docker.DockerClient, tag: str) -> bool:
    try:
        client.images.get(tag)
    except docker.errors.ImageNotFound:
        return False
    return True


def new_key_pair(directory: Path) -> str:
    """A fresh ed25519 admin key pair; returns the public key line."""
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH).decode()
    public = f"{public} provision-sandbox-admin"
    path = directory / "id_ed25519"
    path.touch(mode=0o600)
    path.write_bytes(private)
    (directory / "id_ed25519.pub").write_text(public + "\n")
    return public


def up(name: str, inventory: Path, log=print, *, try_it: bool = False,
       one_filesystem: bool = False, progress: Task = QUIET) -> Sandbox:
    """Start sandbox `name` (or return it if it runs) and register it in the inventory.

    `try_it` (journey 1, `provision sandbox up`): an inventory this creates also gets a demo
    member and the CPU image, and the sandbox gets that image's base and wheels, so that
    `provision host NAME` and `provision verify NAME` work next with no registry in reach.
    `one_filesystem`: /home on the sandbox's root, not a volume (VOLUMES says why).
    """
    client = docker_client()
    existing = find(name, inventory)
    if existing is not None:
        log(f"sandbox {name!r} already runs on 127.0.0.1:{existing.port}")
        return existing
    _check_name_free(inventory, name)
    _check_container_free(client, name)
    base = base_image(client, log, progress)
    image = sandbox_host_image(client, base, log, progress)
    state_dir = state_dir_for(inventory, name)
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    public_key = new_key_pair(state_dir)
    # Journey 1 seeds an inventory it creates (`register` below says so too) with the CPU image's
    # files; they go in through Docker, so while systemd boots.
    seeding = try_it and not inventory.exists()
    progress.status("starting the sandbox")
    container = start_container(client, name, image, public_key, inventory,
                                one_filesystem)
    try:
        if seeding:
            seed_offline_image(client, container, base, log, progress)
        progress.status("waiting for systemd to start sshd")
        port = wait_for_sshd(client, container)
        write_known_hosts(client, container, port, state_dir / "known_hosts")
        created = register(inventory, name, port, state_dir, try_it, base)
    except BaseException:
        # Leave nothing half made: no container, no host table, no key files.
        _remove_container(client, container_name(name))
        _remove_volumes(client, name)
        created_text = state_dir / "inventory-as-created.toml"
        unregister(inventory, name, created_text.read_text() if created_text.exists() else None)
        shutil.rmtree(state_dir, ignore_errors=True)
        raise
    sandbox = Sandbox(name, container_name(name), port, image, str(state_dir),
                      str(inventory.resolve()), created)
    (state_dir / "sandbox.json").write_text(json.dumps(asdict(sandbox), indent=2) + "\n")
    log(f"sandbox {name!r} is up: ssh {ADMIN_USER}@127.0.0.1 -p {port}")
    return sandbox


def start_container(client: docker.DockerClient, name: str, image: str, public_key: str,
                    inventory: Path, one_filesystem: bool = False) -> str:
    """Create, put the admin key in place, start: sshd accepts the key from its first breath."""
    cname = container_name(name)
    binds = {volume: {"bind": path, "mode": "rw"}
             for volume, path in volume_names(name, one_filesystem).items()}
    host_config = client.api.create_host_config(
        port_bindings={22: ("127.0.0.1", None)},
        binds={**binds, "/sys/fs/cgroup": {"bind": "/sys/fs/cgroup", "mode": "rw"}},
        **HOST_CONFIG,
    )
    host_config.update(UNMASKED_PATHS)
    try:
        created = client.api.create_container(
            image, name=cname, hostname=name, ports=[22],
            labels={LABEL: name, INVENTORY_LABEL: str(inventory.resolve())},
            host_config=host_config)
    except docker.errors.APIError as exc:
        raise ProvisionError(f"cannot create sandbox container {cname}: {exc.explanation}",
                             "check the Docker engine (docker info)") from None
    container = client.containers.get(created["Id"])
    data = (public_key + "\n").encode()
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        info = tarfile.TarInfo("authorized_keys")
        info.size, info.mode, info.uid, info.gid = len(data), 0o600, 1000, 1000
        tar.addfile(info, io.BytesIO(data))
    container.put_archive(f"/home/{ADMIN_USER}/.ssh", archive.getvalue())
    container.start()
    return cname


def wait_for_sshd(client: docker.DockerClient, cname: str, timeout: float = BOOT_TIMEOUT) -> int:
    """Wait (bounded) until systemd has started sshd; return the published loopback port.

    One exec asks systemd every 0.1 s from inside: a round of the Docker API each time (an exec
    and an inspect) would cost more than the wait it shortens.
    """
    container = client.containers.get(cname)
    try:
        code, _ = container.exec_run(["timeout", f"{timeout:g}", "sh", "-c",
                                      "until systemctl is-active -q ssh.service; do sleep 0.1; "
                                      "done"])
    except docker.errors.APIError:  # no longer running: said below
        code = None
    container.reload()
    if container.status != "running":
        raise ProvisionError(f"sandbox container {cname} exited while booting",
                             f"see 'docker logs {cname}'")
    ports = container.attrs["NetworkSettings"]["Ports"].get("22/tcp") or []
    if code != 0 or not ports:
        raise ProvisionError(f"sandbox {cname}: sshd did not start within {timeout:g} s",
                             f"see 'docker exec {cname} journalctl -u ssh'")
    return int(ports[0]["HostPort"])


def write_known_hosts(client: docker.DockerClient, cname: str, port: int, path: Path) -> None:
    """Trust the sandbox's keys as read through Docker, never as offered over the network."""
    code, output = client.containers.get(cname).exec_run(
        ["sh", "-c", "cat /etc/ssh/ssh_host_*_key.pub"])
    if code != 0:
        raise ProvisionError(f"sandbox {cname}: cannot read its host keys", "recreate it")
    lines = [ln.split()[:2] for ln in output.decode().splitlines() if ln.strip()]
    path.write_text("".join(f"[127.0.0.1]:{port} {kind} {blob}\n" for kind, blob in lines))


def register(inventory: Path, name: str, port: int, state_dir: Path, try_it: bool,
             base: str) -> bool:
    """Add [hosts.NAME] to the inventory (created if missing); True when the file was created."""
    created = not inventory.exists()
    document = tomlkit.parse(inventory.read_text()) if not created else new_inventory()
    if created and try_it:
        add_demo(document, state_dir, base, inventory.resolve().parent)
    if created:
        # What `down` may delete: the file exactly as made here, less the host table.
        (state_dir / "inventory-as-created.toml").write_text(tomlkit.dumps(document))
    hosts = document.setdefault("hosts", tomlkit.table(is_super_table=True))
    entry = tomlkit.table()
    entry.add(tomlkit.comment(f"local sandbox made by 'provision sandbox up --name {name}'"))
    base = inventory.resolve().parent
    entry["hostname"] = "127.0.0.1"
    entry["port"] = port
    entry["user"] = ADMIN_USER
    entry["identity_file"] = str((state_dir / "id_ed25519").relative_to(base))
    entry["known_hosts"] = str((state_dir / "known_hosts").relative_to(base))
    hosts[name] = entry
    atomic_write(inventory, tomlkit.dumps(document))
    return created


DEMO_MEMBER = "dev"
WHEELHOUSE = "/srv/provision/wheelhouse"
BASE_ARCHIVE = "/srv/provision/base-image.tar"


def demo_image(base: str) -> dict[str, str]:
    """The CPU image a sandbox builds: its own base (Debian 12, Python 3.11) and wheels."""
    return {"base": base, "python": "3.11", "cuda": "cpu", "torch": "2.13.0",
            "torchvision": "", "wheelhouse": WHEELHOUSE, "base_archive": BASE_ARCHIVE}


def add_demo(document: tomlkit.TOMLDocument, state_dir: Path, base: str, root: Path) -> None:
    """A demo teammate (her key beside the admin's) and the sandbox's CPU image."""
    member_dir = state_dir / DEMO_MEMBER
    member_dir.mkdir(exist_ok=True, mode=0o700)
    new_key_pair(member_dir)
    image = tomlkit.table()
    image.add(tomlkit.comment("the sandbox's CPU image: no GPU, no registry (sandbox up)"))
    for key, value in demo_image(base).items():
        image[key] = value
    document["image"] = image
    member = tomlkit.table()
    member["name"] = DEMO_MEMBER
    member["keys"] = [str((member_dir / "id_ed25519.pub").relative_to(root))]
    member["gpus"] = "none"
    members = tomlkit.aot()
    members.append(member)
    document["members"] = members


def cache_dir() -> Path:
    """Where `up` keeps what every sandbox on this machine can reuse ($XDG_CACHE_HOME)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "provision"


def seed_offline_image(client: docker.DockerClient, cname: str, base: str, log,
                       progress: Task = QUIET) -> None:
    """Put the CPU image's wheels and base-image archive where the demo [image] says."""
    seed = seed_archive(client, base, log, progress)
    progress.status("copying the wheels and the base image into the sandbox")
    container = client.containers.get(cname)
    container.exec_run(["mkdir", "-p", str(Path(WHEELHOUSE).parent)])
    with seed.open("rb") as data:
        container.put_archive(str(Path(WHEELHOUSE).parent), data)
    log(f"sandbox has the CPU image's wheels ({WHEELHOUSE}) and base ({BASE_ARCHIVE})")


def seed_archive(client: docker.DockerClient, base: str, log, progress: Task = QUIET) -> Path:
    """The wheels and the base image's archive as one tar, made once per machine: the pins, the
    base image and its tag name it, so every later `up` only copies it in."""
    from provision.versions import resolve_image

    pins = "\n".join(resolve_image(demo_image(base)).pins()) + "\n"
    image = client.images.get(base)
    key = hashlib.sha256(f"{pins}{image.id} {base}".encode()).hexdigest()[:12]
    seed = cache_dir() / f"sandbox-seed-{key}.tar"
    if seed.is_file():
        return seed
    seed.parent.mkdir(parents=True, exist_ok=True)
    # Made beside and renamed into place whole: a seed there is a complete one, also when two
    # `up`s make it at once.
    with tempfile.TemporaryDirectory(prefix=".seed-", dir=seed.parent) as tmp:
        wheels, saved, archive = (Path(tmp) / name for name in ("wheels", "base", "seed.tar"))
        log(f"downloading the CPU image's wheels (once: {seed} keeps them)")
        progress.status("downloading the CPU image's wheels")
        wheels.mkdir()
        (wheels / "requirements.txt").write_text(pins)
        run_streamed(["python3", "-m", "pip", "download", "--progress-bar", "off",
                      "--only-binary=:all:", "-d", str(wheels),
                      "-r", str(wheels / "requirements.txt")], progress)
        progress.status(f"saving {base} for the sandbox")
        with saved.open("wb") as out:
            # Named by the tag the [image] table uses: `named=True` would take the image's
            # first tag, which is another name once the same image is tagged twice.
            for chunk in image.save(named=base):
                megabytes = out.tell() // 2**20
                out.write(chunk)
                if out.tell() // 2**20 // 50 > megabytes // 50:
                    progress.output(f"{out.tell() // 2**20} MB saved")
        with tarfile.open(archive, "w") as tar:
            tar.add(wheels, arcname="wheelhouse",
                    filter=lambda info: None if info.name.endswith(".txt") else info)
            tar.add(saved, arcname=Path(BASE_ARCHIVE).name)
        archive.replace(seed)
    return seed


def new_inventory() -> tomlkit.TOMLDocument:
    """The commented starting inventory, set for a sandbox: Debian's docker.io, since a
    sandbox reaches Debian's archive but not Docker's own repository."""
    document = tomlkit.parse(render("provision.toml.j2"))
    document["defaults"]["docker_source"] = "distro"
    return document


def _check_container_free(client: docker.DockerClient, name: str) -> None:
    """Container names are global to the engine; sandbox names are per inventory."""
    try:
        other = client.containers.get(container_name(name))
    except docker.errors.NotFound:
        return
    owner = other.labels.get(INVENTORY_LABEL, "another inventory")
    raise InventoryError(f"a sandbox named {name!r} already runs for {owner}",
                         f"pick another --name, or run 'provision sandbox down --name {name}' "
                         "with that inventory")


def _check_name_free(inventory: Path, name: str) -> None:
    if inventory.exists():
        document = tomlkit.parse(inventory.read_text())
        if name in document.get("hosts", {}):
            raise InventoryError(f"{inventory}: [hosts.{name}] exists and is not a sandbox",
                                 "pick another --name, or remove that table first")


def find(name: str, inventory: Path) -> Sandbox | None:
    record = state_dir_for(inventory, name) / "sandbox.json"
    if not record.is_file():
        return None
    recorded = json.loads(record.read_text())
    # A record from an older provision may hold fields this one no longer keeps ("volume").
    return Sandbox(**{f.name: recorded[f.name] for f in fields(Sandbox) if f.name in recorded})


def status(name: str, inventory: Path) -> dict[str, object]:
    sandbox = find(name, inventory)
    if sandbox is None:
        return {"name": name, "state": "absent"}
    try:
        container = docker_client().containers.get(sandbox.container)
        state = container.status
    except docker.errors.NotFound:
        state = "missing"
    return {"name": name, "state": state, "port": sandbox.port, "image": sandbox.image,
            "ssh": f"ssh -i {sandbox.identity_file} -p {sandbox.port} {ADMIN_USER}@127.0.0.1"}


def down(name: str, inventory: Path, log=print) -> bool:
    """Remove the container, its Docker volumes, its key files and its inventory entry."""
    sandbox = find(name, inventory)
    client = docker_client()
    removed = _remove_container(client, container_name(name))
    _remove_volumes(client, name)
    if sandbox is None:
        return removed
    as_created = Path(sandbox.state_dir) / "inventory-as-created.toml"
    unregister(inventory, name,
               as_created.read_text() if sandbox.created_inventory and as_created.exists()
               else None)
    shutil.rmtree(sandbox.state_dir, ignore_errors=True)
    log(f"sandbox {name!r} removed")
    return True


def unregister(inventory: Path, name: str, as_created: str | None) -> None:
    if not inventory.exists():
        return
    document = tomlkit.parse(inventory.read_text())
    hosts = document.get("hosts", {})
    if name in hosts:
        del hosts[name]
    if not hosts and "hosts" in document:
        del document["hosts"]
    text = tomlkit.dumps(document)
    # A file `up` created and nobody has added to since is `up`'s to delete.
    if as_created is not None and text.strip() == as_created.strip():
        inventory.unlink()
    else:
        atomic_write(inventory, text)


def _remove_volumes(client: docker.DockerClient, name: str) -> None:
    for volume in volume_names(name):
        with contextlib.suppress(docker.errors.NotFound):
            client.volumes.get(volume).remove(force=True)


def _remove_container(client: docker.DockerClient, cname: str) -> bool:
    try:
        client.containers.get(cname).remove(force=True)
    except docker.errors.NotFound:
        return False
    return True
