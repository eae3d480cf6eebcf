"""Webhooks routed per tenant against the session's real Kafka: each tenant's own secret, records keyed
by tenant and account, and one phone number writing to three tenants giving three customers."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiokafka.partitioner import murmur2

from services.common import codec
from services.common.config import ConfigError, Settings
from services.common.kafka import Topics
from services.common.tenants import Tenants, parse_tenants
from services.ingest import app as ingest_app
from services.ingest.app import make_app, serve
from services.ingest.producer import ProducerSupervisor
from tests.integration.test_ingest_webhooks import Reader, wait_until_ready

pytestmark = pytest.mark.broker

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
WA_ID = "50370000001"  # the text fixture's customer
ENVIRON = {"HOTEL_A_HOOK": "hook-a-0000000000", "SHOP_B_HOOK": "hook-b-0000000000"}


def tenants_doc(include_default: bool = True) -> dict[str, Any]:
    wati = {"token": "env:UNUSED_BY_INGEST"}
    tenants: list[dict[str, Any]] = [
        {"id": "hotel-a", "webhook_secret": "env:HOTEL_A_HOOK", "wati": [
            {"id": "centro", "api_url": "https://live.wati.example/1001", **wati},
            {"id": "playa", "api_url": "https://live.wati.example/1002", **wati}]},
        {"id": "shop-b", "webhook_secret": "env:SHOP_B_HOOK",
         "wati": {"api_url": "https://live.wati.example/2001", **wati}, "manychat": {**wati}},
    ]
    if include_default:
        tenants.insert(0, {"id": "default", "webhook_secret": "env:WEBHOOK_TOKEN",
                           "wati": {"api_url": "https://live.wati.example/1", **wati}, "manychat": {**wati}})
    return {"tenants": tenants}


def tenants_for(settings: Settings, include_default: bool = True) -> Tenants:
    return parse_tenants(tenants_doc(include_default), settings, "tenants.json")


def load(provider: str, name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((FIXTURES / provider / f"{name}.json").read_text(encoding="utf-8"))
    return doc


@pytest.fixture(scope="module")
async def base_url(settings: Settings) -> AsyncIterator[str]:
    async with serve(settings, port=0, tenants=tenants_for(settings), environ=ENVIRON) as url:
        await wait_until_ready(url)
        yield url


@pytest.fixture(scope="module")
async def reader(settings: Settings) -> AsyncIterator[Reader]:
    r = Reader(settings)
    await r.consumer.start()
    yield r
    await r.consumer.stop()


async def post(url: str, body: object, secret: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.post(
        url, json=body, headers={"Authorization": f"Bearer {secret}"}
    ) as resp:
        return resp.status, await resp.json()


def wati_text(event_id: str) -> dict[str, Any]:
    payload = load("wati", "text")
    payload["whatsappMessageId"] = event_id
    payload["id"] = f"id-{event_id}"
    return payload


async def test_one_phone_number_writing_to_three_tenants_is_four_customers(
    base_url: str, reader: Reader, settings: Settings
) -> None:
    routes = [  # (path, secret, expected key)
        ("/webhooks/wati", settings.webhook_token, f"wati:{WA_ID}"),
        ("/webhooks/default/wati", settings.webhook_token, f"wati:{WA_ID}"),  # the same customer
        ("/webhooks/hotel-a/wati/centro", ENVIRON["HOTEL_A_HOOK"], f"hotel-a/centro/wati:{WA_ID}"),
        ("/webhooks/hotel-a/wati/playa", ENVIRON["HOTEL_A_HOOK"], f"hotel-a/playa/wati:{WA_ID}"),
        ("/webhooks/shop-b/wati", ENVIRON["SHOP_B_HOOK"], f"shop-b/default/wati:{WA_ID}"),
    ]
    expected: dict[str, str] = {}
    for number, (path, secret, key) in enumerate(routes):
        event_id = f"wamid.tenants.{number}"
        status, body = await post(f"{base_url}{path}", wati_text(event_id), secret)
        assert status == 200 and body["status"] == "accepted", (path, body)
        expected[event_id] = key
    records = {}
    for record in await reader.read(Topics.from_settings(settings).inbound):
        value = codec.decode("InboundMessage", record.value)
        records[value["event_id"]] = (record, value)
    for event_id, key in expected.items():
        record, value = records[event_id]
        assert value["customer_key"] == key and value["provider_id"] == WA_ID
        assert record.key == key.encode()  # keyed by the tenant-aware customer key
        assert record.partition == (murmur2(key.encode()) & 0x7FFFFFFF) % settings.topic_partitions
    assert len(set(expected.values())) == 4


async def test_a_tenants_manychat_page_keys_its_subscribers(
    base_url: str, reader: Reader, settings: Settings
) -> None:
    status, body = await post(f"{base_url}/webhooks/shop-b/manychat", load("manychat", "flat"),
                              ENVIRON["SHOP_B_HOOK"])
    assert status == 200, body
    values = [codec.decode("InboundMessage", r.value)
              for r in await reader.read(Topics.from_settings(settings).inbound)]
    found = [v for v in values if v["event_id"] == body["event_id"]]
    assert found and found[0]["customer_key"].startswith("shop-b/default/manychat:")


@pytest.mark.parametrize(("path", "secret"), [
    ("/webhooks/shop-b/wati", "hook-a-0000000000"),  # another tenant's secret
    ("/webhooks/hotel-a/wati/centro", "test-webhook-token"),  # the default tenant's secret
    ("/webhooks/wati", "hook-b-0000000000"),  # a tenant's secret on the default routes
    ("/webhooks/shop-b/wati", ""),
])
async def test_each_tenant_accepts_only_its_own_secret(base_url: str, path: str, secret: str) -> None:
    status, body = await post(f"{base_url}{path}", wati_text("wamid.denied"), secret)
    assert status == 401 and body["error"] == "unauthorized"


@pytest.mark.parametrize(("path", "error", "reason"), [
    ("/webhooks/nobody/wati", "unknown_tenant", "no tenant 'nobody'"),
    ("/webhooks/hotel-a/wati", "unknown_tenant",
     "tenant 'hotel-a' has no wati single or 'default' account"),  # two accounts: the URL names one
    ("/webhooks/hotel-a/wati/nope", "unknown_tenant", "tenant 'hotel-a' has no wati account 'nope'"),
    ("/webhooks/hotel-a/manychat", "unknown_tenant",
     "tenant 'hotel-a' has no manychat single or 'default' account"),
    ("/webhooks/shop-b/telegram", "unknown_provider", "no provider 'telegram'"),
])
async def test_an_unknown_tenant_account_or_provider_is_a_404(
    base_url: str, path: str, error: str, reason: str
) -> None:
    status, body = await post(f"{base_url}{path}", wati_text("wamid.nowhere"), ENVIRON["HOTEL_A_HOOK"])
    assert status == 404 and body == {"error": error, "reason": reason}


async def metric_lines(base_url: str, name: str) -> list[str]:
    async with aiohttp.ClientSession() as http, http.get(f"{base_url}/metrics") as resp:
        text = await resp.text()
    return [line for line in text.splitlines() if line.startswith(name + "{")]


async def test_webhook_metrics_carry_the_routes_tenant_and_unknown_tenants_are_one_series(
    base_url: str,
) -> None:
    """Accepted and rejected webhooks count per tenant; 30 invented tenants (an attacker's flood)
    create no series of their own: they all count as `other`."""
    status, _ = await post(f"{base_url}/webhooks/shop-b/wati", wati_text("wamid.metric.1"),
                           ENVIRON["SHOP_B_HOOK"])
    assert status == 200
    status, _ = await post(f"{base_url}/webhooks/hotel-a/wati/playa", [1], ENVIRON["HOTEL_A_HOOK"])
    assert status == 400
    before = await metric_lines(base_url, "watistream_webhook_rejects_total")
    for number in range(30):
        status, _ = await post(f"{base_url}/webhooks/invented-{number}/wati", wati_text("wamid.x"), "x")
        assert status == 404
    events = await metric_lines(base_url, "watistream_webhook_events_total")
    rejects = await metric_lines(base_url, "watistream_webhook_rejects_total")
    assert any('kind="message",provider="wati",tenant="shop-b"}' in line for line in events)
    assert any('reason="not_an_object",tenant="hotel-a"}' in line for line in rejects)
    unknown = [line for line in rejects if 'reason="unknown_tenant"' in line and 'tenant="other"' in line]
    (line,) = unknown
    was = [float(b.split()[-1]) for b in before if b.startswith(line.rsplit(" ", 1)[0] + " ")]
    assert float(line.split()[-1]) - (was[0] if was else 0.0) == 30
    labels = {part.split('tenant="')[1].split('"')[0] for part in events + rejects}
    assert labels <= {"default", "hotel-a", "shop-b", "other"}, labels
    assert not any("invented" in line for line in events + rejects)


async def test_a_dead_letter_on_a_tenants_route_counts_under_that_tenant(
    base_url: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ingest dead-letters a payload it could not normalise keyed by provider (no customer key yet):
    the count still goes to the route's tenant."""
    def broken(payload: object, received_at: Any) -> Any:
        raise ZeroDivisionError("bug")

    monkeypatch.setitem(ingest_app.NORMALISERS, "wati", broken)
    name = "watistream_dead_letters_total"
    label = 'reason="normaliser_error",service="ingest",tenant="shop-b"} '
    before = [float(x.split()[-1]) for x in await metric_lines(base_url, name) if label in x]
    status, body = await post(f"{base_url}/webhooks/shop-b/wati", wati_text("wamid.dl"),
                              ENVIRON["SHOP_B_HOOK"])
    assert status == 400 and body["error"] == "unprocessable"
    after = [float(x.split()[-1]) for x in await metric_lines(base_url, name) if label in x]
    assert after == [(before[0] if before else 0.0) + 1]


def test_without_a_default_tenant_the_old_routes_do_not_exist(settings: Settings) -> None:
    tenants = tenants_for(settings, include_default=False)
    app = make_app(settings, ProducerSupervisor(settings), tenants=tenants, environ=ENVIRON)
    paths = {resource.canonical for resource in app.router.resources()}
    assert "/webhooks/wati" not in paths and "/webhooks/manychat" not in paths
    assert "/webhooks/{tenant}/{provider}" in paths


def test_ingest_refuses_to_start_with_a_missing_or_shared_tenant_secret(settings: Settings) -> None:
    tenants = tenants_for(settings)
    with pytest.raises(ConfigError, match=r"tenant 'shop-b': webhook_secret: env:SHOP_B_HOOK is not set"):
        make_app(settings, ProducerSupervisor(settings), tenants=tenants, environ={"HOTEL_A_HOOK": "a" * 16})
    shared = {"HOTEL_A_HOOK": "same-secret-0000", "SHOP_B_HOOK": "same-secret-0000"}
    with pytest.raises(ConfigError, match=r"'shop-b': webhook_secret: same secret as tenant 'hotel-a'"):
        make_app(settings, ProducerSupervisor(settings), tenants=tenants, environ=shared)


async def test_a_tenants_channels_come_from_its_entry_not_the_deployments_settings(
    settings: Settings, reader: Reader, tmp_path: Path
) -> None:
    """With TENANTS_FILE, `shop-b`'s ManyChat page is served although the deployment's own settings
    enable WhatsApp only (no MANYCHAT_API_TOKEN): its webhook is accepted, not `channel_disabled`."""
    wati_only = dataclasses.replace(settings, tenants_file=str(tmp_path / "tenants.json"),
                                    manychat_api_token="", channels="")
    assert wati_only.enabled_channels == ("wati",)
    tenants = tenants_for(wati_only)
    async with serve(wati_only, port=0, tenants=tenants, environ=ENVIRON) as url:
        await wait_until_ready(url)
        status, body = await post(f"{url}/webhooks/shop-b/manychat", load("manychat", "flat"),
                                  ENVIRON["SHOP_B_HOOK"])
    assert status == 200 and body["status"] == "accepted", body
    values = [codec.decode("InboundMessage", r.value)
              for r in await reader.read(Topics.from_settings(settings).inbound)]
    assert any(v["event_id"] == body["event_id"] and v["customer_key"].startswith("shop-b/default/manychat:")
               for v in values)


def test_ingest_refuses_channels_that_leave_out_a_tenants_channel(settings: Settings, tmp_path: Path) -> None:
    narrowed = dataclasses.replace(settings, tenants_file=str(tmp_path / "tenants.json"), channels="wati")
    with pytest.raises(ConfigError, match="tenant 'default': manychat: has accounts, but CHANNELS=wati"):
        make_app(narrowed, ProducerSupervisor(narrowed), tenants=tenants_for(narrowed), environ=ENVIRON)
