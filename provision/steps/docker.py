"""docker: Docker Engine installed, enabled and running; daemon.json merged, never overwritten.

Sources: Docker's own apt repository (deb822 source, signed-by keyring) or the distribution's
`docker.io`. `auto` takes Docker's repository when the host reaches it, else the distro's,
and says which; with a `[mirrors] docker_apt` it takes the mirror, which stands for
download.docker.com (its key: `docker_apt_key`, else the mirror's copy of Docker's). The
repository must be accepted by `apt-get update` with its key before it stays
(`signed_repository`). An engine already installed is kept as it is, whatever its source.
Group membership (root-equivalent, and said so) is the users step's.
"""

from __future__ import annotations

import json
from typing import Any

from provision.changes import Change, Run, WriteFile, run
from provision.contract import choose_source
from provision.facts import DAEMON_JSON, HostFacts
from provision.inventory import AptKey, Inventory
from provision.steps import APT_UPDATE, Step, StepBlocked, apt_install, signed_repository
from provision.templating import render

NAME = "docker"
DOWNLOAD = "https://download.docker.com"
KEYRING = "/etc/apt/keyrings/docker.asc"
SOURCES = "/etc/apt/sources.list.d/docker.sources"
DOCKER_CE = ("docker-ce", "docker-ce-cli", "containerd.io", "docker-buildx-plugin",
             "docker-compose-plugin")
SUPPORTED = {"ubuntu": ("jammy", "noble"), "debian": ("bookworm", "trixie")}
ENABLE = "systemctl enable --now docker.service"


def merge(current: dict[str, Any], wanted: dict[str, Any]) -> dict[str, Any]:
    """Key by key: ours set, theirs kept; nested tables merged the same way."""
    merged = dict(current)
    for key, value in wanted.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def plan(facts: HostFacts, inventory: Inventory) -> list[Change]:
    changes = _daemon_json(facts, inventory)
    if not facts.docker.installed:
        changes.extend(_install(facts, inventory))
    elif not (facts.docker.active and facts.docker.enabled):
        changes.append(run(NAME, "enable and start Docker", ENABLE))
    return changes


def _install(facts: HostFacts, inventory: Inventory) -> list[Change]:
    source, why = choose_source(facts, inventory)
    if source == "distro":
        return [run(NAME, f"install docker.io from {facts.os.pretty_name or facts.os.id} "
                          f"({why}), enable and start it", apt_install("docker.io"), ENABLE)]
    os_id, codename = facts.os.id, facts.os.codename
    if codename not in SUPPORTED.get(os_id, ()):
        raise StepBlocked(f"Docker's apt repository has no {os_id} {codename or '?'} here",
                          "set docker_source = \"distro\" in [defaults]")
    mirrors = inventory.mirrors
    repository = f"{mirrors.docker_apt or DOWNLOAD}/linux/{os_id}"
    key = mirrors.docker_apt_key or AptKey(url=f"{repository}/gpg")
    sources = render("host/docker.sources.j2", repository=repository, codename=codename,
                     keyring=KEYRING)
    return [
        signed_repository(
            NAME, f"Docker's apt repository for {os_id} {codename} ({repository}), signed-by "
                  f"{KEYRING} with the key from {key.source} ({why})",
            what="Docker's apt repository", uri=repository, key=key,
            setting="[mirrors] docker_apt_key" if mirrors.docker_apt else "the host's network",
            keyring=KEYRING, sources=SOURCES, content=sources, current=facts.text(SOURCES)),
        run(NAME, f"install Docker Engine ({', '.join(DOCKER_CE)}), enable and start it",
            APT_UPDATE,
            apt_install(*DOCKER_CE), ENABLE),
    ]


def merged_daemon_json(text: str | None, where: str, wanted: dict[str, Any]) -> str | None:
    """A daemon.json's new text with `wanted` merged in (other keys kept), or None when it
    already holds it. One that is not a JSON object blocks the step: provision merges into it
    and never overwrites it."""
    try:
        current = json.loads(text) if text and text.strip() else {}
    except json.JSONDecodeError as exc:
        raise StepBlocked(f"{where} is not valid JSON ({exc.msg}, line {exc.lineno})",
                          "fix it by hand; provision merges into it and never overwrites it"
                          ) from None
    if not isinstance(current, dict):
        raise StepBlocked(f"{where} holds no JSON object",
                          "fix it by hand; provision merges into it and never overwrites it")
    merged = merge(current, wanted)
    return None if merged == current else json.dumps(merged, indent=2) + "\n"


def _daemon_json(facts: HostFacts, inventory: Inventory) -> list[Change]:
    wanted = inventory.defaults.docker_daemon
    if not wanted:
        return []
    text = facts.text(DAEMON_JSON)
    merged = merged_daemon_json(text, DAEMON_JSON, wanted)
    if merged is None:
        return []
    keys = ", ".join(sorted(wanted))
    write = WriteFile(DAEMON_JSON, merged, text)
    if not facts.docker.installed:
        return [Change(NAME, f"{DAEMON_JSON}: set {keys} before Docker first starts", (write,))]
    return [Change(NAME, f"{DAEMON_JSON}: merge {keys} (other keys kept), restart Docker",
                   (write, Run("systemctl restart docker.service")), restarts_docker=True)]


STEP = Step(NAME, plan, lambda inventory: (SOURCES,))
