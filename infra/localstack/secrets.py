"""Passwords generated once per stack directory, kept in files only their owner can read."""

from __future__ import annotations

import secrets
from pathlib import Path

from infra.localstack.render import write_private


def password(directory: Path, name: str) -> str:
    """The password called `name`, created on first use."""
    path = directory / f"{name}.password"
    if path.exists():
        return path.read_text().strip()
    value = secrets.token_urlsafe(24)
    write_private(path, value + "\n")
    return value
