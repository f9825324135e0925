"""Jinja2 templates shipped with the package, rendered strictly.

StrictUndefined: a missing variable is an error, never an empty string in a config file.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import jinja2


def templates_dir() -> Path:
    """A wheel carries templates inside the package; a source checkout has them at its top."""
    packaged = Path(__file__).with_name("templates")
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "templates"


@cache
def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(templates_dir()),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )


def render(template: str, **variables: Any) -> str:
    return environment().get_template(template).render(**variables)


def raw(name: str) -> str:
    """A shipped file used as it is (no template syntax in it)."""
    return (templates_dir() / name).read_text()
