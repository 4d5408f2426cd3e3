"""Fill the `${NAME}` placeholders of the shared templates under infra/.

The same files serve compose and k8s (via envsubst), so the syntax stays envsubst's.
A placeholder without a value is an error, never an empty string.
"""

from __future__ import annotations

import os
import string
from collections.abc import Mapping
from pathlib import Path

INFRA = Path(__file__).resolve().parent.parent


def template_path(relative: str) -> Path:
    return INFRA / relative


def render(relative: str, values: Mapping[str, object]) -> str:
    """The template at infra/`relative` with every placeholder filled from `values`."""
    text = template_path(relative).read_text()
    try:
        return string.Template(text).substitute({k: str(v) for k, v in values.items()})
    except KeyError as exc:
        raise KeyError(f"{relative}: no value for placeholder {exc}") from None


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (it may hold a password)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.chmod(path, 0o600)
