"""How results look on a terminal (rich tables); JSON output does not come through here."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Group
from rich.table import Table
from rich.text import Text

from provision.engine import HostReport
from provision.facts import HostFacts
from provision.gpus import NO_GPU, GpuProcess, GpuReport
from provision.inventory import Member

if TYPE_CHECKING:  # only the commands that make these reports import their modules
    from provision.doctor import Check
    from provision.verify import ServiceReport, VerifyReport


def facts_table(host: str, facts: HostFacts) -> Table:
    table = Table(title=f"facts: {host}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    gpus = ", ".join(f"{g.index}: {g.name} (cc {g.compute_capability}, driver {g.driver}, "
                     f"{g.memory_mib} MiB)" for g in facts.nvidia.gpus)
    if not gpus:
        gpus = (f"{len(facts.nvidia.pci_devices)} NVIDIA device(s), nvidia-smi failed: "
                f"{facts.nvidia.smi_error[:60]}" if facts.nvidia.pci_devices else "none")
    sshd = facts.sshd
    rows = [
        ("os", f"{facts.os.pretty_name} ({facts.os.arch}, kernel {facts.os.kernel})"),
        ("init", f"{facts.init} {facts.system_state}".strip()),
        ("admin", f"uid {facts.uid}" + (f" via sudo from {facts.sudo_user}"
                                         if facts.sudo_user else "")),
        ("sshd keepalive", f"ClientAliveInterval {sshd.client_alive_interval}, "
                           f"ClientAliveCountMax {sshd.client_alive_count_max}"
                           + ("" if sshd.test_ok else f" (sshd -t fails: {sshd.test_error})")),
        ("cache dir", f"{facts.cache.path}: " + (
            f"{facts.cache.owner}:{facts.cache.group} {facts.cache.mode}"
            if facts.cache.exists else "missing")),
        ("disk free", f"{facts.disk.free_bytes / 2**30:.1f} GiB of "
                      f"{facts.disk.total_bytes / 2**30:.1f} GiB on {facts.disk.path}"
         if facts.disk else "unknown"),
        ("docker", (f"{facts.docker.version or 'installed'}, "
                    f"{'running' if facts.docker.active else 'stopped'}, runtimes: "
                    f"{', '.join(facts.docker.runtimes) or '-'}")
         if facts.docker.installed else "not installed"),
        ("gpus", gpus),
        ("nvidia-ctk", facts.nvidia.ctk_version or "not installed"),
        ("apt lock", facts.apt_lock_holder or "free"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    return table


STATUS_STYLE = {"changed": "green", "unchanged": "dim", "pending": "yellow", "failed": "red",
                "skipped": "cyan", "not run": "dim red"}


def plan_lines(report: HostReport) -> Group:
    """Every change of every step, with warnings and file diffs, as a user reads a plan."""
    parts: list[object] = [Text(f"{report.host}", style="bold")]
    for step in report.steps:
        if step.message and step.status != "failed":
            parts.append(Text(f"  [{step.name}] {step.message}", style="cyan"))
        for change in step.changes:
            # ~ to do, + done, ! tried by a step that failed (done up to the failure)
            verb = {"pending": "~", "failed": "!"}.get(step.status, "+")
            parts.append(Text(f"  {verb} [{step.name}] {change.summary}"))
            if change.warning:
                parts.append(Text(f"      warning: {change.warning}", style="yellow"))
            if change.restarts_docker:
                parts.append(Text("      warning: restarts Docker (running containers stop; "
                                  "needs --yes when any run)", style="yellow"))
            parts.extend(Text(f"      {line}", style=_diff_style(line))
                         for line in change.diff().splitlines())
        if step.status == "failed":
            # Every failed step says why: several can fail, independently, in one run.
            parts.append(Text(f"  [{step.name}] failed: {step.message}", style="red"))
    if not any(step.changes for step in report.steps) and report.error is None:
        parts.append(Text("  nothing to change", style="dim"))
    return Group(*parts)


def _diff_style(line: str) -> str:
    if line.startswith(("+++", "---", "@@")):
        return "bold"
    return {"+": "green", "-": "red"}.get(line[:1], "")


def summary_table(reports: list[HostReport]) -> Table:
    table = Table(title="provision host: summary")
    table.add_column("host", style="bold")
    table.add_column("step")
    table.add_column("status")
    table.add_column("changes", justify="right")
    table.add_column("time", justify="right")
    for report in reports:
        for step in report.steps:
            table.add_row(report.host, step.name, Text(step.status,
                                                       style=STATUS_STYLE[step.status]),
                          str(len(step.changes)), f"{step.seconds:.2f} s")
        if report.error:
            table.add_row(report.host, "", Text(report.error.line(), style="red"), "",
                          f"{report.seconds:.2f} s")
        elif report.drift:
            table.add_row(report.host, "", Text("not converged: " + "; ".join(
                c.summary for c in report.drift), style="red"), "", "")
        else:
            table.add_row(report.host, "", Text("ok", style="green"), "",
                          f"{report.seconds:.2f} s")
    return table


def team_table(members: tuple[Member, ...]) -> Table:
    table = Table(title="team")
    for column in ("name", "keys", "sudo", "gpus"):
        table.add_column(column)
    for member in members:
        table.add_row(member.name, "\n".join(k.split()[-1] for k in member.keys),
                      "\n".join(member.sudo) or "-", member.gpus)
    return table


DOCTOR_STYLE = {"pass": "green", "fail": "bold red", "warn": "yellow", "skip": "dim"}


def doctor_table(host: str, checks: list[Check]) -> Table:
    table = Table(title=f"doctor: {host}")
    for column in ("check", "status", "evidence", "remedy"):
        table.add_column(column)
    for check in checks:
        table.add_row(check.name, Text(check.status, style=DOCTOR_STYLE[check.status]),
                      check.evidence, check.remedy)
    return table


def verify_table(report: VerifyReport) -> Table:
    table = Table(title=f"verify: {report.member} on {report.host} ({report.device_note})")
    table.add_column("", style="bold")
    runs = list(report.runs)
    for mode in runs:
        table.add_column(f"--fp8 {mode}", justify="right")
    first = report.runs[runs[0]] if runs else {}
    for label, key in (("device", "device"), ("gpu", "gpu"), ("compute capability",
                       "compute_capability"), ("torch", "torch"), ("diffusers", "diffusers"),
                       ("model", "model"), ("FP8 applied", "fp8_applied"),
                       ("compiled", "compiled"), ("ms per step", "step_ms_mean"),
                       ("total s", "total_s"),
                       ("peak GiB", "peak_mem_gib"), ("weights GiB", "transformer_weights_gib"),
                       ("latents", "latents_shape")):
        if key in first:
            table.add_row(label, *(str(report.runs[m].get(key)) for m in runs))
    comparison = ", ".join(f"{k} {v}" for k, v in report.comparison.items())
    table.caption = (f"image {report.image} ({'built' if report.built else 'cached'}; "
                     f"{report.image_choice}); "
                     f"FP8 vs bf16: {comparison}; PNG: {report.png}")
    return table


def service_table(report: ServiceReport) -> Table:
    health, metrics = report.health, report.metrics
    table = Table(title=f"service on {report.host} ({report.address}, through SSH)",
                  show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for label, value in (
            ("status", health.get("status")),
            ("device", health.get("gpu") or health.get("device")),
            ("model", f"{health.get('model')} ({health.get('weights')})"),
            ("FP8", f"requested {health.get('fp8_requested')}, applied "
                    f"{health.get('fp8_applied')}"),
            ("compiled", health.get("compiled")),
            ("image", f"{report.request['height']}x{report.request['width']}, "
                      f"{report.request['steps']} steps"),
            ("ms per step", metrics.get("step_ms_mean")),
            ("generation s", metrics.get("total_s")),
            ("request s (through SSH)", report.seconds),
            ("peak GiB", metrics.get("peak_mem_gib")),
            ("PNG", report.png)):
        table.add_row(label, str(value))
    return table


def gpus_view(report: GpuReport) -> Group | Text:
    """Per GPU its processes and whose they are, the unused GPUs, each member's assignment
    against her use, and what is idle (the JSON carries the same)."""
    if report.no_gpu:
        return Text(f"{report.host}: {NO_GPU}")
    table = Table(title=f"gpus: {report.host}")
    for column in ("gpu", "memory", "util", "pid", "whose", "container", "its memory",
                   "running", "idle"):
        table.add_column(column)
    for gpu in report.gpus:
        head = [f"{gpu.index}: {gpu.name}",
                f"{_mib(gpu.memory_used_mib)} / {_mib(gpu.memory_total_mib)}",
                "?" if gpu.utilisation is None else f"{gpu.utilisation} %"]
        if not gpu.processes:
            table.add_row(*head, "-", Text("unused", style="dim"), "", "", "", "")
        for n, process in enumerate(gpu.processes):
            table.add_row(*(head if n == 0 else ["", "", ""]), *_process_cells(process))
    idle_after = _duration(report.idle_after_s)
    parts: list[Table | Text] = [table]
    if report.unused:
        parts.append(Text("unused: " + ", ".join(f"GPU {i}" for i in report.unused)))
    parts.extend(Text(a.line, style="yellow" if a.outside else "") for a in report.assignments)
    parts.append(Text(f"idle: GPU memory held while its GPU was at 0 % in every refresh for "
                      f"{idle_after} or more, measured from the last refresh that saw it busy "
                      "(else the first that saw the process); nothing is stopped", style="dim"))
    return Group(*parts)


def _process_cells(process: GpuProcess) -> list[str | Text]:
    container = process.container
    where = "-" if container is None else (
        f"{container.name} ({container.image}), {container.daemon}" if container.name
        else f"{container.id[:12]}, {container.daemon}")
    idle = Text(f"idle {_duration(process.idle_s)}", style="bold yellow") if process.idle \
        else ""
    return [str(process.pid), f"{process.owner} ({process.comm})", where,
            _mib(process.memory_mib),
            "?" if process.running_s is None else _duration(process.running_s), idle]


def _mib(value: int | None) -> str:
    return "?" if value is None else f"{value} MiB"


def _duration(seconds: int) -> str:
    """2d 3h, 2h, 5m 2s, 40s: the two largest units, a zero second one left out."""
    for unit, size, smaller, smaller_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60),
                                              ("m", 60, "s", 1)):
        if seconds >= size:
            big, rest = divmod(seconds, size)
            small = rest // smaller_size
            return f"{big}{unit} {small}{smaller}" if small else f"{big}{unit}"
    return f"{seconds}s"
