"""parse_facts on FACTS_SCRIPT transcripts: pure, no SSH.

Each fixture under tests/fixtures/facts/ is what the facts script prints on one kind of host,
and its first lines say where it came from. RECORDED ones were taken with `provision facts
HOST --raw` on a real host (a Debian 12 sandbox fresh and converged; the lent GPU machine).
SYNTHESIZED ones (Ubuntu 22.04/24.04 with and without an H100, a GPU without a driver) were
written by hand in that shape, since no such host can be reached here: tests on them are only
as true as the hand that wrote them, and are named for it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path

import pytest

from provision.facts import (
    DAEMON_JSON,
    STATE_FILE,
    FactsUnreadable,
    Gpu,
    Group,
    HostFacts,
    PathState,
    docker_context,
    key_lines,
    parse_facts,
)
from provision.gather import FACTS_SCRIPT
from provision.templating import templates_dir
from tests.conftest import require

FIXTURES = Path(__file__).parent / "fixtures" / "facts"
CACHE_DIR = "/data/cache/huggingface"

# Synthesized: written by hand (no such host can be reached here); each file says so.
JAMMY_H100 = "ubuntu-22.04-h100.synthesized"
NOBLE_H100 = "ubuntu-24.04-h100.synthesized"
NOBLE_NOGPU = "ubuntu-24.04-nogpu.synthesized"
JAMMY_NODRIVER = "ubuntu-22.04-gpu-nodriver.synthesized"
# Recorded with `provision facts --raw` on a real Debian 12 sandbox, before and after a converge.
DEBIAN = "debian-12-sandbox-fresh"
DEBIAN_CONVERGED = "debian-12-sandbox-converged"
LENT_H200 = "ubuntu-24.04-h200"  # recorded on the lent H200, 2026-11-22 (see its header)
HOSTS = (JAMMY_H100, NOBLE_H100, NOBLE_NOGPU, JAMMY_NODRIVER, DEBIAN, DEBIAN_CONVERGED,
         LENT_H200)

UBUNTU_TOOLS = ("setfacl", "visudo", "flock", "sshd", "systemctl", "apt-get")
CLOUD_SUDOERS = ("90-cloud-init-users", "README")
RUNC_ONLY = ("io.containerd.runc.v2", "runc")


def transcript(host: str) -> str:
    return (FIXTURES / f"{host}.txt").read_text()


@cache
def facts(host: str) -> HostFacts:
    return parse_facts(transcript(host), CACHE_DIR)


def replace_section(text: str, name: str, body: str) -> str:
    """The transcript with one section's output swapped for `body` (what another host printed)."""
    pattern = re.compile(rf"(@@@provision:{re.escape(name)}\n).*?(\n@@@provision:)", re.S)
    new, count = pattern.subn(lambda m: f"{m.group(1)}{body}\n{m.group(2)}", text)
    assert count == 1, name
    return new


# --------------------------------------------------------------------------- the fixtures


@pytest.mark.parametrize("host", HOSTS)
def test_fixture_has_the_scripts_sections(host: str) -> None:
    # A fixture recorded from an older FACTS_SCRIPT would test a parser for output nobody prints.
    # The order is free (the slow sections run side by side and print last); the end is last.
    text = transcript(host)
    printed = re.findall(r"^@@@provision:(.*)$", text, re.M)
    assert sorted(printed) == sorted(re.findall(r"\bsec ([a-z-]+)", FACTS_SCRIPT))
    assert printed[-1] == "end"
    header, _, _ = text.partition("\n@@@provision:os-release\n")
    provenance = "SYNTHESIZED" if host.endswith(".synthesized") else "RECORDED"
    assert header.startswith(f"# {provenance} ") and all(
        ln.startswith("# ") for ln in header.splitlines())
    assert text.endswith("\n@@@provision:end\n")


# --------------------------------------------------------------------------- system


