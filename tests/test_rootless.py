"""docker_mode: the inventory key, and the rootless plan on recorded facts.

debian-12-sandbox-rootless.txt was recorded (`provision facts --raw`) on a sandbox converged in
rootless mode; debian-12-sandbox-converged.txt on one converged before the mode existed
(rootful: every member in the docker group).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jsonschema
import pytest

from provision import doctor
from provision.errors import InventoryError
from provision.facts import HostFacts, IdRange, MemberDaemon, PathState, read_ranges
from provision.inventory import Inventory, Member, load_inventory, parse_inventory
from provision.render import render_workspace
from provision.sandbox import new_inventory
from provision.steps import hf_cache, nvidia, rootless, users
from provision.steps.rootless import allocate
from provision.templating import render
from provision.versions import resolve_image
from tests.conftest import FIXTURES, facts_of, summaries

ROOTLESS = "debian-12-sandbox-rootless"
ROOTFUL = "debian-12-sandbox-converged"


def inventory_in(mode: str | None, base: Path = FIXTURES / "facts"):
    """The recorded rootful sandbox's inventory, with docker_mode set to `mode` (None: unset)."""
    inventory = load_inventory(base / "debian-12-sandbox.toml")
    defaults = dataclasses.replace(inventory.defaults, docker_mode=mode or "")
    return dataclasses.replace(inventory, defaults=defaults)


def test_docker_mode_is_validated_where_it_is_written(tmp_path) -> None:
    path = tmp_path / "provision.toml"
    path.write_text('[defaults]\ncache_group = "hfcache"\ndocker_mode = "rootles"\n')
    with pytest.raises(InventoryError) as error:
        load_inventory(path)
    assert error.value.line().startswith(f"{path}:3: docker_mode: must be one of rootless, "
                                         "rootful")


def test_an_inventory_without_docker_mode_stays_rootful_and_the_plan_says_so() -> None:
    inventory = parse_inventory({}, Path("provision.toml"))
    assert inventory.defaults.mode == "rootful" and not inventory.defaults.rootless
    notes = rootless.notes(facts_of(ROOTFUL), inventory_in(None))
    assert "docker_mode = rootful (docker_mode is not set" in notes[0]
    assert "root-equivalent" in notes[0]


def test_new_inventories_are_rootless() -> None:
    for text in (render("provision.toml.j2"), new_inventory().as_string()):
        inventory = parse_inventory(__import__("tomllib").loads(text), Path("provision.toml"))
        assert inventory.defaults.mode == "rootless"


def test_ranges_are_given_once_lowest_free_first_and_never_overlap() -> None:
    given = read_ranges("admin:100000:65536\nbob:300000:65536\njunk\n")
    new = allocate(given, ["admin", "alice", "carol", "dave"])
    assert "admin" not in new  # a range once given is kept as it is
    # carol fits in the gap below bob's range; dave does not, and goes above it.
    assert (new["alice"].start, new["carol"].start, new["dave"].start) == (165536, 231072,
                                                                           365536)
    everything = [*given, *new.values()]
    assert not [(a, b) for a in everything for b in everything
                if a is not b and a.overlaps(b)]
    assert allocate([*given, *new.values()], ["alice", "carol"]) == {}


def test_overlapping_ranges_are_refused_not_rewritten() -> None:
    facts = facts_of(ROOTLESS)
    text = "admin:100000:65536\ndev:165536:65536\nalice:200000:65536\nbob:296608:65536\n"
    paths = {**facts.paths, "/etc/subuid": dataclasses.replace(facts.paths["/etc/subuid"],
                                                               content=text)}
    inventory = load_inventory(FIXTURES / "facts" / f"{ROOTLESS}.toml")
    with pytest.raises(rootless.StepBlocked, match="dev's subordinate uids 165536-231071 "
                                                   "overlap alice's 200000-265535"):
        rootless.plan(dataclasses.replace(facts, paths=paths), inventory)


def test_a_host_converged_rootless_plans_nothing_and_shows_the_ranges() -> None:
    facts = facts_of(ROOTLESS)
    inventory = load_inventory(FIXTURES / "facts" / f"{ROOTLESS}.toml")
    assert rootless.plan(facts, inventory) == []
    assert users.plan(facts, inventory) == []
    assert not facts.groups["docker"].members
    note = rootless.notes(facts, inventory)[0]
    assert "subordinate ids dev 165536-231071, alice 231072-296607, bob 296608-362143" in note


