"""Generated bad (and good) input against the OpenAPI schema: no 5xx, answers as documented.

Every check schemathesis has, in its coverage, fuzzing and stateful phases, seeded. The
hooks in tests/integration/schemathesis_hooks.py make it use Idempotency-Keys as a client must (one
per request) and drop the one documented answer no schema can express (a visit to an
item that does not exist); they say why.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.stack import StartService

pytestmark = pytest.mark.slow  # a gunicorn replica of its own

MIN_CASES = 1000
HOOKS = Path(__file__).with_name("schemathesis_hooks.py")
PHASES = "coverage,fuzzing,stateful"
SEED = "424242"
# Cases per operation (and stateful scenarios): about 1,500 cases in all, under a minute
# on this 2-core machine, which the rest of the suite shares; more only repeats shapes.
MAX_EXAMPLES = "200"


def test_schemathesis_finds_no_server_error_and_no_mismatch(
    start_service: StartService, scratch: Path
) -> None:
    replica = start_service(workers=2, replica_name="schemathesis")
    report = scratch / "schemathesis.ndjson"
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "schemathesis"),
            "run",
            f"{replica.url}/openapi.json",
            "--checks",
            "all",
            "--phases",
            PHASES,
            "--max-examples",
            MAX_EXAMPLES,
            "--seed",
            SEED,
            # No example database: a seeded run replays nothing from earlier runs.
            "--generation-database",
            "none",
            # One worker: schemathesis' threads trip a CPython 3.11 AST bug
            # ("AST constructor recursion depth mismatch").
            "--workers",
            "1",
            "--report",
            "ndjson",
            "--report-ndjson-path",
            str(report),
            "--suppress-health-check",
            "too_slow",
        ],
        env={**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS)},
        capture_output=True,
        text=True,
        timeout=240,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    cases = count_cases(report)
    assert cases >= MIN_CASES, f"only {cases} generated cases:\n{output[-2000:]}"
    assert "Traceback" not in replica.log.read_text()


def count_cases(ndjson: Path) -> int:
    """Test cases schemathesis ran, from its event log."""
    total = 0
    for line in ndjson.read_text().splitlines():
        event = json.loads(line)
        for name, payload in event.items():
            if name == "ScenarioFinished" and isinstance(payload, dict):
                recorder = payload.get("recorder", {})
                total += len(recorder.get("cases", {}))
    if total:
        return total
    # Fall back to counting generated cases by their ids.
    return len(set(re.findall(r'"case_id":\s*"([^"]+)"', ndjson.read_text())))
