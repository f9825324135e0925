"""Wall time of `provision host` for a 10-member team on local sandboxes.

First converge (fresh sandbox each time) and the no-op re-run (same host, nothing to do),
each the median of N runs of the whole CLI as a user runs it. Results go to a JSON file.

    python3 bench/converge.py [--runs 5] [--out bench/results/converge.json]
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
from pathlib import Path

from provision import sandbox
from provision.sandbox import new_key_pair

TEAM = [f"m{i:02d}" for i in range(10)]


def timed_cli(*args: str, env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "provision", *args], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def one_host(index: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory(prefix="provision-bench-") as tmp:
        base = Path(tmp)
        inventory = base / "provision.toml"
        name = f"bench{os.getpid()}-{index}"
        sandbox.up(name, inventory, log=lambda *_: None)
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
            first = timed_cli("host", name, env=env)
            return first, timed_cli("host", name, env=env)
        finally:
            sandbox.down(name, inventory, log=lambda *_: None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench/results/converge.json"))
    args = parser.parse_args()
    firsts, noops = [], []
    for index in range(args.runs):
        first, noop = one_host(index)
        firsts.append(first)
        noops.append(noop)
        print(f"run {index + 1}: first converge {first:.2f} s, no-op {noop:.2f} s",
              file=sys.stderr)
    results = {
        "what": "provision host <sandbox>, 10 members, whole CLI wall time over SSH on loopback",
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores",
        "runs": args.runs,
        "first_converge_s": {"median": round(statistics.median(firsts), 3),
                             "all": [round(t, 3) for t in firsts]},
        "noop_rerun_s": {"median": round(statistics.median(noops), 3),
                         "all": [round(t, 3) for t in noops]},
        "noop_target_s": 1.0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
