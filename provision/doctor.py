"""`provision doctor`: each known failure checked, with the evidence seen and the remedy.

Two round trips: the facts, and one probe script that acts as each member (`runuser`, so her
groups are read from /etc/group as a fresh login reads them) and looks inside the team image.
The verdicts are a pure function of both, tested on their own. Where nvidia-smi reads a GPU, a
third, `provision gpus`'s, warns of GPUs used outside an assignment or held by outsiders.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict, dataclass

from provision.connection import Connection
from provision.contract import (
    CDI_SPEC,
    CONTAINER_PORT,
    FP8_TENSOR_CORES,
    ROOTLESS_GPU_REMEDY,
    SERVICE_UNIT,
    gpu_proof,
    host_gpu_args,
    in_service_daemon,
    rootless_gpu_blocker,
    wanted_acl,
    without_fp8_tensor_cores,
)
from provision.errors import InventoryError
from provision.facts import (
    SECTION_FUNCTION,
    SUBGID,
    SUBUID,
    HostFacts,
    read_ranges,
    split_sections,
)
from provision.gather import gather_facts
from provision.gpus import (
    DEFAULT_IDLE_AFTER,
    NO_GPU,
    GpuReport,
    parse_duration,
    read_usage,
    unowned,
)
from provision.image import host_image, image_tag
from provision.inventory import SERVICE_NAME, Inventory, Member
from provision.render import render_workspace
from provision.templating import raw
from provision.versions import FLOAT8_TORCH, SCALED_MM_TORCH, ImageSpec

WATCHED = ("**/.git/objects/**",)
SYSTEM_SOCKET = "/var/run/docker.sock"
SETTINGS = ".vscode/settings.json"

# Python run inside the team image (its FP8 and xformers), and in the service's container.
IMAGE_PROBE = raw("host/image-probe.py")
SERVICE_HEALTH = raw("host/service-health.py")
RESTARTS_SINCE = "-24h"


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # pass | fail | warn | skip
    evidence: str
    remedy: str = ""

    def to_json(self) -> dict[str, str]:
        return asdict(self)


def probe_script(inventory: Inventory, members: tuple[Member, ...], image: str | None,
                 gpu_args: list[str]) -> str:
    """One script: per member docker access and cache writes, then the GPU and image probes
    (`gpu_args`: how a container gets every GPU of the host, `contract`; empty: no GPU)."""
    cache = shlex.quote(inventory.defaults.cache_dir)
    lines = [SECTION_FUNCTION]
    for member in members:
        name = member.name
        lines += [
            f"sec docker-{name}",
            # `docker version` fails when the daemon refuses her (`docker info` exits 0).
            _as(name, "docker version --format '{{.Server.Version}}'"),
            f"sec cache-{name}",
            f"runuser -u {name} -- sh -c 'f={cache}/.provision-doctor-$$; "
            f"touch \"$f\" && rm -f \"$f\"' 2>&1; echo \"exit=$?\"",
        ]
        if inventory.defaults.rootless:
            # Her docker CLI as she has it (her context), and the system socket named outright.
            lines += [f"sec own-daemon-{name}",
                      _as(name, "docker info --format '{{json .SecurityOptions}} "
                                "{{json .Runtimes}}'"),
                      f"sec system-socket-{name}",
                      _as(name, f"docker -H unix://{SYSTEM_SOCKET} version --format "
                                "'{{.Server.Version}}'"),
                      # Apart: Docker < 25 knows no such field and would fail the line above.
                      f"sec cdi-{name}",
                      _as(name, "docker info --format '{{json .CDISpecDirs}}'")]
    gpus = "".join(f"{shlex.quote(arg)} " for arg in gpu_args)
    # Rootless: the team image lives in the member's own daemon, not in the system one.
    docker = (f"runuser -u {members[0].name} -- docker" if inventory.defaults.rootless
              and members else "docker")
    if gpu_args:
        lines += ["sec gpu-container",
                  f"{gpu_proof(gpu_args, '-L', docker)} 2>&1; echo \"exit=$?\""]
    if image:
        lines += ["sec image",
                  f"if {docker} image inspect {shlex.quote(image)} >/dev/null 2>&1; then "
                  f"{docker} run --rm {gpus}{shlex.quote(image)} python3 -c "
                  f"{shlex.quote(IMAGE_PROBE)} 2>&1 | tail -n 1; else echo missing; fi"]
    if inventory.service is not None:
        # In the daemon its container runs in: the account's own one when rootless.
        health = in_service_daemon(inventory, f"docker exec {SERVICE_NAME} python -c "
                                          f"{shlex.quote(SERVICE_HEALTH)} {CONTAINER_PORT}")
        lines += [
            "sec service-unit", f"systemctl is-active {SERVICE_UNIT}",
            "sec service-health", f"{{ {health.rstrip()}\n}} 2>&1 | tail -n 1",
            # systemd logs each restart it schedules under the unit.
            "sec service-restarts",
            f"journalctl --unit {SERVICE_UNIT} --since {RESTARTS_SINCE} --output cat "
            "--no-pager 2>/dev/null | grep -c 'Scheduled restart job'",
        ]
    lines.append("sec end")
    return "\n".join(lines) + "\n"


def _as(name: str, command: str) -> str:
    """Shell: `command` as the member (runuser: her groups, her HOME and so her docker
    context), its exit status and the last line it printed."""
    return (f"out=$(runuser -u {name} -- {command} 2>&1); echo \"exit=$?\"; "
            "printf '%s\\n' \"$out\" | tail -n 1")


def decide_image(facts: HostFacts, inventory: Inventory) -> ImageSpec | InventoryError:
    """The team image for this host, decided once per doctor call: the probe looks inside it
    and the image check reports it, or the reason this host's driver cannot run it."""
    try:
        return host_image(facts, inventory)
    except InventoryError as exc:
        return exc


