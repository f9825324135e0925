"""A converge loads only what a converge uses.

Why: every `provision host` pays for its imports before its first byte to the host, and a no-op
converge is mostly that and one facts read. The Docker SDK (the sandbox), tomlkit (team edits)
and the doctor, verify and onboard commands' modules are other commands' cost: the CLI imports
them where those commands run.
"""

from __future__ import annotations

import subprocess
import sys

OTHER_COMMANDS = ("docker", "tomlkit", "provision.sandbox", "provision.team", "provision.doctor",
                  "provision.verify", "provision.onboard")


def test_the_cli_module_leaves_other_commands_modules_unloaded() -> None:
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, provision.cli; print(*sorted(sys.modules))"],
        capture_output=True, text=True, check=True).stdout.split()
    assert "provision.engine" in loaded  # the converge's own modules are there
    assert not set(OTHER_COMMANDS) & set(loaded)
