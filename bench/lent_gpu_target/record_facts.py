"""The facts transcript exactly as `provision` reads it on @local: FACTS_SCRIPT on stdin to
`sh -s` as root, with the export preamble of facts_request(inventory) (two standard paths)."""
import sys
from pathlib import Path

from provision.connection import LocalConnection
from provision.gather import FACTS_SCRIPT, facts_request
from provision.inventory import load_inventory
from provision.target import Target

inventory = load_inventory(Path(sys.argv[1]))
result = LocalConnection(Target(alias="@local")).run(FACTS_SCRIPT, env=facts_request(inventory),
                                                     what="facts")
sys.stdout.write(result.stdout)
