"""Two context workers on the real broker: they split the partitions, route the web views to the
owner of a key, keep every customer's state whole across rebalances (a second worker joins, the
first leaves: changelog recovery, memory store), and the reconciliation sweep answers a customer
whose only webhook WATI never delivered."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from services.common.config import Settings
from services.common.kafka import ensure_topics
from services.context.app import customer_partition
from services.standins import StandIns
from tests.integration.test_context_service import (
    READY_TIMEOUT,
    Bus,
    ContextWorker,
    auth,
    clock,
    customer_doc,
    free_port,
    inbound,
    iso,
    reply,
    texts,
    until_doc,
)

pytestmark = pytest.mark.broker


@pytest.fixture(scope="module")
async def stand_ins() -> AsyncIterator[StandIns]:
    async with StandIns.running() as s:
        yield s


@pytest.fixture(scope="module")
def base_settings(settings: Settings, stand_ins: StandIns,
                  tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return dataclasses.replace(
        settings,
        wati_api_url=stand_ins.wati_url,
        wati_api_token=stand_ins.wati.token,
        quiet_window_seconds=1.0,
        flush_scan_interval_seconds=0.2,
        history_timeout_seconds=5.0,
        reconcile_interval_seconds=1.0,
        reconcile_window_seconds=3600.0,
        reconcile_rate_per_second=20.0,
        context_store="memory",
        data_dir=str(tmp_path_factory.mktemp("cluster-data")),
    )


@pytest.fixture(scope="module")
async def bus(base_settings: Settings) -> AsyncIterator[Bus]:
    b = Bus(base_settings, await ensure_topics(base_settings))
    await b.start()
    yield b
    await b.stop()


@pytest.fixture(scope="module")
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


@pytest.fixture(scope="module")
async def workers(base_settings: Settings, bus: Bus, tmp_path_factory: pytest.TempPathFactory
                  ) -> AsyncIterator[dict[str, ContextWorker]]:
    logs = tmp_path_factory.mktemp("cluster-logs")
    started = {
        name: ContextWorker(dataclasses.replace(base_settings, context_web_port=free_port()),
                            logs / f"{name}.log")
        for name in ("a", "b")
    }
    try:
        yield started
    finally:
        for worker in started.values():
            worker.stop()


def customers_on_every_partition(partitions: int, per_partition: int = 2) -> list[str]:
    """Customer keys, `per_partition` on each partition (so both workers own some)."""
    found: dict[int, list[str]] = {p: [] for p in range(partitions)}
    for n in itertools.count(10_000_000):
        key = f"wati:5039{n:08d}"
        bucket = found[customer_partition(key, partitions)]
        if len(bucket) < per_partition:
            bucket.append(key)
        if all(len(b) == per_partition for b in found.values()):
            return [k for p in sorted(found) for k in found[p]]
    raise AssertionError("unreachable")


async def partitions_of(http: httpx.AsyncClient, worker: ContextWorker) -> set[int] | None:
    doc = await worker.readyz(http)
    return None if doc is None else set(doc["partitions"])


async def until_split(http: httpx.AsyncClient, workers: list[ContextWorker], everything: set[int],
                      timeout: float = READY_TIMEOUT) -> list[set[int]]:
    """Waits until every worker is ready and together they own each partition exactly once."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        owned = [await partitions_of(http, w) for w in workers]
        if all(o for o in owned):
            sets = [o for o in owned if o is not None]
            if set().union(*sets) == everything and sum(len(o) for o in sets) == len(everything):
                return sets
        if loop.time() > deadline:
            tails = "\n".join(w.log_tail(30) for w in workers)
            raise AssertionError(f"partitions never split: {owned}\n{tails}")
        await asyncio.sleep(0.2)


