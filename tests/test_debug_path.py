"""bench/debug_path.py, the tool that times F5's breakpoints on the lent H200, run here on the
CPU as it runs there: the rendered Debug configuration (tiny model for a member without a GPU)
under debugpy, stops in diffusers' attention, the scheduler's `step` and before the decode.

Why: on the H200 it was run from inside the dev container with a relative `--out`, and the
records read no metrics (inference.py runs in a directory of its own), so "not compiled under
the debugger" could not be checked.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from provision.inventory import Inventory, Member
from provision.render import LAUNCH_JSON, render_workspace, write_files
from provision.versions import resolve_image
from tests.conftest import require_modules

ROOT = Path(__file__).resolve().parents[1]


def test_the_debug_configuration_stops_at_each_breakpoint_and_records_its_metrics(
        tmp_path: Path) -> None:
    require_modules("torch", "diffusers", "debugpy")
    member = Member("dev", keys=(), gpus="none")
    files = render_workspace(Inventory(path=Path("provision.toml"), members=(member,)), member,
                             host_alias=None, target=None, cache_gid=None,
                             image=resolve_image({}))
    write_files(files, tmp_path / "ws")
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "debug_path.py"), "--launch",
         f"ws/{LAUNCH_JSON}", "--workspace", "ws", "--configs", "debug", "--out", "out",
         "--timeout", "300"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    (run,) = results["debug"]
    assert "error" not in run, done.stderr[-3000:]
    frames = [run[f"{stop}_frame"].split(" line")[0]
              for stop in ("attention", "scheduler", "decode")]
    assert frames == ["__call__", "step", "decode"]
    assert run["metrics"]["compiled"] is False  # the debugger overrules compilation
    assert run["latents_shape"] == "[1, 16, 32, 32]"
