"""Long work shows its progress while it runs (provision.progress), and never on stdout.

The slow build is a real one: a stand-in Dockerfile with `RUN sleep` steps, built by this
machine's Docker through a LocalConnection, as verify builds the team image on a host. The
BuildKit and tqdm lines below are written by hand in the formats of `docker build
--progress=plain` and a diffusers progress bar (this machine's Docker has no BuildKit).
"""

from __future__ import annotations

import io
import itertools
import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from provision import cli, progress
from provision.connection import LocalConnection
from provision.errors import RemoteCommandFailed
from provision.image import build_command
from provision.progress import Board, Line, read_line
from provision.sandbox import new_key_pair
from provision.target import Target
from provision.verify import VerifyReport
from tests.conftest import facts_of, require


@pytest.mark.parametrize(("line", "said"), [
    ("Step 3/9 : RUN pip install --no-index -r requirements.txt",
     Line("step 3/9: RUN pip install --no-index -r requirements.txt", milestone=True)),
    ("#7 [packages 3/9] RUN pip install torch==2.5.1",
     Line("step 3/9 (packages): RUN pip install torch==2.5.1", milestone=True)),
    ("#5 [2/4] COPY requirements.txt /tmp/", Line("step 2/4: COPY requirements.txt /tmp/",
                                                  milestone=True)),
    ("#7 12.34 Downloading torch-2.5.1-cp311-cp311-manylinux1_x86_64.whl (906.4 MB)",
     Line("Downloading torch-2.5.1-cp311-cp311-manylinux1_x86_64.whl (906.4 MB)")),
    ("#7 DONE 81.2s", Line("DONE 81.2s")),
    ("  Downloading diffusers-0.32.2-py3-none-any.whl (3.2 MB)",
     Line("Downloading diffusers-0.32.2-py3-none-any.whl (3.2 MB)")),
    (" 75%|███████▌  | 3/4 [00:02<00:00,  1.41it/s]", Line("3/4 steps (75 %)")),
    ("I: Retrieving InRelease", Line("I: Retrieving InRelease")),
    (" ---> Running in a71a255d0fc2", None),
    ("Removing intermediate container a71a255d0fc2", None),
    ('{"ok": true, "device": "cpu"}', None),
    ("@@@provision:run-storage", None),
    ("   ", None),
])
def test_a_line_of_output_reads_as_progress(line: str, said: Line | None) -> None:
    assert read_line(line) == said


def test_a_long_step_is_cut_to_the_width() -> None:
    said = read_line("Step 1/2 : RUN " + "x" * 300)
    assert said is not None and len(said.text) == progress.WIDTH and said.text.endswith("…")


def test_lines_end_at_a_carriage_return_too() -> None:
    """A progress bar redraws with \\r: each redraw arrives when it is drawn, not at the end."""
    seen: list[str] = []
    conn = LocalConnection(Target("@local", "localhost", "me", 22))
    result = conn.run("printf 'a\\r b\\r'; echo c; printf 'd\\n' >&2", root=False,
                      on_line=seen.append)
    assert sorted(line.strip() for line in seen if line.strip()) == ["a", "b", "c", "d"]
    assert result.stdout == "a\r b\rc\n" and result.stderr == "d\n"


