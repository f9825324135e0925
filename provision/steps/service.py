"""service: the team's SD3.5 FP8 generation API, run by systemd in the team image.

With a `[service]` table in the inventory each host gets:
- a system account `sd35-api` (not a member: no login, home /var/lib/sd35-api, its state);
- the API (`templates/service/sd35_api.py`, with the workspace's `inference.py` and its
  `sd35/` package beside it: one pipeline code) in /opt/sd35-api, mounted read-only into the
  container;
- the team image, built on the host as `verify` builds it (same Dockerfile and pins, rendered
  for the service account; tagged by their hash, so it is built once);
- an environment file and a systemd unit with `Restart=always`: the container runs in the
  foreground of the unit, so a server killed by anything comes back, and its output is the
  unit's journal (`journalctl -u sd35-api`). Docker's health check calls /health.

The container runs in the Docker that `docker_mode` says:
- rootful: the system daemon (the docker step's). The unit is root's; the container runs as
  the account's uid with the cache group added, its GPUs as a member's are
  (`provision.contract`: CDI devices, or the nvidia runtime asked for CDI names on Docker
  < 25).
- rootless: the account's own rootless daemon, made exactly as a member's is (the rootless
  step's functions: subordinate ranges allocated after the members' and never changed,
  lingering, the setup tool's user service, the `rootless` context, all run as the account),
  and the image is built in it, as the account. The unit is still a *system* unit, with
  `User=sd35-api` and `DOCKER_HOST` naming that daemon's socket, ordered after the account's
  user manager (`user@UID.service`), which runs the daemon: so `systemctl status sd35-api`,
  `journalctl -u sd35-api`, `Restart=always` and doctor's restart count work as in rootful
  mode (a user unit would need `systemctl --user -M sd35-api@` and `journalctl --user-unit`,
  and systemd would not restart it while the account's manager is down). The container runs
  as its root, which is the account on the host (a rootless container drops supplementary
  groups, so the shared cache is read as "other", which its mode allows); its /state is a
  folder inside the home, not the home itself, which holds its daemon and its user units. GPUs
  come as CDI devices (its daemon.json gets CDI on where Docker needs it, as a member's does).

The unit restarts only when its definition changed (unit, environment, API files or image);
an unchanged inventory leaves a running service alone, and a stopped one is only started.
A switch of docker_mode is such a change: the unit is stopped, the container left in the
other daemon removed, and the unit started in the new one. The new daemon gets the image by
copy from the old one (`docker save | docker load`: the same tag is the same build inputs)
rather than by a build; the old mode's image and compile cache stay where they were (rootless
to rootful also stops the account's daemon, keeping its data).

The port is published on `bind` (loopback unless the inventory says otherwise): members reach it
through their SSH connection. Before anything, the port is checked against the host: sshd's port,
or one something else listens on, blocks the step (a unit that cannot publish its port restarts for
ever); any other bind is open to the network, and the API has no authentication: the plan warns.

A `[service]` table removed from the inventory stops and disables the unit and removes it; the
account, its state (the compile cache) and the image stay.
"""

from __future__ import annotations

import ipaddress
import re
import shlex

from provision.changes import Change, Run, WriteFile, as_member, run
from provision.contract import (
    CONTAINER_PORT,
    HF_MOUNT,
    HF_OFFLINE,
    ROOTLESS_GPU_REMEDY,
    SERVICE_UNIT,
    SHM_SIZE,
    account_args,
    engine_source,
    host_gpu_args,
    in_service_daemon,
    rootless_gpu_blocker,
    runs_on_gpu,
)
from provision.facts import HostFacts, Listener
from provision.image import build_script, host_image, image_tag
from provision.inventory import SERVICE_HOME, SERVICE_NAME, Inventory, Member, Service
from provision.models import debug_model
from provision.render import GENERATION, render_workspace
from provision.steps import Proof, Step, StepBlocked, nvidia, rootless
from provision.templating import raw, render
from provision.versions import ImageSpec

