"""`watistream responder`: the responder worker, and `Responder`, its in-process runner (tests, dev).

Start order: topics exist → producer → state reader caught up (the service is not ready before) →
keyed consumer of `responder_requests` (its `on_assign` waits until the state reader reached the end
offsets of that moment, so a customer moved from another worker brings its conversation along) →
ops endpoints. Stop: no new records, in-flight batches get `drain_timeout` to finish, finished
offsets are committed, then everything closes.

Configuration decisions: OPENAI_API_KEY is required. A channel without credentials is allowed but
logged at start (WARNING): its batches are dead-lettered `send_failed` (`channel_not_configured`)
and answered `nothing_sent`; at least one channel must be configured. SYSTEM_PROMPT_FILE, when set,
must be readable; without it a short built-in instruction is used (and a warning logged).

Tenants (docs/tenants.md): the tenants are loaded at start (TENANTS_FILE, else the `default` tenant
from these settings). Each tenant gets its own Replier — its system prompt file (a tenant without
one gets the built-in instructions, never another tenant's), its model, its OpenAI account (own key
and project, else the deployment's key) — and each customer's answer is sent from its tenant's
account (one client per account, opened on first use). With a file, the responder refuses to start
when a tenant's prompt file, account token or OpenAI key reference does not resolve.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from pathlib import Path

from aiohttp import web
from aiokafka import AIOKafkaProducer
from aiokafka.structs import TopicPartition
from openai import AsyncOpenAI

from .. import providers
from ..common import logs
from ..common.backpressure import records_per_tenant
from ..common.config import ConfigError, Settings, channel_names
from ..common.fair_share import per_tenant_slots
from ..common.kafka import Topics, ensure_topics, make_producer
from ..common.keyed_consumer import KeyedConsumer
from ..common.keys import DEFAULT_TENANT
from ..common.logs import event
from ..common.loop_lag import loop_lag_watched
from ..common.openai_accounts import OpenAIClients, openai_account
from ..common.ops_http import bound_port, serve_ops
from ..common.tenants import Tenant, Tenants, load_tenants, require_served_channels, serves_tenant_accounts
from ..providers.accounts import AccountClients, load_served_tenants
from .ai import Replier, TenantRepliers, make_client
from .channels import ChannelSender
from .prompt import UnknownLocale, labels_for
from .state_store import StateStore
from .worker import SERVICE, ResponderWorker

log = logging.getLogger(__name__)

DEFAULT_INSTRUCTIONS = (
    "You are the customer-service assistant of this business. Answer in the customer's language, "
    "briefly and politely. Use the conversation so far and any block of messages between the customer "
    "and human agents. If you do not know something, say that a human agent will follow up."
)


def load_instructions(settings: Settings) -> str:
    """The system prompt: SYSTEM_PROMPT_FILE's content, or the built-in default when it is unset."""
    if not settings.system_prompt_file:
        return DEFAULT_INSTRUCTIONS
    path = Path(settings.system_prompt_file)
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"SYSTEM_PROMPT_FILE cannot be read: {exc.strerror}") from exc
    if not text:
        raise ConfigError("SYSTEM_PROMPT_FILE is empty")
    return text


def tenant_instructions(tenant: Tenant, fallback: str) -> str:
    """The tenant's system prompt (its file), or `fallback` when it names none."""
    if not tenant.system_prompt_file:
        return fallback
    where = f"tenant {tenant.id!r}: system_prompt_file {tenant.system_prompt_file}"
    try:
        text = Path(tenant.system_prompt_file).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{where} cannot be read: {exc.strerror}") from exc
    if not text:
        raise ConfigError(f"{where} is empty")
    return text


def instructions_by_tenant(settings: Settings, tenants: Tenants, override: str | None) -> dict[str, str]:
    """Each tenant's instructions. Without a file the `default` tenant's are SYSTEM_PROMPT_FILE's
    (or `override`), as before; with one, each tenant's own file, else `override` or the built-in."""
    if tenants.source == "environment":
        return {t.id: override if override is not None else load_instructions(settings) for t in tenants}
    fallback = override if override is not None else DEFAULT_INSTRUCTIONS
    return {t.id: tenant_instructions(t, fallback) for t in tenants}


def check_settings(settings: Settings) -> list[str]:
    """Raises ConfigError for what makes the responder useless; returns warnings for the rest."""
    settings.require("OPENAI_API_KEY", "KAFKA_BOOTSTRAP_SERVERS")
    try:
        labels_for(settings.prompt_locale)
    except UnknownLocale as exc:
        raise ConfigError(f"PROMPT_LOCALE: {exc}") from exc
    if serves_tenant_accounts(settings):  # each tenant's channels are its entry's (docs/tenants.md)
        served = require_served_channels(settings, load_tenants(settings))
        warnings = [p.unconfigured_warning() for p in providers.providers()
                    if p.name in channel_names() and p.name not in served]
    else:
        settings.require_channels()
        registered = providers.providers()
        unconfigured = [p for p in registered if not p.configured(settings)]
        if len(unconfigured) == len(registered):
            raise ConfigError(
                "no channel configured: set " + " and/or ".join(p.config_hint() for p in registered)
            )
        warnings = [p.unconfigured_warning() for p in unconfigured]
    if not settings.system_prompt_file:
        warnings.append("SYSTEM_PROMPT_FILE is not set: using the built-in instructions")
    return warnings


