"""Inventory validation: every mistake is one line naming the file, the line and the fix."""

from __future__ import annotations

import tomllib
from pathlib import Path

import paramiko
import pytest

from provision.errors import InventoryError
from provision.inventory import load_inventory
from provision.sandbox import new_key_pair
from provision.target import resolve_target
from tests.conftest import run_cli


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    directory = tmp_path / "keys"
    directory.mkdir()
    new_key_pair(directory)
    return directory


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "provision.toml"
    path.write_text(text)
    return path


GOOD = """
[defaults]
cache_dir = "/srv/hf"
keepalive_interval = 30

[hosts.gpu-01]
hostname = "203.0.113.10"
user = "ubuntu"

[[members]]
name = "alice"
keys = ["keys/id_ed25519.pub"]
sudo = ["/usr/bin/nvidia-smi"]
gpus = "0"
"""


def test_a_good_inventory_loads(tmp_path: Path, keys: Path) -> None:
    inventory = load_inventory(write(tmp_path, GOOD))
    assert inventory.defaults.cache_dir == "/srv/hf"
    assert inventory.defaults.keepalive_interval == 30
    assert inventory.defaults.keepalive_count_max == 3
    alice = inventory.member("alice")
    assert alice.sudo == ("/usr/bin/nvidia-smi",) and alice.gpus == "0"
    assert alice.keys[0] == (keys / "id_ed25519.pub").read_text().strip()


# Synthesized: the edits of GOOD an inventory must be refused for, as data.
REFUSALS = tomllib.loads((Path(__file__).parent / "fixtures" / "inventory-refusals.toml")
                         .read_text())["refusal"]


@pytest.mark.parametrize("refusal", REFUSALS, ids=lambda refusal: refusal["says"])
def test_bad_inventory_is_one_clear_line(tmp_path: Path, keys: Path,
                                         refusal: dict[str, str | int]) -> None:
    assert refusal["old"] in GOOD
    path = write(tmp_path, GOOD.replace(str(refusal["old"]), str(refusal["new"])))
    with pytest.raises(InventoryError) as caught:
        load_inventory(path)
    assert caught.value.line().startswith(f"{path}:{refusal['line']}:")
    assert str(refusal["says"]) in caught.value.line()


def test_a_private_key_is_refused_and_never_echoed(tmp_path: Path, keys: Path) -> None:
    secret = (keys / "id_ed25519").read_text()
    path = write(tmp_path, GOOD.replace("id_ed25519.pub", "id_ed25519"))
    result = run_cli("facts", "gpu-01", inventory=path, home=tmp_path)
    assert result.exit_code == 2
    assert "is a private key" in result.stderr
    body = "".join(secret.splitlines()[1:-1])
    assert body[:40] not in result.stderr + result.stdout
    assert len(result.stderr.strip().splitlines()) == 1


def test_an_inline_private_key_is_refused_too(tmp_path: Path, keys: Path) -> None:
    secret = (keys / "id_ed25519").read_text().replace("\n", "\\n")
    path = write(tmp_path, GOOD.replace('"keys/id_ed25519.pub"', f'"{secret}"'))
    with pytest.raises(InventoryError, match="is a private key") as caught:
        load_inventory(path)
    assert secret[40:80] not in caught.value.line()


def test_a_garbled_public_key_is_refused(tmp_path: Path, keys: Path) -> None:
    (keys / "id_ed25519.pub").write_text("ssh-ed25519 AAAAnotbase64!! alice\n")
    with pytest.raises(InventoryError, match="is not an SSH public key"):
        load_inventory(write(tmp_path, GOOD))


def test_invalid_toml_names_the_problem(tmp_path: Path) -> None:
    result = run_cli("facts", "gpu-01", inventory=write(tmp_path, "[defaults\n"),
                     home=tmp_path)
    assert result.exit_code == 2 and "not valid TOML" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_host_alias_names_the_fix(tmp_path: Path, keys: Path) -> None:
    result = run_cli("facts", "nowhere", inventory=write(tmp_path, GOOD), home=tmp_path)
    assert result.exit_code == 2
    assert "unknown host 'nowhere'" in result.stderr and "[hosts.nowhere]" in result.stderr


