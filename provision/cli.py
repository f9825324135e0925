"""The `provision` command line: each command parses, calls one function, prints.

Errors a user can act on (ProvisionError) become one line on stderr and their own exit code;
a traceback only with -v.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console

from provision import views
from provision.connection import Connection, connect
from provision.engine import HostReport, RunOptions, converge_host, run_hosts
from provision.errors import (
    ChecksFailed,
    Interrupted,
    InventoryError,
    PendingChanges,
    ProvisionError,
    StepFailed,
    SudoPasswordRequired,
    UnexpectedError,
)
from provision.facts import HostFacts, parse_facts
from provision.files import atomic_write
from provision.gather import gather_facts, read_transcript
from provision.gpus import DEFAULT_IDLE_AFTER, GpuReport, parse_duration, read_usage
from provision.image import host_image
from provision.inventory import Inventory, inventory_path, load_inventory
from provision.models import debug_model
from provision.progress import Board
from provision.render import member_files, write_files
from provision.steps import paths_of
from provision.steps.order import select_steps
from provision.target import resolve_target
from provision.templating import render

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
                  help="Provision GPU servers for Stable Diffusion 3.5 FP8 team work, over SSH.")
sandbox_app = typer.Typer(no_args_is_help=True, help="A local throwaway target host.")
app.add_typer(sandbox_app, name="sandbox")
team_app = typer.Typer(no_args_is_help=True, help="The team in provision.toml.")
app.add_typer(team_app, name="team")

out = Console()
err = Console(stderr=True)


@dataclass
class Settings:
    inventory: Path
    ssh_config: Path
    verbose: bool
    accept_new_host_key: bool
    ask_sudo_pass: bool

    def load(self, *, missing_ok: bool = False) -> Inventory:
        return load_inventory(self.inventory, missing_ok=missing_ok)

    sudo_password: str | None = None

    def ask_password(self) -> None:
        """Ask once, before any work starts (several hosts run in threads)."""
        if self.ask_sudo_pass and self.sudo_password is None:
            try:
                self.sudo_password = _read_password("sudo password (admin on the host): ")
            except EOFError:
                raise SudoPasswordRequired("no sudo password was given (end of input)",
                                           "type it at the prompt, or drop --ask-sudo-pass "
                                           "for an admin with NOPASSWD sudo") from None

    def board(self) -> Board:
        """Where long work shows its progress: stderr (provision.progress says when)."""
        return Board(err, verbose=self.verbose)

    def connect(self, host: str, inventory: Inventory) -> Connection:
        target = resolve_target(host, inventory, self.ssh_config)
        self.ask_password()
        return connect(target, sudo_password=self.sudo_password,
                       accept_new_host_key=self.accept_new_host_key)


def _read_password(prompt: str) -> str:
    """At a terminal, a prompt without echo; from a pipe (scripts, CI), its first line."""
    if sys.stdin.isatty():
        return getpass.getpass(prompt)
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\n")


@app.callback()
def options(
    ctx: typer.Context,
    inventory: Annotated[Path | None, typer.Option(
        "--inventory", help="The inventory [default: ./provision.toml, or $PROVISION_INVENTORY]",
        show_default=False)] = None,
    ssh_config: Annotated[Path, typer.Option(help="ssh client config for host aliases")] = Path(
        "~/.ssh/config"),
    verbose: Annotated[bool, typer.Option(
        "-v", "--verbose", help="Full errors, and the full output of long work (build logs)")
    ] = False,
    accept_new_host_key: Annotated[bool, typer.Option(
        help="Trust an unknown host key on first use and record it in known_hosts")] = False,
    ask_sudo_pass: Annotated[bool, typer.Option(
        help="Prompt for the admin's sudo password (never logged or put on a command line)")
    ] = False,
) -> None:
    ctx.obj = Settings(inventory_path(inventory), ssh_config.expanduser(), verbose,
                       accept_new_host_key, ask_sudo_pass)


@app.command()
def init(ctx: typer.Context, dir: Annotated[Path, typer.Option(
        "--dir", help="Where to write provision.toml")] = Path(".")) -> None:
    """Write a commented provision.toml to start from."""
    path = dir / "provision.toml"
    if path.exists():
        raise InventoryError(f"{path} exists", "edit it, or pass --dir for another place")
    atomic_write(path, render("provision.toml.j2"))
    out.print(f"wrote {path}")


@app.command()
def facts(ctx: typer.Context, host: str,
          as_json: Annotated[bool, typer.Option("--json", help="One JSON document")] = False,
          raw: Annotated[bool, typer.Option(
              "--raw", help="The facts script's output as the host printed it (for fixtures "
                            "and bug reports)")] = False,
          ) -> None:
    """What the tool sees on HOST, read in one round trip."""
    settings: Settings = ctx.obj
    inventory = settings.load(missing_ok=True)
    # The paths every step reads too, so this is all a converge would see.
    paths = paths_of(select_steps(None, None), inventory)
    with settings.connect(host, inventory) as conn:
        transcript = read_transcript(conn, inventory, paths)
    if raw:
        print(transcript, end="")
        return
    host_facts = parse_facts(transcript, inventory.defaults.cache_dir)
    if as_json:
        print(json.dumps(host_facts.to_json(), indent=2))
    else:
        out.print(views.facts_table(host, host_facts))


@app.command("host")
def host_command(
    ctx: typer.Context,
    hosts: Annotated[list[str], typer.Argument(help="Host aliases (inventory or ~/.ssh/config)")],
    plan: Annotated[bool, typer.Option("--plan", help="Show every change; change nothing")
                    ] = False,
    check: Annotated[bool, typer.Option(
        "--check", help="Like --plan, and exit non-zero when changes are pending (CI)")] = False,
    only: Annotated[str | None, typer.Option(help="Only these steps (comma-separated)")
                    ] = None,
    skip: Annotated[str | None, typer.Option(help="Skip these steps (comma-separated)")
                    ] = None,
    yes: Annotated[bool, typer.Option(
        "--yes", help="Allow a Docker restart even with containers running")] = False,
    require_gpu: Annotated[bool, typer.Option(
        "--require-gpu", help="Fail (not skip) the nvidia step on a host without a GPU")
    ] = False,
    force: Annotated[bool, typer.Option(
        "--force", help="Overwrite workspace files members edited (a backup is kept)")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document")] = False,
) -> None:
    """Converge HOSTs: plan each step, show it, apply it, re-read and confirm."""
    settings: Settings = ctx.obj
    inventory = settings.load()
    steps = select_steps(_names(only), _names(skip))
    for alias in hosts:
        resolve_target(alias, inventory, settings.ssh_config)
    settings.ask_password()
    options = RunOptions(apply=not (plan or check), yes=yes, require_gpu=require_gpu,
                         force=force)

    with settings.board() as board:
        tasks = {alias: board.task(alias) for alias in hosts}

        def work(alias: str) -> HostReport:
            with settings.connect(alias, inventory) as conn, tasks[alias] as task:
                return converge_host(conn, inventory, steps, options, task)

        reports = run_hosts(hosts, work)
    if as_json:
        print(json.dumps({"ok": all(r.ok for r in reports), "applied": options.apply,
                          "hosts": [r.to_json() for r in reports]}, indent=2))
    else:
        for report in reports:
            out.print(views.plan_lines(report))
        out.print(views.summary_table(reports))
    _raise_for_reports(reports, check)


def _names(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def _raise_for_reports(reports: list[HostReport], check: bool) -> None:
    failed = [r for r in reports if not r.ok]
    if len(reports) == 1 and failed and failed[0].error:
        raise failed[0].error
    if failed:
        raise StepFailed(f"{len(failed)} of {len(reports)} host(s) failed: " + "; ".join(
            r.error.line() if r.error else
            f"{r.host} did not converge ({'; '.join(c.summary for c in r.drift)})"
            for r in failed))
    if check and any(r.pending for r in reports):
        pending = sum(len(s.changes) for r in reports for s in r.steps)
        raise PendingChanges(f"{pending} change(s) pending",
                             "run without --check to apply them")


@app.command()
def doctor(
    ctx: typer.Context, host: str,
    member: Annotated[str | None, typer.Option(help="Check this member only")] = None,
    image: Annotated[str | None, typer.Option(
        help="The image to look inside [default: the one 'provision verify' builds]")] = None,
    min_free_gb: Annotated[float, typer.Option(help="Free space the cache volume needs")
                           ] = 50.0,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document")] = False,
) -> None:
    """Check each known failure on HOST; print the evidence and a remedy for each."""
    from provision.doctor import run_doctor  # imported where used: a converge never needs it

    settings: Settings = ctx.obj
    inventory = settings.load()
    members = (inventory.member(member),) if member else inventory.members
    with settings.connect(host, inventory) as conn:
        found = run_doctor(conn, inventory, members, image, min_free_gb)
    if as_json:
        print(json.dumps({"host": host, "checks": [c.to_json() for c in found]}, indent=2))
    else:
        out.print(views.doctor_table(host, found))
    failed = [c for c in found if c.status == "fail"]
    if failed:
        raise ChecksFailed(f"{host}: {len(failed)} check(s) failed: "
                           + "; ".join(c.name for c in failed), "see the remedies above")


@app.command()
def gpus(
    ctx: typer.Context,
    hosts: Annotated[list[str], typer.Argument(help="Host aliases (inventory or ~/.ssh/config)")],
    as_json: Annotated[bool, typer.Option(
        "--json", help="One JSON document (with --watch: one a line, each refresh)")] = False,
    watch: Annotated[float | None, typer.Option(
        help="Refresh every SECONDS until Ctrl-C", min=1, metavar="SECONDS")] = None,
    idle_after: Annotated[str, typer.Option(
        help="Call a process idle after this long at 0 % (30m, 2h, 1d)", metavar="DURATION")
    ] = DEFAULT_IDLE_AFTER,
) -> None:
    """Who uses which GPU on HOSTs: each GPU's processes, whose they are, their container,
    each member's assignment against her use, and what sits idle (nothing is stopped)."""
    settings: Settings = ctx.obj
    inventory = settings.load(missing_ok=True)
    idle_after_s = parse_duration(idle_after)
    with contextlib.ExitStack() as opened:
        conns = {host: opened.enter_context(settings.connect(host, inventory)) for host in hosts}

        def show() -> None:
            reports = [read_usage(conn, inventory, host, idle_after_s)
                       for host, conn in conns.items()]
            _show_gpus(reports, as_json, indent=None if watch else 2)

        if watch is None:
            show()
            return
        try:
            while True:
                show()
                time.sleep(watch)
        except Interrupted:
            return  # Ctrl-C is how a watch ends: no error


