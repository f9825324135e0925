"""How results look on a terminal (rich tables); JSON output does not come through here."""

from __future__ import annotations

from rich.table import Table

from provision.facts import HostFacts


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