def test_ssh_config_fills_what_the_inventory_leaves_out(tmp_path: Path, keys: Path) -> None:
    ssh_config = tmp_path / "ssh_config"
    ssh_config.write_text(
        "Host gpu-01\n  HostName 198.51.100.7\n  Port 2222\n  IdentityFile ~/.ssh/team\n"
        "  ProxyJump jumper@bastion:2200\n  ConnectTimeout 4\n"
        "Host bastion\n  HostName 192.0.2.1\n"
        "Host only-in-ssh-config\n  HostName 192.0.2.9\n  User ops\n")
    inventory = load_inventory(write(tmp_path, GOOD.replace('hostname = "203.0.113.10"\n', "")))
    target = resolve_target("gpu-01", inventory, ssh_config)
    assert (target.hostname, target.port, target.user) == ("198.51.100.7", 2222, "ubuntu")
    assert target.identity_files == (str(Path("~/.ssh/team").expanduser()),)
    assert target.connect_timeout == 4
    (jump,) = target.jumps
    assert (jump.hostname, jump.port, jump.user) == ("192.0.2.1", 2200, "jumper")
    other = resolve_target("only-in-ssh-config", inventory, ssh_config)
    assert (other.hostname, other.user, other.port) == ("192.0.2.9", "ops", 22)


def test_init_writes_a_file_that_loads(tmp_path: Path) -> None:
    result = run_cli("init", "--dir", str(tmp_path / "team"), inventory=tmp_path / "x.toml",
                     home=tmp_path)
    assert result.exit_code == 0, result.stderr
    written = tmp_path / "team" / "provision.toml"
    inventory = load_inventory(written)
    assert inventory.members == () and inventory.defaults.cache_group == "hfcache"
    assert "# One [[members]] table per teammate." in written.read_text()
    again = run_cli("init", "--dir", str(tmp_path / "team"), inventory=tmp_path / "x.toml",
                    home=tmp_path)
    assert again.exit_code == 2 and "exists" in again.stderr


def test_public_key_types_paramiko_knows_are_accepted(tmp_path: Path) -> None:
    rsa = paramiko.RSAKey.generate(2048)
    line = f"{rsa.get_name()} {rsa.get_base64()} bob@laptop"
    text = GOOD.replace('"keys/id_ed25519.pub"', f'"{line}"')
    assert load_inventory(write(tmp_path, text)).member("alice").keys == (line,)


ARMORED = "-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nmDMEZtest\n-----END PGP PUBLIC KEY BLOCK-----\n"


def test_mirrors_load_with_a_key_url_and_a_key_file(tmp_path: Path) -> None:
    key = tmp_path / "nvidia-mirror.asc"
    key.write_text(ARMORED)
    inventory = load_inventory(write(tmp_path, f"""
[mirrors]
docker_apt = "https://mirror.example/docker/"
docker_apt_key = "https://mirror.example/keys/docker.asc"
nvidia_apt = "http://10.0.0.5:8080/libnvidia-container"
nvidia_apt_key = "{key}"
pypi = "https://mirror.example/pypi/simple"
pytorch = "https://mirror.example/pytorch/whl"
"""))
    mirrors = inventory.mirrors
    assert mirrors.docker_apt == "https://mirror.example/docker", "no trailing slash"
    assert mirrors.docker_apt_key is not None and mirrors.docker_apt_key.url.endswith("docker.asc")
    assert mirrors.nvidia_apt_key is not None and mirrors.nvidia_apt_key.text == ARMORED
    assert mirrors.nvidia_apt_key.source == str(key)
    assert (mirrors.pypi, mirrors.pytorch) == ("https://mirror.example/pypi/simple",
                                               "https://mirror.example/pytorch/whl")