def verify_image(image: ImageSpec | InventoryError, inventory: Inventory,
                 member: Member) -> str | None:
    """The tag `verify` builds on this host (None when its driver cannot run the image: the
    image check says why)."""
    if isinstance(image, InventoryError):
        return None
    return image_tag(render_workspace(inventory, member, host_alias=None, target=None,
                                      cache_gid=None, image=image))


def _exit_ok(lines: list[str]) -> tuple[bool, str]:
    body = [ln for ln in lines if not ln.startswith("exit=")]
    return ("exit=0" in lines), " ".join(body)[:200]


def checks(facts: HostFacts, probe: str, inventory: Inventory, members: tuple[Member, ...],
           min_free_gb: float, workspace_settings: dict[str, str | None],
           image: ImageSpec | InventoryError) -> list[Check]:
    """Pure: facts + probe transcript (+ the image `decide_image` chose) → verdicts."""
    sections = split_sections(probe)
    defaults = inventory.defaults
    found: list[Check] = []
    found.append(_keepalive(facts, inventory))
    for member in members:
        ok, seen = _exit_ok(sections.get(f"docker-{member.name}", []))
        fix = ("provision host HOST --only rootless (her own daemon and context)"
               if defaults.rootless else f"provision host HOST --only users,docker (puts "
                                         f"{member.name} in the docker group; she logs in again)")
        found.append(Check(
            f"{member.name} reaches docker", "pass" if ok else "fail",
            f"docker version as {member.name}: {seen or 'no answer'}",
            "" if ok else fix if facts.docker.installed else
            "Docker is not installed: provision host HOST --only docker"))
        if defaults.rootless:
            found.extend(_rootless(facts, sections, inventory, member))
        ok, seen = _exit_ok(sections.get(f"cache-{member.name}", []))
        link = facts.member_caches.get(member.name)
        linked = link is not None and link.state == "symlink" and link.detail == defaults.cache_dir
        found.append(Check(
            f"{member.name}'s cache", "pass" if ok and linked else "fail",
            f"write in {defaults.cache_dir}: {'ok' if ok else seen}; ~/.cache/huggingface: "
            f"{link.state + ' ' + link.detail if link else 'no account'}",
            "" if ok and linked else "provision host HOST --only hf-cache"))
        settings = workspace_settings.get(member.name)
        watched = settings is not None and all(w in settings for w in WATCHED)
        found.append(Check(
            f"{member.name}'s watcher excludes", "pass" if watched else "fail",
            f"{SETTINGS}: " + ("excludes .git/objects" if watched else
                               "missing" if settings is None else "no .git/objects exclude"),
            "" if watched else "provision host HOST --only workspace (or render it again)"))
    if defaults.rootless:
        found.append(_subordinate_ranges(facts, members))
    found.append(_shared_cache(facts, inventory))
    cache = facts.cache
    found.append(Check(
        "no token in the shared cache", "fail" if cache.token_files else "pass",
        ", ".join(cache.token_files) or "no token file",
        "move it to the owner's ~/.config/huggingface/token (HF_TOKEN_PATH) and revoke it: "
        "every member could read it" if cache.token_files else ""))
    free_gb = facts.disk.free_bytes / 1e9 if facts.disk else 0.0
    found.append(Check(
        "cache disk space", "pass" if free_gb >= min_free_gb else "fail",
        f"{free_gb:.1f} GB free on {facts.disk.path if facts.disk else '?'} "
        f"(threshold {min_free_gb:g} GB)",
        "" if free_gb >= min_free_gb else "free space there, or move cache_dir to a larger "
                                          "volume (SD3.5 Large needs about 30 GB)"))
    found.extend(_gpu_checks(facts, sections))
    found.append(_image_vs_driver(facts, image))
    found.extend(_image_checks(facts, sections))
    if inventory.service is not None:
        found.extend(_service_checks(sections))
    return found


