"""`proxied_kafka`: a broker of the fault tests' own, reached only through a TCP proxy.

The broker advertises the proxy's address (`--override advertised.listeners=...`), so every client
(the test's producers and the service processes) goes through it after bootstrap: the proxy's latency,
blackhole and resets reach them all. The proxy runs in a thread of its own so that a test blocking
its event loop (starting the broker, waiting on a subprocess) never stalls the traffic.
The broker is this package's only: stopping and restarting it disturbs no other test.
"""

from __future__ import annotations

import asyncio
import atexit
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from infra.local_kafka import MAIN_CLASS, LocalKafka
from infra.processes import free_port
from infra.tcp_proxy import TcpProxy
from services.runtime.broker import ensure_topics
from services.runtime.settings import FlywheelSettings


class AdvertisedKafka(LocalKafka):
    """The local broker, advertising another address than the one it listens on."""

    def __init__(self, home: Path, cache: Path, *, port: int, advertised: str) -> None:
        super().__init__(home, cache, port=port)
        self.advertised = advertised

    def _java(self, libs: Path, main_class: str, *args: str) -> list[str]:
        command = super()._java(libs, main_class, *args)
        if main_class == MAIN_CLASS:
            command += ["--override", f"advertised.listeners=PLAINTEXT://{self.advertised}"]
        return command


class ProxyThread:
    """A TcpProxy on an event loop in its own thread; settings change from any thread."""

    def __init__(self, upstream_port: int) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="tcp-proxy", daemon=True)
        self.thread.start()
        self.proxy = TcpProxy(upstream_port=upstream_port, port=free_port())
        self.call(self.proxy.start())

    def call(self, coroutine: Any) -> Any:
        future: Future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result(30)

    def reset_all(self) -> int:
        async def reset() -> int:
            return self.proxy.reset_all()

        return self.call(reset())

    def heal(self) -> None:
        self.proxy.latency_s, self.proxy.blackhole, self.proxy.refuse = 0.0, False, False

    def close(self) -> None:
        self.call(self.proxy.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class ProxiedKafka:
    def __init__(self, broker: AdvertisedKafka, proxy: ProxyThread) -> None:
        self.broker, self.proxy = broker, proxy

    @property
    def bootstrap(self) -> str:
        """The address clients use: the proxy."""
        return self.proxy.proxy.address

    def restart_broker(self) -> None:
        """Stop the broker (SIGTERM, then SIGKILL) and start it again on the same port and data."""
        self.broker.stop()
        self.broker.start(timeout=180)


@pytest.fixture(scope="session")
def proxied_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxiedKafka]:
    port = free_port()
    proxy = ProxyThread(upstream_port=port)
    broker = AdvertisedKafka(
        tmp_path_factory.mktemp("faults-kafka"), FlywheelSettings().cache, port=port, advertised=proxy.proxy.address
    )
    atexit.register(broker.stop)
    try:
        broker.start(timeout=180)
        yield ProxiedKafka(broker, proxy)
    finally:
        broker.stop()
        atexit.unregister(broker.stop)
        proxy.close()


@pytest.fixture
def proxied(proxied_kafka: ProxiedKafka) -> Iterator[ProxiedKafka]:
    """The proxied broker, healed again after the test whatever it did to the network."""
    proxied_kafka.proxy.heal()
    try:
        yield proxied_kafka
    finally:
        proxied_kafka.proxy.heal()
        if not proxied_kafka.broker.status().running:
            proxied_kafka.broker.start(timeout=180)


@pytest.fixture
async def proxied_topics(proxied: ProxiedKafka, topic_prefix: str) -> str:
    await ensure_topics(proxied.bootstrap, topic_prefix)
    return topic_prefix