class Responder:
    """The whole responder in this process: `await start()`, `ready()`, `await stop()`."""

    def __init__(
        self,
        settings: Settings,
        *,
        instructions: str | None = None,
        web_port: int | None = None,
        serve_http: bool = True,
        drain_timeout: float = 10.0,
        revoke_timeout: float = 10.0,
        cancel_revoked: bool = False,
    ) -> None:
        self.settings = settings
        self.tenants, self.environ = load_served_tenants(
            settings, what="tenants cannot be answered", openai_keys=True)
        self.instructions_by_tenant = instructions_by_tenant(settings, self.tenants, instructions)
        self.instructions = self.instructions_by_tenant.get(DEFAULT_TENANT) or (
            instructions if instructions is not None else DEFAULT_INSTRUCTIONS)
        self.web_port = settings.responder_web_port if web_port is None else web_port
        self.serve_http = serve_http
        self.drain_timeout = drain_timeout
        self.revoke_timeout = revoke_timeout
        # False: a batch whose partition moved finishes its OpenAI call and send under its claim
        # (the new owner waits for it; the claim fence refuses it if the new owner took over);
        # True cancels it and releases its claim: the call is wasted, the new owner calls again
        self.cancel_revoked = cancel_revoked
        self.topics = Topics.from_settings(settings)
        self.producer: AIOKafkaProducer | None = None
        self.store: StateStore | None = None
        self.consumer: KeyedConsumer | None = None
        self.sender: ChannelSender | None = None
        self.worker: ResponderWorker | None = None
        self.runner: web.AppRunner | None = None
        self.openai_clients: OpenAIClients[AsyncOpenAI] = OpenAIClients(
            lambda account: make_client(account.api_key, settings.openai_base_url,
                                        settings.openai_timeout_seconds, project=account.project))

    @property
    def port(self) -> int | None:
        return bound_port(self.runner) if self.runner is not None else None

    def ready(self) -> tuple[bool, str]:
        if self.store is None or self.consumer is None:
            return False, "starting"
        ok, reason = self.store.ready()
        if not ok:
            return ok, reason
        return self.consumer.ready()

    async def start(self) -> None:
        s = self.settings
        if self.serve_http:  # probes see "starting" rather than a refused connection
            self.runner = await serve_ops(s.ops_web_host, self.web_port, self.ready)
        await ensure_topics(s)
        self.producer = make_producer(s)
        await self.producer.start()
        self.store = StateStore(s, self.producer, self.topics)
        await self.store.start()
        await self.store.wait_ready()
        repliers = TenantRepliers({
            tenant.id: Replier(
                self.openai_clients.get(openai_account(tenant, s, self.environ)), model=tenant.openai.model,
                instructions=self.instructions_by_tenant[tenant.id], max_attempts=s.openai_max_attempts,
                max_output_tokens=s.openai_max_output_tokens or None)
            for tenant in self.tenants
        })
        self.sender = ChannelSender(accounts=AccountClients(s, self.tenants, "send", environ=self.environ))
        self.worker = ResponderWorker(s, replier=repliers, sender=self.sender, store=self.store,
                                      producer=self.producer, topics=self.topics, tenants=self.tenants)
        self.consumer = KeyedConsumer(
            s, service=SERVICE, topics=[self.topics.responder_requests],
            group_id=f"{s.topic_prefix}responder",
            handler=self.worker.handle, concurrency=s.responder_concurrency, producer=self.producer,
            on_assign=self._on_assign, agent="requests", drain_timeout=self.drain_timeout,
            revoke_timeout=self.revoke_timeout, cancel_revoked=self.cancel_revoked,
            per_tenant=per_tenant_slots(s.responder_concurrency, s.responder_concurrency_per_tenant,
                                        len(self.tenants.by_id)),
            records_per_tenant=records_per_tenant(s.records_per_tenant, s.partition_pause_above,
                                                  len(self.tenants.by_id)),
        )
        await self.consumer.start()
        event(log, "responder_started", concurrency=s.responder_concurrency, port=self.port)

    async def _on_assign(self, partitions: set[TopicPartition]) -> None:
        assert self.store is not None
        await self.store.catch_up()

    async def stop(self) -> None:
        """Stops consuming (in-flight batches get `drain_timeout`), commits, closes everything."""
        if self.consumer is not None:
            await self.consumer.stop()
        if self.store is not None:
            await self.store.stop()
        if self.producer is not None:
            with contextlib.suppress(Exception):
                await self.producer.stop()
        if self.sender is not None:
            await self.sender.aclose()
        for client in self.openai_clients.all():
            with contextlib.suppress(Exception):
                await client.close()
        self.openai_clients.clear()
        if self.runner is not None:
            await self.runner.cleanup()
        self.runner = None
        event(log, "responder_stopped")

    async def wait_ready(self, timeout: float = 60.0) -> None:
        """Waits until `ready()` (tests and launchers); raises TimeoutError with the last reason."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            ok, reason = self.ready()
            if ok:
                return
            if loop.time() > deadline:
                raise TimeoutError(f"responder not ready: {reason}")
            await asyncio.sleep(0.05)


async def run(settings: Settings) -> int:
    responder = Responder(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with loop_lag_watched(SERVICE):
            await responder.start()
            await stop.wait()
    finally:
        await responder.stop()
    return 0


def main(args: argparse.Namespace, settings: Settings) -> int:
    logs.setup(SERVICE, settings.log_level)
    logs.register_secret(settings.openai_api_key, settings.wati_api_token, settings.manychat_api_token)
    for warning in check_settings(settings):
        event(log, "config_warning", logging.WARNING, warning=warning)
    return asyncio.run(run(settings))
