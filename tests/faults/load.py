"""Steady concurrent load through the load balancer, every request timed and recorded.

A few threads, each with its own httpx client, mix `GET /items/{id}` with
`POST /visits`. Each write has its own Idempotency-Key; when an attempt fails (any
non-201 answer or a transport error) the thread retries it with the same key, after
the Retry-After the service asked for, until it is acknowledged. After the load stops,
`drain` keeps retrying whatever is still unacknowledged, so the ledger's audit can
count rows exactly.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass

import httpx

from tests.faults.ledger import Ledger, Write

REPLAYED_HEADER = "idempotent-replayed"
PROBLEM_JSON = "application/problem+json"


@dataclass(frozen=True)
class Attempt:
    """One HTTP request as the client saw it."""

    source: str  # "load", or what a fault sent on its own ("burst", "in-flight", ...)
    kind: str  # "read" or "write"
    started: float  # time.monotonic()
    elapsed: float
    status: int | None  # None: no HTTP answer (see `error`)
    error: str | None = None  # the transport error's class name
    detail: str | None = None  # problem+json `detail` of an error answer
    retry_after: str | None = None
    from_lb: bool = False  # haproxy answered itself: no replica was UP, or one failed

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def outcome(self) -> str:
        """`503` from the service, `503(lb)` from haproxy itself, or the transport error."""
        if self.status is None:
            return self.error or "error"
        return f"{self.status}(lb)" if self.from_lb else str(self.status)


class Recorder:
    """Every attempt of a phase, from every thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._attempts: list[Attempt] = []

    def add(self, attempt: Attempt) -> None:
        with self._lock:
            self._attempts.append(attempt)

    def attempts(self) -> list[Attempt]:
        with self._lock:
            return sorted(self._attempts, key=lambda a: a.started)

    def errors(self) -> Counter[str]:
        return Counter(a.outcome for a in self.attempts() if not a.ok)


def timed(
    http: httpx.Client,
    recorder: Recorder,
    method: str,
    url: str,
    *,
    source: str,
    kind: str,
    json: object = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response | None:
    """Send one request, record it, return the response (None on a transport error)."""
    started = time.monotonic()
    try:
        resp = http.request(method, url, json=json, headers=headers)
    except httpx.TransportError as exc:
        recorder.add(
            Attempt(source, kind, started, time.monotonic() - started, None, type(exc).__name__)
        )
        return None
    detail = None
    if resp.status_code >= 400 and resp.headers.get("content-type") == PROBLEM_JSON:
        detail = resp.json().get("detail")
    recorder.add(
        Attempt(
            source,
            kind,
            started,
            time.monotonic() - started,
            resp.status_code,
            detail=detail,
            retry_after=resp.headers.get("retry-after"),
            # Uvicorn stamps every answer with `server` and `date`; haproxy's own do not.
            from_lb="server" not in resp.headers and "date" not in resp.headers,
        )
    )
    return resp


def post_visit(
    http: httpx.Client, recorder: Recorder, ledger: Ledger, write: Write, *, source: str
) -> httpx.Response | None:
    """One attempt of `write`; a 201 goes into the ledger."""
    write.attempts += 1
    resp = timed(
        http,
        recorder,
        "POST",
        "/visits",
        source=source,
        kind="write",
        json={"item_id": write.item_id},
        headers={"Idempotency-Key": write.key},
    )
    if resp is not None and resp.status_code == 201:
        replayed = resp.headers.get(REPLAYED_HEADER, "").lower() == "true"
        ledger.ack(write, int(resp.json()["id"]), replayed=replayed)
    return resp


def backoff(resp: httpx.Response | None) -> float:
    """Seconds before retrying: the service's Retry-After (capped), else a short pause."""
    if resp is not None:
        try:
            return min(1.0, float(resp.headers.get("retry-after", "")))
        except ValueError:
            pass
    return 0.2


class Load:
    """`threads` clients against `url` until `stop()`; then `drain()` the pending writes.

    `pause()` holds every thread before its next request (pending writes included) and
    returns once none has a request in flight: a fault can then run with no client
    traffic at all, only haproxy's health checks; `resume()` lets them go on.
    """

    def __init__(
        self,
        url: str,
        recorder: Recorder,
        ledger: Ledger,
        *,
        write_items: list[int],
        read_ids: int,
        threads: int = 6,
        think: float = 0.01,
        write_share: float = 0.5,
        timeout: float = 30.0,
    ) -> None:
        self.url = url
        self.recorder = recorder
        self.ledger = ledger
        self.write_items = write_items
        self.read_ids = read_ids
        self.think = think
        self.write_share = write_share
        self.timeout = timeout
        self._stop = threading.Event()
        self._go = threading.Event()
        self._go.set()
        self._idle = [threading.Event() for _ in range(threads)]
        self._drain_until = 0.0
        self._threads = [
            threading.Thread(target=self._run, args=(n,), name=f"load-{n}", daemon=True)
            for n in range(threads)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def pause(self) -> bool:
        """Hold every thread; True once none has a request in flight (within the
        clients' timeout)."""
        self._go.clear()
        deadline = time.monotonic() + self.timeout + 5
        return all(idle.wait(max(0.0, deadline - time.monotonic())) for idle in self._idle)

    def resume(self) -> None:
        self._go.set()

    def _hold(self, n: int) -> None:
        """Wait here while paused (saying so), or until the run stops."""
        while not self._go.is_set() and not self._stop.is_set():
            self._idle[n].set()
            self._go.wait(0.05)
        self._idle[n].clear()  # only this thread clears it: a later pause sees it fresh

    def stop(self, drain: float = 20.0) -> None:
        """Stop issuing new work; retry unacknowledged writes for up to `drain` seconds."""
        self._drain_until = time.monotonic() + drain
        self._stop.set()
        self.resume()
        for thread in self._threads:
            thread.join(drain + self.timeout + 5)

    def __enter__(self) -> Load:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self, n: int) -> None:
        rng = random.Random(n)
        pending: Write | None = None
        retry_at = 0.0
        with httpx.Client(base_url=self.url, timeout=self.timeout) as http:
            while not self._stop.is_set():
                self._hold(n)
                if self._stop.is_set():
                    break
                now = time.monotonic()
                if pending is not None and now >= retry_at:
                    resp = post_visit(http, self.recorder, self.ledger, pending, source="load")
                    if pending.acked:
                        pending = None
                    else:
                        retry_at = time.monotonic() + backoff(resp)
                elif pending is None and rng.random() < self.write_share:
                    write = self.ledger.new(rng.choice(self.write_items))
                    resp = post_visit(http, self.recorder, self.ledger, write, source="load")
                    if not write.acked:
                        pending, retry_at = write, time.monotonic() + backoff(resp)
                else:
                    item = rng.randint(1, self.read_ids)
                    timed(http, self.recorder, "GET", f"/items/{item}", source="load", kind="read")
                self._stop.wait(self.think)
            # Drain: the run is over, but an unacknowledged write is retried until it lands.
            while pending is not None and time.monotonic() < self._drain_until:
                wait = retry_at - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                resp = post_visit(http, self.recorder, self.ledger, pending, source="drain")
                if pending.acked:
                    pending = None
                else:
                    retry_at = time.monotonic() + backoff(resp)