@pytest.mark.parametrize(
    ("host", "os_id", "version_id", "codename", "pretty_name", "kernel", "hostname"),
    [
        (JAMMY_H100, "ubuntu", "22.04", "jammy", "Ubuntu 22.04.4 LTS", "5.15.0-105-generic",
         "h100-jammy-01"),
        (NOBLE_H100, "ubuntu", "24.04", "noble", "Ubuntu 24.04.1 LTS", "6.8.0-45-generic",
         "h100-noble-01"),
        (NOBLE_NOGPU, "ubuntu", "24.04", "noble", "Ubuntu 24.04.1 LTS", "6.8.0-45-generic",
         "cpu-noble-01"),
        (JAMMY_NODRIVER, "ubuntu", "22.04", "jammy", "Ubuntu 22.04.4 LTS", "5.15.0-119-generic",
         "h100-nodrv-01"),
        (DEBIAN, "debian", "12", "bookworm", "Debian GNU/Linux 12 (bookworm)", "6.18.44-fc-v657",
         "rec12b"),
        (LENT_H200, "ubuntu", "24.04", "noble", "Ubuntu 24.04.3 LTS", "6.18.44-fc-v657-gpu", "vm"),
    ],
)
def test_os(host: str, os_id: str, version_id: str, codename: str, pretty_name: str,
            kernel: str, hostname: str) -> None:
    os = facts(host).os
    assert (os.id, os.version_id, os.codename, os.pretty_name) == (
        os_id, version_id, codename, pretty_name)
    assert (os.arch, os.kernel, os.hostname) == ("x86_64", kernel, hostname)


@pytest.mark.parametrize(
    ("host", "system_state", "sudo_user"),
    [
        (JAMMY_H100, "running", "ubuntu"),
        (NOBLE_H100, "running", "ubuntu"),
        (NOBLE_NOGPU, "running", "ubuntu"),
        (JAMMY_NODRIVER, "degraded", ""),  # the admin logs in as root: no SUDO_USER
        (DEBIAN, "running", "admin"),
        (LENT_H200, "", ""),  # no systemd: PID 1 is the VM's own process_api
    ],
)
def test_init_and_identity(host: str, system_state: str, sudo_user: str) -> None:
    f = facts(host)
    assert (f.init, f.system_state) == (
        "process_api" if host == LENT_H200 else "systemd", system_state)
    assert (f.uid, f.sudo_user) == (0, sudo_user)


@pytest.mark.parametrize(
    ("host", "sudoers_d", "tools"),
    [
        (JAMMY_H100, CLOUD_SUDOERS, UBUNTU_TOOLS),
        (NOBLE_H100, CLOUD_SUDOERS, UBUNTU_TOOLS),
        (NOBLE_NOGPU, CLOUD_SUDOERS, UBUNTU_TOOLS),
        (JAMMY_NODRIVER, ("README",), UBUNTU_TOOLS),
        (DEBIAN, ("90-admin", "README"), ("visudo", "flock", "sshd", "systemctl", "apt-get")),
        (DEBIAN_CONVERGED, ("90-admin", "README"), UBUNTU_TOOLS),  # the converge added acl
        (LENT_H200, (), ("flock", "apt-get")),  # no sudo, sshd, setfacl or systemd there
    ],
)
def test_sudoers_d_and_tools(host: str, sudoers_d: tuple[str, ...], tools: tuple[str, ...]) -> None:
    f = facts(host)
    assert f.sudoers_d == sudoers_d
    assert f.tools == tools


# --------------------------------------------------------------------------- accounts


