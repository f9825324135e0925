"""Jinja2 templates shipped with the package, rendered strictly.

StrictUndefined: a missing variable is an error, never an empty string in a config file.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import jinja2


@cache
def templates_dir() -> Path:
    """A wheel carries templates inside the package; a source checkout has them at its top."""
    packaged = Path(__file__).with_name("templates")
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "templates"


@cache
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(templates_dir()),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
        bytecode_cache=_bytecode_cache(),
    )
    # JSON templates quote every value through `tojson`: a missing one must fail naming the
    # variable, not as "StrictUndefined is not JSON serializable".
    env.policies["json.dumps_kwargs"] = {**env.policies["json.dumps_kwargs"],
                                         "default": _undefined_is_an_error}
    return env


def _bytecode_cache() -> jinja2.BytecodeCache | None:
    """Compiled templates kept between runs: a no-op converge renders every member's workspace,
    and compiling its templates was ~30 ms of each run. Jinja2's own private per-user directory
    in the temporary one, which it refuses when anyone else owns it: then no cache."""
    try:
        return jinja2.FileSystemBytecodeCache()
    except (OSError, RuntimeError):
        return None


def _undefined_is_an_error(value: object) -> object:
    if isinstance(value, jinja2.Undefined):
        str(value)  # a StrictUndefined raises UndefinedError here, with the variable's name
    raise TypeError(f"{type(value).__name__} cannot be written as JSON")


def render(template: str, **variables: Any) -> str:
    return environment().get_template(template).render(**variables)


@cache
def raw(name: str) -> str:
    """A shipped file used as it is (no template syntax in it); read once a process (a plan asks
    for each member's copy)."""
    return (templates_dir() / name).read_text()
