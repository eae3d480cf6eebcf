"""The console's pure parts: records -> rows, the store's figures and guards, accounts, sessions,
pages; and its HTTP shell's access rules (401 without a session, 403 without the CSRF token)."""

from __future__ import annotations

import logging
import re
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from services.common import codec
from services.common.config import ConfigError, Settings
from services.common.kafka import Topics
from services.console import pages, rows
from services.console.app import Console, build_app
from services.console.auth import (
    LoginThrottle,
    Sessions,
    check_login,
    hash_password,
    parse_users,
    verify_password,
)
from services.console.consumer import Polled, apply_records
from services.console.replay import NotReplayable, plan_replay
from services.console.store import Store, search_clause
from services.responder.prompt import build_input, labels_for

from .console_builders import dead_letter, decision, missed, request
from .context_builders import KEY, activity, command, inbound, reply, secs, t

LABELS = labels_for("es")
TOPICS = Topics.from_settings(Settings(topic_prefix="c."))


def ms(at: Any) -> int:
    v = rows.ms(at)
    assert v is not None
    return v


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "console.sqlite3")


def apply(store: Store, *records: tuple[str, str, dict[str, Any]]) -> None:
    """(topic, schema, value) records, encoded as on the topics, through the consumer's function."""
    polled = [Polled(topic, 0, n, codec.encode(schema, dict(value))) for n, (topic, schema, value)
              in enumerate(records)]
    apply_records(store, polled, TOPICS, LABELS)


def audited(value: Any) -> tuple[str, str, dict[str, Any]]:
    return TOPICS.audit, "BatchDecision", dict(value)


def received(value: Any) -> tuple[str, str, dict[str, Any]]:
    return TOPICS.inbound, "InboundMessage", dict(value)


def commanded(value: Any) -> tuple[str, str, dict[str, Any]]:
    return TOPICS.context_commands, "ContextCommand", dict(value)


def dead(value: Any) -> tuple[str, str, dict[str, Any]]:
    return TOPICS.dead_letter, "DeadLetter", dict(value)


def replayed(letter_id: str, at: Any, by: str) -> tuple[str, str, dict[str, Any]]:
    return TOPICS.dead_letter_replays, "DeadLetterReplay", {
        "dead_letter_id": letter_id, "source_topic": TOPICS.inbound, "replayed_partition": 0,
        "replayed_offset": 3, "replayed_by": by, "replayed_at": at}


# ---------------------------------------------------------------- rows


def test_the_block_shown_is_the_developer_message_the_responder_builds() -> None:
    items = [missed(t("10:02:00"), "Tenemos habitación doble <vista al mar> & desayuno", name="Ana"),
             missed(t("10:01:00"), "Del 12 al 14", role="customer", source="both")]
    asked = [inbound("e1", t("10:09:00"), "¿cuánto cuesta?")]
    req = request("b1", t("10:10:00"), asked, missed_items=items, dropped=2)
    developer = build_input(req, "es")[0]["content"][0]["text"]
    assert rows.request_row(req, LABELS)["block"] == developer


def test_a_request_without_missed_messages_has_no_block() -> None:
    req = request("b1", t("10:10:00"), [inbound("e1", t("10:09:00"), "hola")])
    assert rows.request_row(req, LABELS)["block"] is None


def test_a_decision_counts_injected_items_by_source() -> None:
    d = decision("b1", t("10:00:00"), injected=[missed(t("9:00:00"), "a", source="realtime"),
                                             missed(t("9:01:00"), "b", source="history"),
                                             missed(t("9:02:00"), "c", source="history")],
                 check_ran=True, webhooks_missing=2, recovered=["e9"], history_error="timeout")
    row = rows.decision_row(d)
    assert (row["inj_realtime"], row["inj_history"], row["inj_both"]) == (1, 2, 0)
    counts = rows.decision_counts(row)
    assert counts == {"batches": 1, "held": 0, "gaps": 1, "inj_realtime": 1, "inj_history": 2, "inj_both": 0,
                      "webhooks_missing": 2, "recovered": 1, "history_failures": 1}


