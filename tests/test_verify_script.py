"""What `provision verify` runs on the host: the containers of its two generations.

Why: the GPU run on the lent H200 failed in a rootful verify where the CPU never fails: the
container runs as her uid, which has no passwd entry in the image, and compiling on the GPU
asks `getpass.getuser()` (KeyError 'getpwuid(): uid not found: 1001'). The facts are those
recorded on a converged sandbox (rootful, member alice).
"""

from __future__ import annotations

import re
from pathlib import Path

from provision.facts import parse_facts
from provision.image import host_image
from provision.inventory import load_inventory
from provision.render import render_for_host
from provision.verify import CPU_DEFAULTS, Place, run_script

FIXTURES = Path(__file__).parent / "fixtures" / "facts"


def test_each_generation_runs_as_her_with_a_user_name_and_the_fp8_run_compiles() -> None:
    inventory = load_inventory(FIXTURES / "debian-12-sandbox.toml")
    facts = parse_facts((FIXTURES / "debian-12-sandbox-converged.txt").read_text(),
                        inventory.defaults.cache_dir)
    alice = inventory.member("alice")
    files = render_for_host(inventory, alice, facts, host_image(facts, inventory),
                            host_alias="sandbox", target=None)
    script = run_script(inventory, alice, facts, files, "img", "storage", dict(CPU_DEFAULTS),
                        Place("/var/lib/provision"))
    runs = [line for line in script.splitlines() if line.startswith("docker run")]
    account = facts.accounts["alice"]
    assert len(runs) == 3  # FP8, bf16, then the comparison of their images
    for line in runs:
        assert f"--user {account.uid}:{account.gid} " in line
        assert re.search(r" -e USER=alice ", line), line
    storage, off, _ = runs
    assert "--fp8 storage --compile " in storage and "--compile" not in off
