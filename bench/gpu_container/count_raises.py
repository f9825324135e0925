#!/usr/bin/env python3
"""Exceptions a generation raises and unwinds, counted with sys.monitoring (Python 3.12+).

Why: under debugpy with VS Code's "uncaught" exception filter, every exception that leaves a
Python frame (even one caught a frame up) costs a walk of the stack (pydevd's PY_UNWIND
callback). How many a denoising step raises says what that filter costs the F5 path. Run it
with two step counts: the difference over the extra steps is the per-step number.

    python3 count_raises.py inference.py --steps 4 ...   # prints {"raise": N, "unwind": M}
"""

from __future__ import annotations

import json
import os
import runpy
import sys

TOOL = 3  # a sys.monitoring tool id no debugger, profiler or coverage tool takes
counts = {"raise": 0, "unwind": 0}


def _count(kind: str):
    def callback(*_: object) -> None:
        counts[kind] += 1
    return callback


def main() -> None:
    monitoring = sys.monitoring
    monitoring.use_tool_id(TOOL, "count-raises")
    monitoring.register_callback(TOOL, monitoring.events.RAISE, _count("raise"))
    monitoring.register_callback(TOOL, monitoring.events.PY_UNWIND, _count("unwind"))
    monitoring.set_events(TOOL, monitoring.events.RAISE | monitoring.events.PY_UNWIND)
    sys.argv = sys.argv[1:]
    # As `python FILE` does (run_path does not): inference.py imports sd35/ from beside it.
    sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    finally:
        monitoring.set_events(TOOL, 0)
        print(json.dumps(counts), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
