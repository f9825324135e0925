"""Reading a host: the facts script (templates/host/facts.sh) run over a `Connection` in one
round trip, its transcript handed to `facts.parse_facts`.

Apart from `facts` so that the parser stays pure: it knows the transcript, not the connection
or the inventory that asks for it.
"""

from __future__ import annotations

from provision.connection import Connection
from provision.contract import SERVICE_UNIT
from provision.errors import FactsUnreadable, RemoteCommandFailed
from provision.facts import DAEMON_JSON, STATE_FILE, HostFacts, parse_facts
from provision.inventory import SERVICE_NAME, Inventory
from provision.templating import raw

# How long the facts read may go without a word from the host before it fails (the script bounds
# each read of a member's files far below it; this is for a hung mount, a stuck daemon).
FACTS_TIMEOUT_SECONDS = 120

# POSIX sh (templates/host/facts.sh, shellcheck-clean): runs on any target, never stops at a
# failing probe, prints every section.
FACTS_SCRIPT = raw("host/facts.sh")


def facts_request(inventory: Inventory, paths: tuple[str, ...] = ()) -> dict[str, str]:
    """The environment the facts script reads: which accounts, cache dir and paths matter."""
    return {
        "PROVISION_ACCOUNTS": " ".join(sorted(m.name for m in inventory.members)),
        "PROVISION_CACHE_DIR": inventory.defaults.cache_dir,
        # Probed with or without [service]: a service removed from the inventory is stopped.
        "PROVISION_UNITS": SERVICE_UNIT,
        # Its own daemon (rootless mode) is looked at like a member's, its images listed too.
        "PROVISION_SERVICE_ACCOUNT": SERVICE_NAME,
        "PROVISION_PATHS": "\n".join((STATE_FILE, DAEMON_JSON, *paths)),
        # Only when the tool chooses Docker's source and no mirror stands for the repository.
        "PROVISION_PROBE_DOCKER_REPO": "1" if inventory.defaults.docker_source == "auto"
        and not inventory.mirrors.docker_apt else "",
    }


def gather_facts(conn: Connection, inventory: Inventory, paths: tuple[str, ...] = ()) -> HostFacts:
    """One round trip: run the facts script as root and parse what it printed.

    `paths` (absolute, or `~name/…` inside an account's home) are stat'ed, files also read.
    """
    transcript = read_transcript(conn, inventory, paths)
    return parse_facts(transcript, inventory.defaults.cache_dir)


def read_transcript(conn: Connection, inventory: Inventory, paths: tuple[str, ...] = ()) -> str:
    """What the facts script prints, unparsed: what recorded fixtures and bug reports hold.

    Bounded in time, so nothing on the host (a member's special file, a hung mount) can hold
    a plan or a converge: past the limit the read fails with one line.
    """
    try:
        result = conn.run(FACTS_SCRIPT, env=facts_request(inventory, paths), what="facts",
                          timeout=FACTS_TIMEOUT_SECONDS, check=False)
    except RemoteCommandFailed:  # unchecked, a run raises it only when out of time
        raise FactsUnreadable(f"{conn.name}: the facts read got no answer for "
                              f"{FACTS_TIMEOUT_SECONDS} s",
                              "check the host's mounts and load (a hung NFS or FUSE mount, a "
                              "stuck nvidia-smi or Docker daemon), then rerun") from None
    if not result.ok:
        raise FactsUnreadable(f"{conn.name}: the facts script failed with exit code "
                              f"{result.exit_code}: {result.tail()}",
                              "rerun with -v for the full output", detail=result.output())
    return result.stdout
