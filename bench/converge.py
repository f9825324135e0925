"""Wall time of `provision host` for a 10-member team on local sandboxes.

First converge (fresh sandbox each time) and the no-op re-run (same host, nothing to do,
several times on each), each a median of runs of the whole CLI as a user runs it, beside a bare
`ssh host true` to the same host (the floor a round trip sets, and how loaded the machine was).
Results go to a JSON file, one a day: earlier records stay.

    python3 bench/converge.py [--runs 5] [--noops 3] [--out bench/results/converge-DATE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from provision import sandbox
from provision.sandbox import new_key_pair

TEAM = [f"m{i:02d}" for i in range(10)]


def timed(command: list[str], env: dict[str, str] | None = None) -> float:
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def timed_cli(*args: str, env: dict[str, str]) -> float:
    return timed([sys.executable, "-m", "provision", *args], env)


def bare_ssh(host: sandbox.Sandbox) -> list[str]:
    """OpenSSH's `ssh HOST true` to the sandbox, as the admin, its keys checked."""
    return ["ssh", "-i", str(host.identity_file), "-o", f"UserKnownHostsFile={host.known_hosts}",
            "-o", "BatchMode=yes", "-p", str(host.port), f"{sandbox.ADMIN_USER}@127.0.0.1", "true"]


def one_host(index: int, noops: int) -> tuple[float, list[float], list[float]]:
    """(first converge, no-op re-runs, bare ssh round trips) on a fresh sandbox."""
    with tempfile.TemporaryDirectory(prefix="provision-bench-") as tmp:
        base = Path(tmp)
        inventory = base / "provision.toml"
        name = f"bench{os.getpid()}-{index}"
        host = sandbox.up(name, inventory, log=lambda *_: None)
        try:
            members = []
            for member in TEAM:
                (base / "keys" / member).mkdir(parents=True)
                new_key_pair(base / "keys" / member)
                members.append(f'\n[[members]]\nname = "{member}"\n'
                               f'keys = ["keys/{member}/id_ed25519.pub"]\n')
            with inventory.open("a") as file:
                file.write("".join(members))
            env = {**os.environ, "PROVISION_INVENTORY": str(inventory), "HOME": str(base)}
            # As a user runs it: Python caches its byte code, which this variable forbids.
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            first = timed_cli("host", name, env=env)
            return (first, [timed_cli("host", name, env=env) for _ in range(noops)],
                    [timed(bare_ssh(host)) for _ in range(noops)])
        finally:
            sandbox.down(name, inventory, log=lambda *_: None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5, help="fresh sandboxes")
    parser.add_argument("--noops", type=int, default=3, help="no-op re-runs on each")
    parser.add_argument("--out", type=Path,
                        default=Path(f"bench/results/converge-{date.today().isoformat()}.json"))
    args = parser.parse_args()
    firsts, noops, sshs = [], [], []
    for index in range(args.runs):
        first, noop, ssh = one_host(index, args.noops)
        firsts.append(first)
        noops += noop
        sshs += ssh
        print(f"run {index + 1}: first converge {first:.2f} s, no-op "
              f"{', '.join(f'{t:.2f}' for t in noop)} s, ssh true "
              f"{', '.join(f'{t:.2f}' for t in ssh)} s", file=sys.stderr)
    results = {
        "what": "provision host <sandbox>, 10 members, whole CLI wall time over SSH on loopback",
        "commit": subprocess.run(["git", "-C", str(Path(sandbox.__file__).parent), "rev-parse",
                                  "--short", "HEAD"], capture_output=True, text=True
                                 ).stdout.strip(),  # the provision measured
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores",
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),  # others' work shares it
        "runs": args.runs,
        "noops_per_run": args.noops,
        "first_converge_s": {"median": round(statistics.median(firsts), 3),
                             "all": [round(t, 3) for t in firsts]},
        "noop_rerun_s": {"median": round(statistics.median(noops), 3),
                         "all": [round(t, 3) for t in noops]},
        "bare_ssh_true_s": {"median": round(statistics.median(sshs), 3),
                            "all": [round(t, 3) for t in sshs]},
        "noop_target_s": 0.8,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
