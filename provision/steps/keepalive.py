"""keepalive: sshd's ClientAlive settings in a drop-in, validated, reloaded (never restarted).

sshd keeps the first value it reads, and Debian/Ubuntu include sshd_config.d/*.conf at the top
of sshd_config in name order, so the drop-in is named to sort first. A config that fails
`sshd -t` with the drop-in in place gets the drop-in removed and no reload: the admin's own
session, and sshd itself, stay as they were. A host without sshd (openssh-server not
installed: a lent machine, a container) has no keepalive to set: the step is skipped, saying so.
"""

from __future__ import annotations

from provision.changes import Change, Run, WriteFile
from provision.facts import HostFacts
from provision.inventory import Inventory
from provision.steps import Step, StepBlocked, StepSkipped
from provision.templating import render

NAME = "keepalive"
MAIN = "/etc/ssh/sshd_config"
DROPIN = "/etc/ssh/sshd_config.d/01-provision-keepalive.conf"
INCLUDE = "Include /etc/ssh/sshd_config.d/*.conf"
RELOAD = render("host/sshd-reload.sh.j2", dropin=DROPIN)


def paths(inventory: Inventory) -> tuple[str, ...]:
    return (MAIN, DROPIN)


def plan(facts: HostFacts, inventory: Inventory) -> list[Change]:
    if "sshd" not in facts.tools:
        raise StepSkipped("skipped: no sshd on this host (openssh-server is not installed)",
                          "install openssh-server if members are to log in over SSH, then rerun")
    if not facts.sshd.test_ok:
        first = (facts.sshd.test_error.strip().splitlines() or ["no detail"])[0]
        raise StepBlocked(f"sshd's configuration already fails 'sshd -t' ({first})",
                          "fix it first; provision will not touch or reload a broken sshd")
    defaults = inventory.defaults
    wanted = render("host/sshd-keepalive.conf.j2",
                    keepalive_interval=defaults.keepalive_interval,
                    keepalive_count_max=defaults.keepalive_count_max)
    changes = []
    main = facts.path(MAIN)
    if not facts.sshd.includes_dropins and main.content is not None:
        changes.append(Change(
            NAME, f"{MAIN} does not include sshd_config.d: add '{INCLUDE}' at its top",
            (WriteFile(MAIN, f"{INCLUDE}\n{main.content}", main.content,
                       mode=f"0{main.mode}", validate="sshd -t -f {}"),)))
    dropin = facts.path(DROPIN)
    in_effect = (facts.sshd.client_alive_interval == defaults.keepalive_interval
                 and facts.sshd.client_alive_count_max == defaults.keepalive_count_max)
    if dropin.content != wanted or changes:
        changes.append(Change(
            NAME, f"sshd keepalive: ClientAliveInterval {defaults.keepalive_interval}, "
                  f"ClientAliveCountMax {defaults.keepalive_count_max}; validate, then reload",
            (WriteFile(DROPIN, wanted, dropin.content, validate="sshd -t -f {}"), Run(RELOAD))))
    elif not in_effect:
        changes.append(Change(
            NAME, f"reload sshd: {DROPIN} is in place but sshd -T shows ClientAliveInterval "
                  f"{facts.sshd.client_alive_interval}, ClientAliveCountMax "
                  f"{facts.sshd.client_alive_count_max}", (Run(RELOAD),)))
    return changes


STEP = Step(NAME, plan, paths)
