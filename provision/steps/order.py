"""The converge steps in the order they run: later steps use what earlier ones create (the
users step makes the cache group the hf-cache step needs, Docker comes before the NVIDIA
toolkit that registers itself in it, the service comes last).

Apart from steps/__init__.py, which every step imports for what they share, so that this
list can import the steps at its top.
"""

from __future__ import annotations

from provision.errors import InventoryError
from provision.steps import (
    Step,
    docker,
    hf_cache,
    keepalive,
    nvidia,
    rootless,
    service,
    users,
    workspace,
)

STEPS: tuple[Step, ...] = (users.STEP, keepalive.STEP, hf_cache.STEP, docker.STEP, rootless.STEP,
                           nvidia.STEP, workspace.STEP, service.STEP)


def select_steps(only: list[str] | None, skip: list[str] | None) -> tuple[Step, ...]:
    names = [s.name for s in STEPS]
    for name in (only or []) + (skip or []):
        if name not in names:
            raise InventoryError(f"unknown step {name!r}", f"steps are {', '.join(names)}")
    return tuple(s for s in STEPS
                 if (not only or s.name in only) and s.name not in (skip or []))
