"""Per-tenant clients (docs/tenants.md "Clients per tenant"): which account and which OpenAI account
a customer key is served from, one client per account, and the senders and media downloads that
use them — against the WATI and OpenAI stand-ins, two WATI accounts with different tenant ids and
tokens."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from services import providers
from services.common.config import ConfigError, Settings
from services.common.openai_accounts import OpenAIAccount, OpenAIClients, openai_account
from services.common.tenants import Tenants, load_tenants, parse_tenants
from services.providers.accounts import (
    AccountClients,
    NoAccount,
    account_of,
    account_token_problems,
    request_account_problem,
)
from services.responder.ai import NoTenant, Replier, TenantRepliers, make_client
from services.responder.channels import ChannelSender, SendFailed
from services.responder.main import DEFAULT_INSTRUCTIONS, Responder, instructions_by_tenant
from services.standins import WatiStandIn
from services.vision.images import ImageRejected
from services.vision.main import Vision
from services.vision.worker import MediaFetcher

ENVIRON = {"PLAYA_WATI": "token-of-playa", "SHOP_WATI": "token-of-shop", "SHOP_OPENAI": "sk-shop-0000",
           "MC_TOKEN": "manychat-token"}


def tenants_doc(playa_url: str = "https://live.wati.example/302222",
                shop_url: str = "https://live.wati.example/401111", **shop_extra: Any) -> dict[str, Any]:
    return {"tenants": [
        {"id": "playa", "webhook_secret": "env:PLAYA_HOOK", "wati": [
            {"id": "reception", "api_url": playa_url, "token": "env:PLAYA_WATI"},
            {"id": "restaurant", "api_url": playa_url + "9", "token": "env:PLAYA_WATI"}]},
        {"id": "shop", "webhook_secret": "env:SHOP_HOOK",
         "wati": {"api_url": shop_url, "token": "env:SHOP_WATI"},
         "manychat": {"token": "env:MC_TOKEN"},
         "openai": {"model": "gpt-shop", "api_key": "env:SHOP_OPENAI", "project": "proj_shop"}, **shop_extra},
    ]}


def tenants_of(doc: dict[str, Any], settings: Settings | None = None) -> Tenants:
    return parse_tenants(doc, settings or Settings(openai_model="gpt-deploy"), "tenants.json")


# -- which account a key is served from (pure) -------------------------------------------------------

def test_a_key_is_served_from_the_account_it_names() -> None:
    tenants = tenants_of(tenants_doc())
    reception = account_of(tenants, "playa/reception/wati:5037")
    assert (reception.tenant.id, reception.account and reception.account.id) == ("playa", "reception")
    assert reception.account is not None and reception.account.api_url.endswith("/302222")
    shop = account_of(tenants, "shop/default/wati:5037")
    assert shop.account is not None and shop.account.api_url.endswith("/401111")
    page = account_of(tenants, "shop/default/manychat:77")
    assert page.account is not None and page.account.token.target == "MC_TOKEN"


@pytest.mark.parametrize(("key", "reason"), [
    ("wati:5037", "tenant 'default' is not configured (tenants.json)"),
    ("gone/default/wati:5037", "tenant 'gone' is not configured (tenants.json)"),
    ("playa/bar/wati:5037", "tenant 'playa' has no wati account 'bar' (tenants.json)"),
    ("playa/reception/manychat:77", "tenant 'playa' has no manychat account 'reception' (tenants.json)"),
    ("not a key", "malformed customer key"),
])
def test_a_key_of_no_configured_tenant_or_account_is_refused_with_its_reason(key: str, reason: str) -> None:
    """A tenant or account removed from the file while its customers' records are in flight."""
    tenants = tenants_of(tenants_doc())
    with pytest.raises(NoAccount) as refused:
        account_of(tenants, key)
    assert refused.value.reason == reason
    assert request_account_problem(tenants, key) == reason


def test_the_environment_default_tenant_changes_nothing() -> None:
    """Without a file every default key is served, a channel without settings being "not
    configured" (None) exactly as before; keys of other tenants are refused."""
    bare = load_tenants(Settings(manychat_api_token="m"))
    assert account_of(bare, "wati:5037").account is None  # no WATI_API_URL: not configured
    assert request_account_problem(bare, "wati:5037") is None
    assert request_account_problem(bare, "manychat:77") is None
    assert request_account_problem(bare, "hotel/main/wati:5037") == (
        "tenant 'hotel' is not configured (environment)")


# -- one client per account ----------------------------------------------------------------------------

def test_one_client_per_account_reused_and_bounded_by_the_file() -> None:
    tenants = tenants_of(tenants_doc())
    clients = AccountClients(Settings(wati_api_url="https://w/1", wati_api_token="t"), tenants, "send",
                             environ=ENVIRON)
    wati = providers.by_name("wati")
    first = clients.client(wati, "playa/reception/wati:1")
    assert first is clients.client(wati, "playa/reception/wati:2")  # another customer, same account
    assert first is not clients.client(wati, "playa/restaurant/wati:1")
    assert first is not clients.client(wati, "shop/default/wati:1")
    for n in range(50):
        with pytest.raises(NoAccount):
            clients.client(wati, f"other-{n}/default/wati:1")  # nothing opened for unknown tenants
    assert len(clients) == 3


