"""One row per fault, and the report: a table on stdout, report.json and report.md."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# The suite's claim for every row: back within this many seconds of the fault clearing,
# both for the clients (a streak of successes through haproxy) and for every replica's
# own /readyz (asked on its port, not through haproxy).
RECOVER_WITHIN = 5.0


@dataclass(frozen=True)
class Check:
    """A fault-specific claim and whether the run bore it out."""

    name: str
    ok: bool
    detail: str = ""


@dataclass
class Row:
    """What one fault did to the clients and to the data."""

    fault: str
    description: str
    requests: int
    errors: dict[str, int]  # non-2xx answers by status, transport errors by class
    allowed_errors: list[str]  # what this fault may answer besides 2xx
    acknowledged: int  # logical writes the service acknowledged
    retried: int  # ... that needed more than one attempt
    replayed: int  # acknowledgements that were replays (Idempotent-Replayed: true)
    lost: int  # acknowledged, missing from PostgreSQL
    duplicated: int  # keys that created more than one row
    unresolved: int  # writes never acknowledged, even after the drain
    over_bound: int  # requests slower than the bound (hangs)
    max_latency: float  # seconds, slowest request of the phase
    recovery: float | None  # seconds from the fault clearing to a streak of successes
    ready: float | None  # seconds from the fault clearing to every replica's /readyz 200
    fault_seconds: float  # from injection to clearing
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def unexpected_errors(self) -> dict[str, int]:
        return {k: v for k, v in self.errors.items() if k not in self.allowed_errors}

    @property
    def ok(self) -> bool:
        return (
            self.lost == 0
            and self.duplicated == 0
            and self.unresolved == 0
            and self.over_bound == 0
            and self.recovery is not None
            and self.recovery <= RECOVER_WITHIN
            and self.ready is not None
            and self.ready <= RECOVER_WITHIN
            and not self.unexpected_errors
            and all(check.ok for check in self.checks)
        )

    def failures(self) -> list[str]:
        """Why the row is not ok, in words."""
        why = []
        if self.lost:
            why.append(f"{self.lost} acknowledged write(s) lost")
        if self.duplicated:
            why.append(f"{self.duplicated} write(s) created twice")
        if self.unresolved:
            why.append(f"{self.unresolved} write(s) never acknowledged")
        if self.over_bound:
            why.append(f"{self.over_bound} request(s) over the bound")
        if self.recovery is None:
            why.append("no recovery seen")
        elif self.recovery > RECOVER_WITHIN:
            why.append(f"recovery took {self.recovery:.2f} s (over {RECOVER_WITHIN:.0f} s)")
        if self.ready is None:
            why.append("some replica's /readyz never answered 200 after the fault")
        elif self.ready > RECOVER_WITHIN:
            why.append(f"every replica ready only after {self.ready:.2f} s")
        if self.unexpected_errors:
            why.append(f"unexpected errors {format_errors(self.unexpected_errors)}")
        why += [f"check failed: {c.name} ({c.detail})" for c in self.checks if not c.ok]
        return why


COLUMNS = (
    "fault",
    "requests",
    "errors by status",
    "acked writes",
    "lost",
    "dup",
    "over bound",
    "max latency s",
    "recovery s",
    "every replica ready s",
    "ok",
)


def format_errors(errors: dict[str, int]) -> str:
    if not errors:
        return "-"
    return " ".join(f"{k}:{v}" for k, v in sorted(errors.items(), key=lambda kv: -kv[1]))


def cells(row: Row) -> list[str]:
    return [
        row.fault,
        str(row.requests),
        format_errors(row.errors),
        str(row.acknowledged),
        str(row.lost),
        str(row.duplicated),
        str(row.over_bound),
        f"{row.max_latency:.2f}",
        "never" if row.recovery is None else f"{row.recovery:.2f}",
        "never" if row.ready is None else f"{row.ready:.2f}",
        "yes" if row.ok else "NO",
    ]


def table(rows: list[Row]) -> str:
    """The fault table, as Markdown that also reads well in a terminal."""
    grid = [list(COLUMNS)] + [cells(r) for r in rows]
    widths = [max(len(line[i]) for line in grid) for i in range(len(COLUMNS))]
    numeric = {1, 3, 4, 5, 6, 7, 8, 9}

    def line(values: list[str]) -> str:
        padded = [
            v.rjust(w) if i in numeric else v.ljust(w)
            for i, (v, w) in enumerate(zip(values, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = (
        "|"
        + "|".join(
            "-" * (w + 1) + ":" if i in numeric else "-" * (w + 2) for i, w in enumerate(widths)
        )
        + "|"
    )
    return "\n".join([line(grid[0]), rule, *(line(values) for values in grid[1:])])


def to_json(rows: list[Row], meta: dict[str, Any]) -> dict[str, Any]:
    return {
        **meta,
        "ok": all(r.ok for r in rows) and not meta.get("aborted"),
        "faults": [{**asdict(r), "ok": r.ok, "failures": r.failures()} for r in rows],
    }


def markdown(rows: list[Row], meta: dict[str, Any]) -> str:
    verdict = "every row holds" if all(r.ok for r in rows) else "SOME ROWS FAIL"
    if meta.get("aborted"):
        verdict = f"ABORTED: {meta['aborted']}"
    out = [
        "# Fault suite",
        "",
        f"{meta['finished']}, {meta['seconds']:.0f} s: {verdict}.",
        "",
        f"Stack: {meta['shape']}. Bound on any request: {meta['bound']:.1f} s"
        f" (DB_DEADLINE {meta['tuning']['db_deadline']} s + {meta['tuning']['margin']} s)."
        f" PostgreSQL fsync={meta['postgres']['fsync']},"
        f" synchronous_commit={meta['postgres']['synchronous_commit']};"
        f" {meta['pgbouncer_version']}.",
        "",
        "Every write carries an Idempotency-Key and is retried with it until acknowledged;"
        " *lost* counts acknowledged visits missing from PostgreSQL afterwards, *dup* keys"
        " that created more than one row, *over bound* requests slower than the bound,"
        " *recovery* the seconds from the fault clearing to the first of a streak of"
        " successes, *every replica ready* the seconds from the fault clearing until each"
        " replica's own /readyz (asked on its port, not through haproxy) answered 200;"
        f" both must be at most {RECOVER_WITHIN:.0f} s.",
        "",
        table(rows),
        "",
    ]
    for row in rows:
        out += [f"## {row.fault}", "", row.description, ""]
        out.append(
            f"- fault lasted {row.fault_seconds:.2f} s; {row.acknowledged} writes acknowledged"
            f" ({row.retried} after retries, {row.replayed} replayed), {row.unresolved} unresolved"
        )
        allowed = ", ".join(row.allowed_errors) or "none"
        out.append(f"- errors: {format_errors(row.errors)} (allowed: {allowed})")
        out += [f"- {'ok' if c.ok else 'FAILED'}: {c.name}. {c.detail}" for c in row.checks]
        out += [f"- {note}" for note in row.notes]
        out += [f"- **{why}**" for why in row.failures()]
        out.append("")
    return "\n".join(out)


def write(rows: list[Row], meta: dict[str, Any], out: Path, latest: Path | None) -> None:
    """report.json and report.md in `out`; copied to latest.json/.md beside it."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(to_json(rows, meta), indent=2) + "\n")
    (out / "report.md").write_text(markdown(rows, meta))
    if latest is not None:
        latest.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "report.json", latest / "latest.json")
        shutil.copyfile(out / "report.md", latest / "latest.md")
