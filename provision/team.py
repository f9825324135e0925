"""`provision team add|remove|list`: edit the inventory's [[members]] in place.

tomlkit round-trips the file, so the admin's comments and ordering survive. The edited text is
validated as a whole, exactly as loading does, before it replaces the old file.
"""

from __future__ import annotations

from pathlib import Path

import tomlkit
import tomlkit.exceptions

from provision.errors import InventoryError
from provision.files import atomic_write
from provision.inventory import Inventory, Member, parse_inventory, validate_member_name


def _document(path: Path) -> tomlkit.TOMLDocument:
    if not path.exists():
        raise InventoryError(f"{path}: no such inventory", "run 'provision init' first")
    try:
        return tomlkit.parse(path.read_text())
    except tomlkit.exceptions.ParseError as exc:
        raise InventoryError(f"{path}:{exc.line}: not valid TOML ({exc})",
                             "fix the syntax; the file was not changed") from None


def _save(path: Path, document: tomlkit.TOMLDocument) -> Inventory:
    """Validate the new text like a load does, then replace the file atomically."""
    text = tomlkit.dumps(document)
    inventory = parse_inventory(document.unwrap(), path, text)
    atomic_write(path, text)
    return inventory


def _key_reference(path: Path, key_file: Path) -> str:
    """How the inventory names the key: relative to the inventory when it lies beside it."""
    key = key_file.resolve()
    try:
        return str(key.relative_to(path.resolve().parent))
    except ValueError:
        return str(key)


def add(path: Path, name: str, key_file: Path, gpus: str = "all",
        sudo: tuple[str, ...] = ()) -> Member:
    validate_member_name(name)
    if not key_file.is_file():
        raise InventoryError(f"key file {key_file} not found", "give the member's .pub file")
    document = _document(path)
    members = document.get("members")
    if members is None:
        members = tomlkit.aot()
        document.append("members", members)
    if any(m.get("name") == name for m in members):
        raise InventoryError(f"{path}: member {name!r} exists",
                             "edit her entry, or 'provision team remove' first")
    if len(members):
        members[-1].add(tomlkit.nl())  # a blank line between members, as people write them
    entry = tomlkit.table()
    entry["name"] = name
    entry["keys"] = [_key_reference(path, key_file)]
    entry["sudo"] = list(sudo)
    entry["gpus"] = gpus
    members.append(entry)
    return _save(path, document).member(name)


def remove(path: Path, name: str) -> None:
    document = _document(path)
    members = document.get("members", [])
    for index, member in enumerate(members):
        if member.get("name") == name:
            del members[index]
            _save(path, document)
            return
    raise InventoryError(f"{path}: no member named {name!r}", "see 'provision team list'")
