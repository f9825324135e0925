"""A block of lines between two marker lines, set in a text that others edit too.

One helper for the idea, used for a member's `authorized_keys` on the host and for the ssh
config on her laptop: the block is replaced where it stands, or appended (after a blank line
when the text does not end with one); every line outside it is kept as it was.
"""

from __future__ import annotations


def set_block(text: str | None, begin: str, end: str, body: list[str]) -> str:
    """`text` with the lines between `begin` and `end` (markers included) set to `body`."""
    lines = (text or "").splitlines()
    block = [begin, *body, end]
    if begin in lines and end in lines[lines.index(begin):]:
        start = lines.index(begin)
        lines[start:lines.index(end, start) + 1] = block
    else:
        lines += ([""] if lines and lines[-1].strip() else []) + block
    return "\n".join(lines) + "\n"