@pytest.mark.parametrize(
    ("host", "n_accounts", "asked", "not_created"),
    [
        # name: (uid, gid, home, locked (expired), authorized key lines)
        (JAMMY_H100, 36, {"alice": (1001, 1001, "/home/alice", False, 2),
                          "bob": (1002, 1002, "/home/bob", True, 1)}, ()),
        # asked "alice dave" + state.json's "alice carol": alice's line comes twice, dave is new
        (NOBLE_H100, 36, {"alice": (1001, 1001, "/home/alice", False, 1),
                          "carol": (1002, 1002, "/home/carol", False, 1)}, ("dave",)),
        (NOBLE_NOGPU, 34, {}, ("alice", "bob")),
        (JAMMY_NODRIVER, 34, {"alice": (1001, 1001, "/home/alice", False, 3)}, ()),
        (DEBIAN, 22, {}, ("alice", "bob")),
        (DEBIAN_CONVERGED, 24, {"alice": (1001, 1002, "/home/alice", False, 1),
                                "bob": (1002, 1003, "/home/bob", False, 1)}, ()),
        (LENT_H200, 19, {}, ("alice", "bob")),
    ],
)
def test_accounts(host: str, n_accounts: int, asked: dict[str, tuple], not_created: tuple) -> None:
    accounts = facts(host).accounts
    assert len(accounts) == n_accounts  # every getent passwd line, GECOS with spaces and commas too
    got = {name: (a.uid, a.gid, a.home, a.locked, a.authorized_keys)
           for name, a in accounts.items() if a.locked is not None}
    assert got == asked
    assert all(accounts[name].shell == "/bin/bash" for name in asked)
    assert not set(not_created) & set(accounts)
    # Accounts nobody asked about carry no lock state and no key count.
    assert (accounts["root"].locked, accounts["root"].authorized_keys) == (None, None)
    assert (accounts["nobody"].uid, accounts["nobody"].home) == (65534, "/nonexistent")


def test_system_account_with_commas_in_gecos() -> None:
    account = facts(JAMMY_H100).accounts["systemd-network"]
    assert (account.uid, account.gid, account.home, account.shell) == (
        101, 102, "/run/systemd", "/usr/sbin/nologin")


ADMIN_GROUPS_JAMMY = {"ubuntu", "adm", "dialout", "cdrom", "floppy", "sudo", "audio", "dip",
                      "video", "plugdev", "lxd", "netdev"}


@pytest.mark.parametrize(
    ("host", "user", "groups"),
    [
        (JAMMY_H100, "ubuntu", ADMIN_GROUPS_JAMMY | {"docker"}),
        (JAMMY_H100, "alice", {"alice", "docker"}),
        (JAMMY_H100, "bob", {"bob"}),
        (NOBLE_H100, "alice", {"alice", "hfcache"}),
        (NOBLE_H100, "carol", {"carol", "hfcache"}),
        (NOBLE_H100, "ubuntu", {"ubuntu", "adm", "dialout", "cdrom", "sudo", "audio", "dip",
                                "video", "lxd"}),
        (NOBLE_NOGPU, "alice", set()),  # no such account, in no group
        (JAMMY_NODRIVER, "alice", {"alice", "sudo"}),
        (JAMMY_NODRIVER, "root", {"root"}),
        (DEBIAN, "admin", {"admin"}),  # sudo through /etc/sudoers.d/90-admin, no group
        (DEBIAN, "alice", set()),
        (DEBIAN_CONVERGED, "alice", {"alice", "hfcache", "docker"}),
    ],
)
def test_groups_of(host: str, user: str, groups: set[str]) -> None:
    assert facts(host).groups_of(user) == groups


@pytest.mark.parametrize(
    ("host", "n_groups", "group"),
    [
        (JAMMY_H100, 62, Group("docker", 999, ("ubuntu", "alice"))),
        (NOBLE_H100, 63, Group("hfcache", 1003, ("alice", "carol"))),
        (NOBLE_NOGPU, 61, Group("docker", 988, ())),
        (JAMMY_NODRIVER, 60, Group("sudo", 27, ("alice",))),
        (DEBIAN, 43, Group("adm", 4, ())),
        (DEBIAN_CONVERGED, 47, Group("hfcache", 1001, ("alice", "bob"))),
    ],
)
def test_groups(host: str, n_groups: int, group: Group) -> None:
    groups = facts(host).groups
    assert len(groups) == n_groups
    assert groups[group.name] == group


# --------------------------------------------------------------------------- sshd


@pytest.mark.parametrize(
    ("host", "interval", "root_login"),
    [
        (JAMMY_H100, 0, "without-password"),
        (NOBLE_H100, 60, "without-password"),  # provisioned: keepalive_interval = 60
        (NOBLE_NOGPU, 0, "without-password"),
        (JAMMY_NODRIVER, 0, "yes"),
    ],
)
def test_sshd_ok(host: str, interval: int, root_login: str) -> None:
    sshd = facts(host).sshd
    assert (sshd.test_ok, sshd.test_error, sshd.includes_dropins) == (True, "", True)
    assert (sshd.client_alive_interval, sshd.client_alive_count_max) == (interval, 3)
    assert sshd.effective["permitrootlogin"] == root_login
    assert sshd.effective["port"] == "22"
    assert sshd.effective["passwordauthentication"] == "no"
    # A value with spaces stays whole.
    assert sshd.effective["authorizedkeysfile"] == ".ssh/authorized_keys .ssh/authorized_keys2"