async def test_two_workers_split_the_partitions_and_keep_each_customer_whole(
    workers: dict[str, ContextWorker], bus: Bus, http: httpx.AsyncClient, base_settings: Settings
) -> None:
    a, b = workers["a"], workers["b"]
    everything = set(range(base_settings.topic_partitions))
    customers = customers_on_every_partition(base_settings.topic_partitions)
    now = clock()
    m1, r1 = now - timedelta(seconds=60), now - timedelta(seconds=50)
    m2, r2 = now - timedelta(seconds=30), now - timedelta(seconds=20)

    a.start()
    await a.wait_ready(http)
    assert await partitions_of(http, a) == everything
    for customer in customers:
        await bus.inbound(inbound(customer, "uno", m1))
    for customer in customers:
        request = (await bus.wait_for(bus.topics.responder_requests, customer))[0]
        await bus.reply(reply(customer, request["batch_id"], "respuesta uno", r1))
    for customer in customers:
        await until_doc(http, a, customer, lambda d: d["state"]["last_reply_at"] == iso(r1))

    b.start()
    owned_a, owned_b = await until_split(http, [a, b], everything)
    # a view asked of either worker is answered by the owner (key sent URL-encoded or not)
    for customer in customers:
        owner = b if customer_partition(customer, base_settings.topic_partitions) in owned_b else a
        other = a if owner is b else b
        path = f"/customers/{quote(customer, safe='')}/"
        response = await http.get(other.url + path, headers=auth(other.settings))
        assert response.status_code == 200, response.text
        doc: dict[str, Any] = response.json()
        assert doc["worker"].rstrip("/") == owner.url.rstrip("/")
        assert doc["state"]["last_inbound_at"] == iso(m1) and doc["state"]["last_reply_at"] == iso(r1)
    refused = await http.get(a.url + f"/customers/{customers[0]}/")
    assert refused.status_code == 401  # routing never skips the token check

    for customer in customers:
        await bus.inbound(inbound(customer, "dos", m2))
    for customer in customers:
        request = (await bus.wait_for(bus.topics.responder_requests, customer, count=2))[1]
        assert texts(request) == ["dos"]
        assert request["prior_last_inbound_at"] == m1 and request["prior_last_reply_at"] == r1, customer
        await bus.reply(reply(customer, request["batch_id"], "respuesta dos", r2))
    for customer in customers:
        await until_doc(http, a, customer, lambda d: d["state"]["last_reply_at"] == iso(r2))

    assert a.stop() == 0  # A leaves: B takes every partition, recovering A's from the changelog
    await until_split(http, [b], everything)
    for customer in customers:
        await bus.inbound(inbound(customer, "tres", now))
    for customer in customers:
        requests = await bus.wait_for(bus.topics.responder_requests, customer, count=3)
        assert texts(requests[2]) == ["tres"]
        assert requests[2]["prior_last_inbound_at"] == m2, customer
        assert requests[2]["prior_last_reply_at"] == r2, customer
        assert len({r["batch_id"] for r in requests}) == 3
        final = await customer_doc(http, b, customer)
        assert final is not None and final["worker"].rstrip("/") == b.url.rstrip("/")
    assert sorted(owned_a | owned_b) == sorted(everything)


async def test_the_sweep_answers_a_customer_whose_only_webhook_was_lost(
    workers: dict[str, ContextWorker], bus: Bus, http: httpx.AsyncClient, stand_ins: StandIns
) -> None:
    b = workers["b"]
    if b.proc is None or b.proc.poll() is not None:
        b.start()
    await b.wait_ready(http)
    customer = "wati:50398765432"
    now = clock()
    request = await _answered_once(bus, customer, now - timedelta(seconds=60))
    await bus.reply(reply(customer, request["batch_id"], "¿algo más?", now - timedelta(seconds=50)))
    await until_doc(http, b, customer, lambda d: d["state"]["last_reply_at"] is not None)
    # the customer writes again, and WATI never calls the webhook: only getMessages knows
    lost = stand_ins.wati.add_message("50398765432", text="sí, una cosa más", owner=False, at=clock())
    second = (await bus.wait_for(bus.topics.responder_requests, customer, count=2, timeout=20.0))[1]
    assert texts(second) == ["sí, una cosa más"]
    assert second["messages"][0]["recovered"] is True
    assert second["messages"][0]["event_id"] == lost["whatsappMessageId"]
    sweeps = [r for r in stand_ins.wati.requests if "50398765432" in r.path]
    assert sweeps, "the sweep fetched the customer's history"


async def _answered_once(bus: Bus, customer: str, at: Any) -> dict[str, Any]:
    await bus.inbound(inbound(customer, "hola", at))
    return (await bus.wait_for(bus.topics.responder_requests, customer))[0]
