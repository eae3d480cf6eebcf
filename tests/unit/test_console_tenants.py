"""The console per tenant (docs/tenants.md, "Per-tenant visibility"): the store's reads limited to
tenants, the tenant filter, operator accounts limited to tenants (never seeing, pausing, resuming or
replaying another tenant's customer or dead letter, by page, direct URL or POST), accounts in the
extended CONSOLE_USERS format, replays seen only within their dead letter's tenant, and a store
written before tenants emptied and rebuilt with them.

Two tenants share one phone number throughout: `wati:<n>` (tenant `default`) and
`hotel-a/centro/wati:<n>` are two customers.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from services.common.config import ConfigError
from services.common.keys import KeyError_, parse_key
from services.console import pages
from services.console.app import Console, build_app
from services.console.auth import Sessions, hash_password, parse_accounts, parse_users
from services.console.rows import tenant_of
from services.console.store import SCHEMA_VERSION, Store

from .console_builders import dead_letter, decision
from .context_builders import command, inbound, reply, secs, t
from .test_console import TOPICS, apply, audited, commanded, dead, received, replayed

PHONE = "50370000001"
OURS = f"wati:{PHONE}"  # tenant `default`
THEIRS = f"hotel-a/centro/wati:{PHONE}"  # tenant `hotel-a`, same phone number
SHOP = "shop-b/default/manychat:42"  # a third tenant


def day(store: Store) -> None:
    """Each customer writes, is held and dead-lettered; OURS is answered and paused too."""
    records = []
    for n, key in enumerate((OURS, THEIRS, SHOP)):
        at = t("10:00:00") + secs(n)
        records += [received(inbound(f"e{n}", at, f"texto {n}", key=key)),
                    audited(decision(f"{key}:1", at + secs(10), key=key, held=True, reason="human_active")),
                    dead(dead_letter(at + secs(20), source_topic=TOPICS.inbound, key=key))]
    apply(store, *records,  # one call: a dead letter's id is its offset
          (TOPICS.replies, "AssistantReply", {**reply(f"{OURS}:0", t("09:00:00")), "customer_key": OURS}),
          commanded({**command("pause", t("10:05:00"), actor="ana"), "customer_key": OURS}),
          commanded({**command("pause", t("10:06:00"), actor="bo"), "customer_key": THEIRS}),
          dead(dead_letter(t("10:07:00"), source_topic=TOPICS.inbound, key=None)))  # of no tenant


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "console.sqlite3")
    day(s)
    return s


def keys(page: Any) -> list[str]:
    return sorted(r.get("key") or r.get("customer_key") or "-" for r in page.rows)


# ---------------------------------------------------------------- the store's reads


@pytest.mark.parametrize("key", [
    OURS, THEIRS, SHOP, "default/default/wati:1", "x/wati:1", "wati:", "wati: 1", "wati:1 ", "wati", ":1",
    "Hotel/a/wati:1", "a/b/c/wati:1", "foo:1", "hotel-a/centro/wati:1:2", "hotel-a/centro/wati:",
])
def test_a_rows_tenant_is_its_keys_as_parse_key_reads_it(key: str) -> None:
    """`tenant_of` parses each key head once (it runs for every record of a rebuild): it must
    still answer exactly as parsing the whole key, None for what is not a customer key."""
    try:
        expected: str | None = parse_key(key).tenant
    except KeyError_:
        expected = None
    assert tenant_of(key) == expected == tenant_of(key.encode())




def test_every_read_can_be_limited_to_tenants(store: Store) -> None:
    hotel = {"hotel-a"}
    assert keys(store.customers(tenants=hotel)) == [THEIRS]
    assert keys(store.customers(tenants={"default", "hotel-a"})) == sorted([OURS, THEIRS])
    assert keys(store.customers()) == sorted([OURS, THEIRS, SHOP])
    assert keys(store.waiting(tenants=hotel)) == [THEIRS]
    assert keys(store.dead_letters(tenants=hotel)) == [THEIRS]
    assert keys(store.dead_letters()) == sorted([OURS, THEIRS, SHOP, "-"])  # the key-less one: all only
    assert store.waiting_now(hotel) == {"held": 1, "paused": 1}
    assert store.waiting_now() == {"held": 3, "paused": 2}
    assert [a["customer_key"] for a in store.recent_actions(tenants=hotel)] == [THEIRS]
    assert store.tenants() == ["default", "hotel-a", "shop-b"]
    assert store.customers(tenants=set()).total == 0, "no tenant: nothing"


def test_the_overview_figures_per_tenant_add_up_to_the_overall_ones(store: Store) -> None:
    overall = store.totals(0)
    per_tenant = [store.totals(0, {tenant}) for tenant in ("default", "hotel-a", "shop-b")]
    hotel = per_tenant[1]
    assert (hotel["batches"], hotel["held"], hotel["messages"], hotel["pauses"], hotel["dead_letters"],
            hotel["replies"], hotel["customers_active"]) == (1, 1, 1, 1, 1, 0, 1)
    assert per_tenant[0]["replies"] == 1 and per_tenant[0]["customers_served"] == 1
    for figure in ("batches", "held", "messages", "pauses", "replies", "customers_active"):
        assert overall[figure] == sum(p[figure] for p in per_tenant), figure
    assert overall["dead_letters"] == sum(p["dead_letters"] for p in per_tenant) + 1  # + the key-less one
    assert [r["batches"] for r in store.hourly(0, {"hotel-a"})] == [1]
    assert sum(r["batches"] for r in store.hourly(0)) == 3


def test_a_phone_search_finds_every_tenants_customer_within_the_limit(store: Store) -> None:
    assert keys(store.customers(PHONE)) == sorted([OURS, THEIRS])
    assert keys(store.customers(PHONE, tenants={"hotel-a"})) == [THEIRS]
    assert keys(store.customers("hotel-a/centro/wati:5037")) == [THEIRS]


def test_a_store_written_before_tenants_is_emptied_and_rebuilt_with_them(tmp_path: Path) -> None:
    """A store of the layout before tenants (no tenant columns, no per-tenant hours) is emptied when
    opened: read again from the topics (here: the same records), every row has its tenant and
    `tenant_hourly` equals what live writes build; the replay comes back from its topic."""
    path = tmp_path / "old.sqlite3"
    live = Store(path)
    day(live)
    letter = store_letter(live, THEIRS)
    apply(live, replayed(letter, t("10:30:00"), "bo"))
    built_live = sorted(tuple(r) for r in live.reader.execute("SELECT * FROM tenant_hourly"))
    live.close()
    old = sqlite3.connect(path)  # the previous layout (SCHEMA_VERSION 2): no tenants anywhere
    for index in ("customers_tenant", "dead_letters_tenant", "actions_tenant", "customers_provider_id"):
        old.execute(f"DROP INDEX {index}")
    for table in ("customers", "dead_letters", "actions"):
        old.execute(f"ALTER TABLE {table} DROP COLUMN tenant")
    old.execute("DROP TABLE tenant_hourly")
    old.execute("PRAGMA user_version = 2")  # the layout before tenants
    assert SCHEMA_VERSION > 2
    old.commit()
    old.close()

    rebuilt = Store(path)
    assert rebuilt.is_empty() and rebuilt.customers().total == 0 and rebuilt.dead_letters().total == 0
    day(rebuilt)  # the consumer reads the topics from their beginning
    apply(rebuilt, replayed(letter, t("10:30:00"), "bo"))
    assert rebuilt.customer(THEIRS)["tenant"] == "hotel-a"  # type: ignore[index]
    assert rebuilt.customer(OURS)["tenant"] == "default"  # type: ignore[index]
    assert keys(rebuilt.dead_letters(tenants={"hotel-a"})) == [THEIRS]
    assert rebuilt.dead_letter(letter)["replayed_by"] == "bo"  # type: ignore[index]
    assert sorted(tuple(r) for r in rebuilt.reader.execute("SELECT * FROM tenant_hourly")) == built_live
    assert [a["customer_key"] for a in rebuilt.recent_actions(tenants={"default"})] == [OURS]
    rebuilt.close()
    assert Store(path).totals(0, {"hotel-a"})["batches"] == 1, "opened again: kept, not emptied again"


def test_a_replay_is_seen_only_within_its_dead_letters_tenant(store: Store) -> None:
    """The replays (from the dead-letter-replays topic, which names no customer) are read only
    through their dead letter, and a replay's action carries its dead letter's tenant, also when the
    replay is read before the dead letter."""
    letter = store_letter(store, THEIRS)
    apply(store, replayed(letter, t("10:30:00"), "bo"))
    apply(store, replayed("0:0", t("10:31:00"), "cy"))  # of a dead letter not read yet (its id: offset 0)
    assert [r["replayed_by"] for r in store.dead_letters(tenants={"default"}).rows] == [None]
    assert [r["replayed_by"] for r in store.dead_letters(tenants={"hotel-a"}).rows] == ["bo"]
    assert [a["operator"] for a in store.recent_actions(tenants={"default", "shop-b"})] == ["ana"]
    assert [a["operator"] for a in store.recent_actions(tenants={"hotel-a"})] == ["bo", "bo"]  # replay, pause
    replays = {a["target"]: a["tenant"] for a in store.recent_actions(100) if a["target"]}
    assert replays == {letter: "hotel-a", "0:0": None}, "not attributable yet: all-tenant operators only"

    apply(store, dead(dead_letter(t("10:20:00"), source_topic=TOPICS.inbound, key=SHOP)))
    assert store.dead_letter("0:0")["customer_key"] == SHOP  # type: ignore[index]
    assert [r["replayed_by"] for r in store.dead_letters(tenants={"shop-b"}).rows] == ["cy", None]
    assert [a["operator"] for a in store.recent_actions(tenants={"shop-b"})] == ["cy"]
    [action] = store.events_between("actions", SHOP, 0, 2**62)
    assert action["operator"] == "cy" and action["tenant"] == "shop-b"


def store_letter(store: Store, key: str) -> str:
    (letter,) = [r["id"] for r in store.dead_letters().rows if (r["customer_key"] or "-") == key]
    return str(letter)


# ---------------------------------------------------------------- accounts


def test_an_account_may_be_limited_to_tenants_and_old_entries_still_parse() -> None:
    h = hash_password("pw")
    accounts = parse_accounts(f"ana:{h}, bo:{h}:hotel-a", f"# file\ncy:{h}:hotel-a+shop-b\n")
    assert set(accounts.hashes) == {"ana", "bo", "cy"}
    assert accounts.tenants == {"bo": frozenset({"hotel-a"}), "cy": frozenset({"hotel-a", "shop-b"})}
    assert parse_users(f"ana:{h}") == {"ana": h}, "the name:hash format is unchanged"
    assert parse_accounts(f"bo:{h}:hotel-a", f"bo:{h}").tenants == {}, "a later entry replaces it whole"


@pytest.mark.parametrize("tenants", ["", "Hotel A", "hotel-a,shop-b", "hotel-a++shop-b", "hotel-a:x"])
def test_a_malformed_tenant_list_is_a_configuration_error(tenants: str) -> None:
    with pytest.raises(ConfigError, match=r"console users: bo's tenants must be tenant ids joined by \+"):
        parse_accounts("", f"bo:{hash_password('pw')}:{tenants}")


# ---------------------------------------------------------------- HTTP


@pytest.fixture
async def client(store: Store) -> AsyncIterator[TestClient[Any, Any]]:
    hashed = hash_password("pw")
    console = Console(store=store, sessions=Sessions("s", 3600), users={"ana": hashed, "bo": hashed},
                      topics=TOPICS, producer=None, ready=lambda: (True, "ok"),
                      scopes={"bo": frozenset({"hotel-a"})}, tenant_ids=("default", "hotel-a", "shop-b"))
    async with TestClient(TestServer(build_app(console))) as c:
        yield c


async def login(client: TestClient[Any, Any], user: str) -> str:
    """Logs in; returns the session's CSRF token."""
    answer = await client.post("/login", data={"user": user, "password": "pw"}, allow_redirects=False)
    assert answer.status == 303
    page = await (await client.get("/")).text()
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found is not None
    return found.group(1)


