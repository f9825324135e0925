"""Progress of long work (image builds, downloads, a generation, a health wait), on stderr.

Work reports through a `Task`: `status(text)` when it starts a phase (its clock restarts),
`output(line)` for each line its commands print (a build's log, pip's downloads, a progress
bar). The `Board` decides what reaches the user:

- stderr is a terminal: one live line per task (spinner, phase, its latest output, elapsed
  time, redrawn as it goes), the milestones (each build step as it starts) printed above it and
  kept, and each phase that took a while with its time when it ends;
- stderr is not a terminal (a pipe, a file, CI): nothing, so stdout and stderr stay what
  scripts read (`--json` on stdout, one error line on stderr). PROVISION_PROGRESS=plain prints
  the same as plain lines, and the latest output at least every HEARTBEAT_S seconds (a log
  with no silent gap); PROVISION_PROGRESS=off silences a terminal too.
- `-v` prints every output line as it comes (the full build log), wherever stderr goes.

A failed build ends with its own last TAIL_LINES lines, printed above the error line.
"""

from __future__ import annotations

import io
import os
import re
import threading
import time
from collections import deque
from dataclasses import dataclass

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Column
from rich.text import Text

ENVIRONMENT = "PROVISION_PROGRESS"  # auto (default) | plain | off
TAIL_LINES = 20
HEARTBEAT_S = 8.0  # checked each second: no gap in a plain log reaches 10 s
LONG_PHASE_S = 5.0  # a phase this long is reported with its time when it ends
WIDTH = 100  # of a step or a detail as shown; the full line is in -v and the failure tail

# docker build (the legacy builder), BuildKit's plain progress, a tqdm bar (diffusers' steps).
_LEGACY_STEP = re.compile(r"^Step (\d+/\d+) : (.+)")
_BUILDKIT_STEP = re.compile(r"^#\d+ \[(?:(\S+) )?(\d+/\d+)\] (.+)")
_BUILDKIT_LOG = re.compile(r"^#\d+ (?:\d+\.\d+ )?")
_BAR = re.compile(r"(\d+)%\|.*\|\s*(\d+)/(\d+)\b")
# Says nothing a user waits for: the legacy builder's bookkeeping between steps, and what
# scripts print for provision to read (section markers, JSON documents).
_NOISE = re.compile(r"^(--->|Removing intermediate container|Sending build context|@@@provision:"
                    r"|\{.*\}$)")


@dataclass(frozen=True)
class Line:
    """What one output line says: a milestone (kept on screen) or a passing detail."""

    text: str
    milestone: bool = False


def read_line(line: str) -> Line | None:
    """One line of long work's output, as progress; None for a blank one.

    `Step 3/9 : RUN pip install …` (legacy builder) and `#7 [packages 3/9] RUN pip install …`
    (BuildKit) are the step starting, "step 3/9: RUN pip install …"; BuildKit's log lines lose
    their `#7 12.3` prefix; a tqdm bar is "3/28 steps"; the legacy builder's bookkeeping
    (` ---> Running in 1a2b`) and output meant for provision (a JSON line) are nothing;
    anything else is itself.
    """
    line = line.strip()
    if not line or _NOISE.match(line):
        return None
    if match := _LEGACY_STEP.match(line):
        return Line(_short(f"step {match[1]}: {match[2]}"), milestone=True)
    if match := _BUILDKIT_STEP.match(line):
        stage = f" ({match[1]})" if match[1] else ""
        return Line(_short(f"step {match[2]}{stage}: {match[3]}"), milestone=True)
    if match := _BAR.search(line):
        return Line(f"{match[2]}/{match[3]} steps ({match[1]} %)")
    text = _BUILDKIT_LOG.sub("", line, count=1).strip()
    return Line(_short(text)) if text else None


def _short(text: str, width: int = WIDTH) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m {secs:02d}s" if minutes else f"{seconds:.1f} s"


# How often the log's reader looks whether the command has ended: tail's default, 1 s, was
# paid at the end of every step's apply script and every generation.
FOLLOW_POLL_S = 0.1


def follow_log(command: str, log: str, to_stderr: bool = False) -> str:
    """Shell that runs `command` with its output into `log` and streams the log as it grows
    (to stdout, or stderr), ending with the command's exit status. The command does not depend
    on the reader: a dropped connection ends the stream, never the command."""
    return (f": >{log}\n(\n{command}\n) >>{log} 2>&1 </dev/null &\n"
            f"tail -s {FOLLOW_POLL_S} -n +1 -f --pid=$! {log} "
            f"{'>&2 ' if to_stderr else ''}2>/dev/null || true\n"
            "wait $!\n")