async def test_an_unresolvable_token_is_not_configured_and_a_file_refuses_it_at_start() -> None:
    tenants = tenants_of(tenants_doc())
    clients = AccountClients(Settings(), tenants, "send", environ={})
    assert clients.client(providers.by_name("wati"), "playa/reception/wati:1") is None
    await clients.aclose()
    problems = account_token_problems(tenants, {}, openai_keys=True)
    assert ("tenants.json: tenant 'playa': wati[reception].token: env:PLAYA_WATI is not set or empty"
            in problems)
    assert "tenants.json: tenant 'shop': openai.api_key: env:SHOP_OPENAI is not set or empty" in problems
    assert not any("webhook_secret" in p for p in problems)  # not the responder's or vision's to check
    assert account_token_problems(tenants, ENVIRON, openai_keys=True) == []
    assert account_token_problems(load_tenants(Settings(wati_api_url="https://w/1")), {}) == []


# -- the OpenAI account, prompt and model of a tenant ----------------------------------------------------

def test_openai_account_is_the_tenants_own_else_the_deployments() -> None:
    settings = Settings(openai_api_key="sk-deploy-0000", openai_model="gpt-deploy")
    tenants = tenants_of(tenants_doc(), settings)
    playa, shop = tenants.get("playa"), tenants.get("shop")
    assert playa is not None and shop is not None
    assert openai_account(playa, settings, ENVIRON) == OpenAIAccount("sk-deploy-0000", None)
    assert openai_account(shop, settings, ENVIRON) == OpenAIAccount("sk-shop-0000", "proj_shop")
    assert "sk-shop" not in repr(openai_account(shop, settings, ENVIRON))
    assert (playa.openai.model, shop.openai.model) == ("gpt-deploy", "gpt-shop")
    made: list[OpenAIAccount] = []

    def factory(account: OpenAIAccount) -> int:
        made.append(account)
        return len(made)

    clients = OpenAIClients(factory)
    for tenant in (playa, shop, playa, shop):
        clients.get(openai_account(tenant, settings, ENVIRON))
    assert len(clients) == 2 and len(made) == 2  # one per account, tenants sharing a key share it


def test_each_tenant_has_its_own_prompt_never_anothers(tmp_path: Path) -> None:
    playa_prompt = tmp_path / "playa.txt"
    playa_prompt.write_text("You answer for Hotel Playa.\n", encoding="utf-8")
    deploy_prompt = tmp_path / "deploy.txt"
    deploy_prompt.write_text("The deployment's own business.", encoding="utf-8")
    settings = Settings(system_prompt_file=str(deploy_prompt))
    doc = tenants_doc()
    doc["tenants"][0]["system_prompt_file"] = str(playa_prompt)
    by_tenant = instructions_by_tenant(settings, tenants_of(doc, settings), None)
    # a tenant without a file gets the built-in instructions, not SYSTEM_PROMPT_FILE's business
    assert by_tenant == {"playa": "You answer for Hotel Playa.", "shop": DEFAULT_INSTRUCTIONS}
    assert instructions_by_tenant(settings, tenants_of(doc, settings), "Test.")["shop"] == "Test."
    env_default = load_tenants(settings)
    assert instructions_by_tenant(settings, env_default, None) == {
        "default": "The deployment's own business."}
    assert instructions_by_tenant(settings, env_default, "Test.") == {"default": "Test."}
    doc["tenants"][1]["system_prompt_file"] = str(tmp_path / "missing.txt")
    with pytest.raises(ConfigError, match=r"tenant 'shop': system_prompt_file .*missing\.txt cannot be read"):
        instructions_by_tenant(settings, tenants_of(doc, settings), None)


async def test_each_customer_gets_its_tenants_replier() -> None:
    client = make_client("sk-x-0000", "http://127.0.0.1:9/v1", 1.0)
    try:
        playa = Replier(client, model="gpt-deploy", instructions="playa", max_attempts=1)
        shop = Replier(client, model="gpt-shop", instructions="shop", max_attempts=1)
        repliers = TenantRepliers({"playa": playa, "shop": shop})
        assert repliers.for_key("playa/reception/wati:1") is playa
        assert repliers.for_key("shop/default/manychat:1") is shop
        with pytest.raises(NoTenant):
            repliers.for_key("wati:1")
        assert TenantRepliers.single(playa).for_key("anyone/x/wati:1") is playa
    finally:
        await client.close()


# -- sends and media through the customer's own account ------------------------------------------------

@pytest.fixture
async def two_watis() -> AsyncIterator[tuple[WatiStandIn, WatiStandIn]]:
    async with WatiStandIn("token-of-playa", tenant="302222") as playa, \
            WatiStandIn("token-of-shop", tenant="401111") as shop:
        yield playa, shop


