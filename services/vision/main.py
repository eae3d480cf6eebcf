"""`watistream vision`: the vision worker process, and `Vision`, the same worker in-process for tests.

Consumes `vision-requests` in group `<prefix>vision` through the keyed consumer (one customer's
batches strictly in order, different customers concurrently up to RESPONDER_CONCURRENCY), and
serves `/healthz`, `/readyz`, `/metrics` on VISION_WEB_PORT. See `worker.py` for what it does.

Tenants are loaded at start (TENANTS_FILE, else the `default` tenant from the settings); with a file,
vision refuses to start when a tenant's account token or OpenAI key reference does not resolve.
Media are downloaded through each customer's tenant account, images uploaded and classified with
its tenant's OpenAI account (one client per account, reused).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal

import httpx
import openai
from aiokafka import AIOKafkaProducer

from services.common import logs
from services.common.backpressure import records_per_tenant
from services.common.config import Settings
from services.common.fair_share import per_tenant_slots
from services.common.kafka import ensure_topics, make_producer
from services.common.keyed_consumer import KeyedConsumer
from services.common.loop_lag import loop_lag_watched
from services.common.openai_accounts import OpenAIAccount, OpenAIClients, openai_account, openai_http_client
from services.common.ops_http import serve_ops
from services.providers.accounts import AccountClients, NoAccount, load_served_tenants

from .classify import parse_categories
from .images import is_private_host
from .worker import (
    SERVICE,
    MediaFetcher,
    VisionWorker,
    attachment_http_client,
    count_sdk_retry,
    refuse_retry_of_billing_errors,
)

log = logging.getLogger(__name__)

class Vision:
    """The vision worker with its producer, clients and consumer: `await start()`, `await stop()`.

    ManyChat attachment URLs on private/loopback addresses are refused unless
    `allow_private_urls` — by default allowed only when MANYCHAT_API_URL itself is such an address
    (a local stand-in setup for tests, dev and demo).
    """

    def __init__(self, settings: Settings, *, allow_private_urls: bool | None = None) -> None:
        self.settings = settings
        self.allow_private_urls = (
            is_private_host(settings.manychat_api_url) if allow_private_urls is None else allow_private_urls
        )
        self.tenants, self.environ = load_served_tenants(
            settings, what="tenants cannot be served", openai_keys=True)
        self.producer: AIOKafkaProducer | None = None
        self.client: openai.AsyncOpenAI | None = None
        self.openai_clients: OpenAIClients[openai.AsyncOpenAI] = OpenAIClients(self._openai_client)
        self._openai_by_tenant: dict[str, openai.AsyncOpenAI] = {}
        self.media_accounts: AccountClients | None = None
        self.http: httpx.AsyncClient | None = None
        self.worker: VisionWorker | None = None
        self.consumer: KeyedConsumer | None = None

    async def start(self) -> None:
        s = self.settings
        topics = await ensure_topics(s)
        self.producer = make_producer(s)
        await self.producer.start()
        self.client = self.openai_clients.get(OpenAIAccount(s.openai_api_key))
        self.media_accounts = AccountClients(s, self.tenants, "media", environ=self.environ)
        self.http = attachment_http_client(allow_private_urls=self.allow_private_urls)
        fetcher = MediaFetcher(s, accounts=self.media_accounts, http=self.http,
                               allow_private_urls=self.allow_private_urls)
        self.worker = VisionWorker(s, producer=self.producer, client=self.client, fetcher=fetcher,
                                   clients_for=self.openai_client_for, tenants=self.tenants)
        self.consumer = KeyedConsumer(
            s, service=SERVICE, topics=[topics.vision_requests], group_id=f"{s.topic_prefix}vision",
            handler=self.worker.handle, concurrency=max(1, s.responder_concurrency),
            producer=self.producer, agent="vision_requests",
            per_tenant=per_tenant_slots(max(1, s.responder_concurrency),
                                        s.responder_concurrency_per_tenant, len(self.tenants.by_id)),
            records_per_tenant=records_per_tenant(s.records_per_tenant, s.partition_pause_above,
                                                  len(self.tenants.by_id)),
        )
        await self.consumer.start()
        logs.event(log, "vision_started", model=s.vision_model_name,
                   categories=",".join(self.worker.categories))

    def _openai_client(self, account: OpenAIAccount) -> openai.AsyncOpenAI:
        """Vision's OpenAI client of one account: the SDK retries, billing 429s refused, counted."""
        s = self.settings
        return openai.AsyncOpenAI(
            api_key=account.api_key, project=account.project, base_url=s.openai_base_url,
            timeout=s.openai_timeout_seconds, max_retries=max(0, s.openai_max_attempts - 1),
            http_client=openai_http_client(timeout=s.openai_timeout_seconds, event_hooks={
                "request": [count_sdk_retry], "response": [refuse_retry_of_billing_errors]}),
        )

    def openai_client_for(self, customer_key: str) -> openai.AsyncOpenAI:
        """The OpenAI client of the customer's tenant (checked configured before any call)."""
        tenant = self.tenants.for_key(customer_key)
        if tenant is None:
            raise NoAccount("tenant is not configured")
        client = self._openai_by_tenant.get(tenant.id)
        if client is None:  # the tenant's key is resolved once, not per image
            client = self.openai_clients.get(openai_account(tenant, self.settings, self.environ))
            self._openai_by_tenant[tenant.id] = client
        return client

    def ready(self) -> tuple[bool, str]:
        if self.consumer is None:
            return False, "not started"
        return self.consumer.ready()

    async def stop(self) -> None:
        """Stops consuming (in-flight batches finish, bounded), then closes the clients."""
        if self.consumer is not None:
            await self.consumer.stop()
            self.consumer = None
        for closer in (
            self.http.aclose() if self.http else None,
            self.media_accounts.aclose() if self.media_accounts else None,
            *(client.close() for client in self.openai_clients.all()),
        ):
            if closer is not None:
                with contextlib.suppress(Exception):
                    await closer
        self.http = self.client = None
        self.media_accounts = None
        self.openai_clients.clear()
        self._openai_by_tenant.clear()
        if self.producer is not None:
            await self.producer.stop()
            self.producer = None
        logs.event(log, "vision_stopped", service=SERVICE)


async def run(settings: Settings) -> int:
    """Runs until SIGTERM/SIGINT, then stops cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    vision = Vision(settings)
    # OPS_WEB_HOST (loopback by default; 0.0.0.0 in docker-compose), as for the responder
    ops = await serve_ops(settings.ops_web_host, settings.vision_web_port, vision.ready)
    try:
        async with loop_lag_watched(SERVICE):
            await vision.start()
            await stop.wait()
    finally:
        await vision.stop()
        await ops.cleanup()
    return 0


def main(args: argparse.Namespace, settings: Settings) -> int:
    logs.setup("vision", settings.log_level)
    settings.require("OPENAI_API_KEY")
    parse_categories(settings.image_categories)  # a bad IMAGE_CATEGORIES fails before we start
    logs.register_secret(settings.openai_api_key, settings.wati_api_token, settings.manychat_api_token)
    return asyncio.run(run(settings))
