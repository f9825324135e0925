#!/usr/bin/env python3
"""Images per minute from the team's generation service, run natively (no systemd, no Docker).

Starts `templates/service/sd35_api.py` as its own process on 127.0.0.1 with the model, FP8
mode and queue asked for, waits for /health to say ready (loading plus, when it compiles, the
warm-up generation that pays the compile), then sends `--requests` generations from
`--clients` concurrent clients (at most max_queue + 1, so none is refused) and measures the
wall time from the first request sent to the last PNG received. Each request gets its own
seed. Stdlib HTTP only, so the GPU machine needs nothing beyond the service's own packages.

Writes `results.json` and `results.md` (and the server's log, and the first PNG) under
`--out`. Progress goes to stderr.

    python3 bench/service_throughput.py --model large --fp8 dq --height 1024 --width 1024 \
        --steps 28 --requests 8 --out bench/results/service-h200
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the GPU machine runs this from a checkout, provision not installed
from provision.service_client import send  # noqa: E402  (stdlib only: nothing to install there)

SERVER = ROOT / "templates" / "service" / "sd35_api.py"
WORKSPACE = ROOT / "templates" / "workspace"  # inference.py: beside the server on a host
LOAD_WAIT = 3600  # seconds: real weights plus a cold FP8 compile


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="large", help="tiny|medium|large|HF id (default: large)")
    p.add_argument("--fp8", choices=("off", "storage", "dq"), default="dq")
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--clients", type=int, default=2, help="concurrent clients (default: 2)")
    p.add_argument("--max-queue", type=int, default=4)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.clients > args.max_queue + 1:
        p.error("--clients must be at most --max-queue + 1: more would measure 429s")
    return args


def call(port: int, method: str, path: str, body: dict[str, Any] | None = None,
         timeout: float = 1800) -> tuple[int, dict[str, str], bytes]:
    """One request to the local server, as `provision verify --service` sends it (through an SSH
    channel there)."""
    return send(http.client.HTTPConnection("127.0.0.1", port, timeout=timeout), method, path, body)


def wait_ready(port: int, server: subprocess.Popen[bytes]) -> dict[str, Any]:
    deadline = time.monotonic() + LOAD_WAIT
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited ({server.returncode}): see its log")
        try:
            status, _, body = call(port, "GET", "/health", timeout=10)
        except OSError:
            time.sleep(1)
            continue
        health = json.loads(body)
        if status == 200:
            return health
        if health.get("status") == "failed":
            raise SystemExit(f"the model failed to load: {health.get('error')}")
        time.sleep(2)
    raise SystemExit("the server was not ready in time")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "SD35_MODEL": args.model, "SD35_FP8": args.fp8,
           "SD35_MAX_QUEUE": str(args.max_queue), "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, (str(WORKSPACE),
                                                       os.environ.get("PYTHONPATH"))))}
    server_log = (args.out / "server.log").open("wb")
    started = time.monotonic()
    server = subprocess.Popen([sys.executable, str(SERVER), "--host", "127.0.0.1", "--port",
                               str(port)], env=env, stdout=server_log, stderr=subprocess.STDOUT)
    try:
        log(f"server on 127.0.0.1:{port}: loading {args.model} --fp8 {args.fp8}")
        health = wait_ready(port, server)
        ready_s = round(time.monotonic() - started, 3)
        log(f"ready in {ready_s} s: {health.get('gpu') or health.get('device')}, "
            f"fp8 {health.get('fp8_applied')}, compiled {health.get('compiled')}")
        body = {"prompt": "a photo of an astronaut riding a horse on the moon",
                "height": args.height, "width": args.width, "steps": args.steps}

        def one(seed: int) -> tuple[int, float, dict[str, Any], bytes]:
            t0 = time.monotonic()
            status, headers, png = call(port, "POST", "/generate", {**body, "seed": seed})
            return status, time.monotonic() - t0, json.loads(headers.get("x-metrics", "{}")), png

        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
            answers = list(pool.map(one, range(args.requests)))
        wall = time.monotonic() - t0
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
        server_log.close()
    statuses = [status for status, *_ in answers]
    done = [a for a in answers if a[0] == 200]
    if done:
        (args.out / "first.png").write_bytes(done[0][3])
    step_ms = [m["step_ms_mean"] for _, _, m, _ in done if m.get("step_ms_mean")]
    generation_s = [m["total_s"] for _, _, m, _ in done if m.get("total_s")]
    results = {
        "model": args.model, "fp8": args.fp8, "height": args.height, "width": args.width,
        "steps": args.steps, "requests": args.requests, "clients": args.clients,
        "health": health, "ready_s": ready_s, "statuses": statuses,
        "wall_s": round(wall, 3),
        "images_per_minute": round(60 * len(done) / wall, 3) if wall else None,
        "generation_s_median": round(statistics.median(generation_s), 3) if generation_s
        else None,
        "request_s_median": round(statistics.median(s for _, s, _, _ in done), 3) if done
        else None,
        "step_ms_median": round(statistics.median(step_ms), 2) if step_ms else None,
        "metrics": [m for _, _, m, _ in done],
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "results.md").write_text(
        f"# generation service throughput ({args.model}, --fp8 {args.fp8}, "
        f"{args.height}x{args.width}, {args.steps} steps)\n\n"
        f"- device: {health.get('gpu') or health.get('device')}; FP8 applied "
        f"{health.get('fp8_applied')}; compiled {health.get('compiled')}\n"
        f"- ready after {ready_s} s (load, and the warm-up compile when compiled)\n"
        f"- {len(done)}/{args.requests} images in {wall:.1f} s from {args.clients} clients: "
        f"**{results['images_per_minute']} images/min**\n"
        f"- per image: generation {results['generation_s_median']} s (median), "
        f"{results['step_ms_median']} ms/step; request {results['request_s_median']} s "
        "(queue included)\n")
    log(f"{results['images_per_minute']} images/min ({len(done)}/{args.requests} in "
        f"{wall:.1f} s); statuses {sorted(set(statuses))}")
    return 0 if len(done) == args.requests else 1


if __name__ == "__main__":
    sys.exit(main())
