"""`provision verify`: build the member's dev-container image on the host, run inference.py in
it (on her GPUs when the host has any) in FP8 and in bf16, and report what it did.

Round trips, after the facts the command read: one script that uploads the build context and
builds (streamed, for progress), then one that runs both generations and reports them as one
JSON document (their metrics, how alike their images are), then one that reads the PNG back.
The image is tagged by the hash of what it is built from, so a second verify (or doctor) finds
it; the Inductor compile cache persists beside the runs.

`verify --service` instead calls the host's generation service ([service]) as a member does:
HTTP through the SSH connection (a direct-tcpip channel to where it listens), /health until
ready, then one /generate; the PNG and the service's metrics come back.
"""

from __future__ import annotations

import base64
import http.client
import json
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provision import service_client
from provision.changes import as_member
from provision.connection import Connection
from provision.contract import (
    HF_MOUNT,
    HF_OFFLINE,
    INDUCTOR_CACHE,
    SHM_SIZE,
    account_args,
    host_gpu_args,
    reach_address,
    runs_on_gpu,
)
from provision.errors import InventoryError, ProvisionError, RemoteCommandFailed
from provision.facts import HostFacts
from provision.image import ROOT, build_script, image_tag, upload_script
from provision.inventory import Inventory, Member
from provision.models import cached_weights, debug_model
from provision.progress import QUIET, Task, follow_log
from provision.render import GENERATION, INFERENCE, render_for_host
from provision.versions import ImageSpec

GPU_DEFAULTS = {"height": 1024, "width": 1024, "steps": 28}
CPU_DEFAULTS = {"model": "tiny", "height": 128, "width": 128, "steps": 4}

# Runs in the image after both generations: their metrics and how alike their images are
# (pixels, not latents), as the one JSON document the run script prints.
REPORT = """
import json, sys
import numpy as np
from PIL import Image
fp8 = sys.argv[1]
runs = {mode: json.load(open(f"{mode}.json")) for mode in dict.fromkeys((fp8, "off"))}
a, b = (np.asarray(Image.open(f"{mode}.png").convert("RGB"), dtype=np.float64)
        for mode in (fp8, "off"))
mse = float(((a - b) ** 2).mean())
psnr = float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)
x, y = (a - 127.5).ravel(), (b - 127.5).ravel()
cosine = float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y) or 1.0))
print(json.dumps({"runs": runs, "compare": {"psnr_db": round(psnr, 2),
                                            "cosine": round(cosine, 6)}}))
"""


@dataclass
class VerifyReport:
    host: str
    member: str
    image: str
    built: bool
    device_note: str
    image_choice: str  # the driver, the wheel flavour and the base it chose
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    comparison: dict[str, Any] = field(default_factory=dict)
    png: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def choose_model(facts: HostFacts, member: Member, requested: str | None, on_gpu: bool) -> str:
    """On her GPU by default what her launch.json debugs (`models.debug_model`); a size asked
    for is the real SD3.5 weights when the shared cache has them, else that architecture."""
    if requested is None:
        return debug_model(member, facts).model if on_gpu else CPU_DEFAULTS["model"]
    return cached_weights(requested, facts.cache_models) or requested


@dataclass(frozen=True)
class Place:
    """Where verify works on the host and as whom. Rootful: as root in ROOT, the system daemon.
    Rootless: as the member (her daemon holds her images), in her own cache directory."""

    root: str
    member: str | None = None  # run as her (rootless)

    def script(self, text: str) -> str:
        return as_member(self.member, text) if self.member else text


def place_of(facts: HostFacts, inventory: Inventory, member: Member) -> Place:
    if inventory.defaults.rootless:
        return Place(f"{facts.accounts[member.name].home}/.cache/provision", member.name)
    return Place(ROOT)


