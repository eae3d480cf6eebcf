"""Per-tenant clients end to end on the real broker (docs/tenants.md "Clients per tenant").

The context service (`watistream context`, a subprocess), vision and the responder (in this process)
run with one TENANTS_FILE. Two tenants, `playa` and `shop`, each with its own WATI account — its own
WATI tenant id (on the same WATI host) and token, read from `file:` references — its own prompt file
and model; `shop` has its own OpenAI key and project. The deployment's own WATI account
(WATI_API_URL) and OpenAI key exist too, and must never be used for these tenants' customers.

- Isolation: the same phone number writing to both tenants is answered twice, each reply going out
  through its own tenant's WATI account, each history read and image downloaded from it, each
  OpenAI call made with its tenant's prompt, model, key and project (the OpenAI stand-in keeps
  conversations and files per project, as OpenAI does, so a call from the wrong account would fail).
- A key of a tenant that is not in the file is refused (`no_account`), never answered.
- Fair share: a hung WATI account of one tenant, with more customers waiting than its fetch slots,
  beside another tenant's customer on the same partition of the same worker: the other's batch is
  emitted (its history read) while every fetch of the hung account still hangs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest

from services.common.config import Settings
from services.context.app import customer_partition
from services.responder.ai import customer_hash
from services.responder.main import Responder
from services.standins import StandIns, WatiStandIn
from services.vision.main import Vision
from tests.integration.test_context_service import Bus, ContextWorker, clock, free_port, inbound, texts
from tests.unit.test_vision_images import JPEG, png_bytes

pytestmark = pytest.mark.broker

PLAYA_PROMPT = "Eres el asistente del Hotel Playa. Responde en español."
SHOP_PROMPT = "You are the assistant of Shop B. Answer in English."
PLAYA_TOKEN = "token-of-playa-wati-0001"
SHOP_TOKEN = "token-of-shop-wati-0002"
SHOP_OPENAI_KEY = "sk-shop-own-key-000000"
SHOP_PROJECT = "proj_shop"
DEPLOY_MODEL = "gpt-deployment"
SHOP_MODEL = "gpt-shop"
FETCH_SLOTS = 2  # HISTORY_FETCHES_PER_ACCOUNT of the worker


@dataclass
class Accounts:
    """The deployment's stand-ins (its WATI account, OpenAI) and the two tenants' WATI accounts."""

    deployment: StandIns
    playa: WatiStandIn
    shop: WatiStandIn


@pytest.fixture(scope="module")
async def accounts() -> AsyncIterator[Accounts]:
    async with StandIns.running() as deployment:
        # three WATI accounts on one WATI host, as on WATI's shared servers: the deployment's own and
        # one per tenant, each its own tenant id in the URL, its own token and its own contacts
        playa = deployment.wati.add_tenant("302222", PLAYA_TOKEN)
        shop = deployment.wati.add_tenant("401111", SHOP_TOKEN)
        deployment.openai.add_key(SHOP_OPENAI_KEY)
        yield Accounts(deployment, playa, shop)


@pytest.fixture(scope="module")
def worker_settings(settings: Settings, accounts: Accounts, tmp_path_factory: pytest.TempPathFactory
                    ) -> Settings:
    folder = tmp_path_factory.mktemp("tenant-clients")

    def secret(name: str, value: str) -> str:
        path = folder / name
        path.write_text(value + "\n", encoding="utf-8")
        return f"file:{path}"

    (folder / "playa.txt").write_text(PLAYA_PROMPT, encoding="utf-8")
    (folder / "shop.txt").write_text(SHOP_PROMPT, encoding="utf-8")
    doc = {"tenants": [
        {"id": "playa", "webhook_secret": secret("playa-hook", "playa-webhook-secret"),
         "wati": {"id": "reception", "api_url": accounts.playa.url,
                  "token": secret("playa-wati", PLAYA_TOKEN)},
         "system_prompt_file": str(folder / "playa.txt")},
        {"id": "shop", "webhook_secret": secret("shop-hook", "shop-webhook-secret"),
         "wati": {"api_url": accounts.shop.url, "token": secret("shop-wati", SHOP_TOKEN)},
         "system_prompt_file": str(folder / "shop.txt"),
         "openai": {"model": SHOP_MODEL, "api_key": secret("shop-openai", SHOP_OPENAI_KEY),
                    "project": SHOP_PROJECT}},
    ]}
    (folder / "tenants.json").write_text(json.dumps(doc), encoding="utf-8")
    s = accounts.deployment
    return dataclasses.replace(
        settings, tenants_file=str(folder / "tenants.json"),
        wati_api_url=s.wati_url, wati_api_token=s.wati.token,  # the deployment's own account
        manychat_api_url=s.manychat_url, manychat_api_token=s.manychat.token,
        openai_base_url=s.openai_url, openai_api_key=s.openai.api_key, openai_model=DEPLOY_MODEL,
        openai_max_attempts=2, openai_timeout_seconds=20.0,
        quiet_window_seconds=1.0, max_batch_wait_seconds=10.0, flush_scan_interval_seconds=0.2,
        history_timeout_seconds=60.0, history_fetches_per_account=FETCH_SLOTS,
        context_web_port=free_port(), context_store="memory", data_dir=str(folder / "data"),
        log_level="INFO",
    )


@pytest.fixture(scope="module")
def bus_records_replies() -> bool:
    """The responder runs in this process: the tests read the replies it wrote."""
    return True


@pytest.fixture(scope="module")
async def services(worker_settings: Settings, worker: ContextWorker
                   ) -> AsyncIterator[tuple[Vision, Responder]]:
    vision = Vision(worker_settings, allow_private_urls=True)
    responder = Responder(worker_settings, web_port=0, serve_http=False)
    await vision.start()
    await responder.start()
    try:
        await responder.wait_ready(60)
        yield vision, responder
    finally:
        await responder.stop()
        await vision.stop()


def phone_numbers(partitions: int, count: int, *templates: str) -> Iterator[str]:
    """Phone numbers whose keys under every template (`{}` = the number) all share ONE partition."""
    found, target = 0, None
    while found < count:
        wa_id = f"5037{uuid.uuid4().int % 10**8:08d}"
        at = {customer_partition(t.format(wa_id), partitions) for t in templates}
        if len(at) == 1 and target in (None, *at):
            target = next(iter(at))
            found += 1
            yield wa_id


def openai_calls(accounts: Accounts, customer_key: str, path: str) -> list[Any]:
    """The recorded OpenAI requests to `path` made for this customer (by its pseudonym)."""
    hashed = customer_hash(customer_key)
    return [r for r in accounts.deployment.openai.requests if r.path == path and isinstance(r.body, dict)
            and hashed in json.dumps(r.body)]


async def test_two_tenants_sharing_a_phone_number_are_served_each_from_its_own_accounts(
    bus: Bus, services: tuple[Vision, Responder], accounts: Accounts, worker_settings: Settings
) -> None:
    (wa_id,) = phone_numbers(worker_settings.topic_partitions, 1, "{}")
    keys = {"playa": f"playa/reception/wati:{wa_id}", "shop": f"shop/default/wati:{wa_id}"}
    watis = {"playa": accounts.playa, "shop": accounts.shop}
    images = {"playa": JPEG, "shop": png_bytes(2, 2)}
    for tenant, wati in watis.items():
        wati.add_message(wa_id, text=f"{tenant}'s agent: your order is ready", owner=True,
                         operator_name="Ana", at=clock() - timedelta(hours=1))
        wati.add_media(f"data/images/{wa_id}.jpg", images[tenant], "image/jpeg")
    accounts.deployment.wati.add_message(wa_id, text="the deployment's own customer", owner=False,
                                         at=clock() - timedelta(hours=1))
    for tenant, key in keys.items():
        await bus.inbound(inbound(key, f"hello {tenant}", clock()))
        await bus.inbound(inbound(key, "", clock(), message_type="image",
                                  media_ref=f"data/images/{wa_id}.jpg"))

    replies = {t: (await bus.wait_for(bus.topics.replies, key, timeout=60))[0] for t, key in keys.items()}
    for tenant, key in keys.items():
        reply, wati = replies[tenant], watis[tenant]
        assert reply["outcome"] == "answered", reply
        # the reply went out through the tenant's own WATI account, and only there
        assert [(s.contact_id, s.text) for s in wati.sent] == [(wa_id, reply["text"])]
        mine = [r for r in wati.requests if wa_id in r.path or "getMedia" in r.path]
        assert {r.path.split("/api/v1/")[1].split("/")[0] for r in mine} == {
            "getMessages", "getMedia", "sendSessionMessage"}
        assert {r.headers["Authorization"] for r in wati.requests} == {f"Bearer {wati.token}"}
        assert {r.path.split("/")[1] for r in wati.requests} == {wati.tenant}
        # the history read is the tenant's own; the image is the tenant's own, in its project
        (request,) = [r for r in bus.of(bus.topics.responder_requests, key) if r.get("images")]
        assert texts(request)[0] == f"hello {tenant}"
        assert [m["text"] for m in request["missed_messages"]] == [f"{tenant}'s agent: your order is ready"]
        # classified in the same project as uploaded (the file is not found from another project)
        assert request["images"][0]["category"] not in ("unreadable", "unclassified"), request["images"]
        stored = accounts.deployment.openai.files[request["images"][0]["file_id"]]
        assert stored.data == images[tenant]
        assert stored.project == (SHOP_PROJECT if tenant == "shop" else
                                  f"key:{worker_settings.openai_api_key}")
    assert not any(wa_id in r.path for r in accounts.deployment.wati.requests)  # never the deployment's
    assert accounts.deployment.wati.sent == []

    oa = accounts.deployment.openai
    expected = {"playa": (PLAYA_PROMPT, DEPLOY_MODEL, worker_settings.openai_api_key, None),
                "shop": (SHOP_PROMPT, SHOP_MODEL, SHOP_OPENAI_KEY, SHOP_PROJECT)}
    for tenant, key in keys.items():
        prompt, model, api_key, project = expected[tenant]
        (answer,) = [r for r in oa.responses.values()
                     if r.request.get("safety_identifier") == customer_hash(key)]
        assert (answer.request["instructions"], answer.request["model"]) == (prompt, model)
        assert oa._info[answer.conversation_id or ""].project == (project or f"key:{api_key}")
        other = "shop" if tenant == "playa" else "playa"
        assert f"{other}'s agent" not in json.dumps(answer.effective_input)
        calls = [*openai_calls(accounts, key, "/v1/responses"),
                 *openai_calls(accounts, key, "/v1/conversations")]
        assert len(calls) == 2
        assert {(r.headers["Authorization"], r.headers.get("OpenAI-Project")) for r in calls} == {
            (f"Bearer {api_key}", project)}
    vision_calls = [r for r in oa.requests if r.path == "/v1/files"]
    uploaders = sorted((r.headers["Authorization"], r.headers.get("OpenAI-Project") or "")
                       for r in vision_calls)
    assert uploaders == [(f"Bearer {SHOP_OPENAI_KEY}", SHOP_PROJECT),
                         (f"Bearer {worker_settings.openai_api_key}", "")]


async def test_a_customer_of_a_tenant_not_in_the_file_is_refused_not_answered(
    bus: Bus, services: tuple[Vision, Responder], accounts: Accounts, worker_settings: Settings
) -> None:
    """A tenant removed from TENANTS_FILE while its customers' events are in flight: no account of
    any tenant reads its history or sends it anything; the responder dead-letters it, saying why."""
    (wa_id,) = phone_numbers(worker_settings.topic_partitions, 1, "{}")
    key = f"gone/default/wati:{wa_id}"
    await bus.inbound(inbound(key, "anyone there?", clock()))
    (reply,) = await bus.wait_for(bus.topics.replies, key, timeout=60)
    assert reply["outcome"] == "nothing_sent"
    (audit,) = await bus.wait_for(bus.topics.audit, key)
    assert audit["history_error"] == "no_account"
    (dead,) = await bus.wait_for(bus.topics.dead_letter, key, where=lambda d: d["service"] == "responder")
    assert dead["reason"] == "no_account"
    assert dead["error"] == f"tenant 'gone' is not configured (TENANTS_FILE {worker_settings.tenants_file})"
    for wati in (accounts.playa, accounts.shop, accounts.deployment.wati):
        assert not any(wa_id in r.path for r in wati.requests)
    assert openai_calls(accounts, key, "/v1/responses") == []


async def test_a_hung_tenant_account_does_not_stall_another_tenants_customer_on_the_same_partition(
    bus: Bus, services: tuple[Vision, Responder], accounts: Accounts, worker_settings: Settings
) -> None:
    """Fair share (issue 17 point 2): `playa`'s WATI hangs with more customers waiting for a history
    fetch than its slots; `shop`'s customer on the same partition has its history read and its
    batch emitted while every fetch of `playa` still hangs. A per-worker pool of fetches would make
    it wait for `playa`'s (HISTORY_TIMEOUT_SECONDS: 60 s here)."""
    slow_count = 20  # more than any per-worker pool the fetcher had (16)
    numbers = list(phone_numbers(worker_settings.topic_partitions, slow_count + 1,
                                 "playa/reception/wati:{}", "shop/default/wati:{}"))
    partitions = {customer_partition(f"playa/reception/wati:{n}", worker_settings.topic_partitions)
                  for n in numbers}
    assert len(partitions) == 1
    slow_keys = [f"playa/reception/wati:{n}" for n in numbers[:slow_count]]
    fast_key = f"shop/default/wati:{numbers[-1]}"
    accounts.shop.add_message(numbers[-1], text="shop's agent: see you tomorrow", owner=True,
                              operator_name="Ana", at=clock() - timedelta(hours=1))
    accounts.playa.hold_requests()
    try:
        for key in slow_keys:
            await bus.inbound(inbound(key, "is the pool open?", clock()))
        await wait_for_held(accounts.playa, FETCH_SLOTS)
        await bus.inbound(inbound(fast_key, "is my order ready?", clock()))
        (fast,) = await bus.wait_for(bus.topics.responder_requests, fast_key, timeout=30)
        assert [m["text"] for m in fast["missed_messages"]] == ["shop's agent: see you tomorrow"]
        assert accounts.playa.held == FETCH_SLOTS  # still hanging: the fast one did not wait for them
        assert all(bus.of(bus.topics.responder_requests, key) == [] for key in slow_keys)
        asked = [r for r in accounts.playa.requests if r.path.rsplit("/", 1)[-1] in numbers]
        assert len(asked) == FETCH_SLOTS  # the others wait for the account's slots, not for shop's
    finally:
        accounts.playa.release_requests()
    for key in slow_keys:  # released: every slow customer is fetched and batched in its turn
        (request,) = await bus.wait_for(bus.topics.responder_requests, key, timeout=60)
        assert request["missed_check_ran"] is True


async def wait_for_held(server: WatiStandIn, count: int, timeout: float = 30.0) -> None:
    """Until `count` requests hang at the server (an awaited condition, polled)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while server.held < count:
        assert loop.time() < deadline, f"{server.held} request(s) held, waited for {count}"
        await asyncio.sleep(0.02)