NAME = "service"
UNIT_FILE = f"/etc/systemd/system/{SERVICE_UNIT}"
ENV_FILE = f"/etc/{SERVICE_NAME}/env"
APP_DIR = f"/opt/{SERVICE_NAME}"
STATE_DIR = SERVICE_HOME
# Rootless: the container's /state, inside the account's home (which holds its daemon).
ROOTLESS_STATE = f"{STATE_DIR}/container"
# Rootless: the build context, as a member's verify puts hers in her own cache.
ROOTLESS_BUILD_ROOT = f"{STATE_DIR}/.cache/provision"
DAEMON_JSON = f"~{SERVICE_NAME}/{nvidia.MEMBER_DAEMON_JSON}"
# The API and what it imports, as they go to APP_DIR (template path → file name there).
APP_FILES = {"service/sd35_api.py": "sd35_api.py", "service/healthcheck.py": "healthcheck.py",
             **{f"workspace/{path}": path for path in GENERATION}}
# The first system id (counting down, as useradd --system does) free as both uid and gid.
SYSTEM_IDS = range(999, 99, -1)
# Up to 30 minutes for the first health: a cold FP8 compile takes minutes, real weights more.
# A unit that cannot run (a port taken since the plan, a broken image) never gets there:
# Restart=always starts it again every RestartSec, for ever, so the wait ends once systemd has
# restarted it CRASH_RESTARTS times, or when it failed or was stopped.
HEALTH_POLLS, HEALTH_POLL_SECONDS = 360, 5
CRASH_RESTARTS = 3
HEALTH_POLL = render("host/health-poll.sh.j2", unit=SERVICE_UNIT, container=SERVICE_NAME,
                     polls=HEALTH_POLLS, poll_seconds=HEALTH_POLL_SECONDS,
                     crash_restarts=CRASH_RESTARTS)


# The system daemon's userland proxy, which holds a rootful container's published port.
SYSTEM_PUBLISHERS = frozenset({"docker-proxy"})


def port_conflict(facts: HostFacts, service: Service) -> str | None:
    """Why the service cannot publish its port on this host (sshd's, or held by something
    else), or None. The service's own socket is no conflict: a re-converge or a docker_mode
    switch frees it before it starts again."""
    if service.port in facts.sshd.ports:
        return "sshd listens there (its Port): the service could never start"
    for listener in facts.listeners:
        if (listener.port == service.port and listener.overlaps(service.bind)
                and not _ours(facts, listener)):
            return f"{listener.address}:{listener.port} is in use by {_holder(facts, listener)}"
    return None


def _ours(facts: HostFacts, listener: Listener) -> bool:
    """Whether the unit the host runs now publishes this socket: rootless, any socket of the
    account (its daemon's rootlesskit, which runs nothing else); rootful, the system daemon's
    proxy while the unit runs (no other container can hold the port it published)."""
    unit = facts.text(UNIT_FILE)
    if unit is None or not re.search(rf"--publish \S+:{listener.port}:{CONTAINER_PORT}\b", unit):
        return False
    if runs_rootless(unit):
        account = facts.accounts.get(SERVICE_NAME)
        return account is not None and listener.uid == account.uid
    state = facts.units.get(SERVICE_UNIT)
    return (state is not None and state.active == "active" and bool(listener.processes)
            and set(listener.processes) <= SYSTEM_PUBLISHERS)


def _holder(facts: HostFacts, listener: Listener) -> str:
    """Who holds a socket, in words: its processes and, when not root, their account."""
    names = ", ".join(listener.processes) or "a process the host did not name"
    if listener.uid == 0:
        return names
    account = next((a.name for a in facts.accounts.values() if a.uid == listener.uid),
                   f"uid {listener.uid}")
    return f"{names} (of {account})"


def exposure(service: Service) -> str | None:
    """The plan's warning for a bind other than loopback, None for loopback."""
    address = ipaddress.ip_address(service.bind)
    if address.is_loopback:
        return None
    where = "every address of the host" if address.is_unspecified else service.bind
    return (f"[service] bind = {service.bind}: the API has no authentication and is open to "
            f"the network on {where}, port {service.port}: anyone who reaches it generates "
            "with this host's GPUs; keep the loopback default (members reach it through "
            "SSH) or firewall the port")