def test_sshd_broken_config_without_include() -> None:
    # The recorded host, with what sshd prints when a line of its config is bad (and the
    # Include line gone): `sshd -t` names the line, `sshd -T` prints nothing.
    text = replace_section(transcript(DEBIAN), "sshd-test",
                           "/etc/ssh/sshd_config: line 12: Bad configuration option: Foo\n"
                           "/etc/ssh/sshd_config: terminating, 1 bad configuration options\n"
                           "exit=255")
    text = replace_section(replace_section(text, "sshd-effective", ""), "sshd-include", "")
    sshd = parse_facts(text, CACHE_DIR).sshd
    assert not sshd.test_ok
    assert sshd.test_error == (
        "/etc/ssh/sshd_config: line 12: Bad configuration option: Foo\n"
        "/etc/ssh/sshd_config: terminating, 1 bad configuration options")
    assert not sshd.includes_dropins
    # `sshd -T` fails on the same line: nothing effective is known.
    assert sshd.effective == {}
    assert (sshd.client_alive_interval, sshd.client_alive_count_max) == (None, None)


def test_sshd_include_of_another_file_is_not_the_dropin_dir() -> None:
    text = replace_section(transcript(DEBIAN), "sshd-include", "Include /etc/ssh/local.conf")
    assert not parse_facts(text, CACHE_DIR).sshd.includes_dropins


# --------------------------------------------------------------------------- cache, disk


@pytest.mark.parametrize("host", [JAMMY_H100, NOBLE_NOGPU, JAMMY_NODRIVER, DEBIAN, LENT_H200])
def test_cache_dir_missing(host: str) -> None:
    cache_dir = facts(host).cache
    assert (cache_dir.path, cache_dir.exists) == (CACHE_DIR, False)
    assert (cache_dir.kind, cache_dir.acl, cache_dir.token_files) == ("", (), ())


def test_cache_dir_shared_with_default_acl() -> None:
    cache_dir = facts(NOBLE_H100).cache
    assert (cache_dir.path, cache_dir.exists) == (CACHE_DIR, True)
    assert (cache_dir.kind, cache_dir.owner, cache_dir.group, cache_dir.mode) == (
        "directory", "root", "hfcache", "2775")
    assert cache_dir.acl == (
        "user::rwx", "group::rwx", "group:hfcache:rwx", "mask::rwx", "other::r-x",
        "default:user::rwx", "default:group::rwx", "default:group:hfcache:rwx",
        "default:mask::rwx", "default:other::r-x",
    )
    # alice logged in through her symlinked cache: her token landed in the shared dir.
    assert cache_dir.token_files == ("/data/cache/huggingface/token",)


@pytest.mark.parametrize(
    ("host", "caches"),
    [
        (JAMMY_H100, {"alice": ("dir", "1234567"), "bob": ("missing", "")}),
        (NOBLE_H100, {"alice": ("symlink", CACHE_DIR), "carol": ("symlink", CACHE_DIR)}),
        (NOBLE_NOGPU, {}),
        (JAMMY_NODRIVER, {"alice": ("missing", "")}),
        (DEBIAN, {}),  # no member account yet
        (DEBIAN_CONVERGED, {"alice": ("symlink", CACHE_DIR), "bob": ("symlink", CACHE_DIR)}),
    ],
)
def test_member_caches(host: str, caches: dict[str, tuple[str, str]]) -> None:
    got = facts(host).member_caches
    assert {name: (c.state, c.detail) for name, c in got.items()} == caches
    assert all(c.name == name for name, c in got.items())


