"""Several PgBouncers in one sampler row, and the spread the sweep predicts for them."""

from __future__ import annotations

from typing import Any

from loadtests.common.sampling import bouncer_counts, combined_bouncer_counts, parse_counts
from loadtests.sweep.cells import split_bounds


def pool(cl_active: int, sv_active: int, maxwait: int = 0) -> dict[str, Any]:
    return {
        "database": "app",
        "cl_active": cl_active,
        "cl_waiting": 0,
        "sv_active": sv_active,
        "sv_idle": 0,
        "sv_used": 0,
        "sv_login": 0,
        "maxwait": maxwait,
        "maxwait_us": 0,
    }


def clients(*names: str) -> list[dict[str, Any]]:
    console = {"database": "pgbouncer", "application_name": "pgscale-sampler"}
    return [console, *({"database": "app", "application_name": n} for n in names)]


def test_two_instances_add_up_and_keep_their_split() -> None:
    one = bouncer_counts([pool(3, 2)], clients("replica-1-10", "replica-1-10", "replica-2-7"), [{}])
    two = bouncer_counts([pool(1, 1, maxwait=2)], clients("replica-2-7"), [{}, {}])
    row = combined_bouncer_counts({"pgbouncer-1": one, "pgbouncer-2": two})
    assert row["cl_active"] == 4
    assert row["sv_active"] == 3
    assert row["maxwait_ms"] == 2000
    assert row["pgb_servers"] == 3
    assert row["pgb_clients"] == 6  # the consoles count against max_client_conn too
    assert parse_counts(row["pgb_clients_by_replica"]) == {"replica-1": 2, "replica-2": 2}
    assert row["pgb_clients_by_instance"] == "pgbouncer-1=3;pgbouncer-2=1"
    assert row["pgb_servers_by_instance"] == "pgbouncer-1=1;pgbouncer-2=2"


def test_an_instance_that_did_not_answer_is_left_out() -> None:
    one = bouncer_counts([pool(2, 1)], clients("replica-1-10", "replica-1-10"), [{}])
    row = combined_bouncer_counts({"pgbouncer-1": one})
    assert row["pgb_clients_by_instance"] == "pgbouncer-1=2"


def test_the_predicted_split_widens_for_few_connections() -> None:
    assert split_bounds(16, 1) == (16, 16)
    assert split_bounds(4, 2) == (0, 4)  # 2 +- 3: anything goes with four connections
    low, high = split_bounds(400, 2)
    assert (low, high) == (170, 230)  # 200 +- 3 x 10