def customer_keys(html: str) -> set[str]:
    return {k for k in (OURS, THEIRS, SHOP) if f">{k}<" in html}


async def text(client: TestClient[Any, Any], path: str, status: int = 200) -> str:
    answer = await client.get(path)
    assert answer.status == status, path
    return await answer.text()


async def test_a_limited_operator_sees_only_its_tenants_on_every_list(client: TestClient[Any, Any]) -> None:
    await login(client, "bo")
    for path in ("/customers", "/waiting", "/dead-letters", f"/customers?q={PHONE}",
                 "/customers?tenant=hotel-a"):
        assert customer_keys(await text(client, path)) == {THEIRS}, path
    overview = await text(client, "/")
    assert "<b>1</b> held</a> and" in overview and "<b>1</b> paused</a>" in overview
    assert customer_keys(overview) == {THEIRS} and ">ana<" not in overview  # the other's action
    html = await text(client, "/customers")
    assert 'data-testid="tenant"' not in html, "one tenant to choose from: no filter"


async def test_a_limited_operator_cannot_choose_another_tenant(client: TestClient[Any, Any]) -> None:
    await login(client, "bo")
    for path in ("/", "/customers", "/waiting", "/dead-letters"):
        refused = await text(client, f"{path}?tenant=default", 403)
        assert "Not your tenant" in refused and not customer_keys(refused)
    await text(client, "/customers?tenant=Not%20a%20slug", 400)


