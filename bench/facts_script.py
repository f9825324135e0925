"""Wall time of the facts script on the machine this runs on (as root, as `@local` runs it), and
whether two versions of it read the same facts.

    python3 bench/facts_script.py templates/host/facts.sh [OTHER.sh] --runs 5 --out FILE.json

Each script runs `--runs` times, alternating, with the environment a read with no inventory
members sets; its transcripts are parsed by provision's own parser, and the parsed facts of the
scripts compared (disk figures aside: they move between reads; and the script's name and line
in sh's "not found" errors).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout, nothing installed
from provision.facts import parse_facts  # stdlib only: runs where provision is not installed

CACHE_DIR = "/data/cache/huggingface"
ENVIRONMENT = {"PROVISION_ACCOUNTS": "", "PROVISION_CACHE_DIR": CACHE_DIR,
               "PROVISION_UNITS": "", "PROVISION_SERVICE_ACCOUNT": "", "PROVISION_PATHS": ""}


def read(script: Path) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(["sh", str(script)], capture_output=True, text=True, check=False,
                          env={**os.environ, **ENVIRONMENT}, timeout=120)
    return time.perf_counter() - started, done.stdout


def comparable(transcript: str) -> dict:
    # sh names the script and the line in "not found" errors (nvidia-smi, sshd): not a fact.
    transcript = re.sub(r"^\S+: \d+: (\S+: not found)$", r"\1", transcript, flags=re.M)
    facts = dataclasses.asdict(parse_facts(transcript, CACHE_DIR))
    facts.pop("disk", None)
    return facts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scripts", type=Path, nargs="+")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    times: dict[str, list[float]] = {str(s): [] for s in args.scripts}
    last: dict[str, str] = {}
    for _ in range(args.runs):
        for script in args.scripts:
            seconds, last[str(script)] = read(script)
            times[str(script)].append(seconds)
    parsed = [comparable(text) for text in last.values()]
    record = {
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores",
        "runs": args.runs,
        "seconds": {name: {"median": round(statistics.median(t), 4),
                           "all": [round(x, 4) for x in t]} for name, t in times.items()},
        "same_facts": all(p == parsed[0] for p in parsed),
        "gpus": parsed[0]["nvidia"]["gpus"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