def _service_checks(sections: dict[str, list[str]]) -> list[Check]:
    """[service]: its unit runs, its /health says ready, and systemd has not been restarting
    it (a crash loop shows as restarts, not as a unit that is down)."""
    logs = f"journalctl -u {SERVICE_NAME}"
    state = " ".join(sections.get("service-unit", [])) or "unknown"
    active = state == "active"
    found = [Check("service unit", "pass" if active else "fail", f"{SERVICE_UNIT}: {state}",
                   "" if active else f"see {logs}; provision host HOST --only service")]
    text = " ".join(sections.get("service-health", []))
    try:
        health = json.loads(text)
        status = health["status"]
    except (json.JSONDecodeError, KeyError, TypeError):
        found.append(Check("service health", "fail", text[:200] or "no answer",
                           f"see {logs}"))
    else:
        seen = (f"{status}: {health.get('model')} on {health.get('gpu') or health.get('device')}"
                f", --fp8 {health.get('fp8_applied')}, compiled {health.get('compiled')}"
                if status == "ready" else f"{status}: {health.get('error') or 'loading'}")
        verdict = {"ready": "pass", "loading": "warn"}.get(status, "fail")
        found.append(Check("service health", verdict, seen, "" if verdict == "pass" else
                           f"wait for the model to load, or see {logs}" if status == "loading"
                           else f"fix the model in [service], then see {logs}"))
    count = " ".join(sections.get("service-restarts", [])).strip()
    restarts = int(count) if count.isdigit() else 0
    found.append(Check("service restarts", "pass" if restarts == 0 else "warn",
                       f"{restarts} restart(s) by systemd since {RESTARTS_SINCE}",
                       "" if restarts == 0 else f"see why in {logs} --since {RESTARTS_SINCE}"))
    return found


def _rootless(facts: HostFacts, sections: dict[str, list[str]], inventory: Inventory,
              member: Member) -> list[Check]:
    """Rootless mode: her own daemon answers (as rootless), the system socket refuses her,
    lingering keeps her daemon up, and on a GPU host her daemon reads the CDI spec directory
    (where her Docker can: the nvidia step's rule; "GPU inside a container" runs one)."""
    name = member.name
    fix = "provision host HOST --only rootless"
    ok, seen = _exit_ok(sections.get(f"own-daemon-{name}", []))
    own = ok and "name=rootless" in seen
    found = [Check(f"{name}'s own daemon", "pass" if own else "fail",
                   f"docker info as {name}: {seen or 'no answer'}", "" if own else fix)]
    reached, seen = _exit_ok(sections.get(f"system-socket-{name}", []))
    found.append(Check(
        f"{name} is refused the system socket", "fail" if reached else "pass",
        f"docker -H unix://{SYSTEM_SOCKET} as {name}: {seen or 'no answer'}",
        f"provision host HOST --only users (takes {name} out of the docker group; she logs "
        "in again)" if reached else ""))
    daemon = facts.member_daemons.get(name)
    lingering = daemon is not None and daemon.linger
    found.append(Check(f"{name}'s lingering", "pass" if lingering else "fail",
                       f"/var/lib/systemd/linger/{name} "
                       f"{'present' if lingering else 'missing'}",
                       "" if lingering else fix))
    found.append(_rootless_gpu(facts, sections, inventory, name))
    return found


def _rootless_gpu(facts: HostFacts, sections: dict[str, list[str]], inventory: Inventory,
                  name: str) -> Check:
    """Her daemon has CDI on and reads the spec directory; where her Docker cannot, the
    check fails with the two ways out (never a silent skip)."""
    check = f"{name}'s GPU runtime"
    if not facts.nvidia.has_gpu:
        return Check(check, "skip", "no NVIDIA GPU on this host")
    blocker = rootless_gpu_blocker(facts, inventory)
    if blocker is not None:
        return Check(check, "fail", blocker, ROOTLESS_GPU_REMEDY)
    spec_dir = CDI_SPEC.rsplit("/", 1)[0]
    ok, seen = _exit_ok(sections.get(f"cdi-{name}", []))
    reads = ok and f'"{spec_dir}"' in seen
    return Check(check, "pass" if reads else "fail",
                 f"CDI spec directories of her daemon: {seen or 'none (CDI off)'}",
                 "" if reads else "provision host HOST --only nvidia (turns CDI on in her "
                                  "daemon and restarts it)")



