"""A small asyncio TCP proxy for network-fault tests: added latency, a blackhole, connection resets.

Set as the broker's advertised listener, it carries every client connection (metadata says "the
broker is at the proxy"), so a test can degrade the network between services and Kafka without
root, iptables or Docker:

    proxy = TcpProxy(upstream_port=broker_port)
    await proxy.start()
    proxy.latency_s = 0.2     # each chunk forwarded 200 ms late, in order
    proxy.blackhole = True    # bytes are read and dropped, connections stay open: a partition
    proxy.reset_all()         # every open connection closed with RST (SO_LINGER 0)
    proxy.refuse = True       # new connections reset at once (a broker that is gone)

The upstream can change (`upstream_port`) while it runs, e.g. when a restarted broker listens elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from dataclasses import dataclass, field

from infra.processes import LOOPBACK

log = logging.getLogger("flywheel.tcp_proxy")
CHUNK = 64 * 1024


@dataclass
class ProxyCounters:
    connections: int = 0
    resets: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    dropped: int = 0


@dataclass
class TcpProxy:
    """Listens on `port` (0: any free port) and forwards to `upstream_host:upstream_port`."""

    upstream_port: int
    upstream_host: str = LOOPBACK
    host: str = LOOPBACK
    port: int = 0
    latency_s: float = 0.0
    blackhole: bool = False
    refuse: bool = False
    counters: ProxyCounters = field(default_factory=ProxyCounters)
    _server: asyncio.Server | None = None
    _pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = field(default_factory=set)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self.reset_all()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> TcpProxy:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    def reset_all(self) -> int:
        """Abort every open connection with a TCP reset; how many pairs were cut."""
        cut = 0
        for client, upstream in list(self._pairs):
            for writer in (client, upstream):
                _reset(writer)
            cut += 1
        self._pairs.clear()
        self.counters.resets += cut
        return cut

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.counters.connections += 1
        if self.refuse:
            _reset(client_writer)
            self.counters.resets += 1
            return
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(self.upstream_host, self.upstream_port)
        except OSError:
            _reset(client_writer)  # as the client would see a broker that is down
            self.counters.resets += 1
            return
        pair = (client_writer, upstream_writer)
        self._pairs.add(pair)
        for task in (
            asyncio.create_task(self._pipe(client_reader, upstream_writer, "bytes_up", pair)),
            asyncio.create_task(self._pipe(upstream_reader, client_writer, "bytes_down", pair)),
        ):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        counter: str,
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
    ) -> None:
        # Latency is added per chunk, in order: a delayed chunk must not overtake the one before it.
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(CHUNK):
                if self.blackhole:
                    self.counters.dropped += len(data)
                    continue
                if self.latency_s:
                    await asyncio.sleep(self.latency_s)
                writer.write(data)
                await writer.drain()
                setattr(self.counters, counter, getattr(self.counters, counter) + len(data))
        if pair in self._pairs:
            self._pairs.discard(pair)
            for side in pair:
                with contextlib.suppress(OSError, RuntimeError):
                    side.close()


def _reset(writer: asyncio.StreamWriter) -> None:
    # SO_LINGER with a zero timeout makes close() send RST instead of FIN: the peer sees "connection reset".
    sock = writer.get_extra_info("socket")
    with contextlib.suppress(OSError, RuntimeError):
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
