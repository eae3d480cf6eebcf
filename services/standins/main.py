"""`watistream standins [--port P]`: the three stand-ins in one process until SIGINT/SIGTERM.

Prints `KEY=VALUE` lines for a `.env` (URLs and the stand-ins' own test tokens — never the tokens
of the current settings, which could be real ones). With `--port P` they listen on P, P+1, P+2
(WATI, ManyChat, OpenAI); without it, on free ports.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

from services.common.config import Settings

from . import StandIns

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


async def serve(
    base_port: int,
    *,
    ready: asyncio.Event | None = None,
    stop: asyncio.Event | None = None,
    install_signals: bool = True,
) -> None:
    """Runs the stand-ins, prints their environment, waits for `stop` or SIGINT/SIGTERM."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    if install_signals:
        for sig in _SIGNALS:
            # impossible outside the main thread or on some platforms: then only `stop` ends it
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, stop.set)
                installed.append(sig)
    try:
        async with StandIns.running(base_port=base_port) as stand_ins:
            for key, value in stand_ins.env().items():
                print(f"{key}={value}", flush=True)
            if ready is not None:
                ready.set()
            await stop.wait()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def main(args: argparse.Namespace, settings: Settings) -> int:
    port = int(getattr(args, "port", 0) or 0)
    if port < 0 or port > 65533:
        print("watistream standins: --port must be between 0 and 65533", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(port))
    except OSError as exc:
        print(f"watistream standins: cannot listen: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0