def run_script(inventory: Inventory, member: Member, facts: HostFacts, files: dict[str, str],
               tag: str, fp8: str, size: dict[str, Any], place: Place) -> str:
    """Both generations (FP8 as asked, then bf16) in the image, then their comparison, the
    container run as her (`contract.account_args`)."""
    account = facts.accounts[member.name]
    work = f"{place.root}/verify/{member.name}"
    cache = shlex.quote(inventory.defaults.cache_dir)
    cache_gid = facts.groups[inventory.defaults.cache_group].gid
    gpus = " ".join(shlex.quote(a) for a in host_gpu_args(facts, member.gpus,
                                                           rootless=bool(place.member)))
    user = account_args(account.uid, account.gid, cache_gid, rootless=bool(place.member))
    # Her uid has no passwd entry in the image: USER answers getpass.getuser(), which
    # compiling on the GPU calls (KeyError 'getpwuid(): uid not found' on the lent H200).
    user += [] if place.member else ["-e", f"USER={member.name}"]
    docker = (f"docker run --rm {gpus} --shm-size={SHM_SIZE} {' '.join(user)} "
              f"-e HOME=/work -e {HF_OFFLINE} "
              f"-e HF_HOME={HF_MOUNT} -e TORCHINDUCTOR_CACHE_DIR=/work/{INDUCTOR_CACHE} "
              f"-v {cache}:{HF_MOUNT} -v {work}:/work -w /work {tag}")
    args = (f"--model {shlex.quote(size['model'])} --height {size['height']} "
            f"--width {size['width']} --steps {size['steps']} --seed 0")
    script = (f"mkdir -p {work}/.cache\nrm -f {work}/*.png {work}/*.json\n"
              + upload_script({path: files[path] for path in GENERATION}, f"{work}.src")
              + f"cp -R {work}.src/. {work}/\nrm -rf {work}.src\n"
              + ("" if place.member else f"chown -R {account.uid}:{account.gid} {work}\n"))
    for mode in dict.fromkeys((fp8, "off")):
        # The FP8 run compiles (what dq, the Run configuration and the service do), on a CPU
        # too: the image must hold what Inductor needs (a C/C++ compiler, Python's headers).
        compile_flag = " --compile" if mode == fp8 else ""
        # Its stderr (progress, the denoising steps) goes to the log, which streams back as
        # it grows (`follow_log`); its stdout is not wanted.
        generate = (f"{docker} python {INFERENCE} {args} --fp8 {mode}{compile_flag} "
                    f"--output {mode}.png --metrics {mode}.json >/dev/null")
        script += (follow_log(generate, f"{work}/{mode}.log", to_stderr=True).rstrip()
                   + f" || {{ tail -n 5 {work}/{mode}.log >&2; exit 4; }}\n")
    return script + f"{docker} python -c {shlex.quote(REPORT)} {fp8}\n"


def verify(conn: Connection, inventory: Inventory, member: Member, facts: HostFacts,
           image: ImageSpec, *, model: str | None, fp8: str, out: Path,
           progress: Task = QUIET) -> VerifyReport:
    """`facts` were read from the host and `image` decided from them once, by the caller
    (`image.host_image`, which refuses a driver that cannot run it before any build)."""
    if not facts.docker.installed:
        raise ProvisionError(f"{conn.name}: Docker is not installed",
                             f"run 'provision host {conn.name}' first")
    if member.name not in facts.accounts:
        raise InventoryError(f"{conn.name}: {member.name} has no account there yet",
                             f"run 'provision host {conn.name}' first")
    on_gpu = runs_on_gpu(facts, member.gpus)
    size = dict(GPU_DEFAULTS if on_gpu else CPU_DEFAULTS)
    size["model"] = choose_model(facts, member, model, on_gpu)
    note = (f"GPU: {', '.join(g.name for g in facts.nvidia.gpus)}" if on_gpu else
            f"CPU: no NVIDIA GPU {'for ' + member.name if facts.nvidia.gpus else 'on this host'}"
            f"; the {size['model']} model at {size['height']}x{size['width']}, "
            f"{size['steps']} steps")
    files = render_for_host(inventory, member, facts, image, host_alias=conn.name, target=None)
    tag = image_tag(files)
    place = place_of(facts, inventory, member)
    progress.status(f"building {tag} ({image.choice}; the first build downloads and installs "
                    "torch: minutes)")
    built = conn.run(place.script(build_script(files, tag, image, place.root)),
                     what="image build", timeout=3600, on_line=progress.output)
    report = VerifyReport(conn.name, member.name, tag, "cached" not in built.stdout, note,
                          image.choice)
    progress.status(f"generating ({size['model']}, --fp8 {fp8}, then bf16 to compare)")
    result = conn.run(place.script(run_script(inventory, member, facts, files, tag, fp8, size,
                                              place)),
                      what="generation", timeout=3600, check=False, on_line=progress.output)
    logs = f"see {place.root}/verify/{member.name}/*.log on the host"
    if not result.ok:
        raise RemoteCommandFailed(f"{conn.name}: inference.py failed in {tag}: {result.tail()}",
                                  logs, detail=result.output())
    report.runs, comparison = read_runs(result.stdout, f"{conn.name}: {logs}")
    require_compiled(report.runs[fp8], f"{conn.name}: {logs}")
    report.comparison = {**comparison, **_ratios(report.runs, fp8)}
    report.png = str(_fetch_png(conn, member, fp8, out, place))
    return report


def read_runs(stdout: str, logs: str) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """The run script's report (`REPORT`) → (metrics per FP8 mode, image comparison). Output
    cut short or garbled (a killed container, a full disk) is one clear error, never a
    KeyError."""
    try:
        report = json.loads(stdout)
    except ValueError as exc:
        reason = "no report" if not stdout.strip() else f"the report is not JSON: {exc}"
    else:
        missing = [key for key in ("runs", "compare")
                   if not isinstance(report, dict) or not isinstance(report.get(key), dict)]
        if not missing:
            return report["runs"], report["compare"]
        reason = f"no {missing[0]} in the report"
    raise RemoteCommandFailed(f"the generation's report could not be read ({reason})", logs,
                              detail=stdout)