async def test_each_answer_goes_out_through_its_tenants_account(
    two_watis: tuple[WatiStandIn, WatiStandIn],
) -> None:
    playa, shop = two_watis
    tenants = tenants_of(tenants_doc(playa.url, shop.url))
    settings = Settings(wati_api_url="https://unused.example/1", wati_api_token="deployment-token",
                        channels="wati")
    sender = ChannelSender(accounts=AccountClients(settings, tenants, "send", environ=ENVIRON),
                           base_delay=0.0)
    try:
        await sender.send("wati", "50370001111", "hola playa", "b1",
                          customer_key="playa/reception/wati:50370001111")
        await sender.send("wati", "50370001111", "hola shop", "b2",
                          customer_key="shop/default/wati:50370001111")
        with pytest.raises(SendFailed) as refused:
            await sender.send("wati", "50370001111", "x", "b3", customer_key="gone/default/wati:50370001111")
    finally:
        await sender.aclose()
    assert refused.value.reason == "no_account"
    assert [s.text for s in playa.sent] == ["hola playa"] and [s.text for s in shop.sent] == ["hola shop"]
    assert {r.headers["Authorization"] for r in playa.requests} == {"Bearer token-of-playa"}
    assert {r.path.split("/")[1] for r in shop.requests} == {"401111"}


async def test_media_is_downloaded_through_its_tenants_account(
    two_watis: tuple[WatiStandIn, WatiStandIn],
) -> None:
    playa, shop = two_watis
    playa.add_media("data/images/a.jpg", b"playa-bytes", "image/jpeg")
    shop.add_media("data/images/a.jpg", b"shop-bytes", "image/jpeg")
    tenants = tenants_of(tenants_doc(playa.url, shop.url))
    settings = Settings(image_max_bytes=1000, channels="wati", wati_api_url="https://unused.example/1",
                        wati_api_token="t")
    accounts = AccountClients(settings, tenants, "media", environ=ENVIRON)
    async with httpx.AsyncClient() as http:
        fetcher = MediaFetcher(settings, accounts=accounts, http=http, allow_private_urls=False)
        try:
            playa_bytes = await fetcher.fetch("wati", "data/images/a.jpg", "playa/reception/wati:1")
            assert playa_bytes == b"playa-bytes"
            assert await fetcher.fetch("wati", "data/images/a.jpg", "shop/default/wati:1") == b"shop-bytes"
            with pytest.raises(ImageRejected, match="tenant 'gone' is not configured"):
                await fetcher.fetch("wati", "data/images/a.jpg", "gone/default/wati:1")
        finally:
            await accounts.aclose()
    assert len(playa.requests) == 1 and len(shop.requests) == 1


def test_a_bearer_pasted_in_front_of_a_tenants_wati_token_is_dropped() -> None:
    """As WATI_API_TOKEN's: the dashboard shows the token as `Bearer eyJ…`."""
    tenants = tenants_of(tenants_doc())
    settings = Settings(channels="wati", wati_api_url="https://w/1", wati_api_token="deploy")
    clients = AccountClients(settings, tenants, "send", environ={**ENVIRON, "PLAYA_WATI": "Bearer abc"})
    client = clients.client(providers.by_name("wati"), "playa/reception/wati:1")
    assert client is not None
    assert client._http.headers["Authorization"] == "Bearer abc"  # type: ignore[attr-defined]


# -- the responder and vision refuse to start on a tenant problem -------------------------------------

def test_the_responder_and_vision_refuse_to_start_when_a_tenant_cannot_be_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("SHOP_WATI", "MC_TOKEN"):
        monkeypatch.setenv(name, ENVIRON[name])
    monkeypatch.delenv("SHOP_OPENAI", raising=False)
    doc = tenants_doc()
    for account in doc["tenants"][0]["wati"]:
        account["token"] = f"file:{tmp_path / 'missing-token'}"
    (tmp_path / "tenants.json").write_text(json.dumps(doc), encoding="utf-8")
    settings = Settings(tenants_file=str(tmp_path / "tenants.json"), openai_api_key="sk-deploy-0000")
    for service in (Responder, Vision):
        with pytest.raises(ConfigError) as refused:
            service(settings)
        message = str(refused.value)
        assert "tenant 'playa': wati[reception].token: file:" in message and "cannot be read" in message
        assert "tenant 'shop': openai.api_key: env:SHOP_OPENAI is not set or empty" in message
    (tmp_path / "missing-token").write_text("a-token\n", encoding="utf-8")
    doc["tenants"][1]["openai"].pop("api_key")
    doc["tenants"][1]["system_prompt_file"] = str(tmp_path / "no-prompt.txt")
    (tmp_path / "tenants.json").write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"'shop': system_prompt_file .*no-prompt\.txt cannot be read"):
        Responder(settings)
    Vision(settings)  # vision has no use for prompts