def _show_gpus(reports: list[GpuReport], as_json: bool, indent: int | None) -> None:
    if as_json:
        print(json.dumps({"hosts": [r.to_json() for r in reports]}, indent=indent), flush=True)
        return
    out.clear()  # a terminal shows the latest refresh alone; a pipe gets each in turn
    for report in reports:
        out.print(views.gpus_view(report))


def _facts(settings: Settings, host: str, inventory: Inventory) -> HostFacts:
    """What the rendered files need of the host: the cache group's gid (the container's
    supplementary group), the shared cache's models and her GPUs' memory."""
    with settings.connect(host, inventory) as conn:
        return gather_facts(conn, inventory)


@app.command("render")
def render_command(
    ctx: typer.Context,
    out_dir: Annotated[Path, typer.Option("--out", help="Where to write the files")],
    host: Annotated[str | None, typer.Option(
        help="Render for this host (its cache group's gid, her ssh block)")] = None,
    member: Annotated[str | None, typer.Option(help="Only this member (else one folder each)")
                      ] = None,
    identity_file: Annotated[str, typer.Option(help="Her private key, in her ssh block")
                             ] = "~/.ssh/id_ed25519",
) -> None:
    """Render the dev container, VS Code debug config, settings and inference.py."""
    settings: Settings = ctx.obj
    inventory = settings.load()
    members = (inventory.member(member),) if member else inventory.members
    if not members:
        raise InventoryError(f"{inventory.path}: no members", "add one: provision team add")
    target = resolve_target(host, inventory, settings.ssh_config) if host else None
    facts = _facts(settings, host, inventory) if host else None
    image = host_image(facts, inventory)
    if facts is not None:
        err.print(f"{host}: {image.choice}")
    for each in members:
        files = member_files(inventory, each, image, host_alias=host, target=target, facts=facts,
                             identity_file=identity_file)
        written = write_files(files, out_dir if member else out_dir / each.name)
        model = debug_model(each, facts)
        err.print(f"{each.name}: {len(written)} files in {written[0].parent.parent}; "
                  f"launch.json runs --model {model.model} ({model.why})")