def test_only_pause_and_resume_commands_become_rows() -> None:
    assert rows.command_row(command("flush", t("10:00:00"))) is None
    assert rows.command_row(command("pause", t("10:00:00"), actor="ana")) == {
        "customer_key": KEY, "kind": "pause", "actor": "ana", "at": ms(t("10:00:00"))}


# ---------------------------------------------------------------- store


def test_a_redelivered_decision_counts_once(store: Store) -> None:
    d = decision("b1", t("10:00:00"), held=True, reason="human_active")
    apply(store, audited(d), audited(d))
    totals = store.totals(ms(t("00:00:00")))
    assert (totals["batches"], totals["held"]) == (1, 1)
    assert store.customer(KEY)["batches"] == 1  # type: ignore[index]


def test_an_answer_clears_the_hold_and_an_older_decision_does_not_bring_it_back(store: Store) -> None:
    apply(store, audited(decision("b1", t("10:00:00"), held=True, reason="paused")))
    assert store.customer(KEY)["held_since"] == ms(t("10:00:00"))  # type: ignore[index]
    apply(store, audited(decision("b2", t("10:05:00"))))
    apply(store, audited(decision("b0", t("09:00:00"), held=True, reason="x")))
    c = store.customer(KEY)
    assert c is not None and (c["held"], c["held_since"], c["batches"]) == (0, None, 3)


def test_a_message_after_the_last_decision_is_an_open_batch_until_decided(store: Store) -> None:
    apply(store, audited(decision("b1", t("10:00:00"))),
          received(inbound("e2", t("10:01:00"), "otra cosa")))
    assert store.customers(filters=["open"]).total == 1
    apply(store, audited(decision("b2", t("10:02:00"))))
    assert store.customers(filters=["open"]).total == 0


def test_the_latest_pause_or_resume_wins(store: Store) -> None:
    apply(store, commanded(command("pause", t("10:00:00"), actor="ana")),
          commanded(command("resume", t("10:05:00"), actor="bo")),
          commanded(command("pause", t("10:01:00"), actor="old")))
    c = store.customer(KEY)
    assert c is not None and (c["paused"], c["paused_by"]) == (0, None)
    assert store.totals(ms(t("00:00:00")))["pauses"] == 2
    actions = store.events_between("actions", KEY, 0, 2**62)
    assert [(a["operator"], a["kind"]) for a in actions] == [
        ("ana", "pause"), ("old", "pause"), ("bo", "resume")]


def test_the_consoles_own_command_coming_back_from_the_topic_counts_once(store: Store) -> None:
    mine = command("pause", t("10:00:00"), actor="ana")
    with store.transaction():
        store.apply_command(rows.command_row(mine) or {})
    apply(store, commanded(mine))
    assert store.totals(0)["pauses"] == 1 and len(store.events_between("actions", KEY, 0, 2**62)) == 1


def test_search_filters_and_paging(store: Store) -> None:
    for n in range(7):
        key = f"wati:5037000000{n}"
        apply(store, received(inbound(f"e{n}", t("10:00:00") + secs(n), key=key)),
              audited(decision(f"b{n}", t("10:00:00") + secs(n + 1), key=key, held=n % 2 == 0,
                               reason="human_active")))
    assert store.customers("50370000003").total == 1
    held = store.customers(filters=["held"], limit=2)
    assert held.total == 4 and [r["key"] for r in held.rows] == ["wati:50370000006", "wati:50370000004"]
    assert [r["key"] for r in store.customers(filters=["held"], offset=2, limit=2).rows] == [
        "wati:50370000002", "wati:50370000000"]
    assert store.customers("+503 7000 0003").total == 1, "a phone written with + and spaces"
    assert store.customers("wati:5037000000").total == 7, "a key prefix"
    assert store.customers("clien").total == 7, "a name prefix, any case"
    assert store.customers("%").total == 0, "no wildcard"
    clause, args = search_clause("5037")
    plan = " ".join(str(tuple(r)) for r in store.reader.execute(
        "EXPLAIN QUERY PLAN SELECT * FROM customers WHERE " + clause, args))
    assert "SCAN customers" not in plan, plan


def test_the_consumer_position_is_written_with_the_rows(store: Store) -> None:
    assert store.is_empty()
    apply(store, audited(decision("b1", t("10:00:00"))))
    apply_records(store, [Polled(TOPICS.inbound, 2, 41, b"not avro")], TOPICS, LABELS)
    assert store.offsets() == {(TOPICS.audit, 0): 1, (TOPICS.inbound, 2): 42}