class Clocked(io.StringIO):
    """A console's file that remembers when each line was written."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[tuple[float, str]] = []

    def write(self, text: str) -> int:
        self.times.extend((time.monotonic(), ln) for ln in text.splitlines() if ln.strip())
        return super().write(text)


@pytest.fixture(scope="module")
def base() -> str:
    require(shutil.which("docker"), "docker")
    from provision import sandbox

    return sandbox.base_image(sandbox.docker_client(), log=lambda _: None)


def containers_of(image: str) -> set[str]:
    """Every container, running or stopped, made from `image` or an image built on it."""
    listed = subprocess.run(["docker", "ps", "-aq", "--no-trunc", "--filter", f"ancestor={image}"],
                            capture_output=True, text=True, check=True).stdout
    return set(listed.split())


def build(directory: Path, base: str, steps: list[str], board: Board) -> float:
    """Build a stand-in image through a LocalConnection with a task on `board`; the time it
    ended."""
    (directory / "Dockerfile").write_text(f"FROM {base}\n" + "".join(f"RUN {s}\n"
                                                                      for s in steps))
    conn = LocalConnection(Target("@local", "localhost", "me", 22))
    tag = f"provision-test/progress:{directory.name.lower()}"
    try:
        with board, board.task("stand-in") as task:
            task.status(f"building {tag}")
            conn.run(f"{build_command(tag, str(directory), cache=False)} 2>&1", root=False,
                     what="image build", timeout=120, on_line=task.output)
        return time.monotonic()
    finally:
        conn.run(f"docker rmi -f {tag} >/dev/null 2>&1 || true", root=False)


def test_a_slow_build_shows_each_step_as_it_starts(base: str, tmp_path: Path) -> None:
    out = Clocked()
    board = Board(Console(file=out, width=200), mode="plain")
    ended = build(tmp_path, base, ["echo first && sleep 3", "sleep 3", "echo done"], board)
    steps = [(at, line) for at, line in out.times if ": step " in line]
    assert [line.split(": ", 1)[1] for _, line in steps] == [
        f"step 1/4: FROM {base}", "step 2/4: RUN echo first && sleep 3", "step 3/4: RUN sleep 3",
        "step 4/4: RUN echo done"]
    # Each step is on screen when it starts: the first RUN about 6 s before the build ends.
    assert steps[1][0] < ended - 4, out.getvalue()
    assert steps[2][0] < ended - 1, out.getvalue()
    assert "done: building" in out.getvalue()  # the phase's time, when it ends


def test_plain_progress_is_never_silent_for_long(base: str, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "HEARTBEAT_S", 1.0)
    out = Clocked()
    build(tmp_path, base, ["sleep 4"], Board(Console(file=out, width=200), mode="plain"))
    times = [at for at, _ in out.times]
    assert max(b - a for a, b in itertools.pairwise(times)) < 2.5, out.getvalue()
    assert "building provision-test/progress" in out.getvalue() and " s)" in out.getvalue()


def test_a_failed_build_ends_with_its_own_last_lines(base: str, tmp_path: Path) -> None:
    out = io.StringIO()
    board = Board(Console(file=out, width=200), mode="off")  # not a terminal: no progress
    before = containers_of(base)
    with pytest.raises(RemoteCommandFailed):
        build(tmp_path, base, ["for i in $(seq 40); do echo line $i; done; exit 3"], board)
    first, *lines = out.getvalue().splitlines()
    assert first.startswith("stand-in: the last 20 lines of 'building provision-test/")
    # The builder's own last lines: the step's output, then its verdict.
    assert len(lines) == 20 and any(ln.endswith("line 40") for ln in lines), out.getvalue()
    assert "code: 3" in " ".join(lines[-12:]), out.getvalue()
    # The failed step's container went with the build (the product's --force-rm).
    assert containers_of(base) <= before


def test_verbose_streams_every_line(base: str, tmp_path: Path) -> None:
    out = io.StringIO()
    build(tmp_path, base, ["for i in $(seq 30); do echo line $i; done"],
          Board(Console(file=out, width=200), mode="off", verbose=True))
    text = out.getvalue()
    assert "Step 2/2 : RUN" in text and all(f"line {i}\n" in text for i in range(1, 31))


def test_verify_json_stays_parseable_while_progress_runs(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    """`verify --json` at a terminal: the progress goes live to stderr while the work runs;
    stdout holds the JSON document alone."""
    new_key_pair(tmp_path)
    inventory = tmp_path / "provision.toml"
    inventory.write_text('[hosts.h]\nhostname = "127.0.0.1"\n\n[[members]]\nname = "alice"\n'
                         f'keys = ["{tmp_path / "id_ed25519.pub"}"]\ngpus = "none"\n')
    stderr = Clocked()
    monkeypatch.setattr(cli, "err", Console(file=stderr, force_terminal=True, width=200))
    monkeypatch.setattr(cli.Settings, "connect",
                        lambda self, host, inv: LocalConnection(Target(host, "h", "me", 22)))
    # The host's read stands in too (a synthesized host's facts): this test is about the output.
    monkeypatch.setattr(cli, "gather_facts",
                        lambda conn, inv: facts_of("ubuntu-24.04-h100.synthesized"))
    during: list[str] = []

    def slow_verify(conn, inventory, member, facts, image, *, model, fp8, out,
                    progress) -> VerifyReport:
        progress.status("building provision/sd35-fp8:stand-in")
        for line in ("Step 1/2 : FROM debian", "Step 2/2 : RUN pip install torch",
                     "Downloading torch (906.4 MB)"):
            progress.output(line)
            time.sleep(0.3)
        during.append(stderr.getvalue())
        return VerifyReport(conn.name, member.name, "provision/sd35-fp8:stand-in", True,
                            "CPU", "cpu wheels", runs={fp8: {"step_ms_mean": 1.0}})

    monkeypatch.setattr("provision.verify.verify", slow_verify)  # the command imports it late
    result = CliRunner().invoke(cli.app, ["--inventory", str(inventory), "verify", "h",
                                          "--json", "--fp8", "storage"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["image"] == "provision/sd35-fp8:stand-in"
    assert "h: step 2/2: RUN pip install torch" in during[0]  # before the work ended
    assert "Downloading torch" in stderr.getvalue() and "{" not in stderr.getvalue()


def test_progress_is_off_when_stderr_is_not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(progress.ENVIRONMENT, raising=False)
    out = io.StringIO()
    with Board(Console(file=out)) as board, board.task("h") as task:
        task.status("building")
        task.output("Step 1/1 : FROM debian")
    assert out.getvalue() == ""
    monkeypatch.setenv(progress.ENVIRONMENT, "plain")
    assert Board(Console(file=out)).mode == "plain"


def test_a_task_is_safe_from_two_threads() -> None:
    """stdout and stderr lines of one command arrive on two threads."""
    out = io.StringIO()
    with Board(Console(file=out, width=200), mode="plain") as board, board.task("h") as task:
        task.status("building")
        threads = [threading.Thread(target=lambda n=n: [task.output(f"Step {i}/100 : RUN {n}")
                                                        for i in range(100)]) for n in "ab"]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert out.getvalue().count(": step ") == 200


@pytest.mark.parametrize("to_stderr", [False, True])
def test_a_followed_log_streams_as_it_grows_and_keeps_the_exit_status(tmp_path: Path,
                                                                      to_stderr: bool) -> None:
    """The apply scripts' and the generation's way: the command writes its log, the reader
    streams it, the exit status is the command's."""
    log = tmp_path / "work.log"
    seen: list[tuple[float, str]] = []
    conn = LocalConnection(Target("@local", "localhost", "me", 22))
    started = time.monotonic()
    result = conn.run(progress.follow_log("echo first; sleep 2; echo second >&2; sleep 0.3; exit 3",
                                          str(log), to_stderr), root=False, check=False,
                      on_line=lambda line: seen.append((time.monotonic(), line)))
    ended = time.monotonic()
    assert ended - started < 2.8  # the reader ends soon after the command, not a second on
    assert result.exit_code == 3
    assert [line for _, line in seen] == ["first", "second"] and seen[0][0] < ended - 1.5
    assert (result.stderr if to_stderr else result.stdout) == "first\nsecond\n"
    assert log.read_text() == "first\nsecond\n"