class Task:
    """What one piece of work (a host, a command) is doing; safe to call from its threads."""

    def __init__(self, board: Board, name: str) -> None:
        self.board = board
        self.name = name
        self.phase = ""
        self.detail = ""
        self.started = time.monotonic()
        self.shown = self.started  # when a plain line last said something of this task
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.milestones: set[str] = set()
        self.lock = threading.Lock()
        self.id: TaskID | None = None
        self.done = False

    def status(self, text: str) -> None:
        """A new phase starts: shown, its clock restarted, its output tail emptied."""
        with self.lock:
            self._end_phase()
            self.phase, self.detail = text, ""
            self.started = time.monotonic()
            self.tail.clear()
            self.milestones.clear()
            self.board.phase(self)

    def output(self, line: str) -> None:
        """A line the work printed: -v prints it; a build step is kept on screen; the latest
        that says something is the live line's detail."""
        with self.lock:
            if line.strip():
                self.tail.append(line.rstrip())
            if self.board.verbose:
                self.board.echo(line.rstrip())
            said = read_line(line)
            if said is None:
                return
            if said.milestone and said.text not in self.milestones:
                self.milestones.add(said.text)  # BuildKit repeats a step's header
                self.board.milestone(self, said.text)
            self.detail = said.text
            self.board.refresh(self)

    def failed(self) -> None:
        """The phase failed: a build's last lines go above the error (-v showed them all)."""
        with self.lock:
            if self.milestones and self.tail and not self.board.verbose:
                self.board.echo(f"{self.name}: the last {len(self.tail)} lines of "
                                f"'{self.phase}':")
                for line in self.tail:
                    self.board.echo(f"  {line}")
            self.milestones.clear()
            self.tail.clear()

    def finish(self) -> None:
        with self.lock:
            if not self.done:
                self._end_phase()
            self.done = True

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def describe(self) -> str:
        """The live line: the phase cut short enough to leave room for its latest output."""
        return f"{self.name}: {_short(self.phase, 60)}" + (
            f" · {self.detail}" if self.detail else "")

    def _end_phase(self) -> None:
        if self.phase and self.elapsed() >= LONG_PHASE_S:
            self.board.note(self, f"{self.phase}: {_clock(self.elapsed())}")

    def __enter__(self) -> Task:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is None:
            self.finish()
            return
        self.failed()
        with self.lock:
            self.done = True


class Board:
    """Where tasks show: live on a terminal, plain lines, or nowhere (see the module's doc)."""

    def __init__(self, console: Console, *, verbose: bool = False, mode: str | None = None
                 ) -> None:
        self.console = console
        self.verbose = verbose
        wanted = mode or os.environ.get(ENVIRONMENT, "auto")
        self.mode = ("live" if console.is_terminal else "off") if wanted == "auto" else wanted
        self.tasks: list[Task] = []
        self.live: Progress | None = None
        self.stopped = threading.Event()
        self.beat: threading.Thread | None = None

    def task(self, name: str) -> Task:
        task = Task(self, name)
        self.tasks.append(task)
        if self.live is not None:
            task.id = self.live.add_task(name)
        return task

    def __enter__(self) -> Board:
        if self.mode == "live":
            # The clock first: a long line is cut at its end, never the clock.
            self.live = Progress(SpinnerColumn(),
                                 TimeElapsedColumn(table_column=Column(min_width=7)),
                                 TextColumn("{task.description}", table_column=Column(
                                     no_wrap=True, overflow="ellipsis", ratio=1)),
                                 console=self.console, transient=True, expand=True)
            for task in self.tasks:
                task.id = self.live.add_task(task.describe())
            self.live.start()
        elif self.mode == "plain":
            self.beat = threading.Thread(target=self._heartbeat, daemon=True)
            self.beat.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stopped.set()
        if self.live is not None:
            self.live.stop()
        if self.beat is not None:
            self.beat.join()

    # What tasks call (under their lock).
    def phase(self, task: Task) -> None:
        if self.live is not None and task.id is not None:
            self.live.reset(task.id, description=task.describe())
        elif self.mode == "plain":
            self._plain(task, task.phase)

    def refresh(self, task: Task) -> None:
        if self.live is not None and task.id is not None:
            self.live.update(task.id, description=task.describe())

    def milestone(self, task: Task, text: str) -> None:
        if self.mode == "live":
            self.echo(f"{task.name}: {text}", style="dim")
        elif self.mode == "plain":
            self._plain(task, text)

    def note(self, task: Task, text: str) -> None:
        """A phase that took a while ended: kept, with its time."""
        if self.mode == "live":
            self.echo(f"{task.name}: {text}", style="dim")
        elif self.mode == "plain":
            self._plain(task, f"done: {text}")

    def echo(self, text: str, style: str = "") -> None:
        """One kept line on stderr, above the live display when there is one."""
        console = self.live.console if self.live is not None else self.console
        console.print(Text(text, style=style), soft_wrap=True, highlight=False)

    def _plain(self, task: Task, text: str) -> None:
        task.shown = time.monotonic()
        self.echo(f"{time.strftime('%H:%M:%S')} {task.name}: {text}")

    def _heartbeat(self) -> None:
        while not self.stopped.wait(1.0):
            for task in self.tasks:
                with task.lock:
                    quiet = time.monotonic() - task.shown
                    if task.phase and not task.done and quiet >= HEARTBEAT_S:
                        self._plain(task, f"{_short(task.phase, 40)} ({_clock(task.elapsed())})"
                                    + (f" · {task.detail}" if task.detail else ""))


QUIET = Task(Board(Console(file=io.StringIO()), mode="off"), "")
"""For callers that watch nothing (tests, benchmarks)."""