@pytest.mark.parametrize(
    ("host", "mount", "total", "free"),
    [
        # the cache dir's nearest existing ancestor
        (JAMMY_H100, "/data", 7681501126656, 6168627142656),
        (NOBLE_H100, "/data", 3844124475392, 2736582701056),
        (NOBLE_NOGPU, "/", 103865303040, 98448048128),
        (JAMMY_NODRIVER, "/", 1888556142592, 1761989021696),
        (DEBIAN, "/", 270553174016, 73730039808),
        (LENT_H200, "/", 270553174016, 68668338176),
    ],
)
def test_disk(host: str, mount: str, total: int, free: int) -> None:
    disk = facts(host).disk
    assert disk is not None
    assert (disk.path, disk.total_bytes, disk.free_bytes) == (mount, total, free)


# --------------------------------------------------------------------------- paths, state


def test_paths_daemon_json_present_state_missing() -> None:
    f = facts(JAMMY_H100)
    assert not f.path(STATE_FILE).exists
    assert f.text(STATE_FILE) is None
    daemon = f.path(DAEMON_JSON)
    assert (daemon.kind, daemon.owner, daemon.group, daemon.mode, daemon.target) == (
        "file", "root", "root", "644", "")
    assert json.loads(f.text(DAEMON_JSON) or "") == {
        "features": {"cdi": True},
        "runtimes": {"nvidia": {"args": [], "path": "nvidia-container-runtime"}}}
    assert f.state == {}


def test_paths_of_every_kind() -> None:
    f = facts(NOBLE_H100)
    assert list(f.paths) == [STATE_FILE, DAEMON_JSON, "~alice/.ssh/authorized_keys",
                             "~dave/.ssh/authorized_keys", "~alice/.cache/huggingface",
                             "/data/cache"]
    keys = f.path("~alice/.ssh/authorized_keys")
    assert (keys.kind, keys.owner, keys.group, keys.mode) == ("file", "alice", "alice", "600")
    assert keys.content == ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHq0c8x3zYp6vQe2m1T9bKf7rJwLd4sN"
                            "5uGhA0yXcVbE alice@laptop\n")
    assert not f.path("~dave/.ssh/authorized_keys").exists  # dave has no account yet
    link = f.path("~alice/.cache/huggingface")
    assert (link.kind, link.owner, link.mode, link.target, link.content) == (
        "link", "alice", "777", CACHE_DIR, None)
    directory = f.path("/data/cache")
    assert (directory.kind, directory.mode, directory.target, directory.content) == (
        "directory", "755", "", None)
    assert not f.path(DAEMON_JSON).exists
    assert f.path("/etc/never-asked").kind == "missing"


def test_state_from_state_json() -> None:
    f = facts(DEBIAN_CONVERGED)
    state = f.path(STATE_FILE)
    assert (state.kind, state.owner, state.mode) == ("file", "root", "600")
    assert set(f.state) == {"tool_version", "inventory_digest", "members", "applied_at",
                            "steps_applied"}
    assert f.state["members"] == ["alice", "bob"]
    assert f.state["steps_applied"] == ["users", "keepalive", "hf-cache", "docker", "workspace"]


def test_synthesized_state_is_what_provision_writes() -> None:
    assert set(facts(NOBLE_H100).state) == set(facts(DEBIAN_CONVERGED).state)
    assert facts(NOBLE_H100).path(STATE_FILE).mode == "600"


@pytest.mark.parametrize("host", [NOBLE_NOGPU, JAMMY_NODRIVER, DEBIAN, LENT_H200])
def test_paths_standard_both_missing(host: str) -> None:
    f = facts(host)
    assert (f.path(STATE_FILE).kind, f.path(DAEMON_JSON).kind) == ("missing", "missing")
    assert f.state == {}


def test_a_fresh_host_has_none_of_the_paths_the_steps_ask_for() -> None:
    f = facts(DEBIAN)  # recorded with every step's paths, before any converge
    assert len(f.paths) > 10
    assert [p for p, s in f.paths.items() if s.exists] == ["/etc/ssh/sshd_config"]


# --------------------------------------------------------------------------- docker, nvidia, apt