def test_a_store_of_another_layout_is_emptied_to_be_rebuilt_from_the_topics(tmp_path: Path) -> None:
    """An older store (the decisions keyed by batch id alone) would keep its old layout under
    CREATE TABLE IF NOT EXISTS; emptied, the consumer rebuilds it from the topics' beginning."""
    old = sqlite3.connect(tmp_path / "old.sqlite3")
    old.executescript("CREATE TABLE decisions (batch_id TEXT PRIMARY KEY, customer_key TEXT);"
                      "CREATE TABLE offsets (topic TEXT, partition INTEGER, next_offset INTEGER);"
                      "INSERT INTO offsets VALUES ('c.audit', 0, 41);")
    old.close()
    store = Store(tmp_path / "old.sqlite3")
    assert store.is_empty() and store.offsets() == {}
    apply(store, audited(decision("b1", t("10:00:00"))))
    assert store.totals(0)["batches"] == 1
    store.close()
    assert Store(tmp_path / "old.sqlite3").totals(0)["batches"] == 1  # the new layout is kept


def test_a_customer_known_only_by_a_recent_pause_survives_the_prune(store: Store) -> None:
    apply(store, commanded(command("pause", t("12:00:00"), actor="ana")))
    store.prune(ms(t("10:00:00")))
    assert (store.customer(KEY) or {}).get("paused") == 1


def test_prune_deletes_what_is_older_than_the_retention(store: Store) -> None:
    apply(store, received(inbound("e1", t("08:00:00"))),
          audited(decision("b1", t("08:01:00"))),
          received(inbound("e2", t("12:00:00"), key="wati:50371111111")))
    assert store.prune(ms(t("10:00:00"))) > 0
    assert store.customer(KEY) is None and store.customer("wati:50371111111") is not None
    assert store.batches(KEY) == [] and store.totals(0)["messages"] == 1


def test_a_dead_letter_is_replayed_once(store: Store) -> None:
    apply(store, dead(dead_letter(t("10:00:00"), source_topic=TOPICS.inbound)))
    letter = store.dead_letters().rows[0]
    full = store.dead_letter(letter["id"])
    assert full is not None
    plan = plan_replay(full, TOPICS.all())
    assert (plan.topic, plan.key, plan.payload) == (TOPICS.inbound, KEY.encode(), b"\x00garbage")
    apply(store, replayed(letter["id"], t("10:05:00"), "ana"), replayed(letter["id"], t("10:06:00"), "bo"))
    with pytest.raises(NotReplayable, match="already replayed by ana"):
        plan_replay(store.dead_letter(letter["id"]) or {}, TOPICS.all())
    assert [a["operator"] for a in store.recent_actions()] == ["ana"]  # the first replay is the one


def test_a_replay_read_before_its_dead_letter_still_marks_it_and_shows_on_the_timeline(store: Store) -> None:
    """The two topics are read in no particular order (a rebuild reads them side by side)."""
    apply(store, replayed("0:0", t("10:05:00"), "bo"))
    apply(store, dead(dead_letter(t("10:00:00"), source_topic=TOPICS.inbound)))
    letter = store.dead_letter("0:0")
    assert letter is not None and letter["replayed_by"] == "bo"
    assert store.dead_letters().rows[0]["replayed_by"] == "bo"
    [action] = store.events_between("actions", KEY, 0, 2**62)
    assert action["operator"] == "bo" and "replayed dead letter 0:0" in action["kind"]


@pytest.mark.parametrize(("topic", "payload", "why"), [
    (None, b"x", "no source topic"), ("elsewhere", b"x", "not one of"), ("c.inbound", None, "no payload")])
def test_a_dead_letter_without_a_usable_source_is_not_replayable(topic: str | None, payload: bytes | None,
                                                                 why: str) -> None:
    letter = rows.dead_letter_row(dead_letter(t("10:00:00"), source_topic=topic, payload=payload), 0, 1)
    with pytest.raises(NotReplayable, match=why):
        plan_replay(letter, TOPICS.all())


# ---------------------------------------------------------------- accounts and sessions


