"""Every pooled connection busy: each user keeps one read in flight, with no pause.

The sweep's load (loadtests/sweep/). A closed loop of N users holds N requests in
flight all the time, so with more users than pooled connections every pool fills and
has requests waiting, however fast the machine answers. browse.py's users pause
between reads as people do, and on a fast machine that leaves pools half empty. The
reads are browse.py's: items by random id, and pages of the listing.

    .venv/bin/locust -f loadtests/saturate.py --headless -u 16 -r 16 -t 30s
"""

from __future__ import annotations

from locust import constant, run_single_user

from loadtests import browse


class Saturating(browse.Browser):
    """browse.py's reader, without the pause: the next read leaves as the last returns."""

    wait_time = constant(0)


if __name__ == "__main__":
    run_single_user(Saturating)
