"""The drills' TCP fault proxy against a real loopback server (pass, delay, stall, reset, EOF), and
the embedded broker's PROXIED listener that sends a client's every connection through it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from services.common.broker import EmbeddedKafka, free_port
from services.devtools.faultproxy import FaultProxy, Mode, apply_command


class Upstream:
    """A loopback server that echoes every chunk and records what it received per connection."""

    def __init__(self) -> None:
        self.received: list[bytearray] = []
        self.closed = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got = bytearray()
        self.received.append(got)
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                got.extend(data)
                writer.write(data)
                await writer.drain()
        writer.close()
        self.closed.set()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = Upstream()
    up.server = await asyncio.start_server(up.handle, "127.0.0.1", 0)
    yield up
    up.server.close()


@pytest.fixture
async def proxy(upstream: Upstream) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(upstream.port) as running:
        yield running


async def connect(proxy: FaultProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", proxy.port)


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> bytes:
    writer.write(data)
    await writer.drain()
    return await asyncio.wait_for(reader.readexactly(len(data)), 10)


async def test_pass_forwards_both_ways_and_counts(proxy: FaultProxy, upstream: Upstream) -> None:
    reader, writer = await connect(proxy)
    assert await echo(reader, writer, b"hello kafka") == b"hello kafka"
    big = bytes(range(256)) * 1024  # several chunks
    assert await echo(reader, writer, big) == big
    assert proxy.stats.bytes_up == proxy.stats.bytes_down == len(big) + 11
    assert proxy.stats.connections == 1 and proxy.open_connections == 1
    writer.close()
    assert await proxy.wait_idle(5), "the link winds down after the client closed"


async def test_delay_adds_latency_each_way_and_keeps_order_pipelined(proxy: FaultProxy) -> None:
    reader, writer = await connect(proxy)
    await echo(reader, writer, b"warm-up")
    proxy.delay(150)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await echo(reader, writer, b"x") == b"x"
    round_trip = loop.time() - started
    assert round_trip >= 0.29, f"150 ms each way, measured a {round_trip:.3f} s round trip"
    # five chunks sent 30 ms apart come back in order, each ~300 ms after it left (not 5 x 300 ms)
    started = loop.time()
    for i in range(5):
        writer.write(f"<{i}>".encode())
        await writer.drain()
        await asyncio.sleep(0.03)  # spaces the writes: distinct chunks (the scenario itself)
    assert await asyncio.wait_for(reader.readexactly(15), 10) == b"<0><1><2><3><4>"
    assert loop.time() - started < 1.2, "chunks are pipelined, not delayed one after the other"
    proxy.pass_through()
    assert proxy.mode is Mode.PASS
    with pytest.raises(ValueError):
        proxy.delay(-1)


async def test_stall_holds_bytes_without_closing_then_delivers_them(
    proxy: FaultProxy, upstream: Upstream
) -> None:
    reader, writer = await connect(proxy)
    await echo(reader, writer, b"before")
    proxy.stall()
    writer.write(b"during the stall")
    await writer.drain()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.read(100), 0.4)  # nothing comes back while stalled
    assert bytes(upstream.received[0]) == b"before", "nothing reached the upstream either"
    assert proxy.open_connections == 1 and not reader.at_eof()
    proxy.pass_through()
    assert await asyncio.wait_for(reader.readexactly(16), 10) == b"during the stall"
    assert proxy.stats.stalls == 1


async def test_reset_sends_rst_to_open_and_new_connections(proxy: FaultProxy) -> None:
    reader, writer = await connect(proxy)
    await echo(reader, writer, b"ok")
    proxy.reset()
    with pytest.raises(ConnectionResetError):
        data = await asyncio.wait_for(reader.read(100), 5)
        assert data, "a clean EOF is not a reset"
        raise AssertionError(f"read {data!r} after the reset")
    new_reader, _ = await connect(proxy)  # the listener still accepts, and resets at once
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(new_reader.read(100), 5)
        raise AssertionError("a new connection was not reset")
    assert proxy.stats.resets == 2
    assert await proxy.wait_idle(5)
    proxy.pass_through()
    reader, writer = await connect(proxy)
    assert await echo(reader, writer, b"again") == b"again"


async def test_a_closed_client_still_delivers_its_queued_bytes(
    proxy: FaultProxy, upstream: Upstream
) -> None:
    """A killed client's last requests reach the upstream, as over a real network."""
    proxy.delay(200)
    _, writer = await connect(proxy)
    writer.write(b"last words")
    await writer.drain()
    writer.transport.abort()  # the client dies right after writing
    assert await proxy.wait_idle(10)
    assert bytes(upstream.received[0]) == b"last words"


async def test_an_unreachable_upstream_is_a_reset(upstream: Upstream) -> None:
    assert upstream.server is not None
    port = upstream.port
    upstream.server.close()
    await upstream.server.wait_closed()
    async with FaultProxy(port) as proxy:
        reader, _ = await connect(proxy)
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(100), 5)
            raise AssertionError("expected a reset")


async def test_commands(proxy: FaultProxy) -> None:
    assert apply_command(proxy, "delay 40") == "mode delay delay 40 ms"
    assert proxy.mode is Mode.DELAY and proxy.delay_seconds == pytest.approx(0.04)
    assert apply_command(proxy, "stall").startswith("mode stall")
    assert apply_command(proxy, "pass") == "mode pass delay 0 ms"
    assert apply_command(proxy, "reset").startswith("mode reset")
    assert apply_command(proxy, "delay soon").startswith("error:")
    assert apply_command(proxy, "delay -5").startswith("error:")
    assert apply_command(proxy, "jam").startswith("error:")
    assert apply_command(proxy, "  ") == ""


async def test_a_client_bootstrapped_through_the_proxied_listener_only_uses_the_proxy(
    broker_factory: type[EmbeddedKafka],
) -> None:
    """The broker advertises the proxy on its PROXIED listener: metadata sends the client back to the
    proxy, so a stall of the proxy holds every produce of that client; the default listener is direct."""
    proxied_port = free_port()
    broker = broker_factory(partitions=2, proxied_port=proxied_port)  # type: ignore[call-arg]
    await asyncio.to_thread(broker.start)
    async with FaultProxy(broker.proxied_bind_port, listen_port=proxied_port) as proxy:
        direct = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
        await direct.start()
        try:
            await direct.create_topics([NewTopic("proxied", 2, 1)])
            cluster = await direct.describe_cluster()
            assert [b["port"] for b in cluster["brokers"]] == [broker.port]
        finally:
            await direct.close()
        producer = AIOKafkaProducer(bootstrap_servers=broker.proxied_bootstrap, request_timeout_ms=30000)
        await producer.start()
        try:
            await producer.send_and_wait("proxied", b"through the proxy", partition=0)
            nodes = {(b.host, b.port) for b in producer.client.cluster.brokers()}
            assert nodes == {("127.0.0.1", proxied_port)}, "metadata advertises only the proxy"
            assert proxy.stats.bytes_up > 0 and proxy.stats.connections >= 1
            proxy.stall()
            pending = await producer.send("proxied", b"stalled", partition=0)
            done, _ = await asyncio.wait({pending}, timeout=1.0)
            assert not done, "a stalled proxy holds the produce"
            proxy.pass_through()
            metadata = await asyncio.wait_for(pending, 30)
            assert metadata.offset == 1
        finally:
            await producer.stop()