def health_wait(inventory: Inventory) -> str:
    """The proof's script: the health poll in the right daemon, the journal's tail if it was
    not healthy (read as root: the account cannot read the system journal)."""
    return (f"status=$({in_service_daemon(inventory, HEALTH_POLL)})\necho \"$status\"\n"
            f"[ \"$status\" = healthy ] || journalctl --unit {SERVICE_UNIT} --lines 5 --no-pager "
            "--output cat\n")


def paths(inventory: Inventory) -> tuple[str, ...]:
    # Asked for without [service] too: a service removed from the inventory is stopped.
    return (UNIT_FILE, ENV_FILE, STATE_DIR, ROOTLESS_STATE, DAEMON_JSON,
            *(f"{APP_DIR}/{name}" for name in APP_FILES.values()))


def service_ids(facts: HostFacts) -> tuple[int, int]:
    """The account's uid and gid: its own when it exists, else the first system id free as
    both, chosen here so the unit can name them before the account exists."""
    account = facts.accounts.get(SERVICE_NAME)
    if account:
        return account.uid, account.gid
    used = {a.uid for a in facts.accounts.values()} | {g.gid for g in facts.groups.values()}
    free = next(i for i in SYSTEM_IDS if i not in used)
    group = facts.groups.get(SERVICE_NAME)  # left by a run cut short: kept
    return free, group.gid if group else free


def chosen_model(facts: HostFacts, service: Service) -> str:
    """The inventory's model, else what this host's GPU holds (as for a member's launch.json);
    a host without a GPU runs the tiny model on the CPU."""
    if service.model:
        return service.model
    gpus = service.gpus if facts.nvidia.gpus else "none"
    return debug_model(Member(SERVICE_NAME, (), gpus=gpus), facts).model


def image_files(facts: HostFacts, inventory: Inventory, service: Service,
                image: ImageSpec) -> dict[str, str]:
    """The team image's build files, rendered for the service account on this host."""
    group = facts.groups.get(inventory.defaults.cache_group)
    return render_workspace(inventory, Member(SERVICE_NAME, (), gpus=service.gpus),
                            host_alias=None, target=None, cache_gid=group.gid if group else None,
                            image=image, facts=facts)


def publish(service: Service) -> str:
    """docker's --publish value: the port on `bind` only (an IPv6 address in brackets)."""
    bind = f"[{service.bind}]" if ":" in service.bind else service.bind
    return f"{bind}:{service.port}:{CONTAINER_PORT}"


def runs_rootless(unit: str | None) -> bool:
    """Whether a unit file (as written by unit_text) runs the container in the account's own
    daemon: a switch of docker_mode is seen from the unit on the host."""
    return unit is not None and "DOCKER_HOST=" in unit


def unit_text(facts: HostFacts, inventory: Inventory, service: Service, tag: str) -> str:
    uid, gid = service_ids(facts)
    group = facts.groups.get(inventory.defaults.cache_group)
    if group is None:
        raise StepBlocked(f"the cache group {inventory.defaults.cache_group} does not exist",
                          "the users step creates it: converge without --skip users")
    mode_rootless = inventory.defaults.rootless
    gpu_args = host_gpu_args(facts, service.gpus, rootless=mode_rootless)
    user = " ".join(account_args(uid, gid, group.gid, rootless=mode_rootless))
    return render("host/sd35-api.service.j2", name=SERVICE_NAME, image=tag, uid=uid,
                  user=user, rootless=mode_rootless, env_file=ENV_FILE,
                  publish=publish(service), bind=service.bind,
                  cache_dir=inventory.defaults.cache_dir, app_dir=APP_DIR,
                  state_dir=ROOTLESS_STATE if mode_rootless else STATE_DIR,
                  shm_size=SHM_SIZE, hf_home=HF_MOUNT, gpu_args=gpu_args)


def images_of(facts: HostFacts, rootless: bool) -> tuple[str, ...]:
    """provision's images in the daemon of that mode (the account's own when rootless)."""
    if not rootless:
        return facts.images
    daemon = facts.member_daemons.get(SERVICE_NAME)
    return daemon.images if daemon else ()