@app.command()
def onboard(
    ctx: typer.Context, name: str,
    host: Annotated[str, typer.Option(help="The host she will work on")],
    out_dir: Annotated[Path | None, typer.Option(
        "--out", help="Bundle folder [default: ./onboard-NAME]")] = None,
    identity_file: Annotated[str, typer.Option(help="Her private key, in her ssh block")
                             ] = "~/.ssh/id_ed25519",
    merge_into: Annotated[Path | None, typer.Option(
        help="Also merge her ssh block into this ssh config (marked block, backup kept)")
    ] = None,
) -> None:
    """A teammate's bundle: her ssh config block, workspace files and the three steps."""
    from provision.onboard import bundle, merge_ssh_block  # likewise

    settings: Settings = ctx.obj
    inventory = settings.load()
    member = inventory.member(name)
    target = resolve_target(host, inventory, settings.ssh_config)
    folder = out_dir or Path(f"onboard-{name}")
    facts = _facts(settings, host, inventory)
    written = bundle(inventory, member, host, target, facts, identity_file, folder)
    model = debug_model(member, facts)
    err.print(f"{len(written)} files in {folder}: send her the folder; README.md has the steps; "
              f"launch.json runs --model {model.model} ({model.why})")
    if merge_into is not None:
        block = (folder / "ssh_config").read_text()
        changed = merge_ssh_block(merge_into.expanduser(), block, name, host)
        err.print(f"{merge_into}: {'ssh block merged' if changed else 'already up to date'}")