@pytest.mark.parametrize(
    ("host", "installed", "version", "up", "containers", "runtimes"),
    [
        (JAMMY_H100, True, "27.3.1", True, 2, ("io.containerd.runc.v2", "nvidia", "runc")),
        (NOBLE_H100, False, None, False, 0, ()),
        (NOBLE_NOGPU, True, "24.0.7", True, 0, RUNC_ONLY),  # docker.io from the archive
        (JAMMY_NODRIVER, True, "27.3.1", True, 0, RUNC_ONLY),
        (DEBIAN, False, None, False, 0, ()),
        (LENT_H200, False, None, False, 0, ()),
    ],
)
def test_docker(host: str, installed: bool, version: str | None, up: bool, containers: int,
                runtimes: tuple[str, ...]) -> None:
    docker = facts(host).docker
    assert (docker.installed, docker.version) == (installed, version)
    # systemctl says "inactive" and nothing for is-enabled when the unit does not exist.
    assert (docker.active, docker.enabled) == (up, up)
    assert docker.running_containers == containers
    assert docker.runtimes == runtimes


def test_docker_installed_enabled_but_daemon_down() -> None:
    # dockerd failed to start (say, a bad daemon.json): the server version template prints
    # nothing and `docker info --format` renders an empty Info, whose Runtimes is null.
    text = replace_section(transcript(JAMMY_NODRIVER), "docker",
                           "/usr/bin/docker\nactive=failed\nenabled=enabled\nrunning=0")
    text = replace_section(text, "docker-runtimes", "null")
    docker = parse_facts(text, CACHE_DIR).docker
    assert (docker.installed, docker.version, docker.runtimes) == (True, None, ())
    assert (docker.active, docker.enabled) == (False, True)


H100 = "NVIDIA H100 80GB HBM3"


def test_nvidia_two_h100() -> None:
    nvidia = facts(JAMMY_H100).nvidia
    assert nvidia.pci_devices == ("0000:18:00.0", "0000:2a:00.0")
    assert nvidia.gpus == (
        Gpu(0, H100, "550.54.15", "9.0", 81559, "GPU-7c2a9f4e-1b3d-6e8a-92f5-0d4c8b1a3e76"),
        Gpu(1, H100, "550.54.15", "9.0", 81559, "GPU-e41b7d09-58c2-a3f6-1d9e-6b2f07c4a85d"),
    )
    assert (nvidia.smi_error, nvidia.ctk_version, nvidia.has_gpu) == ("", "1.16.2", True)


def test_nvidia_one_h100_without_toolkit() -> None:
    nvidia = facts(NOBLE_H100).nvidia
    assert nvidia.pci_devices == ("0000:00:05.0",)
    assert nvidia.gpus == (
        Gpu(0, H100, "560.35.03", "9.0", 81559, "GPU-3a9d52c8-0f17-b4e2-8c6a-d19e4f72b035"),)
    assert (nvidia.smi_error, nvidia.ctk_version, nvidia.has_gpu) == ("", None, True)


@pytest.mark.parametrize(("host", "pci", "has_gpu"), [
    (NOBLE_NOGPU, (), False),
    (JAMMY_NODRIVER, ("0000:17:00.0",), True),  # on the bus, driver not installed
    (DEBIAN, (), False),
])
def test_nvidia_without_nvidia_smi(host: str, pci: tuple[str, ...], has_gpu: bool) -> None:
    nvidia = facts(host).nvidia
    assert (nvidia.pci_devices, nvidia.gpus, nvidia.has_gpu) == (pci, (), has_gpu)
    assert re.fullmatch(r"sh: \d+: nvidia-smi: not found", nvidia.smi_error)
    assert nvidia.ctk_version is None


def test_lent_h200_without_sshd_sudo_or_systemd() -> None:
    f = facts(LENT_H200)
    assert f.nvidia.gpus == (Gpu(0, "NVIDIA H200", "580.159.04", "9.0", 143771,
                                 "GPU-1ab72e4e-dadd-7665-26ba-d776ef8439b0"),)
    assert (f.nvidia.pci_devices, f.nvidia.driver) == (("0000:00:06.0",), "580.159.04")
    assert not f.sshd.test_ok and f.sshd.test_error == "sh: 29: sshd: not found"
    assert f.sshd.effective == {} and "sshd" not in f.tools
    assert f.member_caches == {} and f.groups_of("alice") == set()


