"""Who is tracing this process: the debugger decides what may be compiled and how libraries
import.

VS Code's F5 runs the program under debugpy, which traces with sys.settrace up to Python 3.11
and registers as sys.monitoring's debugger tool from 3.12; `python -m debugpy` attached later
shows as a connected client. Stdlib only: inference.py imports this before torch.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def untraced_by_debugpy() -> Iterator[None]:
    """Run the block with this thread untraced by a connected debugpy, then trace it again.

    Why: under F5, debugpy traces every function that importing torch, torchao, diffusers and
    transformers runs; on the lent H200 that made the imports most of the seconds to the first
    breakpoint. Only library imports run in here: breakpoints in the libraries' import-time code
    do not fire, everything called after them (inference.py, the pipeline, the model) is traced.
    """
    debugpy = sys.modules.get("debugpy")
    if debugpy is None or not debugpy.is_client_connected():
        yield
        return
    debugpy.trace_this_thread(False)
    try:
        yield
    finally:
        debugpy.trace_this_thread(True)


def debugger_reason() -> str | None:
    """What is tracing this process (so compiling must not happen), or None.

    Any trace function counts: compiled code would hide breakpoints from it, and compiling
    under it is many times slower.
    """
    debugpy = sys.modules.get("debugpy")
    if debugpy is not None and debugpy.is_client_connected():
        return "a debugpy client is connected"
    trace = sys.gettrace()
    if trace is not None:
        return f"a trace function is set ({getattr(trace, '__qualname__', type(trace).__name__)})"
    monitoring = getattr(sys, "monitoring", None)  # Python >= 3.12
    if monitoring is not None:
        tool = monitoring.get_tool(monitoring.DEBUGGER_ID)
        if tool is not None:
            return f"debugger {tool!r} is registered with sys.monitoring"
    return None
