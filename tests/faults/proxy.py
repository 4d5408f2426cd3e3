"""A TCP proxy we control, between the replicas and PgBouncer: the network, as a fault.

It runs an asyncio loop in one thread it owns. Three states:

- `pass`: bytes flow both ways;
- `cut()`: every connection is reset (RST) and the port refuses new ones, the way a
  dead link or a restarted middlebox looks to libpq;
- `blackhole()`: nothing flows and nothing is refused: established connections stall
  with their bytes held, new ones are accepted and held too, as in a partition where
  packets are dropped silently. Only timeouts notice it.

`restore()` goes back to `pass`; after a blackhole the held bytes are delivered (TCP
would have retransmitted them). psycopg's tests/fix_proxy.py is the model: a proxy of
the test's own, so no firewall rules or root-only tricks are needed.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

logger = logging.getLogger("tests.faults.proxy")

T = TypeVar("T")
State = Literal["pass", "cut", "blackhole"]


@dataclass
class ProxyStats:
    """What the proxy saw: for the report, and to prove a fault reached real connections."""

    accepted: int = 0
    refused_upstream: int = 0  # PgBouncer did not answer the proxy's connect
    reset_by_cut: int = 0
    held_by_blackhole: int = 0


class _Side(asyncio.Protocol):
    """One end of a proxied connection; writes what it reads to its peer."""

    def __init__(self, link: _Link) -> None:
        self.link = link
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.pending: list[bytes] = []  # read before the peer existed
        self.congested = False  # our peer's write buffer is full

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.link.update_reading()

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:
            self.pending.append(data)
        else:
            peer.transport.write(data)

    def flush_to(self, peer: _Side) -> None:
        assert peer.transport is not None
        for chunk in self.pending:
            peer.transport.write(chunk)
        self.pending.clear()

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.congested = True
            self.link.update_reading()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.congested = False
            self.link.update_reading()

    def eof_received(self) -> bool | None:
        self.link.close()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.link.close()


class _Link:
    """A client connection and its upstream connection to PgBouncer."""

    def __init__(self, proxy: TcpProxy) -> None:
        self.proxy = proxy
        self.client = _Side(self)
        self.upstream: _Side | None = None
        self.closed = False

    def update_reading(self) -> None:
        stalled = self.proxy.state == "blackhole"
        for side in (self.client, self.upstream):
            if side is None or side.transport is None or side.transport.is_closing():
                continue
            if stalled or side.congested:
                side.transport.pause_reading()
            else:
                side.transport.resume_reading()

    async def connect_upstream(self) -> None:
        loop = asyncio.get_running_loop()
        upstream = _Side(self)
        try:
            await loop.create_connection(lambda: upstream, "127.0.0.1", self.proxy.upstream_port)
        except OSError:
            self.proxy.stats.refused_upstream += 1
            self.close(reset=True)
            return
        if self.closed:
            assert upstream.transport is not None
            upstream.transport.abort()
            return
        self.upstream = upstream
        upstream.peer, self.client.peer = self.client, upstream
        self.client.flush_to(upstream)
        self.update_reading()

    def close(self, *, reset: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        self.proxy.links.discard(self)
        for side in (self.client, self.upstream):
            if side is None or side.transport is None:
                continue
            if reset:
                # SO_LINGER 0: close sends RST, so the peer learns at once, as from a dead link.
                sock = side.transport.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                side.transport.abort()
            else:
                side.transport.close()


class TcpProxy:
    """127.0.0.1:`port` forwarded to 127.0.0.1:`upstream_port`, until `stop()`.

    Use as a context manager, or call `start()`/`stop()`: the thread and every socket
    it opened are closed by `stop()`, whatever state the proxy is in.
    """

    def __init__(self, port: int, upstream_port: int) -> None:
        self.port = port
        self.upstream_port = upstream_port
        self.state: State = "pass"
        self.stats = ProxyStats()
        self.links: set[_Link] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy")
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._flowing = asyncio.Event()  # clear while blackholed
        self._flowing.set()

    # ---- control, from any thread -------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        self._call(self._listen)

    def cut(self) -> None:
        """Reset every connection and refuse new ones."""
        self._call(self._cut)

    def blackhole(self) -> None:
        """Stall every connection and hold new ones, refusing nothing."""
        self._call(self._blackhole)

    def restore(self) -> None:
        """Let bytes flow again; held connections go on where they stalled."""
        self._call(self._restore)

    def connections(self) -> int:
        return self._call(self._count)

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        try:
            self._call(self._shutdown)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    def __enter__(self) -> TcpProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _call(self, func: Callable[[], Coroutine[Any, Any, T]]) -> T:
        return asyncio.run_coroutine_threadsafe(func(), self._loop).result(timeout=10)

    # ---- on the loop --------------------------------------------------------------------

    async def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._accept, "127.0.0.1", self.port, reuse_address=True, backlog=128
        )

    def _accept(self) -> asyncio.Protocol:
        link = _Link(self)
        self.links.add(link)
        self.stats.accepted += 1
        if self.state == "blackhole":
            self.stats.held_by_blackhole += 1
        self._spawn(self._connect_when_flowing(link))
        return link.client

    async def _connect_when_flowing(self, link: _Link) -> None:
        # Held in a blackhole: the upstream connection is made only once bytes flow again.
        await self._flowing.wait()
        if not link.closed:
            await link.connect_upstream()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _cut(self) -> None:
        self.state = "cut"
        if self._server is not None:
            self._server.close()  # new connections are refused by the kernel
            await self._server.wait_closed()
            self._server = None
        for link in list(self.links):
            self.stats.reset_by_cut += 1
            link.close(reset=True)

    async def _blackhole(self) -> None:
        if self.state == "cut":
            await self._listen()
        self.state = "blackhole"
        self._flowing.clear()
        for link in list(self.links):
            link.update_reading()

    async def _restore(self) -> None:
        if self._server is None:
            await self._listen()
        self.state = "pass"
        self._flowing.set()
        for link in list(self.links):
            link.update_reading()

    async def _count(self) -> int:
        return len(self.links)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for link in list(self.links):
            link.close(reset=True)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def port_refuses(port: int) -> bool:
    """True when nothing accepts connections on 127.0.0.1:`port`."""
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) != 0