@app.command("verify")
def verify_command(
    ctx: typer.Context, host: str,
    member: Annotated[str | None, typer.Option(help="Whose dev container [default: first]")
                      ] = None,
    model: Annotated[str | None, typer.Option(
        help="tiny|medium|large (random weights) or an HF id in the shared cache "
             "[default: large on a GPU, tiny on a CPU]")] = None,
    fp8: Annotated[str, typer.Option(help="off|storage|dq")] = "dq",
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document")] = False,
    out_dir: Annotated[Path, typer.Option("--out", help="Where the PNG is copied")] = Path("."),
    service: Annotated[bool, typer.Option(
        "--service", help="Call HOST's generation service ([service]) through the SSH "
                          "connection instead: /health, then one image")] = False,
) -> None:
    """Build the dev-container image on HOST and generate in it, FP8 against bf16."""
    from provision.verify import verify, verify_service  # likewise

    settings: Settings = ctx.obj
    if fp8 not in ("off", "storage", "dq"):
        raise InventoryError(f"--fp8 {fp8!r}", "use off, storage or dq")
    inventory = settings.load()
    if service:
        with settings.connect(host, inventory) as conn, settings.board() as board, \
                board.task(host) as task:
            called = verify_service(conn, inventory, out=out_dir, progress=task)
        if as_json:
            print(json.dumps(called.to_json(), indent=2))
        else:
            out.print(views.service_table(called))
        return
    if not inventory.members:
        raise InventoryError(f"{inventory.path}: no members", "add one: provision team add")
    chosen = inventory.member(member) if member else inventory.members[0]
    with settings.connect(host, inventory) as conn, settings.board() as board, \
            board.task(host) as task:
        task.status("reading facts")
        facts = gather_facts(conn, inventory)
        report = verify(conn, inventory, chosen, facts, host_image(facts, inventory), model=model,
                        fp8=fp8, out=out_dir, progress=task)
    if as_json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        out.print(views.verify_table(report))


NameOption = Annotated[str, typer.Option("--name", help="The sandbox's name and host alias")]


@sandbox_app.command("up")
def sandbox_up(ctx: typer.Context, name: NameOption = "sandbox",
               one_filesystem: Annotated[bool, typer.Option(
                   "--one-filesystem",
                   help="Homes on the sandbox's root filesystem, as on a one-disk server "
                        "(members' rootless Docker then runs fuse-overlayfs: slower builds)",
               )] = False) -> None:
    """Start a local target host (systemd + sshd on 127.0.0.1) and add it to the inventory."""
    from provision import sandbox as sandboxes  # the Docker SDK costs every other command 0.1 s

    with ctx.obj.board() as board, board.task(name) as task:
        sandboxes.up(name, ctx.obj.inventory, log=board.echo, try_it=True,
                     one_filesystem=one_filesystem, progress=task)


