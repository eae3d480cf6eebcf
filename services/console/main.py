"""`watistream console`: the operator console process, and `ConsoleService`, the same in-process.

Consumes its topics in group `<prefix>console` into `$DATA_DIR/console/console.sqlite3`, prunes
rows older than CONSOLE_RETENTION_HOURS every few minutes, and serves the pages on
CONSOLE_HOST:CONSOLE_PORT (loopback by default). `watistream console --hash-password` reads a
password on stdin and prints the hash to put in CONSOLE_USERS / CONSOLE_USERS_FILE.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import logging
import signal
import sys
import time
from pathlib import Path

from aiohttp import web
from aiokafka import AIOKafkaProducer

from services.common import deadletters, logs
from services.common.config import ConfigError, Settings
from services.common.kafka import ensure_topics, make_producer
from services.common.loop_lag import loop_lag_watched
from services.common.ops_http import bound_port
from services.common.tenants import load_tenants
from services.responder.prompt import labels_for

from .app import Console, build_app
from .auth import Sessions, hash_password, load_accounts
from .consumer import SERVICE, ConsoleConsumer
from .store import Store

log = logging.getLogger(__name__)
PRUNE_EVERY_SECONDS = 300.0


def store_path(settings: Settings) -> Path:
    return Path(settings.data_dir) / "console" / "console.sqlite3"


class ConsoleService:
    """Store + consumer + producer + web server: `await start()`, `await stop()`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        accounts = load_accounts(settings.console_users, settings.console_users_file)
        self.users, self.scopes = accounts.hashes, accounts.tenants
        if not self.users:
            raise ConfigError("the console needs at least one operator: set CONSOLE_USERS or "
                              "CONSOLE_USERS_FILE (hash with `watistream console --hash-password`)")
        self.tenant_ids = tuple(sorted(t.id for t in load_tenants(settings)))
        for user, tenants in sorted(self.scopes.items()):  # a typo would show the operator nothing
            unknown = sorted(tenants - set(self.tenant_ids))
            if unknown:
                raise ConfigError(f"console users: {user} is limited to tenant(s) {', '.join(unknown)} "
                                  "that the tenants configuration does not have")
        self.labels = labels_for(settings.prompt_locale)
        self.store: Store | None = None
        self.producer: AIOKafkaProducer | None = None
        self.consumer: ConsoleConsumer | None = None
        self.runner: web.AppRunner | None = None
        self.pruner: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        assert self.runner is not None
        return bound_port(self.runner)

    def ready(self) -> tuple[bool, str]:
        if self.consumer is None:
            return False, "not started"
        return self.consumer.ready()

    async def start(self) -> None:
        s = self.settings
        self.store = Store(store_path(s))
        topics = await ensure_topics(s)
        self.producer = make_producer(s)
        await self.producer.start()
        console = Console(
            store=self.store, sessions=Sessions(s.console_session_secret, s.console_session_hours * 3600),
            users=self.users, topics=topics, producer=self.producer, ready=self.ready,
            scopes=self.scopes, tenant_ids=self.tenant_ids,
            replays=lambda: deadletters.read_replays(s),
        )
        self.runner = web.AppRunner(build_app(console), access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, s.console_host, s.console_port).start()
        self.consumer = ConsoleConsumer(s, self.store, self.labels)
        await self.consumer.start()
        self.pruner = asyncio.create_task(self._prune_loop(), name="console-prune")
        logs.event(log, "console_started", host=s.console_host, port=self.port, operators=len(self.users))

    async def _prune_loop(self) -> None:
        assert self.store is not None
        retention_ms = int(self.settings.console_retention_hours * 3_600_000)
        while True:
            await asyncio.sleep(PRUNE_EVERY_SECONDS)
            now_ms = int(time.time() * 1000)
            deleted = self.store.prune(now_ms - retention_ms)
            if deleted:
                logs.event(log, "console_pruned", rows=deleted)

    async def stop(self) -> None:
        if self.pruner is not None:
            self.pruner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.pruner
        if self.consumer is not None:
            await self.consumer.stop()
        if self.runner is not None:
            await self.runner.cleanup()
        if self.producer is not None:
            await self.producer.stop()
        if self.store is not None:
            self.store.close()
        self.consumer, self.runner, self.producer, self.store, self.pruner = None, None, None, None, None


async def run(settings: Settings) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    service = ConsoleService(settings)
    try:
        async with loop_lag_watched(SERVICE):
            await service.start()
            await stop.wait()
    finally:
        await service.stop()
    return 0


def main(args: argparse.Namespace, settings: Settings) -> int:
    if getattr(args, "hash_password", False):
        password = getpass.getpass("password: ") if sys.stdin.isatty() else sys.stdin.readline().rstrip("\n")
        if not password:
            print("watistream console: empty password", file=sys.stderr)
            return 2
        print(hash_password(password))
        return 0
    logs.setup("console", settings.log_level)
    logs.register_secret(settings.console_session_secret)
    return asyncio.run(run(settings))