def test_passwords_hash_and_verify() -> None:
    stored = hash_password("correct horse")
    assert verify_password("correct horse", stored)
    assert not verify_password("wrong", stored)
    assert not verify_password("correct horse", "scrypt$bad")
    users = parse_users(f"ana:{stored}", f"# team\nbo:{hash_password('x')}\n")
    assert set(users) == {"ana", "bo"}
    assert check_login(users, "ana", "correct horse")
    assert not check_login(users, "nobody", "correct horse")


@pytest.mark.parametrize("entry", ["ana", "ana:plaintext", "a b:scrypt$1$2$3$4$5", ":scrypt$1$2$3$4$5"])
def test_a_malformed_account_is_a_configuration_error(entry: str) -> None:
    with pytest.raises(ConfigError):
        parse_users(entry)


def test_sessions_expire_and_cannot_be_forged() -> None:
    sessions = Sessions("secret", 3600)
    cookie = sessions.issue("ana", now=1000)
    session = sessions.check(cookie, now=2000)
    assert session is not None and session.user == "ana"
    assert sessions.check(cookie, now=1000 + 3601) is None
    assert sessions.check(cookie.replace("ana", "bob", 1), now=2000) is None
    assert Sessions("other", 3600).check(cookie, now=2000) is None
    assert sessions.csrf_ok(session, session.csrf)
    assert not sessions.csrf_ok(session, "") and not sessions.csrf_ok(session, session.csrf + "0")


# ---------------------------------------------------------------- pages


def test_record_text_is_escaped_in_the_timeline(store: Store) -> None:
    evil = "<script>alert(1)</script>"
    apply(store, received(inbound("e1", t("10:00:00"), evil)),
          audited(decision("b1", t("10:01:00"))),
          (TOPICS.agent_activity, "AgentActivity", dict(activity("a1", t("10:02:00"), evil))),
          (TOPICS.replies, "AssistantReply", dict(reply("b1", t("10:02:00"), evil))))
    html = pages.timeline_page(pages.Viewer("ana", "tok"), ms(t("11:00:00")), store.customer(KEY) or {},
                               list(reversed(store.batches(KEY))),
                               store.events_between("inbound", KEY, 0, 2**62),
                               store.events_between("agent_activity", KEY, 0, 2**62), [], None)
    assert "<script>" not in html and html.count("&lt;script&gt;") == 3


def test_overview_figures_and_charts(store: Store) -> None:
    apply(store, received(inbound("e1", t("10:00:00"))),
          (TOPICS.audit, "BatchDecision", dict(decision("b1", t("10:01:00"), check_ran=True, injected=[
              missed(t("9:00:00"), "a", source="history"), missed(t("9:01:00"), "b", source="both")]))),
          (TOPICS.responder_requests, "ResponderRequest", dict(request("b1", t("10:01:00"), []))))
    now = ms(t("10:30:00"))
    html = pages.overview_page(pages.Viewer("ana", "tok"), now, store.totals(now - 86_400_000),
                               store.totals(now - 7 * 86_400_000), store.hourly(now - 7 * 86_400_000),
                               store.waiting_now(), [])
    assert html.count('class="chart"') == 3
    assert re.search(r"OpenAI calls per customer message</th><td>1.00</td>", html)
    assert pages.detection_rate({"inj_realtime": 1, "inj_history": 2, "inj_both": 1}) == 50.0
    assert pages.detection_rate({"inj_realtime": 0, "inj_history": 0, "inj_both": 0}) is None


# ---------------------------------------------------------------- HTTP: 401 / 403


@pytest.fixture
async def client(store: Store) -> AsyncIterator[TestClient[Any, Any]]:
    console = Console(store=store, sessions=Sessions("s", 3600), users={"ana": hash_password("pw")},
                      topics=TOPICS, producer=None, ready=lambda: (True, "ok"))
    async with TestClient(TestServer(build_app(console))) as c:
        yield c


@pytest.mark.parametrize("path", ["/", "/customers", f"/customers/{KEY}", "/waiting", "/dead-letters",
                                  "/dead-letters/0:1"])
async def test_every_page_needs_a_login(client: TestClient[Any, Any], path: str) -> None:
    answer = await client.get(path, allow_redirects=False)
    assert answer.status == 401
    assert 'action="/login"' in await answer.text()