@sandbox_app.command("down")
def sandbox_down(ctx: typer.Context, name: NameOption = "sandbox") -> None:
    """Remove the sandbox and everything `up` made for it."""
    from provision import sandbox as sandboxes

    if not sandboxes.down(name, ctx.obj.inventory, log=err.print):
        err.print(f"no sandbox named {name!r}")


@sandbox_app.command("status")
def sandbox_status(ctx: typer.Context, name: NameOption = "sandbox") -> None:
    """Whether the sandbox runs, and how to reach it."""
    from provision import sandbox as sandboxes

    print(json.dumps(sandboxes.status(name, ctx.obj.inventory), indent=2))


@team_app.command("add")
def team_add(
    ctx: typer.Context, name: str,
    key: Annotated[Path, typer.Option("--key", help="Her SSH public key (.pub)")],
    gpus: Annotated[str, typer.Option(help='Her CUDA_VISIBLE_DEVICES: "all", "0", "0,1"')
                    ] = "all",
    sudo: Annotated[list[str] | None, typer.Option(
        "--sudo", help="A command she may run with sudo (absolute path; repeatable)")] = None,
) -> None:
    """Add a member (comments and order of provision.toml are kept)."""
    from provision import team  # tomlkit, which only edits need, costs every command ~15 ms

    member = team.add(ctx.obj.inventory, name, key, gpus, tuple(sudo or ()))
    err.print(f"added {member.name}; run 'provision host HOST' to create her account")


@team_app.command("remove")
def team_remove(ctx: typer.Context, name: str) -> None:
    """Remove a member; the next converge offboards her (locked, keys removed, home kept)."""
    from provision import team

    team.remove(ctx.obj.inventory, name)
    err.print(f"removed {name}; run 'provision host HOST' to offboard her there")


@team_app.command("list")
def team_list(ctx: typer.Context,
              as_json: Annotated[bool, typer.Option("--json", help="One JSON document")] = False
              ) -> None:
    """The members, their keys, sudo commands and GPUs."""
    members = ctx.obj.load().members
    if as_json:
        print(json.dumps([{"name": m.name, "keys": [k.split()[-1] for k in m.keys],
                           "sudo": list(m.sudo), "gpus": m.gpus} for m in members], indent=2))
    else:
        out.print(views.team_table(members))


VERBOSE_FLAGS = ("-v", "--verbose")


def verbose_first(args: list[str]) -> list[str]:
    """-v may follow the subcommand (`provision host web -v`): move it to where typer reads
    global options. Arguments after `--` are left alone."""
    end = args.index("--") if "--" in args else len(args)
    flags = [a for a in args[:end] if a in VERBOSE_FLAGS]
    return [*flags[:1], *(a for a in args[:end] if a not in VERBOSE_FLAGS), *args[end:]]


def _on_sigint(signum: int, frame: object) -> None:
    raise Interrupted("interrupted", "a step the host already received runs to its end; rerun "
                                     "to finish converging")


def _report(exc: ProvisionError, verbose: bool) -> NoReturn:
    if verbose and exc.detail:
        err.print(exc.detail.rstrip(), markup=False, highlight=False)
    elif verbose:
        err.print_exception()
    err.print(f"error: {exc.line()}", markup=False, highlight=False, soft_wrap=True)
    sys.stdout.flush()
    sys.stderr.flush()
    if isinstance(exc, Interrupted):
        # Worker threads (one per host) would hold the exit until their host is done.
        os._exit(exc.exit_code)
    sys.exit(exc.exit_code)


def main() -> None:
    """Usage errors, --help and a missing argument are typer's own (usage on stderr, exit 2);
    everything provision raises is one line, with the detail and traceback only under -v."""
    args = verbose_first(sys.argv[1:])
    verbose = bool(args) and args[0] in VERBOSE_FLAGS
    signal.signal(signal.SIGINT, _on_sigint)
    try:
        app(args=args, prog_name="provision")
    except ProvisionError as exc:
        _report(exc, verbose)
    except Exception as exc:
        _report(UnexpectedError.wrap("provision", exc), verbose)