def test_lent_h200_facts_json_is_its_parsed_transcript() -> None:
    """`provision facts @local --json`, recorded a second after the transcript on the same
    machine, is the transcript's HostFacts.to_json() (only the free disk space moved)."""
    recorded = json.loads((FIXTURES / f"{LENT_H200}.json").read_text())
    parsed = json.loads(json.dumps(facts(LENT_H200).to_json()))
    recorded["disk"]["free_bytes"] = parsed["disk"]["free_bytes"]
    # Fields added to HostFacts since the recording (provision's images and units, probed in
    # the docker section): its transcript lacks their lines, so they parse empty.
    assert {key: parsed.pop(key) for key in ("images", "units")} == {"images": [], "units": {}}
    # Recorded before the facts had member daemons (issue 12); none of its accounts existed.
    recorded.setdefault("member_daemons", {})
    # Recorded before the facts had TCP listeners and sshd's ports (issue 23): no sshd there,
    # and its transcript's listening section was inserted empty.
    recorded.setdefault("listeners", [])
    recorded["sshd"].setdefault("ports", [])
    assert recorded == parsed


def test_nvidia_driver_library_mismatch() -> None:
    # After a driver upgrade without a reboot: nvidia-smi runs, NVML does not.
    text = replace_section(transcript(NOBLE_H100), "nvidia-smi",
                           "Failed to initialize NVML: Driver/library version mismatch\n"
                           "NVML library version: 560.35\nexit=18")
    nvidia = parse_facts(text, CACHE_DIR).nvidia
    assert nvidia.gpus == ()
    assert nvidia.smi_error == ("Failed to initialize NVML: Driver/library version mismatch\n"
                                "NVML library version: 560.35")
    assert nvidia.has_gpu


@pytest.mark.parametrize(("host", "holder"), [
    # /proc/locks holds other processes' locks too (dockerd, cron…): only dpkg/apt inodes count.
    (JAMMY_H100, "unattended-upgr (pid 2817) holds /var/lib/dpkg/lock"),
    (NOBLE_H100, None),
    (NOBLE_NOGPU, None),
    (JAMMY_NODRIVER, None),
    (DEBIAN, None),
    (LENT_H200, None),
])
def test_apt_lock_holder(host: str, holder: str | None) -> None:
    assert facts(host).apt_lock_holder == holder


# --------------------------------------------------------------------------- whole transcript


@pytest.mark.parametrize("host", HOSTS)
def test_to_json_is_serialisable(host: str) -> None:
    f = facts(host)
    data = json.loads(json.dumps(f.to_json()))
    assert data["os"]["hostname"] == f.os.hostname
    assert len(data["nvidia"]["gpus"]) == len(f.nvidia.gpus)
    assert data["docker"]["runtimes"] == list(f.docker.runtimes)
    assert set(data["paths"]) == set(f.paths)


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("cut_before", ["@@@provision:end", "@@@provision:nvidia-smi"])
def test_truncated_transcript_is_refused(host: str, cut_before: str) -> None:
    text = transcript(host)
    truncated = text[:text.index(cut_before)]
    with pytest.raises(FactsUnreadable, match="no end marker"):
        parse_facts(truncated, CACHE_DIR)


def test_empty_transcript_is_refused() -> None:
    with pytest.raises(FactsUnreadable, match="no end marker"):
        parse_facts("", CACHE_DIR)


@pytest.mark.parametrize(("section", "garbled"), [
    ("identity", "uid=root"),
    ("passwd", "alice:x:one:1001::/home/alice:/bin/bash"),
    ("group", "hfcache:x:nine:alice"),
])
def test_garbled_output_is_one_clear_error(section: str, garbled: str) -> None:
    text = replace_section(transcript(NOBLE_H100), section, garbled)
    with pytest.raises(FactsUnreadable, match="could not be read") as caught:
        parse_facts(text, CACHE_DIR)
    assert caught.value.detail == text  # -v shows what the host printed