def test_switching_a_rootful_host_to_rootless_is_a_plan() -> None:
    facts = facts_of(ROOTFUL)
    inventory = inventory_in("rootless")
    plan = summaries(users.plan(facts, inventory))
    assert [s for s in plan if "leaves the docker group" in s and "images" in s] == [
        s for s in plan if s.startswith(("alice leaves", "bob leaves"))]
    assert len([s for s in plan if "leaves the docker group" in s]) == 2
    # (Recorded before the users step asked for the home's mode: it says no "was".)
    assert {s for s in plan if "alone (0700" in s} == {
        "/home/alice: alice's alone (0700)", "/home/bob: bob's alone (0700)"}
    assert not [s for s in plan if "add" in s and "docker" in s]
    steps = summaries(rootless.plan(facts, inventory))
    assert steps[0] == ("install rootlesskit, uidmap, slirp4netns, dbus-user-session, "
                        "fuse-overlayfs (rootless Docker: user namespaces, networking, storage)")
    assert "docker-ce-rootless-extras" not in " ".join(steps)
    for name in ("alice", "bob"):
        assert f"{name}: lingering on (her daemon runs while she is logged out)" in steps
        assert any(s.startswith(f"{name}: her own Docker daemon") for s in steps)
        assert any(s.startswith(f"{name}: docker context 'rootless' in use") for s in steps)


def test_the_daemon_is_set_up_as_her_never_as_root() -> None:
    changes = rootless.plan(facts_of(ROOTFUL), inventory_in("rootless"))
    daemon = next(c for c in changes if c.summary.startswith("alice: her own Docker daemon"))
    script = daemon.script()
    assert "runuser -u alice -- env -i" in script
    assert "dockerd-rootless-setuptool.sh install" in script
    assert "--force" not in script and "--skip-iptables" not in script


def test_docker_ce_hosts_take_dockers_rootless_extras_never_debians_rootlesskit() -> None:
    facts = facts_of(ROOTFUL)
    docker = dataclasses.replace(facts.docker, packages={"docker-ce": "5:27.0"})
    changes = rootless.plan(dataclasses.replace(facts, docker=docker), inventory_in("rootless"))
    assert changes[0].summary.startswith("install docker-ce-rootless-extras, uidmap")
    assert "rootlesskit" not in changes[0].summary
    assert "/usr/bin/dockerd-rootless-setuptool.sh install" in "".join(
        c.script() for c in changes)
    both = dataclasses.replace(docker, packages={"docker-ce": "5:27.0", "rootlesskit": "1.1"})
    with pytest.raises(rootless.StepBlocked, match="conflict"):
        rootless.plan(dataclasses.replace(facts, docker=both), inventory_in("rootless"))


def test_switching_back_to_rootful_stops_her_daemon_and_keeps_its_data() -> None:
    facts = facts_of(ROOTLESS)
    inventory = load_inventory(FIXTURES / "facts" / f"{ROOTLESS}.toml")
    rootful = dataclasses.replace(inventory, defaults=dataclasses.replace(
        inventory.defaults, docker_mode="rootful"))
    steps = summaries(rootless.plan(facts, rootful))
    assert steps == [f"{n}: stop her rootless daemon (its images and data stay in /home/{n}/"
                     ".local/share/docker) and use the system daemon (docker context default)"
                     for n in ("dev", "alice", "bob")]
    assert "rm " not in "".join(c.script() for c in rootless.plan(facts, rootful))
    plan = summaries(users.plan(facts, rootful))
    assert {"create group docker"} <= set(plan) or "docker" in facts.groups
    assert "add alice to docker" in plan


def test_offboarding_a_rootless_member_stops_her_daemon() -> None:
    facts = facts_of(ROOTLESS)
    inventory = load_inventory(FIXTURES / "facts" / f"{ROOTLESS}.toml")
    without_bob = dataclasses.replace(inventory, members=inventory.members[:2])
    state = {**facts.state, "members": ["alice", "bob", "dev"]}
    plan = summaries(users.plan(dataclasses.replace(facts, state=state), without_bob))
    assert "offboard bob: lingering off (her own Docker daemon stops; its data stays in her " \
           "home)" in plan


