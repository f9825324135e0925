"""Pure plans against recorded facts: given this host and this inventory, expect these changes.

Recorded hosts (tests/fixtures/facts): Ubuntu 22.04/24.04 with H100s, without a GPU or its
driver, and Debian 12. Every generated apply script must also parse as POSIX sh.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import pytest

from provision.changes import Run, WriteFile
from provision.engine import apply_script
from provision.errors import InventoryError
from provision.facts import Account, HostFacts, PathState, parse_facts
from provision.gather import facts_request
from provision.inventory import AptKey, Inventory, Mirrors, load_inventory, parse_inventory
from provision.sandbox import new_key_pair
from provision.steps import (
    NoGpu,
    StepBlocked,
    StepSkipped,
    docker,
    hf_cache,
    keepalive,
    nvidia,
    users,
    workspace,
)
from provision.steps.order import STEPS, select_steps
from tests.conftest import FIXTURES, facts_of, summaries, synthesized_h100_transcript

HOSTS = sorted(p.stem for p in (FIXTURES / "facts").glob("*.txt"))


@pytest.fixture(scope="module")
def team(tmp_path_factory) -> Inventory:
    base = tmp_path_factory.mktemp("team")
    new_key_pair(base)
    key = (base / "id_ed25519.pub").read_text().strip()
    data = {"members": [{"name": "alice", "keys": [key], "sudo": ["/usr/bin/nvidia-smi"]},
                        {"name": "dave", "keys": [key]}]}
    return parse_inventory(data, base / "provision.toml")


def test_users_on_a_provisioned_host_adds_dave_and_offboards_carol(team: Inventory) -> None:
    changes = users.plan(facts_of("ubuntu-24.04-h100.synthesized"), team)
    text = summaries(changes)
    assert "create account dave (home, bash)" in text
    assert not any("create account alice" in s for s in text)
    assert "offboard carol: lock the account (home kept)" in text
    assert "offboard carol: move her SSH keys aside" in text
    dave_keys = next(c for c in changes if c.summary.startswith("create dave's managed"))
    (write,) = dave_keys.actions
    assert isinstance(write, WriteFile) and write.path == "/home/dave/.ssh/authorized_keys"
    assert (write.owner, write.mode) == ("dave", "0600")
    assert write.content.startswith(users.BEGIN) and write.content.rstrip().endswith(users.END)
    sudo = next(c for c in changes if c.summary.startswith("sudo for alice"))
    assert sudo.actions[0].validate == "visudo -cf {}"
    assert "alice ALL=(root) NOPASSWD: /usr/bin/nvidia-smi" in sudo.actions[0].content


def test_users_warns_that_docker_is_root_equivalent(team: Inventory) -> None:
    changes = users.plan(facts_of("ubuntu-22.04-h100.synthesized"), team)
    joins = [c for c in changes if "docker" in c.summary and c.summary.startswith("add ")]
    assert joins and all(c.warning == users.DOCKER_WARNING for c in joins)


def test_users_unlocks_a_returning_member(team: Inventory) -> None:
    facts = facts_of("ubuntu-22.04-h100.synthesized")
    assert facts.accounts["bob"].locked is True
    bob = parse_inventory({"members": [{"name": "bob", "keys": list(team.members[0].keys)}]},
                          team.path)
    assert "unlock returning member bob" in summaries(users.plan(facts, bob))


def test_users_refuses_to_take_over_a_system_account(team: Inventory) -> None:
    facts = facts_of("ubuntu-24.04-nogpu.synthesized")
    taken = {**facts.accounts, "dave": Account("dave", 120, 120, "/var/lib/dave", "/bin/false")}
    with pytest.raises(StepBlocked, match="system account"):
        users.plan(dataclasses.replace(facts, accounts=taken), team)


def test_managed_block_keeps_the_members_own_lines() -> None:
    own = "ssh-ed25519 AAAAOWN alice@laptop\n"
    first = users.managed_keys(own, ("ssh-ed25519 AAAA1 a",))
    second = users.managed_keys(first + "# her note\n", ("ssh-ed25519 AAAA2 a",))
    assert second.startswith(own)
    assert "AAAA1" not in second and "AAAA2" in second and "# her note" in second
    assert users.managed_keys(second, ("ssh-ed25519 AAAA2 a",)) == second


def test_keepalive_refuses_a_host_whose_sshd_already_fails(team: Inventory) -> None:
    facts = facts_of("debian-12-sandbox-fresh")
    broken = dataclasses.replace(facts, sshd=dataclasses.replace(
        facts.sshd, test_ok=False,
        test_error="/etc/ssh/sshd_config: line 12: Bad configuration option: Foo"))
    with pytest.raises(StepBlocked, match=r"already fails 'sshd -t'.*Bad configuration option"):
        keepalive.plan(broken, team)


def test_keepalive_adds_the_missing_include_line(team: Inventory) -> None:
    facts = facts_of("debian-12-sandbox-fresh")
    main = PathState(keepalive.MAIN, "file", "root", "root", "644", content="Port 22\n")
    fixed = dataclasses.replace(facts, sshd=dataclasses.replace(facts.sshd,
                                                                includes_dropins=False),
                                paths={**facts.paths, keepalive.MAIN: main})
    first, dropin = keepalive.plan(fixed, team)
    assert "does not include sshd_config.d" in first.summary
    assert first.actions[0].content == f"{keepalive.INCLUDE}\nPort 22\n"
    assert first.actions[0].validate == "sshd -t -f {}"
    assert isinstance(dropin.actions[1], Run) and "systemctl reload ssh" in \
        dropin.actions[1].command
    assert "restart" not in dropin.script()


def test_keepalive_on_ubuntu_writes_a_validated_dropin_then_reloads(team: Inventory) -> None:
    (change,) = keepalive.plan(facts_of("ubuntu-22.04-h100.synthesized"), team)
    write, reload = change.actions
    assert write.path == keepalive.DROPIN and write.validate == "sshd -t -f {}"
    assert "ClientAliveInterval 60\nClientAliveCountMax 3\n" in write.content
    assert "rm -f " + keepalive.DROPIN in reload.command


def test_hf_cache_merges_an_existing_cache_and_installs_acl(team: Inventory) -> None:
    facts = facts_of("ubuntu-22.04-h100.synthesized")
    text = summaries(hf_cache.plan(facts, team))
    assert "create /data/cache/huggingface (root:hfcache, 2775)" in text
    assert any(s.startswith("/home/alice/.cache/huggingface: merge alice's own cache") for s in
               text)
    assert any(s.startswith("/home/dave/.cache/huggingface -> ") for s in text)
    assert ("install acl (setfacl) for the cache's default ACLs" in text) == \
        ("setfacl" not in facts.tools)


def test_hf_cache_leaves_a_right_link_alone(team: Inventory) -> None:
    text = summaries(hf_cache.plan(facts_of("ubuntu-24.04-h100.synthesized"), team))
    assert not any(s.startswith("/home/alice/.cache/huggingface") for s in text)


@pytest.mark.parametrize("host", HOSTS)
def test_every_apply_script_parses_as_posix_sh(host: str, team: Inventory,
                                               tmp_path: Path) -> None:
    facts = facts_of(host)
    for step in STEPS:
        try:
            changes = step.plan(facts, team)
        except (StepBlocked, StepSkipped):
            continue
        script = tmp_path / f"{step.name}.sh"
        script.write_text(apply_script(step.name, changes))
        checked = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stderr


def with_defaults(inventory: Inventory, **values: object) -> Inventory:
    return dataclasses.replace(inventory,
                               defaults=dataclasses.replace(inventory.defaults, **values))


def test_docker_ce_on_ubuntu_noble_uses_the_signed_by_deb822_source(team: Inventory) -> None:
    facts = facts_of("ubuntu-24.04-h100.synthesized")
    assert facts.docker.repo_reachable is True
    repo, install = docker.plan(facts, team)
    assert "auto: download.docker.com answers" in repo.summary
    fetch_key, sources, check = repo.actions
    assert 'curl -fsSL https://download.docker.com/linux/ubuntu/gpg -o "$backup/key.new"' \
        in fetch_key.command
    assert 'cp "$backup/key.new" "$tmp"\nchmod 0644 "$tmp"\nmv -f "$tmp" ' \
        "/etc/apt/keyrings/docker.asc\n" in fetch_key.command, "an .asc keyring stays ASCII-armored"
    assert "Dir::Etc::SourceList=/etc/apt/sources.list.d/docker.sources" in check.command
    assert sources.path == "/etc/apt/sources.list.d/docker.sources"
    assert "URIs: https://download.docker.com/linux/ubuntu\nSuites: noble\n" in sources.content
    assert "Signed-By: /etc/apt/keyrings/docker.asc" in sources.content
    assert "docker-ce docker-ce-cli containerd.io docker-buildx-plugin docker-compose-plugin" \
        in install.script()
    assert "systemctl enable --now docker.service" in install.script()


def test_docker_ce_on_debian_bookworm_and_distro_when_asked(team: Inventory) -> None:
    recorded = facts_of("debian-12-sandbox-fresh")  # the sandbox cannot reach Docker's repo
    facts = dataclasses.replace(recorded, docker=dataclasses.replace(
        recorded.docker, repo_reachable=True))
    repo, _ = docker.plan(facts, team)
    assert "Suites: bookworm" in repo.actions[1].content
    assert "linux/debian" in repo.actions[1].content
    (distro,) = docker.plan(facts, with_defaults(team, docker_source="distro"))
    assert "install docker.io" in distro.summary and "apt-get" in distro.script()
    unreachable = dataclasses.replace(facts, docker=dataclasses.replace(
        facts.docker, repo_reachable=False))
    (auto,) = docker.plan(unreachable, team)
    assert "auto: download.docker.com does not answer" in auto.summary


def test_docker_keeps_an_installed_engine_and_merges_daemon_json(team: Inventory) -> None:
    facts = facts_of("ubuntu-22.04-h100.synthesized")
    assert docker.plan(facts, team) == []
    (change,) = docker.plan(facts, with_defaults(team, docker_daemon={"log-level": "warn"}))
    write, restart = change.actions
    merged = json.loads(write.content)
    assert merged["log-level"] == "warn" and merged["runtimes"]["nvidia"]
    assert change.restarts_docker and "systemctl restart docker" in restart.command


def test_nvidia_toolkit_from_nvidias_repository_then_cdi_spec_and_runtime(team: Inventory) -> None:
    repo, install, spec, runtime = nvidia.plan(facts_of("ubuntu-24.04-h100.synthesized"), team)
    assert "nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml" in spec.script()
    script = repo.script() + install.script()
    assert ('curl -fsSL https://nvidia.github.io/libnvidia-container/gpgkey -o "$backup/key.new"'
            in script)
    assert ('gpg --batch --yes --dearmor -o "$tmp" < "$backup/key.new"\nchmod 0644 "$tmp"\n'
            'mv -f "$tmp" /usr/share/keyrings/nvidia-container-toolkit-keyring.gpg\n') in script
    (sources,) = [a for a in repo.actions if isinstance(a, WriteFile)]
    assert sources.path == "/etc/apt/sources.list.d/nvidia-container-toolkit.list"
    assert ("deb [signed-by=/usr/share/keyrings/nvidia-container-toolkit-keyring.gpg] "
            "https://nvidia.github.io/libnvidia-container/stable/deb/$(ARCH) /") in \
        sources.content
    assert "nvidia-container-toolkit >/dev/null" in script
    assert runtime.restarts_docker
    assert "nvidia-ctk runtime configure --runtime=docker" in runtime.script()
    pinned = nvidia.plan(facts_of("ubuntu-24.04-h100.synthesized"),
                         with_defaults(team, nvidia_toolkit_version="1.17.8-1"))
    assert ("nvidia-container-toolkit=1.17.8-1 nvidia-container-toolkit-base=1.17.8-1 "
            "libnvidia-container-tools=1.17.8-1 libnvidia-container1=1.17.8-1") in \
        pinned[1].script(), "all four together, as NVIDIA's guide pins them"


def test_nvidia_on_a_ready_host_changes_nothing_and_proves_all_gpus(team: Inventory) -> None:
    facts = facts_of("ubuntu-22.04-h100.synthesized")
    assert nvidia.plan(facts, team) == [] and nvidia.notes(facts, team) == []
    proof = nvidia.proof(facts, team)
    assert "docker run --rm --device=nvidia.com/gpu=all " in proof.script  # Docker 27: CDI
    uuids = [g.uuid for g in facts.nvidia.gpus]
    assert proof.check("\n".join(reversed(uuids)) + "\n") is None
    assert "sees" in proof.check(uuids[0] + "\n")


def test_nvidia_without_gpu_skips_and_without_driver_says_how(team: Inventory) -> None:
    with pytest.raises(NoGpu, match="skipped: no NVIDIA GPU"):
        nvidia.plan(facts_of("ubuntu-24.04-nogpu.synthesized"), team)
    with pytest.raises(StepBlocked, match=r"driver does not answer.*ubuntu-drivers"):
        nvidia.plan(facts_of("ubuntu-22.04-gpu-nodriver.synthesized"), team)


def test_nvidia_warns_below_compute_capability_8_9(team: Inventory) -> None:
    facts = facts_of("ubuntu-22.04-h100.synthesized")
    ampere = tuple(dataclasses.replace(g, name="NVIDIA A100-SXM4-80GB", compute_capability="8.0")
                   for g in facts.nvidia.gpus)
    older = dataclasses.replace(facts, nvidia=dataclasses.replace(facts.nvidia, gpus=ampere))
    (first, _) = nvidia.notes(older, team)
    assert "8.0 < 8.9" in first and "storage only" in first


def test_every_step_plans_nothing_on_the_host_it_just_converged() -> None:
    """Recorded right after `provision host` converged a real Debian 12 sandbox with this same
    inventory: a re-plan on those facts must be empty (nvidia: skipped, no GPU there)."""
    inventory = load_inventory(FIXTURES / "facts" / "debian-12-sandbox.toml")
    facts = facts_of("debian-12-sandbox-converged")
    for step in select_steps(None, ["nvidia", "workspace"]):
        assert step.plan(facts, inventory) == [], step.name
    with pytest.raises(NoGpu):
        nvidia.plan(facts, inventory)
    # Templates change after a recording: then workspace files provision wrote are brought up
    # to date, files and directories new since are made, and none is mistaken for a member's
    # edit.
    changes = workspace.plan(facts, inventory)
    assert changes and not any(c.needs_force for c in changes)
    kinds = {"mkdir" if c.summary.endswith("workspace directories") else c.summary.split()[0]
             for c in changes}
    assert kinds <= {"update", "seed", "remember", "mkdir"}


# --------------------------------------------------------------------------- the host's image

# SYNTHESIZED facts, not recorded: the synthesized Ubuntu 24.04 H100 host (driver 560) with its
# nvidia-smi line rewritten to report another driver. What each driver gets follows NVIDIA's
# driver table and minor-version compatibility (provision/versions.py cites both).
SYNTHESIZED_DRIVERS = {
    "535.183.01": ("cu126", "nvidia/cuda:12.2.2-base-ubuntu22.04", "3.10"),
    "550.127.05": ("cu126", "nvidia/cuda:12.4.1-base-ubuntu22.04", "3.10"),
    "570.133.20": ("cu128", "nvidia/cuda:12.8.1-base-ubuntu24.04", "3.12"),
    "580.95.05": ("cu130", "nvidia/cuda:13.0.0-base-ubuntu24.04", "3.12"),
}


def synthesized_h100(driver: str) -> HostFacts:
    """SYNTHESIZED facts (see synthesized_h100_transcript)."""
    return parse_facts(synthesized_h100_transcript(driver), "/data/cache/huggingface")


def workspace_file(changes, suffix: str) -> str:
    (write,) = [a for c in changes for a in c.actions
                if isinstance(a, WriteFile) and a.path.endswith(suffix)][:1]
    return write.content


@pytest.mark.parametrize("driver", sorted(SYNTHESIZED_DRIVERS))
def test_synthesized_h100_gets_the_newest_image_its_driver_runs(driver: str,
                                                                team: Inventory) -> None:
    flavour, base, python = SYNTHESIZED_DRIVERS[driver]
    facts = synthesized_h100(driver)
    changes = workspace.plan(facts, team)
    dockerfile = workspace_file(changes, "/home/alice/sd35-fp8/.devcontainer/Dockerfile")
    requirements = workspace_file(changes, "/home/alice/sd35-fp8/.devcontainer/requirements.txt")
    assert f"ARG BASE_IMAGE={base}\n" in dockerfile
    assert f'v == "{python}"' in dockerfile, "the base's own python3"
    assert f"torch==2.11.0+{flavour}\n" in requirements
    assert f"--index-url https://download.pytorch.org/whl/{flavour} " in dockerfile
    (note,) = workspace.notes(facts, team)
    assert f"driver {driver} → {flavour} wheels" in note and f"base {base}" in note


@pytest.mark.parametrize(("driver", "override", "needed"), [
    ("535.183.01", {"cuda": "cu130"}, "580.65.06"),
    ("550.127.05", {"cuda": "cu130"}, "580.65.06"),
    ("570.133.20", {"cuda": "cu130"}, "580.65.06"),
    ("550.127.05", {"base": "nvidia/cuda:12.8.1-base-ubuntu24.04"}, "570.26"),
    ("535.183.01", {"base": "nvidia/cuda:12.4.1-base-ubuntu22.04", "python": "3.10"},
     "550.54.14"),
])
def test_an_override_the_synthesized_driver_cannot_run_is_refused_at_plan_time(
        driver: str, override: dict[str, str], needed: str, team: Inventory) -> None:
    facts = synthesized_h100(driver)
    wanting = dataclasses.replace(team, image=override)
    with pytest.raises(InventoryError) as caught:
        workspace.plan(facts, wanting)
    line = caught.value.line()
    assert f"needs NVIDIA driver {needed} or newer" in line
    assert f"this host's driver {driver}" in line and "upgrade the host's driver" in line
    # ... and the same override is fine where the driver runs it.
    assert workspace.plan(synthesized_h100("580.95.05"), wanting)


def test_one_inventory_several_drivers_each_host_gets_its_own(team: Inventory) -> None:
    bases = {driver: workspace_file(workspace.plan(synthesized_h100(driver), team),
                                    "alice/sd35-fp8/.devcontainer/Dockerfile")
             for driver in SYNTHESIZED_DRIVERS}
    assert len(set(bases.values())) == len(SYNTHESIZED_DRIVERS)


def test_synthesized_hosts_get_the_image_their_driver_runs(team: Inventory) -> None:
    noble = workspace.notes(facts_of("ubuntu-24.04-h100.synthesized"), team)
    assert noble == ["image for this host: driver 560.35.03 → cu126 wheels, base "
                     "nvidia/cuda:12.6.3-base-ubuntu24.04"]
    jammy = workspace.notes(facts_of("ubuntu-22.04-h100.synthesized"), team)[0]
    assert "driver 550.54.15 → cu126 wheels (CUDA 12.6 on a CUDA 12.4 driver: minor-version " \
           "compatibility), base nvidia/cuda:12.4.1-base-ubuntu22.04" in jammy
    nogpu = workspace.notes(facts_of("ubuntu-24.04-nogpu.synthesized"), team)[0]
    assert "no NVIDIA driver known → cu130 wheels (need driver 580.65.06 or newer)" in nogpu


# --------------------------------------------------------------------------- mirrors


def with_mirrors(inventory: Inventory, **values: object) -> Inventory:
    return dataclasses.replace(inventory, mirrors=Mirrors(**values))


def test_docker_from_a_mirror_with_a_key_file(team: Inventory) -> None:
    key = AptKey(text="-----BEGIN PGP PUBLIC KEY BLOCK-----\nk\n", path="/keys/docker.asc")
    mirrored = with_mirrors(team, docker_apt="http://10.0.0.5/docker", docker_apt_key=key)
    facts = facts_of("ubuntu-24.04-nogpu.synthesized")
    unreachable = dataclasses.replace(facts, docker=dataclasses.replace(
        facts.docker, installed=False, repo_reachable=False))
    repo, _ = docker.plan(unreachable, mirrored)
    assert "auto: [mirrors] docker_apt" in repo.summary, "the mirror, not docker.io"
    fetch, sources, check = repo.actions
    assert "URIs: http://10.0.0.5/docker/linux/ubuntu\n" in sources.content
    assert "curl" not in fetch.command, "a key file travels with the script"
    assert "/keys/docker.asc" in fetch.command and "base64 -d" in fetch.command
    assert "check [mirrors] docker_apt_key" in check.command
    assert "rm -f /etc/apt/keyrings/docker.asc /etc/apt/sources.list.d/docker.sources" in \
        check.command, "a refused source is taken back"
    assert facts_request(mirrored)["PROVISION_PROBE_DOCKER_REPO"] == "", "no probe needed"


def test_nvidia_from_a_mirror_fetches_the_mirrors_key(team: Inventory) -> None:
    mirrored = with_mirrors(team, nvidia_apt="https://mirror.example/libnvidia-container")
    repo, *_ = nvidia.plan(facts_of("ubuntu-24.04-h100.synthesized"), mirrored)
    script = repo.script()
    assert "curl -fsSL https://mirror.example/libnvidia-container/gpgkey" in script
    (sources,) = [a for a in repo.actions if isinstance(a, WriteFile)]
    assert "https://mirror.example/libnvidia-container/stable/deb/$(ARCH) /" in sources.content


def test_the_image_builds_from_the_pip_mirrors(team: Inventory) -> None:
    mirrored = with_mirrors(team, pypi="http://10.0.0.5:3141/root/pypi/+simple",
                            pytorch="https://mirror.example/pytorch/whl")
    changes = workspace.plan(synthesized_h100("550.127.05"), mirrored)
    dockerfile = workspace_file(changes, "alice/sd35-fp8/.devcontainer/Dockerfile")
    assert ("--index-url https://mirror.example/pytorch/whl/cu126 --extra-index-url "
            "http://10.0.0.5:3141/root/pypi/+simple --trusted-host 10.0.0.5:3141") in dockerfile


# --------------------------------------------------------------------------- real causes


# The lent H200 (recorded): Ubuntu 24.04 without sshd, sudo, setfacl, systemd or network.
LENT_H200 = "ubuntu-24.04-h200"


def test_keepalive_without_sshd_is_skipped_saying_so(team: Inventory) -> None:
    with pytest.raises(StepSkipped, match=r"skipped: no sshd on this host \(openssh-server"):
        keepalive.plan(facts_of(LENT_H200), team)


def test_sudo_rules_without_visudo_install_sudo_first_and_last(team: Inventory) -> None:
    changes = users.plan(facts_of(LENT_H200), team)
    text = summaries(changes)
    install = text.index("install sudo (visudo is missing) for the sudo rules of alice")
    assert text[install + 1].startswith("sudo for alice"), "right before the rule that needs it"
    assert install == len(text) - 2, "after the accounts and keys, which do not need it"
    assert "could not install sudo: $why" in changes[install].script()
    rule = changes[-1].script()
    assert "command -v visudo >/dev/null ||" in rule
    assert "visudo is not installed: cannot check the new /etc/sudoers.d/provision-alice" in rule


def test_acls_come_before_the_members_merges_which_run_as_them(team: Inventory) -> None:
    # A member's cache merge runs as her (issue 12): the ACLs must let her write in every folder
    # of the shared cache first. The cache itself and the login profile still come before.
    changes = hf_cache.plan(facts_of(LENT_H200), team)
    acl = summaries(changes).index("install acl (setfacl is missing) for the cache's default "
                                   "ACLs")
    assert summaries(changes)[acl + 1] == ("/data/cache/huggingface: default ACLs keep "
                                           "members' files group-writable")
    assert summaries(changes)[0] == "create /data/cache/huggingface (root:hfcache, 2775)"
    assert all(c.summary.startswith("/home/") for c in changes[acl + 2:])
    assert "could not install acl: $why" in changes[acl].script()
