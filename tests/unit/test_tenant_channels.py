"""Each tenant's channels come from its tenants-file entry (issue 17, point 1; docs/tenants.md).

With TENANTS_FILE, a tenant is served on the channels it lists accounts of: the deployment needs no
CHANNELS and no WATI_* / MANYCHAT_* settings of its own, a CHANNELS that leaves out a channel a tenant
lists is refused (naming tenant and channel) rather than silently not serving it. Without a file,
nothing changes: the settings decide, as before.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from services import providers
from services.common.config import ConfigError, Settings
from services.common.tenants import (
    Tenants,
    channel_problems,
    load_tenants,
    parse_tenants,
    require_served_channels,
    served_channels,
    tenant_problems,
)
from services.context.main import check_settings as context_check_settings
from services.devtools.check import settings_checks
from services.providers.accounts import AccountClients
from services.responder.channels import ChannelSender
from services.responder.main import check_settings as responder_check_settings
from services.standins import ManyChatStandIn, WatiStandIn

ENVIRON = {"PLAYA_WATI": "token-of-playa", "SHOP_MC": "token-of-shop-page", "HOOK_A": "a" * 16,
           "HOOK_B": "b" * 16}
REQUIRED: dict[str, Any] = {"openai_api_key": "sk-test", "kafka_bootstrap_servers": "localhost:9092",
                            "web_token": "w", "webhook_token": ""}


def doc(wati_url: str = "https://live.wati.example/302222",
        manychat_url: str = "https://api.manychat.example") -> dict[str, Any]:
    """`playa` on WhatsApp only, `shop` on Facebook/Instagram only."""
    return {"tenants": [
        {"id": "playa", "webhook_secret": "env:HOOK_A",
         "wati": {"api_url": wati_url, "token": "env:PLAYA_WATI"}},
        {"id": "shop", "webhook_secret": "env:HOOK_B",
         "manychat": {"api_url": manychat_url, "token": "env:SHOP_MC"}},
    ]}


def with_file(tmp_path: Path, document: dict[str, Any] | None = None, **settings: Any) -> Settings:
    path = tmp_path / "tenants.json"
    path.write_text(json.dumps(document or doc()), encoding="utf-8")
    return Settings(tenants_file=str(path), **{**REQUIRED, **settings})


def tenants_of(settings: Settings, document: dict[str, Any] | None = None) -> Tenants:
    return parse_tenants(document or doc(), settings, "tenants.json")


# -- which channels are served (pure) ----------------------------------------------------------------

def test_with_a_file_the_tenants_entries_decide_the_channels(tmp_path: Path) -> None:
    """No CHANNELS, no deployment WATI or ManyChat settings: both channels are served, each for the
    tenant that lists it."""
    settings = with_file(tmp_path)
    tenants = load_tenants(settings)
    assert served_channels(settings, tenants) == ("wati", "manychat")
    assert channel_problems(settings, tenants) == []
    assert require_served_channels(settings, tenants) == ("wati", "manychat")
    only_wati = {"tenants": doc()["tenants"][:1]}
    assert served_channels(settings, tenants_of(settings, only_wati)) == ("wati",)


def test_without_a_file_the_settings_decide_as_before() -> None:
    for settings, served in [
        (Settings(manychat_api_token="mc"), ("manychat",)),
        (Settings(wati_api_url="https://w/1", wati_api_token="t", manychat_api_token="mc"),
         ("wati", "manychat")),
        (Settings(wati_api_url="https://w/1", wati_api_token="t", manychat_api_token="mc",
                  channels="wati"), ("wati",)),
        (Settings(), ()),
    ]:
        tenants = load_tenants(settings)
        assert served_channels(settings, tenants) == settings.enabled_channels == served
    bare = Settings()
    assert channel_problems(bare, load_tenants(bare)) == [
        "no channel enabled: set WATI_API_URL + WATI_API_TOKEN (WhatsApp) and/or MANYCHAT_API_TOKEN "
        "(Facebook/Instagram), or name them in CHANNELS"]
    half = Settings(channels="wati")
    assert channel_problems(half, load_tenants(half)) == [
        "missing required setting(s): WATI_API_URL, WATI_API_TOKEN"]


def test_channels_that_leave_out_a_tenants_channel_are_refused_naming_it(tmp_path: Path) -> None:
    settings = with_file(tmp_path, channels="wati", wati_api_url="https://w/1", wati_api_token="t")
    tenants = load_tenants(settings)
    problem = ("tenants.json: tenant 'shop': manychat: has accounts, but CHANNELS=wati leaves manychat out "
               "(with a tenants file the tenants' entries decide: unset CHANNELS, or remove the accounts)")
    assert channel_problems(settings, tenants) == [problem.replace("tenants.json", tenants.source)]
    with pytest.raises(ConfigError, match="tenant 'shop': manychat: has accounts"):
        require_served_channels(settings, tenants)
    assert any("CHANNELS=wati leaves manychat out" in p for p in tenant_problems(settings, ENVIRON))
    # naming both (or more) is consistent: nothing to say
    both = with_file(tmp_path, channels="wati,manychat")
    assert channel_problems(both, load_tenants(both)) == []


# -- clients: a tenant's account is served without deployment channel settings ------------------------

@pytest.fixture
async def accounts() -> AsyncIterator[tuple[WatiStandIn, ManyChatStandIn]]:
    async with WatiStandIn(ENVIRON["PLAYA_WATI"], tenant="302222") as wati, \
            ManyChatStandIn(ENVIRON["SHOP_MC"]) as manychat:
        yield wati, manychat


async def test_each_tenant_is_answered_on_its_channels_with_no_deployment_channel_settings(
    tmp_path: Path, accounts: tuple[WatiStandIn, ManyChatStandIn]
) -> None:
    wati, manychat = accounts
    settings = with_file(tmp_path, doc(wati.url, manychat.url))
    assert settings.enabled_channels == ()  # the settings alone enable nothing
    tenants = load_tenants(settings)
    sender = ChannelSender(accounts=AccountClients(settings, tenants, "send", environ=ENVIRON),
                           base_delay=0.0)
    try:
        await sender.send("wati", "50370001111", "hola playa", "b1",
                          customer_key="playa/default/wati:50370001111")
        await sender.send("facebook", "77", "hello shop", "b2", customer_key="shop/default/manychat:77")
    finally:
        await sender.aclose()
    assert [s.text for s in wati.sent] == ["hola playa"]
    assert [s.texts for s in manychat.sent] == [["hello shop"]]
    media = AccountClients(settings, tenants, "media", environ=ENVIRON)
    assert media.client(providers.by_name("wati"), "playa/default/wati:1") is not None
    await media.aclose()


def test_without_a_file_a_channel_the_settings_disable_stays_unserved() -> None:
    """The zero-change default: CHANNELS=manychat keeps the default tenant's WATI account unused."""
    settings = Settings(channels="manychat", wati_api_url="https://w/1", wati_api_token="t",
                        manychat_api_token="mc")
    clients = AccountClients(settings, load_tenants(settings), "send")  # tokens: the settings
    assert clients.client(providers.by_name("wati"), "wati:5037") is None
    assert clients.client(providers.by_name("manychat"), "manychat:77") is not None