def _subordinate_ranges(facts: HostFacts, members: tuple[Member, ...]) -> Check:
    """Every member has subordinate uids and gids, and none overlaps another account's."""
    problems, given = [], []
    for path in (SUBUID, SUBGID):
        ranges = read_ranges(facts.text(path))
        for member in members:
            mine = [r for r in ranges if r.owner == member.name]
            if not mine:
                problems.append(f"{member.name} has none in {path}")
            problems += [f"{path}: {r.owner} {r} overlaps {o.owner} {o}" for r in mine
                         for o in ranges if o.owner != r.owner and r.overlaps(o)]
            given += [f"{member.name} {r}" for r in mine if path == SUBUID]
    return Check("subordinate ranges", "fail" if problems else "pass",
                 "; ".join(problems or given) or "no members",
                 "provision host HOST --only rootless (a range given is never changed: an "
                 "overlap is fixed by hand)" if problems else "")


def _keepalive(facts: HostFacts, inventory: Inventory) -> Check:
    if "sshd" not in facts.tools:
        return Check("ssh keepalive", "skip", "no sshd on this host (openssh-server is not "
                     "installed): nobody logs in over SSH")
    keepalive = (facts.sshd.client_alive_interval, facts.sshd.client_alive_count_max)
    wanted = (inventory.defaults.keepalive_interval, inventory.defaults.keepalive_count_max)
    return Check(
        "ssh keepalive", "pass" if keepalive == wanted else "fail",
        f"sshd -T: ClientAliveInterval {keepalive[0]}, ClientAliveCountMax {keepalive[1]}",
        "" if keepalive == wanted else "provision host HOST --only keepalive")


def _shared_cache(facts: HostFacts, inventory: Inventory) -> Check:
    """Its owner and mode, then its default ACLs (without them a member's new files may not
    stay writable for the others: a warning, since the setgid directory still shares them)."""
    cache, group = facts.cache, inventory.defaults.cache_group
    where = f"{cache.path}: " + (f"{cache.owner}:{cache.group} {cache.mode}" if cache.exists
                                 else "missing")
    if not cache.exists or (cache.group, cache.mode) != (group, "2775"):
        return Check("shared cache", "fail", where, "provision host HOST --only hf-cache")
    if not wanted_acl(group) <= set(cache.acl):
        setfacl = "" if "setfacl" in facts.tools else " (setfacl is not installed: apt-get " \
                                                      "install acl)"
        return Check("shared cache", "warn", f"{where}, no default ACLs",
                     f"provision host HOST --only hf-cache{setfacl}")
    return Check("shared cache", "pass", f"{where}, default ACLs for {group}")


def _image_vs_driver(facts: HostFacts, image: ImageSpec | InventoryError) -> Check:
    """The team image's CUDA (flavour and base) against this host's driver."""
    name = "image's CUDA vs the driver"
    if facts.nvidia.driver is None:
        return Check(name, "skip", "no NVIDIA driver answers on this host")
    if isinstance(image, InventoryError):
        return Check(name, "fail", image.problem, image.remedy)
    return Check(name, "pass", image.choice)


def _gpu_checks(facts: HostFacts, sections: dict[str, list[str]]) -> list[Check]:
    if not facts.nvidia.has_gpu:
        reason = "no NVIDIA GPU on this host"
        return [Check(name, "skip", reason) for name in
                ("nvidia runtime", "GPU inside a container", "compute capability vs FP8")]
    registered = "nvidia" in facts.docker.runtimes
    ok, seen = _exit_ok(sections.get("gpu-container", []))
    slow = without_fp8_tensor_cores(facts.nvidia.gpus)
    return [
        Check("nvidia runtime", "pass" if registered else "fail",
              f"docker info runtimes: {', '.join(facts.docker.runtimes) or 'none'}",
              "" if registered else "provision host HOST --only nvidia"),
        Check("GPU inside a container", "pass" if ok else "fail", seen,
              "" if ok else "provision host HOST --only nvidia; after 'systemctl daemon-reload' "
                            "with the systemd cgroup driver, restart the container"),
        Check("compute capability vs FP8", "warn" if slow else "pass",
              ", ".join(f"GPU {g.index} {g.name}: {g.compute_capability}"
                        for g in facts.nvidia.gpus),
              f"FP8 runs as storage only below {FP8_TENSOR_CORES}: use --fp8 storage there"
              if slow else ""),
    ]