def test_the_facts_script_passes_shellcheck() -> None:
    """Shell is code (issue 24): the facts script is a file of its own, linted as sh."""
    shellcheck = shutil.which("shellcheck")
    require(shellcheck, "shellcheck (apt install shellcheck)")
    assert shellcheck
    done = subprocess.run([shellcheck, "-s", "sh", str(templates_dir() / "host" / "facts.sh")],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout


def run_facts_script(tmp_path: Path, limit: str = "") -> subprocess.CompletedProcess[str]:
    """The facts script on this machine, as root runs it on a host (`limit`: shell run first)."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "TMPDIR": str(tmp_path),
           "PROVISION_CACHE_DIR": CACHE_DIR, "PROVISION_ACCOUNTS": "", "PROVISION_PATHS": "",
           "PROVISION_UNITS": "", "PROVISION_SERVICE_ACCOUNT": ""}
    script = templates_dir() / "host" / "facts.sh"
    return subprocess.run(["sh", "-c", f"{limit}\nexec sh {script}"], capture_output=True,
                          text=True, env=env, timeout=120, check=False)


def test_the_facts_script_prints_every_section_once_its_slow_ones_are_done(
        tmp_path: Path) -> None:
    done = run_facts_script(tmp_path)
    assert done.returncode == 0, done.stderr
    printed = re.findall(r"^@@@provision:(.*)$", done.stdout, re.M)
    assert sorted(printed) == sorted(re.findall(r"\bsec ([a-z-]+)", FACTS_SCRIPT))
    assert printed[-1] == "end" and "section-done" not in done.stdout
    assert list(tmp_path.iterdir()) == [], "its temporary files are removed"


@pytest.mark.parametrize(("limit", "why"), [
    ("export TMPDIR=\"$TMPDIR/absent\"", "no temporary directory"),  # mktemp -d fails
    ("ulimit -f 0", "a section was cut short"),  # every write to a file fails
])
def test_a_facts_script_that_cannot_keep_its_sections_fails_rather_than_read_them_absent(
        tmp_path: Path, limit: str, why: str) -> None:
    """A full or read-only /tmp would leave the slow sections (Docker, accounts, the asked
    paths) empty: read as absent, a plan would "fix" what is there. The read fails instead."""
    done = run_facts_script(tmp_path, limit)
    assert done.returncode == 1 and why in done.stderr, done.stderr
    assert "@@@provision:end" not in done.stdout


def test_key_lines_counts_as_the_facts_scripts_grep_does() -> None:
    """A member's key count comes from her authorized_keys read as a path (where it was asked)
    or from grep on the host (former members): both must give the same number. Synthesized
    content, counted by the real grep the script runs."""
    content = ("ssh-ed25519 AAAA one\n# a comment\n\n  indented-key AAAA\n\tx\n"
               "ecdsa-sha2-nistp256 BBBB two\r\nno-newline-at-the-end")
    grep = subprocess.run(["grep", "-cE", "^[^#[:space:]]"], input=content,
                          capture_output=True, text=True, check=False).stdout.strip()
    assert key_lines(PathState("~a/.ssh/authorized_keys", "file", content=content)) \
        == int(grep) == 3
    # A link she planted is never read; no file, no keys.
    assert key_lines(PathState("~a/.ssh/authorized_keys", "link", target="/root/.ssh/x")) == 0
    assert key_lines(None) == 0


@pytest.mark.parametrize("content", [
    '{\n  "auths": {},\n  "currentContext": "rootless"\n}\n',
    '{"currentContext":"a", "x": {"currentContext": "b"}}\n{"currentContext": "c"}',
    '{\n  "auths": {}\n}\n',
    '{"currentContext": "rootless"',  # cut short: sed still finds it
    "",
])
def test_docker_context_is_found_as_the_facts_scripts_sed_finds_it(content: str) -> None:
    """A member's docker context comes from her config read as a path (where it was asked) or
    from sed on the host (former members, the service account): both must agree. Synthesized
    content, read by the script's own sed command."""
    command = "sed -n 's/.*\"currentContext\": *\"\\([^\"]*\\)\".*/\\1/p' | head -n 1"
    assert command in FACTS_SCRIPT
    sed = subprocess.run(command, shell=True, input=content, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert docker_context(PathState("~a/.docker/config.json", "file", content=content)) == sed
    assert docker_context(PathState("~a/.docker/config.json", "link", target="/root/x")) == ""
    assert docker_context(None) == ""