async def test_another_tenants_customer_and_dead_letter_are_unknown_by_direct_url(
    client: TestClient[Any, Any], store: Store,
) -> None:
    await login(client, "bo")
    for key in (OURS, SHOP):
        page = await text(client, pages.customer_url(key), 404)
        assert "Unknown customer" in page and "texto" not in page
    assert "texto 1" in await text(client, pages.customer_url(THEIRS))
    for letter in (store_letter(store, OURS), store_letter(store, "-")):
        assert "Unknown dead letter" in await text(client, f"/dead-letters/{letter}", 404)
    await text(client, f"/dead-letters/{store_letter(store, THEIRS)}")


async def test_a_limited_operator_cannot_pause_resume_or_replay_another_tenants(
    client: TestClient[Any, Any], store: Store,
) -> None:
    csrf = await login(client, "bo")
    before = store.recent_actions(100)
    for key in (OURS, SHOP):
        for kind in ("pause", "resume"):
            answer = await client.post(f"{pages.customer_url(key)}/{kind}", data={"csrf": csrf},
                                       allow_redirects=False)
            assert answer.status == 403 and "Not your tenant" in await answer.text(), (key, kind)
    for key in (OURS, "-"):
        letter = store_letter(store, key)
        answer = await client.post(f"/dead-letters/{letter}/replay", data={"csrf": csrf, "confirm": "yes"},
                                   allow_redirects=False)
        assert answer.status == 404, key
        assert store.dead_letter(letter)["replayed_at"] is None  # type: ignore[index]
    assert store.recent_actions(100) == before and store.customer(OURS)["paused_by"] == "ana"  # type: ignore[index]
    # its own tenant's customer gets past the check to the broker (none here: 503 "Not sent")
    own = await client.post(f"{pages.customer_url(THEIRS)}/resume", data={"csrf": csrf},
                            allow_redirects=False)
    assert own.status == 503 and "Not sent" in await own.text()