def require_compiled(run: dict[str, Any], logs: str) -> None:
    """The FP8 run was asked to compile: one that ran eager instead proves nothing about the
    compiled path the Run configuration and the service take, so verify fails, loudly."""
    if run.get("compiled") is not True:
        raise RemoteCommandFailed(
            f"the --fp8 {run.get('fp8_applied')} run was not compiled "
            f"({run.get('compile_skipped_reason') or 'inference.py reports compiled: false'})",
            logs)


def _ratios(runs: dict[str, dict[str, Any]], fp8: str) -> dict[str, Any]:
    fast, base = runs.get(fp8, {}), runs.get("off", {})

    def ratio(key: str, a: dict[str, Any], b: dict[str, Any]) -> float | None:
        return round(a[key] / b[key], 3) if a.get(key) and b.get(key) else None

    return {"speedup_vs_bf16": ratio("step_ms_mean", base, fast),
            "peak_memory_ratio": ratio("peak_mem_gib", fast, base),
            "weights_ratio": ratio("transformer_weights_gib", fast, base)}


def _fetch_png(conn: Connection, member: Member, fp8: str, out: Path, place: Place) -> Path:
    data = conn.run(place.script(f"base64 -w0 {place.root}/verify/{member.name}/{fp8}.png"),
                    what="fetch PNG")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"verify-{conn.name}-{member.name}-{fp8}.png"
    path.write_bytes(base64.b64decode(data.stdout))
    return path


# What `verify --service` asks the service for: SD3.5's own size on a GPU, a quick one on a CPU.
SERVICE_GPU_REQUEST = {"height": 1024, "width": 1024, "steps": 28}
SERVICE_CPU_REQUEST = {"height": 128, "width": 128, "steps": 4}
SERVICE_LOAD_WAIT = 1800  # seconds: real weights and a cold FP8 compile take minutes


@dataclass
class ServiceReport:
    host: str
    address: str  # where the service listens on the host, reached through the SSH connection
    health: dict[str, Any]
    request: dict[str, Any]
    metrics: dict[str, Any]
    seconds: float  # the request's wall time through the forward, queue included
    png: str

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def service_call(conn: Connection, address: str, port: int, method: str, path: str,
                 body: dict[str, Any] | None = None,
                 timeout: float = 600) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request to the service through the host connection (an `ssh -L` channel)."""
    client = http.client.HTTPConnection(address, port, timeout=timeout)
    client.sock = conn.tunnel(address, port)
    client.sock.settimeout(timeout)
    return service_client.send(client, method, path, body)


def verify_service(conn: Connection, inventory: Inventory, *, out: Path,
                   progress: Task = QUIET) -> ServiceReport:
    """Call the host's generation service as a member does, through the SSH connection: wait
    until /health says ready, generate one image, keep the PNG and the metrics."""
    service = inventory.service
    if service is None:
        raise InventoryError(f"{inventory.path}: no [service] table",
                             "add one and run 'provision host HOST' first")
    address = reach_address(service.bind)
    where = f"{address}:{service.port}"
    deadline = time.monotonic() + SERVICE_LOAD_WAIT
    progress.status(f"waiting for the service on {where} to be ready")
    while True:
        status, _, body = service_call(conn, address, service.port, "GET", "/health", timeout=30)
        health = _json_or_text(body)
        if status == 200:
            break
        if health.get("status") != "loading" or time.monotonic() > deadline:
            raise RemoteCommandFailed(
                f"{conn.name}: the service on {where} is not ready ({status}: "
                f"{health.get('error') or health.get('status') or body[:200]!r})",
                f"see 'provision doctor {conn.name}' and journalctl -u sd35-api on the host")
        progress.output(f"/health: {health.get('status')}")
        time.sleep(5)
    request = {"prompt": "a photo of an astronaut riding a horse on the moon", "seed": 0,
               **(SERVICE_GPU_REQUEST if health.get("device", "").startswith("cuda")
                  else SERVICE_CPU_REQUEST)}
    progress.status(f"generating {request['height']}x{request['width']}, "
                    f"{request['steps']} steps")
    started = time.monotonic()
    status, headers, body = service_call(conn, address, service.port, "POST", "/generate",
                                         request, timeout=SERVICE_LOAD_WAIT)
    seconds = round(time.monotonic() - started, 3)
    if status != 200 or not body.startswith(b"\x89PNG"):
        raise RemoteCommandFailed(f"{conn.name}: /generate on {where} answered {status}: "
                                  f"{_json_or_text(body).get('error', body[:200])}",
                                  "see journalctl -u sd35-api on the host")
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"service-{conn.name}.png"
    png.write_bytes(body)
    return ServiceReport(conn.name, where, health, request,
                         json.loads(headers.get("x-metrics", "{}")), seconds, str(png))


def _json_or_text(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except ValueError:
        return {"text": body[:200].decode(errors="replace")}
    return value if isinstance(value, dict) else {"text": str(value)[:200]}
