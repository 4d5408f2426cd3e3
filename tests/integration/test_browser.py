"""What a person sees: Locust's web UI in a real browser during a short run.

Debian's chromium, driven by Playwright (its Python package only: the browser is the
system's, nothing is downloaded), opens the web UI of a Locust run against a real
replica, its Connections and Server-Timing tabs and the `/connections` chart page, and
checks that they show live, non-zero numbers. Screenshots go to the test's directory
(docs/locust-server-timing.png and docs/locust-connections.png are two).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import BrowserContext, Locator, sync_playwright

from infra.localstack import procs
from infra.localstack.config import REPO
from tests.support.stack import Databases, StartService

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package (the Makefile installs it)
FLAGS = [
    "--headless",
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
WAIT_MS = 30_000  # for any one thing to show on a loaded machine


@pytest.fixture(scope="module")
def locust_ui(
    start_service: StartService, databases: Databases, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A Locust run with its web UI, started at once, against a replica of its own."""
    replica = start_service(pool_min=2, pool_max=2)
    port = procs.free_port_block(1)
    logs = tmp_path_factory.mktemp("locust-ui")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCUST_", "SAMPLER_"))}
    env.update(
        SAMPLER_PGBOUNCER_URL=databases.bouncer.admin_conninfo(),
        SAMPLER_POSTGRES_URL=databases.postgres.superuser_conninfo(),
        SAMPLER_INTERVAL="0.5",
        SAMPLER_CSV=str(logs / "connections.csv"),
        SEED_ITEMS="200",
    )
    args = ["-f", "loadtests/browse.py", "--host", replica.url, "--autostart"]
    args += ["-u", "16", "-r", "16", "-t", "120s", "--web-host", "127.0.0.1"]
    args += ["--web-port", str(port)]
    with (logs / "locust.log").open("w") as log:
        locust = subprocess.Popen(
            [sys.executable, "-m", "locust", *args], env=env, cwd=REPO, stdout=log, stderr=log
        )
    url = f"http://127.0.0.1:{port}"
    try:

        def answers() -> bool:
            try:
                return httpx.get(url, timeout=2).status_code == 200
            except httpx.HTTPError:
                return locust.poll() is not None

        assert procs.wait_until(answers, 30), "Locust's web UI never answered"
        assert locust.poll() is None, (logs / "locust.log").read_text()[-3000:]
        yield url
    finally:
        procs.stop(locust.pid, timeout=20)
        locust.wait(timeout=10)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrowserContext]:
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (`make setup` installs it)")
    profile = tmp_path_factory.mktemp("chromium-profile")  # a fresh user-data-dir
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=str(CHROMIUM),
            args=FLAGS,
            headless=True,
            viewport={"width": 1280, "height": 900},
        )
        try:
            yield context
        finally:
            context.close()


def number_in(cell: Locator) -> float:
    text = cell.inner_text().strip()
    try:
        return float(text)
    except ValueError:
        return 0.0


def test_the_connections_tab_shows_live_counts(
    locust_ui: str, browser: BrowserContext, tmp_path: Path
) -> None:
    page = browser.new_page()
    page.goto(locust_ui)
    page.get_by_role("tab", name="Connections").click()
    row = page.get_by_role("row").filter(has_text="PgBouncer client connections (all)")
    # Now and peak: the replica's pool (2 connections) as PgBouncer's clients.
    page.wait_for_function(
        """() => [...document.querySelectorAll('tr')].some(r =>
             r.innerText.includes('PgBouncer client connections (all)')
             && Number(r.cells[1]?.innerText) > 0)""",
        timeout=WAIT_MS,
    )
    assert number_in(row.get_by_role("cell").nth(1)) > 0
    users = page.get_by_role("row").filter(has_text="Locust users")
    assert number_in(users.get_by_role("cell").nth(2)) == 16  # the peak this run

    page.get_by_role("tab", name="Server-Timing").click()
    page.wait_for_function(
        """() => [...document.querySelectorAll('tr')].some(r =>
             r.innerText.includes('/items/[id]') && Number(r.cells[1]?.innerText) > 0)""",
        timeout=WAIT_MS,
    )
    page.screenshot(path=str(tmp_path / "locust-server-timing.png"))


def test_the_connections_page_draws_a_live_chart(
    locust_ui: str, browser: BrowserContext, tmp_path: Path
) -> None:
    page = browser.new_page()
    page.goto(f"{locust_ui}/connections")
    page.wait_for_function(
        "() => /^\\d+ samples/.test(document.getElementById('status').innerText)"
        " && Number(document.getElementById('status').innerText.split(' ')[0]) >= 4",
        timeout=WAIT_MS,
    )
    latest = page.get_by_role("row").filter(has_text="pgb_clients")
    assert number_in(latest.get_by_role("cell").nth(1)) > 0
    # The chart has lines on it: pixels of PgBouncer's cl_active colour (#1f77b4).
    drawn = page.evaluate(
        """() => {
             const c = document.getElementById('chart');
             const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
             let n = 0;
             for (let i = 0; i < d.length; i += 4)
               if (Math.abs(d[i] - 0x1f) < 24 && Math.abs(d[i+1] - 0x77) < 24
                   && Math.abs(d[i+2] - 0xb4) < 24 && d[i+3] > 0) n++;
             return n;
           }"""
    )
    assert drawn > 50, drawn
    page.screenshot(path=str(tmp_path / "locust-connections.png"), full_page=True)
