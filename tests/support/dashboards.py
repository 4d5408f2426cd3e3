"""The Grafana dashboards under infra/grafana/dashboards, and their panels."""

from __future__ import annotations

from typing import Any

from infra.localstack.config import REPO

DASHBOARDS = sorted((REPO / "infra" / "grafana" / "dashboards").glob("*.json"))


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel of a dashboard, those inside collapsed rows included; rows left out."""
    found = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found += panel.get("panels", [])
    return [p for p in found if p["type"] != "row"]
