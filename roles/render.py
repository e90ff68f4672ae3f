"""Rendering the files a host gets from ``templates/<role>/*.j2`` (Jinja2, strict)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2

KIT_DIR = Path(__file__).resolve().parent.parent
TEMPLATES_DIR = KIT_DIR / "templates"
MANAGED_NOTE = "Managed by the Secure Mail Gateway deploy (deploy.py): local edits are overwritten."

_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
    trim_blocks=True,
    lstrip_blocks=True,
    autoescape=False,
)


def render(template: str, **values: Any) -> str:
    """``template`` is relative to templates/, e.g. ``relay/smg.service.j2``."""
    return _ENV.get_template(template).render(managed_note=MANAGED_NOTE, **values)
