"""A loopback TCP fault proxy for drills: forwards to one upstream and misbehaves on demand.

Put between one process and the broker (see `EmbeddedKafka.proxied_port`), it widens the windows
a crash can fall into: a slow path keeps records in the client's buffers longer, a stall holds
them without closing anything, a reset breaks every connection at once. The mode is switched at
run time by the drill (same event loop):

- `pass_through()`: bytes are forwarded as they come;
- `delay(ms)`: every chunk, in each direction, is forwarded `ms` later than it arrived (a latency:
  order is kept and chunks are pipelined, so throughput is not divided by the delay);
- `stall()`: nothing is forwarded, nothing is closed; what arrives meanwhile waits in the proxy
  and goes out, in order, once another mode is set;
- `reset()`: every open connection is closed with a TCP RST (SO_LINGER 0) on both sides, and so is
  every new one for as long as the mode lasts.

A client's EOF is forwarded after the data queued before it, so the last requests of a killed
client still reach the broker, as they would over a real network; `wait_idle()` says when every
connection of a dead client has been wound down.

    python -m services.devtools.faultproxy --upstream 127.0.0.1:9092 --listen 9093
reads `pass`, `delay <ms>`, `stall` and `reset` lines on stdin.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import socket
import struct
import sys
from dataclasses import dataclass, field
from types import TracebackType

CHUNK = 65536


class Mode(enum.Enum):
    PASS = "pass"  # noqa: S105 - a mode name, not a password
    DELAY = "delay"
    STALL = "stall"
    RESET = "reset"


@dataclass
class ProxyStats:
    """Counters a drill reports (how much the faults actually hit)."""

    connections: int = 0
    resets: int = 0
    bytes_up: int = 0  # client → upstream
    bytes_down: int = 0  # upstream → client
    stalls: int = 0


@dataclass(eq=False)
class _Link:
    """One proxied connection: the client's and the upstream's transports."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def abort(self, rst: bool) -> None:
        for writer in (self.client, self.upstream):
            if writer is not None:
                _abort(writer, rst)


def _abort(writer: asyncio.StreamWriter, rst: bool) -> None:
    """Closes at once; with `rst`, SO_LINGER 0 makes the kernel send a RST instead of a FIN."""
    if rst:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    """`async with FaultProxy(upstream_port) as proxy:` listens on 127.0.0.1:`proxy.port`."""

    def __init__(
        self, upstream_port: int, *, upstream_host: str = "127.0.0.1", listen_port: int = 0,
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.listen_port = listen_port
        self.mode = Mode.PASS
        self.delay_seconds = 0.0
        self.stats = ProxyStats()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._links: set[_Link] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None, "start() first"
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def open_connections(self) -> int:
        return len(self._links)

    # -- modes --------------------------------------------------------------------------------------
    def pass_through(self) -> None:
        self._set(Mode.PASS, 0.0)

    def delay(self, ms: float) -> None:
        """Forward each chunk `ms` milliseconds after it arrived, in both directions."""
        if ms < 0:
            raise ValueError(f"delay must be >= 0 ms, got {ms}")
        self._set(Mode.DELAY, ms / 1000.0)

    def stall(self) -> None:
        """Forward nothing (connections stay open) until another mode is set."""
        if self.mode is not Mode.STALL:
            self.stats.stalls += 1
        self._set(Mode.STALL, self.delay_seconds)

    def reset(self) -> None:
        """RST every open connection, and every new one while this mode lasts."""
        self._set(Mode.RESET, 0.0)
        for link in list(self._links):
            self.stats.resets += 1
            link.abort(rst=True)

    def _set(self, mode: Mode, delay_seconds: float) -> None:
        self.mode = mode
        self.delay_seconds = delay_seconds
        if mode is Mode.STALL:
            self._flowing.clear()
        else:
            self._flowing.set()

    # -- lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.listen_port)
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.abort(rst=False)
        tasks = [t for link in list(self._links) for t in link.tasks]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def wait_idle(self, timeout: float) -> bool:
        """Waits until no connection is open (a dead client's queued bytes went out); False on timeout."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    # -- forwarding ---------------------------------------------------------------------------------
    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats.connections += 1
        if self.mode is Mode.RESET:
            self.stats.resets += 1
            _abort(writer, rst=True)
            return
        link = _Link(writer)
        self._links.add(link)
        self._idle.clear()
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            except OSError:
                link.abort(rst=True)  # the upstream refuses: so does the proxy
                return
            link.upstream = up_writer
            link.tasks = [
                asyncio.create_task(self._pipe(reader, up_writer, link, up=True)),
                asyncio.create_task(self._pipe(up_reader, writer, link, up=False)),
            ]
            await asyncio.gather(*link.tasks, return_exceptions=True)
        finally:
            link.abort(rst=False)
            self._links.discard(link)
            if not self._links:
                self._idle.set()

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link, *, up: bool
    ) -> None:
        """One direction: a reader task queues (deliver-at, chunk); this task delivers in order."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

        async def read() -> None:
            try:
                while data := await reader.read(CHUNK):
                    queue.put_nowait((loop.time() + self.delay_seconds, data))
            except OSError:
                pass
            finally:
                queue.put_nowait(None)  # EOF (or a broken side): after what was queued

        reading = asyncio.create_task(read())
        try:
            while (item := await queue.get()) is not None:
                at, data = item
                pause = at - loop.time()
                if pause > 0:
                    await asyncio.sleep(pause)  # the injected latency itself
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
                if up:
                    self.stats.bytes_up += len(data)
                else:
                    self.stats.bytes_down += len(data)
            if writer.can_write_eof():
                writer.write_eof()  # half-close: the other direction may still answer
        except OSError:
            # The side we write to is gone. Upstream gone: nothing can be delivered any more. The
            # client gone: its queued requests still go upstream (the other direction drains them).
            if up:
                link.abort(rst=False)
            else:
                _abort(writer, rst=False)
        finally:
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading


# -- command line ------------------------------------------------------------------------------------

def apply_command(proxy: FaultProxy, line: str) -> str:
    """`pass`, `delay <ms>`, `stall`, `reset`: switches the mode; returns what it did (or why not)."""
    words = line.split()
    if not words:
        return ""
    match words:
        case ["pass"]:
            proxy.pass_through()
        case ["delay", ms]:
            try:
                proxy.delay(float(ms))
            except ValueError as exc:
                return f"error: {exc}"
        case ["stall"]:
            proxy.stall()
        case ["reset"]:
            proxy.reset()
        case _:
            return "error: commands are pass | delay <ms> | stall | reset"
    return f"mode {proxy.mode.value} delay {proxy.delay_seconds * 1000:g} ms"


async def _serve(upstream: str, listen: int) -> None:
    host, _, port = upstream.rpartition(":")
    async with FaultProxy(int(port), upstream_host=host or "127.0.0.1", listen_port=listen) as proxy:
        print(f"faultproxy 127.0.0.1:{proxy.port} -> {upstream}", flush=True)
        loop = asyncio.get_running_loop()
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            if answer := apply_command(proxy, line):
                print(answer, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--upstream", required=True, help="host:port to forward to")
    parser.add_argument("--listen", type=int, default=0, help="loopback port (0: any free one)")
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.upstream, args.listen))


if __name__ == "__main__":
    main()