def plan(facts: HostFacts, inventory: Inventory) -> list[Change]:
    service = inventory.service
    if service is None:
        return _removal(facts)
    if conflict := port_conflict(facts, service):
        raise StepBlocked(f"[service] port = {service.port}: {conflict}",
                          "set [service] port to one nothing listens on")
    if not facts.docker.installed:
        raise StepBlocked("Docker is not installed", "the docker step installs it")
    mode_rootless = inventory.defaults.rootless
    changes = _account(facts)
    if mode_rootless:
        changes += _own_daemon(facts, inventory, service)
    image = host_image(facts, inventory)
    files = image_files(facts, inventory, service, image)
    tag = image_tag(files)
    env = render("host/sd35-api.env.j2", name=SERVICE_NAME, model=chosen_model(facts, service),
                 fp8=service.fp8, max_queue=service.max_queue, container_port=CONTAINER_PORT,
                 hf_home=HF_MOUNT, hf_offline=HF_OFFLINE)
    wanted = {**{f"{APP_DIR}/{name}": raw(template) for template, name in APP_FILES.items()},
              ENV_FILE: env, UNIT_FILE: unit_text(facts, inventory, service, tag)}
    definition: list[Change] = []
    for path, content in wanted.items():
        current = facts.text(path)
        if current != content:
            verb = "write" if current is None else "update"
            definition.append(Change(NAME, f"{verb} {path}", (WriteFile(path, content, current),)))
    if tag not in images_of(facts, mode_rootless):
        definition.append(_team_image(facts, mode_rootless, files, tag, image))
    changes += definition
    state = facts.units.get(SERVICE_UNIT)
    where = f"{service.bind}:{service.port}"
    warning = exposure(service)  # on the change that opens the port
    current_unit = facts.text(UNIT_FILE)
    switched = current_unit is not None and runs_rootless(current_unit) != mode_rootless
    if definition:
        changes.append(run(
            NAME, f"(re)start {SERVICE_UNIT} on {where}: its definition changed"
                  + (f" (docker_mode switched: its container moves to "
                     f"{'its own' if mode_rootless else 'the system'} daemon)"
                     if switched else ""),
            "systemctl daemon-reload", f"systemctl enable --quiet {SERVICE_UNIT}",
            *(_leave_other_daemon(facts, mode_rootless) if switched else
              (f"systemctl restart {SERVICE_UNIT}",)), warning=warning))
    elif state is None or state.active != "active" or state.enabled != "enabled":
        changes.append(run(NAME, f"start {SERVICE_UNIT} on {where} (it was "
                                 f"{state.active if state else 'unknown'})",
                           f"systemctl enable --quiet --now {SERVICE_UNIT}", warning=warning))
    if not mode_rootless and (stop := rootless.stop_daemon(facts, SERVICE_NAME, NAME)):
        changes.append(stop)  # after the restart: its container has left that daemon
    return changes


def _team_image(facts: HostFacts, mode_rootless: bool, files: dict[str, str], tag: str,
                image: ImageSpec) -> Change:
    """The team image in the daemon the service uses. Where the other daemon already holds
    this tag (a docker_mode switch), the image is copied across (`docker save | docker load`):
    the tag is the hash of its build inputs, so it is the image a build would make, without
    the build's minutes (its CUDA wheels' downloads, on a GPU host). Otherwise it is built."""
    own = "its own daemon, as sd35-api" if mode_rootless else "the system daemon"
    if tag in images_of(facts, not mode_rootless):
        save, load = (f"docker save {tag}", as_member(SERVICE_NAME, "docker load")) \
            if mode_rootless else (as_member(SERVICE_NAME, f"docker save {tag}"), "docker load")
        other = "the system daemon" if mode_rootless else "its own daemon"
        return run(NAME, f"copy the team image {tag} for the service from {other} into {own} "
                         "(the same build inputs: no build)", f"{save.strip()} | {load.strip()}")
    build = (as_member(SERVICE_NAME, build_script(files, tag, image, ROOTLESS_BUILD_ROOT))
             if mode_rootless else
             # A subshell: the script's own `exit` ends the build only.
             f"(\n{build_script(files, tag, image)})")
    return run(NAME, f"build the team image {tag} for the service in {own} "
                     f"({image.choice}; minutes the first time)", build)