async def test_login_sets_a_strict_httponly_cookie_and_wrong_passwords_are_refused(
    client: TestClient[Any, Any], caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    refused = await client.post("/login", data={"user": "ana", "password": "nope"}, allow_redirects=False)
    assert refused.status == 401
    ok = await client.post("/login", data={"user": "ana", "password": "pw", "next": "//evil.example/"},
                           allow_redirects=False)
    assert ok.status == 303 and ok.headers["Location"] == "/"
    cookie = ok.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Secure" not in cookie
    assert (await client.get("/", allow_redirects=False)).status == 200
    tls = await client.post("/login", data={"user": "ana", "password": "pw"}, allow_redirects=False,
                            headers={"X-Forwarded-Proto": "https"})
    assert "Secure" in tls.headers["Set-Cookie"]
    assert "pw" not in caplog.text.replace("pwd", "")


async def test_repeated_wrong_passwords_are_throttled(client: TestClient[Any, Any]) -> None:
    for _ in range(5):
        assert (await client.post("/login", data={"user": "ana", "password": "x"})).status == 401
    throttled = await client.post("/login", data={"user": "ana", "password": "pw"}, allow_redirects=False)
    assert throttled.status == 429, "even the right password, until the window passes"


def test_the_throttle_forgets_after_its_window() -> None:
    throttle = LoginThrottle(limit=2, window=60)
    throttle.failed(("user:ana",), 0)
    throttle.failed(("user:ana",), 1)
    assert throttle.blocked(("user:ana",), 30) and not throttle.blocked(("user:bo",), 30)
    assert not throttle.blocked(("user:ana",), 62)


async def test_a_post_without_the_session_csrf_token_is_forbidden(client: TestClient[Any, Any]) -> None:
    assert (await client.post(f"/customers/{KEY}/pause", data={})).status == 401
    await client.post("/login", data={"user": "ana", "password": "pw"}, allow_redirects=False)
    assert (await client.post(f"/customers/{KEY}/pause", data={})).status == 403
    assert (await client.post(f"/customers/{KEY}/pause", data={"csrf": "forged"})).status == 403
    assert (await client.post("/dead-letters/0:1/replay", data={"confirm": "yes"})).status == 403
    assert (await client.post("/logout", data={})).status == 403


async def test_pages_render_for_a_logged_in_operator_and_log_no_phone_or_text(
    client: TestClient[Any, Any], store: Store, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="services")
    text = "mi tarjeta termina en 4242"
    apply(store, received(inbound("e1", t("10:00:00"), text)),
          audited(decision("b1", t("10:00:00") + secs(1), held=True, reason="paused")),
          dead(dead_letter(t("10:00:00"), source_topic=TOPICS.inbound)))
    await client.post("/login", data={"user": "ana", "password": "pw"}, allow_redirects=False)
    for path in ("/", "/customers?q=5037&f=held", f"/customers/{KEY}", "/waiting", "/dead-letters",
                 f"/dead-letters/{store.dead_letters().rows[0]['id']}"):
        answer = await client.get(path)
        assert answer.status == 200, path
    page = await (await client.get(f"/customers/{KEY}")).text()
    assert text in page and "held: paused" in page
    assert KEY.split(":")[1] not in caplog.text and text not in caplog.text
    assert (await client.get("/customers/wati:1")).status == 404


async def test_a_replay_needs_the_confirmation(client: TestClient[Any, Any], store: Store) -> None:
    apply(store, dead(dead_letter(t("10:00:00"), source_topic=TOPICS.inbound)))
    letter_id = store.dead_letters().rows[0]["id"]
    await client.post("/login", data={"user": "ana", "password": "pw"}, allow_redirects=False)
    page = await (await client.get(f"/dead-letters/{letter_id}")).text()
    csrf = re.search(r'name="csrf" value="([^"]+)"', page)
    assert csrf is not None
    answer = await client.post(f"/dead-letters/{letter_id}/replay", data={"csrf": csrf.group(1)})
    assert answer.status == 400 and "Tick the box" in await answer.text()
    assert store.dead_letter(letter_id)["replayed_at"] is None  # type: ignore[index]