@pytest.mark.parametrize(("line", "reason"), [
    ('pypi = "ftp://mirror.example/pypi"', "not a plain http(s) URL"),
    ('pypi = "https://mirror.example/pypi simple"', "not a plain http(s) URL"),
    ('pypi = "https://mirror.example/$(reboot)"', "not a plain http(s) URL"),
    ('pypi = "https://mirror.example/pypi;rm"', "not a plain http(s) URL"),
    ("pypi = \"https://mirror.example/p'y\"", "not a plain http(s) URL"),
    ('pypi = "https://user:secret@mirror.example/pypi"', "credentials or a query (not shown)"),
    ('pypi = "https://mirror.example/pypi?token=secret"', "credentials or a query (not shown)"),
    ('pytorch = ""', "non-empty string"),
    ('docker = "https://mirror.example/docker"', "unknown key in [mirrors]"),
    ('docker_apt_key = "https://mirror.example/docker.asc"', "set docker_apt too"),
    ('docker_apt = "https://m.example/d"\ndocker_apt_key = "keys/docker.asc"',
     "absolute path"),
    ('docker_apt = "https://m.example/d"\ndocker_apt_key = "/nonexistent/docker.asc"',
     "not found"),
])
def test_a_bad_mirror_is_refused_at_load(tmp_path: Path, line: str, reason: str) -> None:
    with pytest.raises(InventoryError) as caught:
        load_inventory(write(tmp_path, f"[mirrors]\n{line}\n"))
    assert reason in caught.value.line() and "secret" not in caught.value.line()


@pytest.mark.parametrize(("text", "reason"), [
    ("-----BEGIN PGP PRIVATE KEY BLOCK-----\nsecret\n", "is a private key"),
    ("mDMEZ binary or something else\n", "not an ASCII-armored public key"),
])
def test_a_mirror_key_file_must_be_an_armored_public_key(tmp_path: Path, text: str,
                                                         reason: str) -> None:
    key = tmp_path / "key.asc"
    key.write_text(text)
    with pytest.raises(InventoryError, match=reason) as caught:
        load_inventory(write(tmp_path, f'[mirrors]\nnvidia_apt = "https://m.example/n"\n'
                                       f'nvidia_apt_key = "{key}"\n'))
    assert "secret" not in caught.value.line()


def test_service_defaults_bind_to_loopback(tmp_path: Path, keys: Path) -> None:
    assert load_inventory(write(tmp_path, GOOD)).service is None  # absent: no service
    service = load_inventory(write(tmp_path, GOOD + "\n[service]\n")).service
    assert service is not None
    assert (service.port, service.bind, service.model, service.fp8, service.gpus,
            service.max_queue) == (8000, "127.0.0.1", "", "dq", "all", 4)
    chosen = load_inventory(write(tmp_path, GOOD + '\n[service]\nport = 7860\nbind = "::1"\n'
                                  'model = "stabilityai/stable-diffusion-3.5-large"\n'
                                  'fp8 = "storage"\ngpus = "1"\nmax_queue = 0\n')).service
    assert chosen is not None and (chosen.port, chosen.bind, chosen.gpus, chosen.max_queue) == (
        7860, "::1", "1", 0)


@pytest.mark.parametrize(("line", "reason"), [
    ("port = 0", "port: must be a whole number from 1 to 65535"),
    ('port = "8000"', "port: must be a whole number"),
    ("max_queue = -1", "max_queue: must be a whole number from 0 to 1000"),
    ("max_queue = true", "max_queue: must be a whole number"),
    ('bind = "localhost; id"', "bind: 'localhost; id' must be an IP address"),
    ('bind = "0.0.0.0 -v /:/host"', "must be an IP address"),
    ('model = "huge"', "model: 'huge' must be tiny, medium, large"),
    ('model = "org/name\\nExecStartPre=/bin/sh"', "model:"),
    ('fp8 = "fp4"', "fp8: must be one of off, storage, dq"),
    ('gpus = "first"', "gpus: must be 'all', 'none' or indexes"),
    ('workers = 2', "unknown key in [service]"),
])
def test_a_bad_service_table_is_one_line_at_its_key(tmp_path: Path, keys: Path, line: str,
                                                    reason: str) -> None:
    # The [service] key's own line, even where a host table above has a key of the same name.
    path = write(tmp_path, GOOD.replace('user = "ubuntu"', 'user = "ubuntu"\nport = 22')
                 + f"\n[service]\n{line}\n")
    with pytest.raises(InventoryError) as caught:
        load_inventory(path)
    lines = path.read_text().splitlines()
    assert caught.value.line().startswith(f"{path}:{lines.index(line.split(chr(10))[0]) + 1}:")
    assert reason in caught.value.line()