def _leave_other_daemon(facts: HostFacts, mode_rootless: bool) -> tuple[str, ...]:
    """A docker_mode switch: stop the unit (the new definition is loaded, so its ExecStop
    talks to the new daemon; systemd still ends the old `docker run`), remove the container
    the old daemon may still hold (with the port), then start in the new daemon."""
    remove = f"docker rm --force {SERVICE_NAME} >/dev/null 2>&1 || true"
    daemon = facts.member_daemons.get(SERVICE_NAME)
    if mode_rootless:
        leave = remove  # the system daemon, as root
    elif daemon is not None and daemon.socket:
        leave = as_member(SERVICE_NAME, remove)
    else:
        leave = ":"
    return (f"systemctl stop {SERVICE_UNIT}", leave, f"systemctl start {SERVICE_UNIT}")


def _own_daemon(facts: HostFacts, inventory: Inventory, service: Service) -> list[Change]:
    """Rootless: the account's own daemon, made by the rootless step's functions as a member's
    is, with CDI on for its GPUs; its subordinate ranges come after every member's."""
    changes = rootless.subordinate_ids(facts, [*(m.name for m in inventory.members),
                                               SERVICE_NAME], (SERVICE_NAME,), NAME)
    changes += rootless.own_daemon(facts, SERVICE_NAME,
                                   engine_source(facts, inventory), NAME)
    if facts.path(ROOTLESS_STATE).kind != "directory":
        changes.append(run(NAME, f"{ROOTLESS_STATE}: the container's /state (its compile "
                                 "cache), made as the account",
                           as_member(SERVICE_NAME, f"mkdir -p -m 0700 {ROOTLESS_STATE}")))
    if runs_on_gpu(facts, service.gpus):
        blocker = rootless_gpu_blocker(facts, inventory)
        if blocker is not None:
            raise StepBlocked(f"the service's GPUs in its own daemon: {blocker}",
                              ROOTLESS_GPU_REMEDY)
        changes += nvidia.daemon_cdi(facts, SERVICE_NAME, restart=False, step=NAME)
    return changes


def _account(facts: HostFacts) -> list[Change]:
    """The service's own system account and state directory (no login, no password)."""
    changes = []
    uid, gid = service_ids(facts)
    if SERVICE_NAME not in facts.accounts:
        changes.append(run(
            NAME, f"system account {SERVICE_NAME} (uid {uid}, gid {gid}; not a member: no "
                  "login)",
            f"getent group {SERVICE_NAME} >/dev/null || groupadd --system --gid {gid} "
            f"{SERVICE_NAME}",
            f"useradd --system --uid {uid} --gid {gid} --home-dir {STATE_DIR} "
            f"--no-create-home --shell /usr/sbin/nologin {SERVICE_NAME}"))
    if facts.path(STATE_DIR).kind != "directory":
        changes.append(run(NAME, f"{STATE_DIR}: the service's home and compile cache",
                           f"install -d -o {uid} -g {gid} -m 0750 {shlex.quote(STATE_DIR)}"))
    return changes


def _removal(facts: HostFacts) -> list[Change]:
    if not facts.path(UNIT_FILE).exists:
        return []
    return [Change(NAME, f"no [service] in the inventory: stop, disable and remove {SERVICE_UNIT} "
                         f"(the {SERVICE_NAME} account, {STATE_DIR} and the image stay)",
                   (Run(f"systemctl disable --quiet --now {SERVICE_UNIT} || true"),
                    Run(f"rm -f {UNIT_FILE}"), Run("systemctl daemon-reload")))]


def proof(facts: HostFacts, inventory: Inventory) -> Proof | None:
    """Docker's health check passed: /health answered 200 (the model is loaded)."""
    if inventory.service is None:
        return None

    def check(stdout: str) -> str | None:
        lines = stdout.strip().splitlines()
        return None if "healthy" in lines else "; ".join(lines[-6:]) or "no answer"

    return Proof(health_wait(inventory), check)


STEP = Step(NAME, plan, paths, proof=proof, needs=("docker", "rootless", "hf-cache"))