def _image_checks(facts: HostFacts, sections: dict[str, list[str]]) -> list[Check]:
    lines = sections.get("image")
    if lines is None or lines == ["missing"]:
        return [Check("image: torch float8", "skip",
                      "the team image is not built on this host yet",
                      "provision verify HOST builds it")]
    try:
        report = json.loads(lines[-1])
    except (json.JSONDecodeError, IndexError):
        return [Check("image: torch float8", "fail", " ".join(lines)[:200],
                      "rebuild the image: provision verify HOST")]
    torch_ok = report.get("float8") is True
    found = [Check(
        "image: torch float8", "pass" if torch_ok else "fail",
        f"torch {report.get('torch', report.get('torch_error', '?'))}: "
        f"float8_e4m3fn {'present' if torch_ok else 'missing'}",
        "" if torch_ok else f"torch >= {FLOAT8_TORCH} has float8 (>= {SCALED_MM_TORCH} for "
                            "rowwise _scaled_mm): fix the [image] pins and rebuild")]
    if facts.nvidia.gpus and torch_ok:
        scaled = report.get("scaled_mm")
        found.append(Check("image: _scaled_mm on this GPU", "pass" if scaled == "ok" else "fail",
                           str(scaled), "" if scaled == "ok" else
                           f"needs compute capability >= {FP8_TENSOR_CORES} and torch >= "
                           f"{SCALED_MM_TORCH}"))
    if "xformers_error" in report:
        found.append(Check("image: xformers", "fail", report["xformers_error"],
                           "xformers is built for one torch: pin the pair from the version "
                           "table, or drop xformers"))
    elif report.get("xformers"):
        found.append(Check("image: xformers", "pass", f"xformers {report['xformers']}"))
    return found


def run_doctor(conn: Connection, inventory: Inventory, members: tuple[Member, ...],
               image: str | None, min_free_gb: float) -> list[Check]:
    """`image`: the image to look inside; None: the one `verify` builds for this host."""
    workspace = inventory.defaults.workspace_dir
    settings_paths = {m.name: f"~{m.name}/{workspace}/{SETTINGS}" for m in members}
    facts = gather_facts(conn, inventory, (*settings_paths.values(), SUBUID, SUBGID))
    decided = decide_image(facts, inventory)
    if image is None and members:
        image = verify_image(decided, inventory, members[0])
    gpu_args = host_gpu_args(facts, "all", rootless=inventory.defaults.rootless)
    probe = conn.run(probe_script(inventory, members, image, gpu_args),
                     what="doctor probe", check=False)
    settings = {name: facts.text(path) for name, path in settings_paths.items()}
    found = checks(facts, probe.stdout, inventory, members, min_free_gb, settings, decided)
    # Only where nvidia-smi answers: a GPU it cannot read is the GPU checks' failure.
    usage = read_usage(conn, inventory, conn.name, parse_duration(DEFAULT_IDLE_AFTER)
                       ) if facts.nvidia.gpus else None
    return [*found, *gpu_use_checks(usage, members)]


def gpu_use_checks(usage: GpuReport | None, members: tuple[Member, ...]) -> list[Check]:
    """Warnings, not failures: a member on GPUs outside her `gpus`, and GPU memory held by a
    process neither a member's nor the service's (`provision gpus` names them all)."""
    if usage is None or usage.no_gpu:
        return [Check(name, "skip", f"{NO_GPU} that nvidia-smi reads") for name in
                ("GPUs within assignments", "GPU memory held by the team")]
    names = {m.name for m in members}
    outside = [a.line for a in usage.assignments if a.member in names and a.outside]
    strays = [f"GPU {p.gpu}: pid {p.pid} ({p.comm}) of {p.owner}, {p.memory_mib} MiB"
              for p in unowned(usage)]
    return [
        Check("GPUs within assignments", "warn" if outside else "pass",
              "; ".join(outside) or "every member on her own GPUs",
              "ask her to move to her GPUs (CUDA_VISIBLE_DEVICES), or change her gpus in the "
              "inventory and converge" if outside else ""),
        Check("GPU memory held by the team", "warn" if strays else "pass",
              "; ".join(strays) or "every GPU process is a member's or the service's",
              "see provision gpus HOST; stop it, or add its owner to the team" if strays
              else ""),
    ]