def test_member_daemons_are_read_from_the_facts() -> None:
    assert facts_of(ROOTLESS).member_daemons["alice"] == MemberDaemon(
        "alice", linger=True, unit=True, socket=True, context="rootless")
    assert IdRange("a", 1, 2).end == 2


def test_the_rootless_devcontainer_runs_as_container_root_which_is_her() -> None:
    inventory = load_inventory(FIXTURES / "facts" / f"{ROOTLESS}.toml")
    member = inventory.member("alice")
    files = render_workspace(inventory, member, host_alias="box", target=None, cache_gid=1001,
                             image=resolve_image(inventory.image))
    config = json.loads(files[".devcontainer/devcontainer.json"])
    assert (config["containerUser"], config["remoteUser"]) == ("root", "root")
    assert config["updateRemoteUserUID"] is False  # it would land on a subordinate uid
    assert not [a for a in config["runArgs"] if a.startswith("--group-add")]
    mounts = {m["target"]: m["source"] for m in config["mounts"]}
    assert mounts["/root/.cache/huggingface"] == inventory.defaults.cache_dir
    assert mounts["/root/.config/huggingface"] == "${localEnv:HOME}/.config/huggingface"
    assert config["containerEnv"]["HF_TOKEN_PATH"] == "/root/.config/huggingface/token"
    schema = json.loads((FIXTURES / "schemas" / "devContainer.base.schema.json").read_text())
    jsonschema.Draft201909Validator(schema).validate(config)
    rootful = render_workspace(inventory_in("rootful"), member, host_alias="box", target=None,
                               cache_gid=1001, image=resolve_image(inventory.image))
    assert json.loads(rootful[".devcontainer/devcontainer.json"])["updateRemoteUserUID"] is True


def test_rootless_cache_acls_name_each_member_and_drop_former_ones() -> None:
    facts = facts_of(ROOTFUL)
    changes = hf_cache.plan(facts, inventory_in("rootless"))
    named = [c for c in changes if "ACL entries naming" in c.summary]
    assert len(named) == 1 and "alice, bob" in named[0].summary
    assert "setfacl -R -m u:alice:rwX,d:u:alice:rwX,u:bob:rwX,d:u:bob:rwX," in named[0].script()
    assert not [c for c in hf_cache.plan(facts, inventory_in("rootful"))
                if "ACL entries" in c.summary]
    acl = (*facts.cache.acl, *(f"{d}user:{n}:rwx" for n in ("alice", "bob", "carol")
                               for d in ("", "default:")))
    cache = dataclasses.replace(facts.cache, acl=acl)
    state = {**facts.state, "members": ["alice", "bob", "carol"]}
    changes = hf_cache.plan(dataclasses.replace(facts, cache=cache, state=state),
                            inventory_in("rootless"))
    assert [c.summary for c in changes if "ACL" in c.summary] == [
        "/data/cache/huggingface: remove the ACL entries of former members carol"]


# A doctor probe transcript as probe_script's commands print it (SYNTHESIZED: the shapes are
# those the e2e test sees on a rootless sandbox).
PROBE = """
@@@provision:docker-alice
exit=0
20.10.24+dfsg1
@@@provision:cache-alice
exit=0
@@@provision:own-daemon-alice
exit=0
["name=seccomp,profile=default","name=rootless"] {"io.containerd.runc.v2":{"path":"runc"}}
@@@provision:system-socket-alice
exit=1
Got permission denied while trying to connect to the Docker daemon socket
@@@provision:end
"""


def verdicts(facts: HostFacts, probe: str, inventory: Inventory,
             members: tuple[Member, ...]) -> dict[str, doctor.Check]:
    """Doctor's verdicts on these facts and probe transcript, by check name."""
    found = doctor.checks(facts, probe, inventory, members, 1, {},
                          doctor.decide_image(facts, inventory))
    return {check.name: check for check in found}


