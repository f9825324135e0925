"""Local files written whole or not at all.

One helper for the idea: a temporary file beside the target, then a rename, so a reader (or an
interrupted run) never sees half a file, and a failed write leaves the old file as it was.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path


def atomic_write(path: Path, content: str, mode: int | None = None) -> None:
    """`mode` None: the mode of the file replaced (an admin's 0600 inventory stays 0600), 0644
    for a new one."""
    if mode is None:
        mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o644
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as stream:
            stream.write(content)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
