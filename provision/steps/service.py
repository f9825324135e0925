"""service: the team's SD3.5 FP8 generation API, run by systemd in the team image.

With a `[service]` table in the inventory each host gets:
- a system account `sd35-api` (not a member: no login, no home of its own beyond its state
  directory), whose ids the container runs as, with the cache group added so it can read the
  shared cache (mounted read-only);
- the API (`templates/service/sd35_api.py`, with the workspace's `inference.py` beside it:
  one pipeline code) in /opt/sd35-api, mounted read-only into the container;
- the team image, built on the host as `verify` builds it (same Dockerfile and pins, rendered
  for the service account; tagged by their hash, so it is built once);
- an environment file and a systemd unit with `Restart=always`: the container runs in the
  foreground of the unit, so a server killed by anything comes back, and its output is the
  unit's journal (`journalctl -u sd35-api`). Docker's health check calls /health.

The unit restarts only when its definition changed (unit, environment, API files or image);
an unchanged inventory leaves a running service alone, and a stopped one is only started.
The port is published on `bind` (loopback unless the inventory says otherwise): members reach
it through their SSH connection. Docker here is the system daemon (the docker step's).

A `[service]` table removed from the inventory stops and disables the unit and removes it; the
account, its state (the compile cache) and the image stay.
"""

from __future__ import annotations

import shlex

from provision.changes import Change, Run, WriteFile, run
from provision.facts import HostFacts
from provision.image import build_script, image_tag
from provision.inventory import SERVICE_NAME, Inventory, Member, Service
from provision.models import debug_model
from provision.render import INFERENCE, SHM_SIZE, gpu_run_args, render_workspace
from provision.steps import Proof, Step, StepBlocked
from provision.templating import raw, render
from provision.versions import host_image

NAME = "service"
UNIT = f"{SERVICE_NAME}.service"
UNIT_FILE = f"/etc/systemd/system/{UNIT}"
ENV_FILE = f"/etc/{SERVICE_NAME}/env"
APP_DIR = f"/opt/{SERVICE_NAME}"
STATE_DIR = f"/var/lib/{SERVICE_NAME}"
CONTAINER_PORT = 8000
# The API and what it imports, as they go to APP_DIR (template path → file name there).
APP_FILES = {"service/sd35_api.py": "sd35_api.py", "service/healthcheck.py": "healthcheck.py",
             f"workspace/{INFERENCE}": INFERENCE}
# The first system id (counting down, as useradd --system does) free as both uid and gid.
SYSTEM_IDS = range(999, 99, -1)
# Up to 30 minutes for the first health: a cold FP8 compile takes minutes, real weights more.
HEALTH_WAIT = f"""for _ in $(seq 360); do
  health=$(docker inspect --format '{{{{.State.Health.Status}}}}' {SERVICE_NAME} 2>/dev/null)
  [ "$health" = healthy ] && {{ echo healthy; exit 0; }}
  systemctl is-failed --quiet {UNIT} && break
  sleep 5
done
echo "health: ${{health:-no container}}"
journalctl --unit {UNIT} --lines 5 --no-pager --output cat
"""


