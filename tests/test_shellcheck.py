"""shellcheck over the shell provision runs on hosts: every shell file in templates/, each
template rendered as the steps render it, every step's apply script, and the scripts built in
Python (the service's health wait, doctor's probe), on the fact fixtures and a few inventories.

`sh -n` (test_plans) only proves a script parses; shellcheck also catches what parses and then
does something else (a quote that ends early, a word split). Under CI a missing shellcheck is
a failure (`require`): .ci/setup installs it.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from collections import defaultdict
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from unittest.mock import patch

import jinja2
import pytest

from provision import doctor, gpus, verify
from provision.contract import host_gpu_args
from provision.engine import apply_script
from provision.image import build_script, host_image, image_tag
from provision.inventory import AptKey, Inventory, load_inventory, parse_inventory
from provision.render import render_for_host
from provision.steps import StepBlocked, StepSkipped, keepalive, service
from provision.steps.order import STEPS
from provision.templating import templates_dir
from tests.conftest import FIXTURES, facts_of, require

HOSTS = sorted(p.stem for p in (FIXTURES / "facts").glob("*.txt"))
MEMBERS = [{"name": "alice", "keys": ["keys/alice/id_ed25519.pub"], "gpus": "0",
            "sudo": ["/usr/bin/nvidia-smi"]},
           {"name": "bob", "keys": ["keys/bob/id_ed25519.pub"]}]
# What changes the scripts: docker mode, Docker's source, mirrors, the service.
INVENTORIES = {
    "rootful": {"members": MEMBERS},
    "rootful-service": {"members": MEMBERS, "service": {"model": "tiny"}},
    "rootless-service": {"defaults": {"docker_mode": "rootless"}, "members": MEMBERS,
                         "service": {"model": "tiny"}},
    "distro": {"defaults": {"docker_source": "distro"}, "members": MEMBERS},
    "mirrors": {"members": MEMBERS, "mirrors": {"docker_apt": "https://mirror.example/docker",
                                                "nvidia_apt": "https://mirror.example/nvidia"}},
}
# as_member hands a whole script to another sh in single quotes: `$` there is meant for that sh.
RUN_AS_MEMBER = "SC2016"
# Shell files shipped as they are, and shell templates (checked once rendered).
SHELL_FILES = sorted(p for p in templates_dir().rglob("*") if p.is_file() and (
    p.suffix == ".sh" or p.read_text(errors="replace").startswith("#!/bin/sh")))
# host/apply.sh.j2's renderings are the apply scripts, checked as such.
SHELL_TEMPLATES = sorted(name for p in templates_dir().rglob("*.sh.j2")
                         if (name := p.relative_to(templates_dir()).as_posix())
                         != "host/apply.sh.j2")


@pytest.fixture(scope="module")
def shellcheck() -> str:
    found = shutil.which("shellcheck")
    require(found, "shellcheck (apt install shellcheck)")
    assert found
    return found


def inventories() -> Iterator[tuple[str, Inventory]]:
    for name, data in INVENTORIES.items():
        # Keys are read beside the fixtures' own inventories.
        yield name, parse_inventory(data, FIXTURES / "facts" / "provision.toml")
    # The mirrors' keys as key files read here, shipped in the script (written by hand: the
    # text only has to look armored).
    inventory = parse_inventory(INVENTORIES["mirrors"], FIXTURES / "facts" / "provision.toml")
    key = AptKey(text="-----BEGIN PGP PUBLIC KEY BLOCK-----\nk\n", path="/keys/mirror.asc")
    yield "mirror-key-files", dataclasses.replace(inventory, mirrors=dataclasses.replace(
        inventory.mirrors, docker_apt_key=key, nvidia_apt_key=key))


def findings(shellcheck: str, scripts: dict[str, str], tmp_path: Path,
             *excluded: str) -> list[str]:
    """shellcheck's one-line findings (`NAME:line:col: level: message [SCnnnn]`), all scripts
    in one run; each as POSIX sh, which is what runs them on a host (`sh -s`)."""
    paths = []
    for name, text in scripts.items():
        path = tmp_path / name.replace("/", "_")
        path.write_text(text)
        paths.append(path.name)
    exclude = ["--exclude", ",".join(excluded)] if excluded else []
    done = subprocess.run([shellcheck, "--shell", "sh", "--format", "gcc", *exclude, *paths],
                          cwd=tmp_path, capture_output=True, text=True, check=False)
    return done.stdout.splitlines() + done.stderr.splitlines()


@cache  # planned once for the templates' renderings, then checked per host
def step_scripts(host: str) -> dict[str, str]:
    """Every step's apply script on this fixture host, per inventory (steps that would not run
    there have none)."""
    facts = facts_of(host)
    scripts = {}
    for name, inventory in inventories():
        for step in STEPS:
            try:
                changes = step.plan(facts, inventory)
            except (StepBlocked, StepSkipped):  # NoGpu is a StepSkipped
                continue
            if changes:
                scripts[f"{name}.{step.name}.sh"] = apply_script(step.name, changes)
    return scripts


@pytest.fixture(scope="module")
def renderings() -> dict[str, set[str]]:
    """Each shell template as the tool renders it: what the steps' plans, the GPU usage read and
    the apply scripts render on every fixture host, plus the two rendered once, on import."""
    seen: dict[str, set[str]] = defaultdict(set)
    original = jinja2.Template.render

    def spy(template: jinja2.Template, *args: object, **kwargs: object) -> str:
        text = original(template, *args, **kwargs)
        seen[template.name or "?"].add(text)
        return text

    with patch.object(jinja2.Template, "render", spy):
        for host in HOSTS:
            step_scripts(host)
        for _, inventory in inventories():
            gpus.usage_script(inventory)
    seen["host/sshd-reload.sh.j2"].add(keepalive.RELOAD)
    seen["host/health-poll.sh.j2"].add(service.HEALTH_POLL)
    return seen


@pytest.mark.parametrize("path", SHELL_FILES, ids=lambda p: p.name)
def test_shell_files_pass(shellcheck: str, path: Path, tmp_path: Path) -> None:
    assert findings(shellcheck, {path.name: path.read_text()}, tmp_path) == []


@pytest.mark.parametrize("template", SHELL_TEMPLATES)
def test_shell_templates_pass_as_rendered(shellcheck: str, template: str,
                                          renderings: dict[str, set[str]],
                                          tmp_path: Path) -> None:
    texts = renderings.get(template)
    assert texts, f"{template} is rendered nowhere here: add how the tool renders it"
    scripts = {f"{i}.sh": text for i, text in enumerate(sorted(texts))}
    assert findings(shellcheck, scripts, tmp_path, RUN_AS_MEMBER) == []


@pytest.mark.parametrize("host", HOSTS)
def test_apply_scripts_pass(shellcheck: str, host: str, tmp_path: Path) -> None:
    scripts = step_scripts(host)
    assert scripts, "no step has anything to do here: the fixture checks nothing"
    assert findings(shellcheck, scripts, tmp_path, RUN_AS_MEMBER) == []


@pytest.mark.parametrize("host", HOSTS)
def test_scripts_built_in_python_pass(shellcheck: str, host: str, tmp_path: Path) -> None:
    facts = facts_of(host)
    scripts = {}
    for name, inventory in inventories():
        scripts[f"{name}.health-wait.sh"] = service.health_wait(inventory)
        gpu_args = host_gpu_args(facts, "all", rootless=inventory.defaults.rootless)
        scripts[f"{name}.doctor.sh"] = doctor.probe_script(
            inventory, inventory.members, "provision/sd35-fp8:0123456789ab", gpu_args)
    assert findings(shellcheck, scripts, tmp_path, RUN_AS_MEMBER) == []


@pytest.mark.parametrize("rootless", [False, True], ids=["rootful", "rootless"])
def test_verify_scripts_pass(shellcheck: str, rootless: bool, tmp_path: Path) -> None:
    """What `provision verify` runs: the image build and the two generations with their
    report, on the facts recorded on a converged sandbox (member alice)."""
    inventory = load_inventory(FIXTURES / "facts" / "debian-12-sandbox.toml")
    inventory = dataclasses.replace(inventory, defaults=dataclasses.replace(
        inventory.defaults, docker_mode="rootless" if rootless else "rootful"))
    facts = facts_of("debian-12-sandbox-converged")
    alice = inventory.member("alice")
    image = host_image(facts, inventory)
    files = render_for_host(inventory, alice, facts, image, host_alias="sandbox", target=None)
    place = verify.place_of(facts, inventory, alice)
    tag = image_tag(files)
    scripts = {"build.sh": place.script(build_script(files, tag, image, place.root)),
               "run.sh": place.script(verify.run_script(
                   inventory, alice, facts, files, tag, "storage", dict(verify.CPU_DEFAULTS),
                   place))}
    assert findings(shellcheck, scripts, tmp_path, RUN_AS_MEMBER) == []
