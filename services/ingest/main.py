"""`watistream ingest`: runs the webhook service until SIGTERM/SIGINT, then stops cleanly."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import time
from collections.abc import Callable

from services.common import logs
from services.common.config import ConfigError, Settings
from services.common.logs import event
from services.common.loop_lag import loop_lag_watched

from .app import serve

log = logging.getLogger(__name__)


class Throttle(logging.Filter):
    """Lets one line per message template through every `period` seconds.

    While the broker is down, aiokafka logs "Unable connect to node ..." about ten times a second;
    the supervisor already logs each transition (`kafka_unreachable`, `kafka_reachable`).
    """

    def __init__(self, period: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.period = period
        self.clock = clock
        self._last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = f"{record.name}:{record.msg}"
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.period:
            return False
        self._last[key] = now
        return True


def main(args: argparse.Namespace, settings: Settings) -> int:
    """Entry point of the CLI; a ConfigError propagates (the CLI prints it and exits 2).

    Settings are checked before logging is set up, so a refused start changes nothing in-process."""
    if not settings.webhook_token and not settings.tenants_file:  # a file's tenants have their own
        raise ConfigError("WEBHOOK_TOKEN is empty: the webhook endpoints refuse to run without a secret")
    if not settings.kafka_bootstrap_servers:
        raise ConfigError("KAFKA_BOOTSTRAP_SERVERS is empty: `watistream ingest` needs a broker "
                          "(`watistream broker` starts one; `watistream dev` runs everything)")
    logs.setup("ingest", settings.log_level)
    # logger filters do not apply to records propagated from children: name each aiokafka logger
    for name in ("aiokafka", "aiokafka.conn", "aiokafka.producer.sender", "aiokafka.producer.producer"):
        logging.getLogger(name).addFilter(Throttle())
    logs.register_secret(settings.webhook_token, settings.wati_api_token, settings.manychat_api_token,
                         settings.openai_api_key, settings.web_token)
    asyncio.run(run(settings))
    return 0


async def run(settings: Settings) -> None:
    """Serves until a stop signal. Topics and the producer come up in the background (with
    retries), so the service answers 503 rather than failing while the broker is still starting."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with serve(settings) as url, loop_lag_watched("ingest"):
        event(log, "ingest_listening", url=url)
        await stop.wait()
        event(log, "ingest_stopping")
    event(log, "ingest_stopped")
