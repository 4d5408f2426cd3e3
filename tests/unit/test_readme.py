"""README.md documents every setting, with the default the code really has."""

from __future__ import annotations

import pytest
from pydantic_settings import BaseSettings

from infra.localstack.config import REPO, StackSettings
from service.settings import Settings

README = (REPO / "README.md").read_text()


@pytest.mark.parametrize("settings_class", [Settings, StackSettings])
def test_every_setting_is_documented_with_its_default(settings_class: type[BaseSettings]) -> None:
    for name, field in settings_class.model_fields.items():
        default = ".stack" if name == "stack_dir" else str(field.default)
        assert f"| `{name.upper()}` | `{default}` |" in README, name


def test_ci_runs_the_command_readme_gives() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in README
    assert "make test" in ci