def paths(inventory: Inventory) -> tuple[str, ...]:
    # Asked for without [service] too: a service removed from the inventory is stopped.
    return (UNIT_FILE, ENV_FILE, STATE_DIR,
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


def image_files(facts: HostFacts, inventory: Inventory, service: Service) -> dict[str, str]:
    """The team image's build files, rendered for the service account on this host."""
    group = facts.groups.get(inventory.defaults.cache_group)
    return render_workspace(inventory, Member(SERVICE_NAME, (), gpus=service.gpus),
                            host_alias=None, target=None, cache_gid=group.gid if group else None,
                            image=host_image(facts, inventory), facts=facts)


def publish(service: Service) -> str:
    """docker's --publish value: the port on `bind` only (an IPv6 address in brackets)."""
    bind = f"[{service.bind}]" if ":" in service.bind else service.bind
    return f"{bind}:{service.port}:{CONTAINER_PORT}"


def unit_text(facts: HostFacts, inventory: Inventory, service: Service, tag: str) -> str:
    uid, gid = service_ids(facts)
    group = facts.groups.get(inventory.defaults.cache_group)
    if group is None:
        raise StepBlocked(f"the cache group {inventory.defaults.cache_group} does not exist",
                          "the users step creates it: converge without --skip users")
    on_gpu = bool(facts.nvidia.gpus) and service.gpus != "none"
    # systemd keeps a single-quoted word whole: --gpus="device=1,2" must reach docker as is.
    # The unit runs the container in the system daemon in either docker_mode (root's unit, no
    # member's daemon), so its GPUs come through the nvidia runtime, not a member's CDI.
    gpu_args = [f"'{a}'" if '"' in a else a
                for a in gpu_run_args(service.gpus, rootless=False)] if on_gpu else []
    return render("host/sd35-api.service.j2", name=SERVICE_NAME, image=tag, uid=uid, gid=gid,
                  cache_gid=group.gid, env_file=ENV_FILE, publish=publish(service),
                  bind=service.bind, cache_dir=inventory.defaults.cache_dir, app_dir=APP_DIR,
                  state_dir=STATE_DIR, shm_size=SHM_SIZE, gpu_args=gpu_args)


def plan(facts: HostFacts, inventory: Inventory) -> list[Change]:
    service = inventory.service
    if service is None:
        return _removal(facts)
    if not facts.docker.installed:
        raise StepBlocked("Docker is not installed", "the docker step installs it")
    changes = _account(facts)
    files = image_files(facts, inventory, service)
    tag = image_tag(files)
    env = render("host/sd35-api.env.j2", name=SERVICE_NAME, model=chosen_model(facts, service),
                 fp8=service.fp8, max_queue=service.max_queue, container_port=CONTAINER_PORT)
    wanted = {**{f"{APP_DIR}/{name}": raw(template) for template, name in APP_FILES.items()},
              ENV_FILE: env, UNIT_FILE: unit_text(facts, inventory, service, tag)}
    definition: list[Change] = []
    for path, content in wanted.items():
        current = facts.text(path)
        if current != content:
            verb = "write" if current is None else "update"
            definition.append(Change(NAME, f"{verb} {path}", (WriteFile(path, content, current),)))
    if tag not in facts.images:
        definition.append(run(NAME, f"build the team image {tag} for the service "
                                    f"({host_image(facts, inventory).choice}; minutes the "
                                    "first time)",
                                 # A subshell: the script's own `exit` ends the build only.
                                 f"(\n{build_script(files, tag, host_image(facts, inventory))})"))
    changes += definition
    state = facts.units.get(UNIT)
    where = f"{service.bind}:{service.port}"
    if definition:
        changes.append(run(NAME, f"(re)start {UNIT} on {where}: its definition changed",
                           "systemctl daemon-reload", f"systemctl enable --quiet {UNIT}",
                           f"systemctl restart {UNIT}"))
    elif state is None or state.active != "active" or state.enabled != "enabled":
        changes.append(run(NAME, f"start {UNIT} on {where} (it was "
                                 f"{state.active if state else 'unknown'})",
                           f"systemctl enable --quiet --now {UNIT}"))
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
        changes.append(run(NAME, f"{STATE_DIR}: the service's compile cache",
                           f"install -d -o {uid} -g {gid} -m 0750 {shlex.quote(STATE_DIR)}"))
    return changes


def _removal(facts: HostFacts) -> list[Change]:
    if not facts.path(UNIT_FILE).exists:
        return []
    return [Change(NAME, f"no [service] in the inventory: stop, disable and remove {UNIT} "
                         f"(the {SERVICE_NAME} account, {STATE_DIR} and the image stay)",
                   (Run(f"systemctl disable --quiet --now {UNIT} || true"),
                    Run(f"rm -f {UNIT_FILE}"), Run("systemctl daemon-reload")))]


def proof(facts: HostFacts, inventory: Inventory) -> Proof | None:
    """Docker's health check passed: /health answered 200 (the model is loaded)."""
    if inventory.service is None:
        return None

    def check(stdout: str) -> str | None:
        lines = stdout.strip().splitlines()
        return None if "healthy" in lines else "; ".join(lines[-6:]) or "no answer"

    return Proof(HEALTH_WAIT, check)


STEP = Step(NAME, plan, paths, proof=proof, needs=("docker", "hf-cache"))
