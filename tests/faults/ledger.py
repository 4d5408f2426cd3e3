"""The client's ledger of writes, and its audit against PostgreSQL after a fault.

Every logical write (one `POST /visits`) carries its own Idempotency-Key and is retried
with that key until the service acknowledges it with a 201. The ledger keeps what each
acknowledgement said; `audit` then asks PostgreSQL, directly, whether

- every acknowledged visit exists (an acknowledged write that is missing was *lost*);
- no key produced a second row: every 201 for one key names the same visit, and the
  phase's items hold exactly one visit per acknowledged key (a retry whose first
  attempt committed but whose answer was lost must replay, not insert again);
- the service's own record of each key (`idempotency_keys`, service/idempotency.py)
  names the visit the client was given, so a later retry would replay that one.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, field

import psycopg


@dataclass
class Write:
    """One logical write: a visit to `item_id` under `key`, however many attempts it takes."""

    key: str
    item_id: int
    attempts: int = 0
    acked_ids: list[int] = field(default_factory=list)  # the id of every 201 for this key
    replays: int = 0  # 201s that came with `Idempotent-Replayed: true`

    @property
    def acked(self) -> bool:
        return bool(self.acked_ids)


class Ledger:
    """Every write of one fault phase; threads add to it concurrently."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._writes: list[Write] = []

    def new(self, item_id: int) -> Write:
        write = Write(key=uuid.uuid4().hex, item_id=item_id)
        with self._lock:
            self._writes.append(write)
        return write

    def ack(self, write: Write, visit_id: int, *, replayed: bool) -> None:
        with self._lock:
            write.acked_ids.append(visit_id)
            write.replays += int(replayed)

    def writes(self) -> list[Write]:
        with self._lock:
            return list(self._writes)


@dataclass(frozen=True)
class Audit:
    """What PostgreSQL holds against what the clients were told."""

    writes: int  # logical writes started
    acknowledged: int  # ... of which the service acknowledged
    unresolved: int  # never acknowledged, even after the drain
    retried: int  # acknowledged writes that needed more than one attempt
    replayed: int  # acknowledgements that were replays of an earlier commit
    lost: int  # acknowledged, yet not in the database
    conflicting_acks: int  # keys acknowledged with two different visit ids
    rows: int  # visits in the database on the phase's items
    extra_rows: int  # rows beyond one per key: something was created twice
    key_mismatches: int  # acknowledged keys the service has no record of, or another visit

    @property
    def duplicated(self) -> int:
        return self.conflicting_acks + self.extra_rows + self.key_mismatches


def audit(conninfo: str, ledger: Ledger, items: list[int]) -> Audit:
    """Check the ledger against the `visits` table, straight on PostgreSQL."""
    writes = ledger.writes()
    acked = [w for w in writes if w.acked]
    acked_ids = sorted({i for w in acked for i in w.acked_ids})
    with psycopg.connect(conninfo, autocommit=True) as conn:
        found = {
            row[0]
            for row in conn.execute(
                "SELECT id FROM visits WHERE id = ANY(%s)", (acked_ids,)
            ).fetchall()
        }
        row = conn.execute(
            "SELECT count(*) FROM visits WHERE item_id = ANY(%s)", (items,)
        ).fetchone()
        recorded: dict[str, int | None] = {
            str(key): None if visit is None else int(visit)
            for key, visit in conn.execute(
                "SELECT key, (response->>'id')::bigint FROM idempotency_keys WHERE key = ANY(%s)",
                ([w.key for w in acked],),
            ).fetchall()
        }
    rows = int(row[0]) if row else 0
    unresolved = len(writes) - len(acked)
    # A key never acknowledged may or may not have committed: only rows beyond one per
    # key, counting those, prove a double insert.
    extra = max(0, rows - len(acked) - unresolved)
    return Audit(
        writes=len(writes),
        acknowledged=len(acked),
        unresolved=unresolved,
        retried=sum(1 for w in acked if w.attempts > 1),
        replayed=sum(w.replays for w in acked),
        lost=len(set(acked_ids) - found),
        conflicting_acks=sum(1 for w in acked if len(set(w.acked_ids)) > 1),
        rows=rows,
        extra_rows=extra,
        key_mismatches=sum(1 for w in acked if recorded.get(w.key) != w.acked_ids[0]),
    )