async def test_an_operator_of_every_tenant_filters_by_tenant(client: TestClient[Any, Any]) -> None:
    csrf = await login(client, "ana")
    assert customer_keys(await text(client, "/customers")) == {OURS, THEIRS, SHOP}
    assert customer_keys(await text(client, "/customers?tenant=hotel-a")) == {THEIRS}
    assert customer_keys(await text(client, "/dead-letters?tenant=shop-b")) == {SHOP}
    waiting = await text(client, "/waiting?tenant=default")
    assert customer_keys(waiting) == {OURS}
    assert 'value="/waiting?tenant=default"' in waiting, "a resume comes back to the filtered page"
    html = await text(client, "/customers?tenant=hotel-a")
    assert re.search(r'<option value="hotel-a" selected>hotel-a</option>', html)
    assert all(f'<option value="{t}"' in html for t in ("", "default", "shop-b"))
    assert 'href="/waiting?tenant=hotel-a"' in html, "the navigation keeps the tenant"
    assert '<input type="hidden" name="tenant" value="hotel-a">' in html, "and the search"
    overview = await text(client, "/?tenant=hotel-a")
    assert "<b>1</b> held</a>" in overview
    assert "<b>3</b> held</a>" in await text(client, "/")
    letter_page = await text(client, "/dead-letters?tenant=default")
    assert customer_keys(letter_page) == {OURS}
    answer = await client.post(f"{pages.customer_url(OURS)}/resume", data={"csrf": csrf},
                               allow_redirects=False)
    assert answer.status == 503, "not refused: sent to the broker (none here)"


async def test_a_single_tenant_console_shows_no_tenant_filter(tmp_path: Path) -> None:
    single = Store(tmp_path / "single.sqlite3")
    apply(single, received(inbound("e1", t("10:00:00"), key=OURS)))
    console = Console(store=single, sessions=Sessions("s", 3600), users={"ana": hash_password("pw")},
                      topics=TOPICS, producer=None, ready=lambda: (True, "ok"), tenant_ids=("default",))
    async with TestClient(TestServer(build_app(console))) as c:
        await login(c, "ana")
        for path in ("/", "/customers", "/waiting", "/dead-letters"):
            html = await text(c, path)
            assert 'data-testid="tenant"' not in html and "?tenant=" not in html, path



async def test_a_session_of_a_removed_operator_is_refused(store: Store) -> None:
    """A limit must not fall away with the account: a cookie of an operator no longer configured
    (still validly signed) is no session at all."""
    hashed = hash_password("pw")
    sessions = Sessions("s", 3600)
    console = Console(store=store, sessions=sessions, users={"bo": hashed}, topics=TOPICS, producer=None,
                      ready=lambda: (True, "ok"), scopes={"bo": frozenset({"hotel-a"})})
    async with TestClient(TestServer(build_app(console))) as c:
        await login(c, "bo")
        del console.users["bo"], console.scopes["bo"]  # the account file changed (and the console restarted)
        for path in ("/", "/customers", pages.customer_url(OURS)):
            assert (await c.get(path)).status == 401, path