def test_doctor_checks_her_daemon_the_system_socket_ranges_and_lingering() -> None:
    facts = facts_of(ROOTLESS)
    inventory = load_inventory(FIXTURES / "facts" / f"{ROOTLESS}.toml")
    members = (inventory.member("alice"),)
    found = verdicts(facts, PROBE, inventory, members)
    for name in ("alice's own daemon", "alice is refused the system socket",
                 "alice's lingering", "subordinate ranges"):
        assert found[name].status == "pass", found[name]
    assert found["alice's GPU runtime"].status == "skip"
    reached = PROBE.replace("exit=1\nGot permission denied while trying to connect to the "
                            "Docker daemon socket", "exit=0\n20.10.24+dfsg1")
    found = verdicts(facts, reached, inventory, members)
    assert found["alice is refused the system socket"].status == "fail"
    daemons = {**facts.member_daemons, "alice": dataclasses.replace(
        facts.member_daemons["alice"], linger=False)}
    subuid = dataclasses.replace(facts.paths["/etc/subuid"],
                                 content="dev:165536:65536\nalice:200000:65536\n")
    broken = dataclasses.replace(facts, member_daemons=daemons,
                                 paths={**facts.paths, "/etc/subuid": subuid})
    found = verdicts(broken, PROBE, inventory, members)
    assert found["alice's lingering"].status == "fail"
    assert found["subordinate ranges"].status == "fail"
    assert "overlaps dev 165536-231071" in found["subordinate ranges"].evidence


def test_ubuntu_24_04s_user_namespace_restriction_gets_a_profile_for_rootlesskit() -> None:
    # SYNTHESIZED: the recorded-shape Ubuntu 24.04 facts, with the sysctl as 24.04 sets it.
    facts = facts_of("ubuntu-24.04-nogpu.synthesized")
    restricted = PathState(rootless.USERNS_RESTRICTED, "file", "root", "root", "644", "", "1\n")
    facts = dataclasses.replace(facts, paths={**facts.paths,
                                              rootless.USERNS_RESTRICTED: restricted})
    changes = rootless.plan(facts, inventory_in("rootless"))
    profile = next(c for c in changes if c.summary.startswith(rootless.PROFILE))
    assert "kernel.apparmor_restrict_unprivileged_userns = 1" in profile.summary
    assert "profile provision-rootlesskit /usr/bin/rootlesskit flags=(unconfined)" in \
        profile.actions[0].content and "userns," in profile.actions[0].content
    assert profile.script().endswith(f"apparmor_parser -r {rootless.PROFILE}\n")
    shipped = PathState(rootless.SHIPPED_PROFILE, "file", "root", "root", "644", "", "...")
    covered = dataclasses.replace(facts, paths={**facts.paths,
                                                rootless.SHIPPED_PROFILE: shipped})
    assert not [c for c in rootless.plan(covered, inventory_in("rootless"))
                if c.summary.startswith(rootless.PROFILE)]
    assert not [c for c in rootless.plan(facts_of(ROOTFUL), inventory_in("rootless"))
                if c.summary.startswith(rootless.PROFILE)]


def test_offboarding_moves_her_keys_aside_as_her() -> None:
    # Her ~/.ssh may be a link to /root/.ssh: root moving "her" keys would move root's.
    facts = facts_of(ROOTFUL)
    inventory = inventory_in("rootful")
    alice = dataclasses.replace(facts.accounts["alice"], authorized_keys=1)
    offboarding = dataclasses.replace(facts, accounts={**facts.accounts, "alice": alice},
                                      state={**facts.state, "members": ["alice", "bob"]})
    without = dataclasses.replace(inventory, members=inventory.members[1:])
    move = next(c for c in users.plan(offboarding, without)
                if c.summary == "offboard alice: move her SSH keys aside")
    assert move.script().startswith("runuser -u alice -- ")
    assert "mv -f .ssh/authorized_keys .ssh/authorized_keys.offboarded-" in move.script()


# GPUs for rootless members: CDI (steps/nvidia.py). The facts are those recorded on the lent
# H200 (Ubuntu 24.04, driver 580.159.04, no Docker yet); the Docker engine in them is replaced
# by hand with the one each test names (SYNTHESIZED: no GPU host with Docker was reachable).
H200 = "ubuntu-24.04-h200"


def gpu_host(docker: str, version: str, spec: str | None = None):
    facts = facts_of(H200)
    engine = dataclasses.replace(facts.docker, installed=True, version=version.split("-")[0],
                                 packages={docker: version})
    paths = dict(facts.paths)
    if spec is not None:
        paths[nvidia.CDI_SPEC] = PathState(nvidia.CDI_SPEC, "file", "root", "root", "644", "",
                                           spec)
    return dataclasses.replace(facts, docker=engine, paths=paths)


def rootless_inventory():
    return load_inventory(FIXTURES / "facts" / f"{ROOTLESS}.toml")


