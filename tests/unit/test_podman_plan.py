"""What the Podman driver reads from compose.yaml, checked without Podman.

The driver starts services in the order compose.yaml's depends_on gives and waits on
the conditions written there, and its override file may only touch what Podman mounts
itself; a change to either file that breaks that shows here, in make test, rather than
minutes into make compose-test.
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from infra.docker import compose, podman


@pytest.fixture(scope="module")
def plan() -> dict[str, dict[str, str]]:
    env = {k: v or "secret" for k, v in compose.read_env_file(compose.ENV_EXAMPLE).items()}
    return podman.Compose("plan-only", env).plan()


def test_every_service_starts_after_what_it_waits_for(plan: dict[str, dict[str, str]]) -> None:
    order = list(plan)
    for service, gates in plan.items():
        for dependency in gates:
            assert order.index(dependency) < order.index(service), (service, dependency)


def test_the_gates_are_compose_yamls_own(plan: dict[str, dict[str, str]]) -> None:
    assert plan["migrate"] == {"postgres": "service_healthy"}
    assert plan["api"] == {
        "migrate": "service_completed_successfully",
        "pgbouncer": "service_healthy",
    }


def test_grafana_and_the_load_test_profile_are_left_out(plan: dict[str, dict[str, str]]) -> None:
    assert "grafana" not in plan
    assert not {"locust-master", "locust-worker"} & set(plan)
    assert {"postgres", "migrate", "pgbouncer", "api", "lb", "prometheus"} <= set(plan)


def test_a_plain_list_of_dependencies_means_started() -> None:
    assert podman.depends_on({"depends_on": ["a"]}) == {"a": "service_started"}
    assert podman.depends_on({}) == {}


class _OverrideLoader(yaml.SafeLoader):
    """compose's `!override` tag, read as the value it carries."""


def _override(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node)
    return loader.construct_mapping(node)  # type: ignore[arg-type]


_OverrideLoader.add_constructor("!override", _override)


def test_the_podman_override_only_drops_tmpfs_mounts_under_run() -> None:
    """Podman mounts /run itself for a read-only container; nothing else is changed."""
    override = yaml.load(podman.OVERRIDE.read_text(), Loader=_OverrideLoader)  # noqa: S506
    services = yaml.safe_load(compose.COMPOSE_FILE.read_text())["services"]
    assert set(override) == {"services"}
    for name, changes in override["services"].items():
        assert set(changes) == {"tmpfs"}, name
        assert services[name]["read_only"] is True, name
        dropped = set(services[name]["tmpfs"]) - set(changes["tmpfs"])
        assert dropped, name
        for mount in dropped:
            path = mount.split(":", 1)[0]
            assert path.startswith(("/run/", "/var/run/")), (name, mount)