# -- the services' start and `watistream check` ---------------------------------------------------------

def test_the_services_start_with_channels_only_in_the_file(tmp_path: Path) -> None:
    settings = with_file(tmp_path, {"tenants": doc()["tenants"][:1]})  # WhatsApp only
    assert responder_check_settings(settings) == [
        "ManyChat is not configured: Facebook/Instagram batches will be dead-lettered",
        "SYSTEM_PROMPT_FILE is not set: using the built-in instructions"]
    context_check_settings(settings)
    checks = {c.name: c for c in settings_checks(settings)}
    assert checks["channels"].ok and checks["channels"].detail == "wati (from TENANTS_FILE)"


def test_the_services_refuse_channels_that_leave_out_a_tenants_channel(tmp_path: Path) -> None:
    settings = with_file(tmp_path, channels="manychat", manychat_api_token="mc")
    for check in (responder_check_settings, context_check_settings):
        with pytest.raises(ConfigError, match="tenant 'playa': wati: has accounts, but CHANNELS=manychat"):
            check(settings)
    channels = next(c for c in settings_checks(settings) if c.name == "channels")
    assert not channels.ok and channels.fix == "see the 'tenants' check"


def test_without_a_file_the_services_still_need_a_channel() -> None:
    settings = Settings(**REQUIRED)
    with pytest.raises(ConfigError, match="no channel enabled"):
        responder_check_settings(settings)
    with pytest.raises(ConfigError, match="no channel enabled"):
        context_check_settings(settings)