def test_rootless_gpus_come_through_cdi_where_docker_is_28_2_or_newer() -> None:
    facts = gpu_host("docker-ce", "5:28.5.1-1~ubuntu.24.04~noble")
    changes = nvidia.plan(facts, rootless_inventory())
    spec = next(c for c in changes if c.summary.startswith(nvidia.CDI_SPEC))
    assert "nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml" in spec.script()
    mine = next(c for c in changes if c.summary.startswith("alice: GPUs in her own daemon"))
    # CDI is on by default from 28.2: her daemon.json is left alone; the new /etc/cdi needs
    # her daemon restarted (it sees only spec directories that existed when it started).
    assert "features.cdi" not in mine.summary and not mine.diff()
    assert "runuser -u alice -- " in mine.script()
    assert "systemctl --user restart docker.service" in mine.script()
    assert "no-cgroups" not in "".join(c.script() for c in changes)  # the rootful daemon keeps
    note = " ".join(nvidia.notes(facts, rootless_inventory()))
    assert "members' own daemons get GPUs through CDI" in note


def test_docker_25_to_28_1_gets_cdi_turned_on_in_her_daemon_json_as_her() -> None:
    facts = gpu_host("docker-ce", "5:28.1.1-1~ubuntu.24.04~noble")
    daemon = PathState("~alice/.config/docker/daemon.json", "file", "alice", "alice", "644", "",
                       '{"data-root": "/home/alice/docker"}\n')
    facts = dataclasses.replace(facts, paths={**facts.paths, daemon.path: daemon})
    mine = next(c for c in nvidia.plan(facts, rootless_inventory())
                if c.summary.startswith("alice: GPUs in her own daemon"))
    write = mine.actions[0]
    assert write.member == "alice" and write.path == "/home/alice/.config/docker/daemon.json"
    assert json.loads(write.content) == {"data-root": "/home/alice/docker",
                                         "features": {"cdi": True}}
    assert mine.script().startswith("runuser -u alice -- ")


def test_a_spec_for_the_running_driver_is_kept_and_a_stale_one_generated_again() -> None:
    current = "  - hostPath: /usr/lib/x86_64-linux-gnu/libcuda.so.580.159.04\n"
    facts = gpu_host("docker-ce", "5:28.5.1-1~ubuntu.24.04~noble", spec=current)
    facts = dataclasses.replace(facts, docker=dataclasses.replace(facts.docker,
                                                                  runtimes=("nvidia", "runc")))
    toolkit = dataclasses.replace(facts.nvidia, ctk_version="1.18.0")
    assert nvidia.plan(dataclasses.replace(facts, nvidia=toolkit), rootless_inventory()) == []
    stale = gpu_host("docker-ce", "28.5.1", spec=current.replace("580.159.04", "570.86.15"))
    summaries_ = summaries(nvidia.plan(stale, rootless_inventory()))
    assert f"{nvidia.CDI_SPEC}: the GPUs as CDI devices (nvidia.com/gpu=N), generated again " \
           "for driver 580.159.04" in summaries_
    assert not [s for s in summaries_ if "restart her daemon" in s]  # /etc/cdi was there


def test_debians_docker_io_gives_rootless_members_no_gpu_and_says_so() -> None:
    facts = gpu_host("docker.io", "20.10.24+dfsg1-1+deb12u1")
    changes = nvidia.plan(facts, rootless_inventory())
    # The spec is for the system daemon's nvidia runtime (contract); her daemon gets nothing.
    assert [c.summary for c in changes if "CDI" in c.summary] == [
        f"{nvidia.CDI_SPEC}: the GPUs as CDI devices (nvidia.com/gpu=N), generated for "
        "containers' GPUs"]
    note = " ".join(nvidia.notes(facts, rootless_inventory()))
    assert "members' containers get NO GPU: Docker 20.10 cannot hand GPUs to a rootless " \
           "daemon" in note
    assert 'docker_source = "docker-ce"' in note and 'docker_mode = "rootful"' in note
    members = (rootless_inventory().member("alice"),)
    found = verdicts(facts, PROBE, rootless_inventory(), members)
    assert found["alice's GPU runtime"].status == "fail"
    assert 'docker_source = "docker-ce"' in found["alice's GPU runtime"].remedy


