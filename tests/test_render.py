"""The rendered workspace: goldens of every file, the rules each one must keep, the version table.

Why: every member's dev container, debugger and SSH login come from these files, and a wrong
one fails far from its cause (a container with the wrong GPUs, a token in the shared cache, an
image that breaks twenty minutes into its build). Goldens show any change as a diff; the other
tests say which rule a change must not break. Regenerate the goldens (and the repository's own
.devcontainer/) after an intended change with PROVISION_UPDATE_GOLDEN=1.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import tempfile
import tomllib
from pathlib import Path

import jinja2
import jinja2.meta
import jsonschema
import paramiko
import pytest

from provision import render as workspace
from provision import templating
from provision.contract import INDUCTOR_CACHE, WHEELHOUSE
from provision.errors import InventoryError
from provision.inventory import Defaults, Inventory, Member, Service
from provision.steps import workspace as steps_workspace
from provision.target import Target
from provision.templating import environment, raw
from provision.versions import DEFAULT_IMAGE, ImageSpec, resolve_image

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN = FIXTURES / "golden"
SCHEMA = json.loads((FIXTURES / "schemas" / "devContainer.base.schema.json").read_text())
UPDATE = os.environ.get("PROVISION_UPDATE_GOLDEN") == "1"

MEMBERS = (
    Member("alice", keys=(), gpus="0"),
    Member("bob", keys=(), gpus="1,2"),
    Member("carol", keys=(), gpus="none"),
    Member("dan", keys=(), gpus="all"),
)
INVENTORY = Inventory(
    path=Path("provision.toml"),
    defaults=Defaults(cache_dir="/srv/cache/huggingface", keepalive_interval=30,
                      keepalive_count_max=4),
    members=MEMBERS,
)
SD_SERVER = Target(alias="sd-server", hostname="203.0.113.10", user="ubuntu")
BEHIND_BASTION = Target(alias="gpu-02", hostname="10.0.0.12", port=2202, user="ubuntu",
                        jumps=(Target(alias="bastion", hostname="198.51.100.7", port=2222),))
# Per member: the host it is rendered for and the cache group's gid there (carol's host has
# not been read, so the gid is unknown).
HOSTS = {"alice": (SD_SERVER, 1001), "bob": (BEHIND_BASTION, 1001), "carol": (SD_SERVER, None),
         "dan": (SD_SERVER, 1001)}
# A CPU image from a local wheelhouse (the test machines' torch wheel; no CUDA, no torchvision).
CPU_IMAGE = {"base": "provision/debian:bookworm-minbase", "python": "3.11", "cuda": "cpu",
             "torch": "2.13.0", "torchvision": "", "wheelhouse": "/opt/wheels"}


def rendered(member: Member, inventory: Inventory = INVENTORY) -> dict[str, str]:
    target, gid = HOSTS[member.name]
    return workspace.render_workspace(inventory, member, host_alias=target.alias, target=target,
                                      cache_gid=gid, image=resolve_image(inventory.image))


def as_json(member: Member, path: str) -> dict:
    return json.loads(rendered(member)[path])


def differences(files: dict[str, str], directory: Path, *, exact: bool) -> list[str]:
    """Paths whose content on disk differs from `files` (with `exact`, also files not rendered).

    Under PROVISION_UPDATE_GOLDEN=1 the directory is brought up to date first.
    """
    def extra() -> list[Path]:
        return sorted(p for p in directory.rglob("*")
                      if exact and p.is_file() and p.relative_to(directory).as_posix() not in files)

    if UPDATE:
        for path in extra():
            path.unlink()
        workspace.write_files(files, directory)
    wrong = [path for path, text in files.items()
             if not (directory / path).is_file() or (directory / path).read_text() != text]
    return wrong + [p.relative_to(directory).as_posix() for p in extra()]


@pytest.mark.parametrize("member", MEMBERS, ids=lambda m: f"{m.name}-gpus-{m.gpus}")
def test_every_rendered_file_matches_its_golden(member: Member) -> None:
    files = rendered(member)
    for path in workspace.COPIED:
        assert files.pop(path) == raw(f"workspace/{path}"), f"{path} is copied as is"
    target, _ = HOSTS[member.name]
    files["ssh_config"] = workspace.ssh_config_block(INVENTORY, member, target.alias, target,
                                                     f"~/.ssh/{member.name}_ed25519")
    stale = differences(files, GOLDEN / member.name, exact=True)
    assert not stale, f"differs from the golden: {stale} (PROVISION_UPDATE_GOLDEN=1 to accept)"


@pytest.mark.parametrize("member", MEMBERS, ids=lambda m: m.name)
def test_the_facts_read_asks_for_every_file_the_workspace_holds(member: Member) -> None:
    """The workspace step names its files without rendering them (a no-op converge renders
    each member's workspace once, for the plan): the names must be every file it writes."""
    assert tuple(rendered(member)) == workspace.WORKSPACE_FILES
    asked = steps_workspace.paths(INVENTORY)
    base = f"~{member.name}/{INVENTORY.defaults.workspace_dir}"
    assert {f"sha256:{base}/{path}" for path in rendered(member)} <= set(asked)


def test_repository_devcontainer_is_the_rendered_one() -> None:
    stale = differences(workspace.repo_devcontainer(), REPO, exact=False)
    assert not stale, f"stale: {stale}; re-render with PROVISION_UPDATE_GOLDEN=1"


@pytest.mark.parametrize("member", MEMBERS, ids=lambda m: m.name)
def test_json_files_parse_and_devcontainer_json_fits_the_official_schema(member: Member) -> None:
    files = rendered(member)
    for path in (".vscode/launch.json", ".vscode/settings.json"):
        json.loads(files[path])
    jsonschema.Draft201909Validator(SCHEMA).validate(
        json.loads(files[".devcontainer/devcontainer.json"]))


def test_the_vendored_schema_rejects_what_the_cli_would() -> None:
    """Guards the schema itself: a validator that accepts anything proves nothing."""
    config = as_json(MEMBERS[3], ".devcontainer/devcontainer.json")
    validator = jsonschema.Draft201909Validator(SCHEMA)
    for broken in ({"hostRequirements": {"gpu": "yes"}}, {"runArgs": [16]}, {"mounts": [{}]}):
        assert not validator.is_valid({**config, **broken}), broken


# gpus -> (GPU run args: CDI devices for a host not read, CUDA_VISIBLE_DEVICES in the debug launch)
GPU_CASES = {
    "alice": (["--device=nvidia.com/gpu=0"], "0"),
    "bob": (["--device=nvidia.com/gpu=1", "--device=nvidia.com/gpu=2"], "0,1"),  # numbered from 0
    "carol": ([], ""),
    "dan": (["--device=nvidia.com/gpu=all"], None),
}


@pytest.mark.parametrize("member", MEMBERS, ids=lambda m: f"{m.name}-gpus-{m.gpus}")
def test_gpus_become_cdi_run_args_and_launch_env_never_host_requirements(member: Member) -> None:
    gpu_args, visible = GPU_CASES[member.name]
    config = as_json(member, ".devcontainer/devcontainer.json")
    _, gid = HOSTS[member.name]
    group = [f"--group-add={gid}"] if gid is not None else []
    assert config["runArgs"] == [*gpu_args, "--shm-size=16g", *group]
    # The CLI appends --gpus all when it sees an nvidia runtime and hostRequirements.gpu is
    # set: every GPU for a member assigned one, and no container where only CDI works.
    assert "hostRequirements" not in config
    for launch in as_json(member, ".vscode/launch.json")["configurations"][:2]:
        assert launch.get("env", {}).get("CUDA_VISIBLE_DEVICES") == visible


@pytest.mark.parametrize("member", MEMBERS, ids=lambda m: m.name)
def test_devcontainer_shares_the_cache_and_keeps_token_and_compile_cache_private(
        member: Member) -> None:
    config = as_json(member, ".devcontainer/devcontainer.json")
    env, home = config["containerEnv"], f"/home/{member.name}"
    mounts = {m["target"]: m["source"] for m in config["mounts"]}
    assert mounts[f"{home}/.cache/huggingface"] == INVENTORY.defaults.cache_dir
    assert env["HF_HOME"] == f"{home}/.cache/huggingface"
    token_dir = str(Path(env["HF_TOKEN_PATH"]).parent)
    assert not env["HF_TOKEN_PATH"].startswith(env["HF_HOME"])
    assert mounts[token_dir] == "${localEnv:HOME}/.config/huggingface", "her own 0700 directory"
    assert env["TORCHINDUCTOR_CACHE_DIR"] == "${containerWorkspaceFolder}/.cache/torchinductor"
    assert config["remoteUser"] == member.name != "root"
    assert config["updateRemoteUserUID"] is True
    assert config["build"] == {"dockerfile": "Dockerfile", "context": "."}
    vscode = config["customizations"]["vscode"]
    assert vscode["extensions"] == ["ms-python.python", "ms-python.debugpy"]
    assert vscode["settings"]["python.defaultInterpreterPath"] == f"{workspace.VENV}/bin/python"


def test_launch_json_debugs_eager_runs_compiled_and_can_attach() -> None:
    """F5 on "Debug" runs under debugpy, where inference.py never compiles; "Run" is noDebug,
    so nothing traces it and its blocks compile. Both run the same model, size and FP8 mode."""
    debug, run, attach = as_json(MEMBERS[0], ".vscode/launch.json")["configurations"]
    assert (debug["name"], run["name"]) == ("Debug SD3.5 FP8", "Run SD3.5 FP8 (compiled)")
    for launch in (debug, run):
        assert (launch["type"], launch["request"]) == ("debugpy", "launch")
        assert launch["program"] == "${workspaceFolder}/inference.py"
        assert launch["justMyCode"] is False and launch["console"] == "integratedTerminal"
        assert all(isinstance(arg, str) for arg in launch["args"])
    assert "noDebug" not in debug and run["noDebug"] is True
    flags = dict(zip(debug["args"][::2], debug["args"][1::2], strict=True))
    assert {"--prompt", "--output", "--height", "--width", "--steps", "--model", "--fp8"} == set(
        flags)
    assert flags["--output"] == f"{workspace.OUTPUTS}/debug.png"
    assert (flags["--model"], flags["--fp8"], flags["--height"]) == ("large", "dq", "1024")
    assert run["args"][-1] == "--compile"
    assert run["args"][:-3] == debug["args"][:-2], "same prompt, size, steps, model, FP8"
    assert run["args"][-3:-1] == ["--output", f"{workspace.OUTPUTS}/run.png"]
    assert (attach["type"], attach["request"]) == ("debugpy", "attach")
    assert attach["connect"] == {"host": "localhost", "port": workspace.DEBUGPY_PORT}


def test_watcher_search_and_git_skip_caches_checkpoints_and_outputs() -> None:
    files = rendered(MEMBERS[0])
    settings = json.loads(files[".vscode/settings.json"])
    wanted = {"**/.git/objects/**", "**/.cache/**", "**/__pycache__/**", "**/*.safetensors",
              "**/checkpoints/**", f"**/{workspace.OUTPUTS}/**"}
    for key in ("files.watcherExclude", "search.exclude"):
        assert wanted <= {glob for glob, on in settings[key].items() if on}, key
    assert INDUCTOR_CACHE.startswith(".cache/"), "covered by **/.cache/**"
    ignored = files[".gitignore"].splitlines()
    assert {".cache/", f"{workspace.OUTPUTS}/", f"{WHEELHOUSE}/"} <= set(ignored)


@pytest.mark.parametrize("image", [{}, CPU_IMAGE, {"torch": "2.10.0", "torchvision": "0.25.0",
                                                   "torchao": "0.16.0", "xformers": "0.0.34"},
                                   {"flash_attn_3": "3.0.0", "wheelhouse": "/srv/wheels"}],
                         ids=["default", "cpu-wheelhouse", "xformers", "flash-attn-3"])
def test_dockerfile_fails_early_and_builds_without_buildkit(image: dict[str, str]) -> None:
    inventory = dataclasses.replace(INVENTORY, image=image)
    files = rendered(MEMBERS[0], inventory)
    dockerfile, spec = files[".devcontainer/Dockerfile"], resolve_image(image)
    assert f"ARG BASE_IMAGE={spec.base}\nFROM ${{BASE_IMAGE}}" in dockerfile
    instructions = "\n".join(ln for ln in dockerfile.splitlines() if not ln.startswith("#"))
    for buildkit_only in ("--mount", "<<", "--chmod", "--link"):
        assert buildkit_only not in instructions
    assert not dockerfile.startswith("# syntax=")
    assert "/bin/pip check" in dockerfile and "torch.float8_e4m3fn" in dockerfile
    assert ("xformers.ops" in dockerfile) == bool(spec.xformers)
    assert ("flash_attn_interface" in dockerfile) == bool(spec.flash_attn_3)  # loads at build
    assert final_user(instructions) == "alice"
    # Nothing after the venv but its copy or her USER: each step past that layer is a commit of
    # it, ~10 s on a rootless daemon's fuse-overlayfs.
    after_packages = instructions[instructions.index("/bin/pip check"):].splitlines()[1:]
    assert [ln.split()[0] for ln in after_packages if ln[:1].isalpha()] in (
        ["USER"], ["FROM", "COPY"])
    if spec.wheelhouse:
        assert "--no-index --find-links /wheelhouse" in dockerfile
        assert "COPY wheelhouse/ /wheelhouse/" in dockerfile
    else:
        assert f"--index-url {spec.torch_index} " in dockerfile
    pins = [ln for ln in files[".devcontainer/requirements.txt"].splitlines()
            if ln and not ln.startswith("#")]
    assert tuple(pins) == spec.pins()
    assert f"torch=={spec.torch}+{spec.cuda}" in pins
    if spec.flash_attn_3:  # only the wheel built for this flavour and torch may be installed
        assert "flash_attn_3==3.0.0+cu130torch2.11" in pins


def final_user(instructions: str) -> str:
    """The user the image's last stage runs as, following `FROM <stage>` to the stage it
    names (a stage without USER keeps the one it was built from)."""
    users: dict[str, str] = {}
    stage = user = ""
    for line in instructions.splitlines():
        words = line.split()
        if words[:1] == ["FROM"]:
            user = users.get(words[1], "root")
            stage = words[3] if len(words) > 3 else ""
        elif words[:1] == ["USER"]:
            user = words[1]
        users[stage] = user
    return user


def test_defaults_are_the_measured_set() -> None:
    spec = resolve_image({})
    assert (spec.torch, spec.diffusers, spec.transformers, spec.torchao, spec.accelerate) == (
        "2.11.0", "0.40.0", "5.17.0", "0.17.0", "1.15.0")
    assert spec.torch_index == "https://download.pytorch.org/whl/cu130"
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.torch = "2.0.1"  # type: ignore[misc]
    decided = ("driver", "torch_root")  # for a host, not from [image]
    table = [f.name for f in dataclasses.fields(ImageSpec) if f.name not in decided]
    assert table == list(DEFAULT_IMAGE)


def test_cpu_table_of_the_test_machines_is_accepted() -> None:
    """torch 2.13 with torchao 0.17 (built for 2.11) is fine on a CPU image only: there torchao
    is merely imported, and its CUDA kernels, which need their own torch, never run."""
    assert resolve_image(CPU_IMAGE).pins()[0] == "torch==2.13.0+cpu"
    with pytest.raises(InventoryError, match="torchao"):
        resolve_image({**CPU_IMAGE, "cuda": "cu130", "base": DEFAULT_IMAGE["base"]})


# Synthesized: the [image] overrides the table must refuse, as data.
IMAGE_REFUSALS = tomllib.loads((FIXTURES / "image-refusals.toml").read_text())["refusal"]


@pytest.mark.parametrize("refusal", IMAGE_REFUSALS, ids=lambda refusal: refusal["named"])
def test_an_override_that_breaks_the_table_is_refused_with_its_reason(
        refusal: dict) -> None:
    override = {**(CPU_IMAGE if refusal.get("on_cpu_table") else {}), **refusal["override"]}
    with pytest.raises(InventoryError) as caught:
        resolve_image(override)
    assert caught.value.problem.startswith("[image] ")
    assert refusal["named"] in caught.value.problem, caught.value.problem
    assert refusal["reason"] in caught.value.problem, caught.value.problem


@pytest.mark.parametrize(("override", "driver", "cuda", "base"), [
    # A base fixed in [image] keeps the wheels to its CUDA major, and not older than it.
    ({"base": "nvidia/cuda:12.4.1-base-ubuntu22.04", "python": "3.10"}, None, "cu128",
     "nvidia/cuda:12.4.1-base-ubuntu22.04"),
    ({"base": "nvidia/cuda:12.4.1-base-ubuntu22.04", "python": "3.10"}, "580.95.05", "cu128",
     "nvidia/cuda:12.4.1-base-ubuntu22.04"),
    # A flavour fixed in [image] that the driver runs through minor-version compatibility.
    ({"cuda": "cu128"}, "550.127.05", "cu128", "nvidia/cuda:12.4.1-base-ubuntu22.04"),
    ({"cuda": "cu128"}, None, "cu128", "nvidia/cuda:12.8.1-base-ubuntu24.04"),
    # Not a driver version: as if none were known.
    ({}, "N/A", "cu130", "nvidia/cuda:13.0.0-base-ubuntu24.04"),
])
def test_what_overrides_and_drivers_make_of_the_image(override: dict[str, str],
                                                      driver: str | None, cuda: str,
                                                      base: str) -> None:
    spec = resolve_image(override, driver)
    assert (spec.cuda, spec.base) == (cuda, base)
    assert spec.driver == (driver if driver and driver[0].isdigit() else "")


def test_a_driver_too_old_for_every_flavour_is_refused_saying_which_it_needs() -> None:
    with pytest.raises(InventoryError) as caught:
        resolve_image({}, "520.61.05")
    assert caught.value.problem == (
        "[image] torch = '2.11.0': none of its CUDA flavours (cu126, cu128, cu130) runs on "
        "NVIDIA driver 520.61.05 (they need 525.60.13 or newer)")
    assert "upgrade the host's NVIDIA driver" in caught.value.remedy


def test_a_broken_table_stops_rendering_before_any_file_exists(tmp_path: Path) -> None:
    inventory = dataclasses.replace(INVENTORY, image={"torch": "2.0.1"})
    with pytest.raises(InventoryError, match="float8"):
        workspace.write_files(rendered(MEMBERS[0], inventory), tmp_path)
    assert not any(tmp_path.iterdir())


def full_context() -> dict[str, object]:
    """Every workspace and ssh_config template variable. The CPU table with a wheelhouse and a
    member without GPUs take every conditional branch that uses a variable of its own."""
    return {
        **workspace.workspace_context(dataclasses.replace(INVENTORY, image=CPU_IMAGE), MEMBERS[2],
                                      resolve_image(CPU_IMAGE), where="sd-server", cache_gid=1),
        "alias": "sd-server", "hostname": "h", "port": 22, "identity_file": "k",
        "keepalive_interval": 1, "keepalive_count_max": 1, "proxy_jump": "j",
        "service_forward": "8000 127.0.0.1:8000",
    }


def template_cases() -> list[tuple[str, str]]:
    """(template, variable) for every variable each template takes from its caller."""
    env, given = environment(), full_context()
    names = [f"workspace/{path}.j2" for path in workspace.RENDERED] + ["workspace/ssh_config.j2"]
    return [(name, variable) for name in names
            for variable in sorted(jinja2.meta.find_undeclared_variables(
                env.parse(env.loader.get_source(env, name)[0])) & set(given))]


@pytest.mark.parametrize(("template", "variable"), template_cases())
def test_a_missing_template_variable_raises(template: str, variable: str) -> None:
    """StrictUndefined: never an empty string in a config file, and the error names it."""
    context = full_context()
    del context[variable]
    with pytest.raises(jinja2.UndefinedError, match=variable):
        environment().get_template(template).render(**context)


def test_compiled_templates_are_kept_in_a_private_directory_and_never_in_a_planted_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bytecode cache (compiled templates between runs) lives in Jinja2's per-user 0700
    directory; where that name is taken by a link (another user's trap in /tmp) the cache is
    refused and templates still render, compiled each run."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    cache = templating._bytecode_cache()
    assert cache is not None
    private = tmp_path / f"_jinja2-cache-{os.getuid()}"
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    env = jinja2.Environment(loader=environment().loader, bytecode_cache=cache)
    env.get_template("workspace/ssh_config.j2")
    assert [p.suffix for p in private.iterdir()] == [".cache"]

    for entry in private.iterdir():
        entry.unlink()
    private.rmdir()
    (tmp_path / "theirs").mkdir()
    private.symlink_to(tmp_path / "theirs")
    assert templating._bytecode_cache() is None
    assert not any((tmp_path / "theirs").iterdir())


def test_ssh_config_block_reads_back_as_the_member_login() -> None:
    member, target = MEMBERS[1], BEHIND_BASTION
    block = workspace.ssh_config_block(INVENTORY, member, "gpu-02", target, "~/.ssh/bob_ed25519")
    seen = paramiko.SSHConfig.from_text(block).lookup("gpu-02")
    assert seen["hostname"] == "10.0.0.12" and seen["port"] == "2202"
    assert seen["user"] == "bob", "her account, not the admin's"
    assert seen["identityfile"] == [os.path.expanduser("~/.ssh/bob_ed25519")]
    assert (seen["serveraliveinterval"], seen["serveralivecountmax"]) == ("30", "4")
    assert seen["proxyjump"] == "198.51.100.7:2222", "resolved hop, without the admin's login"
    plain = workspace.ssh_config_block(INVENTORY, member, "sd-server", SD_SERVER, "k")
    assert "proxyjump" not in paramiko.SSHConfig.from_text(plain).lookup("sd-server")
    assert "localforward" not in paramiko.SSHConfig.from_text(plain).lookup("sd-server")
    served = dataclasses.replace(INVENTORY, service=Service(port=7860, bind="::1"))
    block = workspace.ssh_config_block(served, member, "sd-server", SD_SERVER, "k")
    assert paramiko.SSHConfig.from_text(block).lookup("sd-server")["localforward"] == [
        "7860 [::1]:7860"]  # the generation service, through her SSH connection
    with pytest.raises(InventoryError, match="identity file"):
        workspace.ssh_config_block(INVENTORY, member, "sd-server", SD_SERVER, "my key\nHost *")


def test_write_files_creates_directories_and_replaces_whole_files(tmp_path: Path) -> None:
    files = {"a/b/c.json": "{}\n", "run.py": "#!/usr/bin/env python3\n"}
    assert workspace.write_files(files, tmp_path) == [tmp_path / "a/b/c.json", tmp_path / "run.py"]
    workspace.write_files({"a/b/c.json": "[]\n"}, tmp_path)
    assert (tmp_path / "a/b/c.json").read_text() == "[]\n"
    assert stat.S_IMODE((tmp_path / "run.py").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "a/b/c.json").stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["c.json", "run.py"]
    with pytest.raises(ValueError, match="inside"):
        workspace.write_files({"../escape": ""}, tmp_path)
