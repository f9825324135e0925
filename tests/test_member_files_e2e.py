"""What a member puts in her home can neither hold a run nor be read by root through her link
(issue 23, holes 6 and 8).

A FIFO where provision reads (her workspace README, her authorized_keys, her Docker CLI
config) once hung every `host --plan` and `facts`: root opened it and waited for a writer. Her
~/.ssh linked to the admin's showed the admin's keys in the plan: root read through her link.
The sandbox tests re-run both on a real host over SSH; the parse tests beside them run on
transcripts written by hand.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import threading
import time

import pytest

from provision.connection import connect
from provision.errors import FactsUnreadable
from provision.facts import parse_facts
from provision.inventory import load_inventory
from provision.target import resolve_target
from tests.conftest import Host, converge, plant, step_of

# Half the facts read's own limit (FACTS_TIMEOUT_SECONDS): a run that ends within it was never
# held by her FIFO, not merely cut off.
BOUND_SECONDS = 60
# Processes of the facts script that a FIFO once left blocked on the host, as root.
READERS = "pgrep -a -u root -x 'sha256sum|head|dd|grep|sed|cat|timeout'"
FIFOS = ("sd35-fp8/README.md", ".ssh/authorized_keys", ".docker/config.json",
         ".config/systemd/user/docker.service")


def facts_json(host: Host) -> dict:
    result = host.cli("facts", host.name, "--json", timeout=BOUND_SECONDS)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.sandbox
def test_a_members_fifos_never_hold_a_run(own_host) -> None:
    host: Host = own_host
    host.add_members(["gina"])
    report = converge(host, "--yes", "--only", "users,workspace")
    assert report["exit"] == 0, report
    made = " && ".join(f"mkdir -p $(dirname {p}) && rm -f {p} && mkfifo {p}" for p in FIFOS)
    code, output = host.exec(f"cd /home/gina && {made}", user="gina")
    assert code == 0, output

    plan = host.cli("host", host.name, "--plan", timeout=BOUND_SECONDS)
    assert plan.exit_code == 0, plan.stderr
    # Her README is no file to root: seeded again, as her (the write replaces her FIFO).
    assert "seed /home/gina/sd35-fp8/README.md" in " ".join(plan.stdout.split()), plan.stdout
    facts = facts_json(host)
    for path in ("sha256:~gina/sd35-fp8/README.md", "~gina/.ssh/authorized_keys"):
        assert facts["paths"][path]["kind"] == "other", facts["paths"][path]
        assert facts["paths"][path]["content"] is None
    assert facts["accounts"]["gina"]["authorized_keys"] == 0
    assert facts["member_daemons"]["gina"]["unit"] is False
    assert facts["member_daemons"]["gina"]["context"] == ""
    code, left = host.exec(READERS)
    assert code != 0, f"a read still waits on her FIFO: {left}"

    report = converge(host, "--yes", "--only", "users,workspace")
    assert report["exit"] == 0, report
    assert host.exec("test -f /home/gina/sd35-fp8/README.md")[0] == 0


@pytest.mark.sandbox
def test_root_never_reads_through_her_link_to_the_admins_ssh(own_host) -> None:
    host: Host = own_host
    admin_keys = "/home/admin/.ssh/authorized_keys"
    code, before = host.exec(f"stat -c '%U %G %a' {admin_keys}; cat {admin_keys}")
    assert code == 0, before
    key_body = next(word for word in before.split() if word.startswith("AAAA"))
    plant(host, "frank", "ln -s /home/admin/.ssh .ssh")
    host.add_members(["frank"])

    plan = host.cli("host", host.name, "--plan", "--only", "users", timeout=BOUND_SECONDS)
    assert plan.exit_code == 0, plan.stderr
    assert key_body not in plan.stdout, plan.stdout
    assert "/home/frank/.ssh is a link to /home/admin/.ssh" in " ".join(plan.stdout.split())
    facts = facts_json(host)
    # What she sees there: nothing (the admin's ~/.ssh is not hers to enter).
    assert facts["paths"]["~frank/.ssh/authorized_keys"] == {
        "path": "~frank/.ssh/authorized_keys", "kind": "missing", "owner": "", "group": "",
        "mode": "", "target": "", "content": None}
    assert facts["accounts"]["frank"]["authorized_keys"] == 0

    report = converge(host, "--yes", "--only", "users")
    assert step_of(report, "users")["status"] == "failed"
    assert host.exec(f"stat -c '%U %G %a' {admin_keys}; cat {admin_keys}")[1] == before
    # The admin still gets in, with the key she had.
    assert host.cli("facts", host.name, "--json", timeout=BOUND_SECONDS).exit_code == 0


@pytest.mark.sandbox
def test_one_ctrl_c_ends_a_run_the_host_does_not_answer(own_host) -> None:
    """Ctrl-C once took two: the first left the run waiting on its stderr reader, which waited
    on the host."""
    host: Host = own_host
    inventory = load_inventory(host.inventory)
    conn = connect(resolve_target(host.name, inventory, host.home / "no-ssh-config"))
    ctrl_c = threading.Timer(1, os.kill, (os.getpid(), signal.SIGINT))
    started = time.monotonic()
    ctrl_c.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            conn.run("sleep 60")
    finally:
        conn.close()
    assert time.monotonic() - started < 10


def parsed_paths(*lines: str) -> dict:
    """The paths section alone, the rest of the transcript empty."""
    transcript = "\n".join(("@@@provision:paths", *lines, "@@@provision:end", ""))
    return parse_facts(transcript, "/data/cache/huggingface").paths


def test_a_path_seen_as_her_parses_like_one_root_saw() -> None:
    """Written by hand, in the shape the script prints for paths looked at as her."""
    text = base64.b64encode(b"ssh-ed25519 AAAAmine gina\n").decode()
    paths = parsed_paths(f"~hank/.ssh/authorized_keys|file|hank|hank|600|{text}",
                         "~frank/.ssh/authorized_keys|missing",
                         "sha256:~gina/sd35-fp8/README.md|other|gina|gina|644|")
    assert paths["~hank/.ssh/authorized_keys"].content == "ssh-ed25519 AAAAmine gina\n"
    assert not paths["~frank/.ssh/authorized_keys"].exists
    assert paths["sha256:~gina/sd35-fp8/README.md"].kind == "other"
    assert paths["sha256:~gina/sd35-fp8/README.md"].content is None


def test_a_batch_out_of_time_fails_the_read_rather_than_report_files_missing() -> None:
    """Written by hand: the line the paths section prints for a batch `timeout` killed."""
    with pytest.raises(FactsUnreadable, match=r"\(sha256sum\) ran past 30 s"):
        parsed_paths("/etc/hostname|file|root|root|644|", "timed-out|sha256sum|30")