def test_the_rootful_daemon_keeps_its_nvidia_runtime_and_no_member_daemon_changes() -> None:
    facts = gpu_host("docker-ce", "5:28.5.1-1~ubuntu.24.04~noble")
    plan = summaries(nvidia.plan(facts, inventory_in("rootful")))
    assert any("register the nvidia runtime" in s for s in plan)
    # The spec (every container's GPUs come through it); CDI is on by default from 28.2.
    assert [s for s in plan if "CDI" in s or "cdi" in s] == [
        f"{nvidia.CDI_SPEC}: the GPUs as CDI devices (nvidia.com/gpu=N), generated for "
        "containers' GPUs"]
    assert not [n for n in nvidia.notes(facts, inventory_in("rootful")) if "rootless" in n]


def test_doctor_passes_her_gpu_check_when_her_daemon_reads_etc_cdi() -> None:
    facts = gpu_host("docker-ce", "28.5.1")
    inventory = rootless_inventory()
    probe = PROBE.replace("@@@provision:end", "@@@provision:cdi-alice\nexit=0\n"
                                              '["/etc/cdi","/var/run/cdi"]\n@@@provision:end')
    members = (inventory.member("alice"),)
    found = verdicts(facts, probe, inventory, members)
    assert found["alice's GPU runtime"].status == "pass"
    off = verdicts(facts, PROBE, inventory, members)
    assert off["alice's GPU runtime"].status == "fail"
    script = doctor.probe_script(inventory, members, "img", ["--device=nvidia.com/gpu=all"])
    assert "run --rm --device=nvidia.com/gpu=all ubuntu:24.04 nvidia-smi -L" in script
    assert "--gpus" not in script


@pytest.mark.parametrize(("gpus", "devices"), [
    ("all", ["--device=nvidia.com/gpu=all"]),
    ("1,2", ["--device=nvidia.com/gpu=1", "--device=nvidia.com/gpu=2"]),
    ("none", []),
])
def test_the_rootless_devcontainer_asks_for_her_gpus_as_cdi_devices(gpus, devices) -> None:
    inventory = rootless_inventory()
    member = dataclasses.replace(inventory.member("alice"), gpus=gpus)
    config = json.loads(render_workspace(inventory, member, host_alias="box", target=None,
                                         cache_gid=None, image=resolve_image(inventory.image))[
        ".devcontainer/devcontainer.json"])
    assert config["runArgs"] == [*devices, "--shm-size=16g"]
    assert "hostRequirements" not in config  # the CLI would append --gpus all
    schema = json.loads((FIXTURES / "schemas" / "devContainer.base.schema.json").read_text())
    jsonschema.Draft201909Validator(schema).validate(config)
    rootful = json.loads(render_workspace(inventory_in("rootful"), member, host_alias="box",
                                          target=None, cache_gid=None,
                                          image=resolve_image(inventory.image))[
        ".devcontainer/devcontainer.json"])
    assert rootful["runArgs"] == [*devices, "--shm-size=16g"]  # the same CDI devices


def test_doctor_decides_the_image_once_and_says_why_an_old_driver_cannot_run_it() -> None:
    """The image check and the tag the probe looks inside come from one decision: on the
    H200's facts with the driver made too old by hand (SYNTHESIZED), no tag to look inside and
    the refusal as the check's evidence; on its own driver, the flavour chosen."""
    facts = gpu_host("docker-ce", "28.5.1")
    inventory = rootless_inventory()
    members = (inventory.member("alice"),)
    decided = doctor.decide_image(facts, inventory)
    assert doctor.verify_image(decided, inventory, members[0]).startswith("provision/sd35-fp8:")
    assert verdicts(facts, PROBE, inventory, members)[
        "image's CUDA vs the driver"].status == "pass"
    gpus = tuple(dataclasses.replace(gpu, driver="520.61.05") for gpu in facts.nvidia.gpus)
    old = dataclasses.replace(facts, nvidia=dataclasses.replace(facts.nvidia, gpus=gpus))
    refused = doctor.decide_image(old, inventory)
    assert isinstance(refused, InventoryError)
    assert doctor.verify_image(refused, inventory, members[0]) is None
    check = verdicts(old, PROBE, inventory, members)["image's CUDA vs the driver"]
    assert (check.status, check.evidence) == ("fail", refused.problem)
    assert "NVIDIA driver 520.61.05" in check.evidence
