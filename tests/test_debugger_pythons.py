"""F5's breakpoints on every Python the team images use: 3.11 (Debian 12), 3.12 (Ubuntu 24.04,
the CUDA bases), 3.13 (Debian 13).

Why: from 3.12 debugpy traces through `sys.monitoring` and CPython's line tables changed, and
a breakpoint on the first statement of diffusers' `FlowMatchEulerDiscreteScheduler.step`
never stopped on the lent H200's 3.12 while every one stopped on 3.11. The cause was where
the breakpoint went: on a multi-line `if (` line, which holds no code from 3.12, so debugpy
moved it up to the method's signature, run once at import (tests/dap.py,
`first_statement_line`). This runs what F5 runs, without torch (debugpy needs none): the
workspace's own `untraced_by_debugpy` (its `sd35/` package, imported as inference.py imports
it) around the imports of a stand-in library written in diffusers' shape, then a pipeline
calling `self.scheduler.step(...)`, under `python -m debugpy --listen ... --wait-for-client`
with a DAP client attached as VS Code attaches.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from provision.versions import DEFAULT_IMAGE
from tests.conftest import require
from tests.dap import DapClient, first_statement_line

MACHINERY = Path(__file__).resolve().parents[1] / "templates" / "workspace" / "sd35"

# The stand-in for diffusers' scheduling_flow_match_euler_discrete.py: annotations and defaults
# in the signature (evaluated in the class body, at import), a docstring, and a first statement
# whose condition starts on the line after `if (`.
SCHEDULER = '''
class Output:
    pass


class FlowMatchEulerDiscreteScheduler:
    def step(
        self,
        model_output: float,
        timestep: float | int,
        sample: float,
        s_tmax: float = float("inf"),
        return_dict: bool = True,
    ) -> Output | tuple:
        """Predict the sample at the previous timestep."""

        if (
            isinstance(timestep, str)
            or isinstance(timestep, bytes)
        ):
            raise ValueError("timestep must be a number")
        return sample - model_output * 0.1
'''
PIPELINE = '''
class StableDiffusion3Pipeline:
    def __init__(self, scheduler):
        self.scheduler = scheduler

    def __call__(self, steps):
        sample = 1.0
        for t in range(steps):
            sample = self.scheduler.step(0.5, float(t), sample)
        return sample
'''
STEPS = 2
PROGRAM = """
from sd35.debugger import untraced_by_debugpy

with untraced_by_debugpy():
    import pipeline
    import scheduling

pipeline.StableDiffusion3Pipeline(scheduling.FlowMatchEulerDiscreteScheduler())({steps})
print("done", flush=True)
"""


def interpreter(version: str) -> str | None:
    """A python of that version: on PATH, else one of pyenv's builds (this machine's kind has
    3.11, 3.12 and 3.13 there)."""
    for candidate in (shutil.which(f"python{version}"),
                      *sorted(glob.glob(os.path.expanduser(
                          f"~/.pyenv/versions/{version}.*/bin/python{version}")))):
        if candidate and subprocess.run([candidate, "-c", ""], capture_output=True).returncode == 0:
            return candidate
    return None


@pytest.fixture(scope="module", params=["3.11", "3.12", "3.13"])
def python(request, tmp_path_factory) -> str:
    """That Python with the image's pinned debugpy, in a venv of its own."""
    found = interpreter(request.param)
    require(found, f"Python {request.param}")
    venv = tmp_path_factory.mktemp(f"py{request.param}")
    subprocess.run([found, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
                    f"debugpy=={DEFAULT_IMAGE['debugpy']}"], check=True)
    return str(venv / "bin" / "python")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_breakpoints_in_libraries_imported_untraced_stop_on_every_python(python, tmp_path):
    (tmp_path / "scheduling.py").write_text(SCHEDULER)
    (tmp_path / "pipeline.py").write_text(PIPELINE)
    shutil.copytree(MACHINERY, tmp_path / "sd35", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "prog.py").write_text(PROGRAM.format(steps=STEPS))
    step_line = first_statement_line(SCHEDULER, "FlowMatchEulerDiscreteScheduler", "step")
    call_line = next(n for n, text in enumerate(PIPELINE.splitlines(), 1)
                     if "self.scheduler.step(" in text)
    port = free_port()
    log = tmp_path / "debuggee.log"
    # A session of its own: debugpy's adapter is a child process, ended with it.
    with log.open("w") as out:
        proc = subprocess.Popen([python, "-m", "debugpy", "--listen", f"127.0.0.1:{port}",
                                 "--wait-for-client", "prog.py"], cwd=tmp_path, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    stops = []
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                stream = socket.create_connection(("127.0.0.1", port), timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "debugpy never listened"
                time.sleep(0.2)
        dap = DapClient(stream, timeout=60)
        dap.request("initialize", adapterID="debugpy", clientID="provision-tests",
                    pathFormat="path", linesStartAt1=True, columnsStartAt1=True)
        dap.send("attach", justMyCode=False)
        dap.wait("event", "initialized")
        for name, line in (("scheduling.py", step_line), ("pipeline.py", call_line)):
            placed = dap.request("setBreakpoints", source={"path": str(tmp_path / name)},
                                 breakpoints=[{"line": line}])["breakpoints"][0]
            # debugpy answers with where it really put it: moved, it would stop elsewhere.
            assert (placed["verified"], placed["line"]) == (True, line), placed
        dap.request("configurationDone")
        while len(stops) < 2 * STEPS:
            stopped = dap.wait("event", "stopped")["body"]
            frame = dap.request("stackTrace", threadId=stopped["threadId"])["stackFrames"][0]
            stops.append((frame["name"], frame["line"]))
            dap.request("continue", threadId=stopped["threadId"])
        dap.wait("event", "terminated")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    output = log.read_text()
    assert stops == [("__call__", call_line), ("step", step_line)] * STEPS, output
    assert "done" in output
    assert textwrap.dedent(SCHEDULER).splitlines()[step_line - 1].strip() == \
        "isinstance(timestep, str)"
