"""The responder's pure decisions: error classes and backoff, answers, state bounds, validation, config."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from services.common import codec
from services.common.config import ConfigError, Settings
from services.common.openai_errors import ErrorBody
from services.common.records import BatchProgress, ResponderState
from services.responder.ai import (
    MAX_DELAY,
    AIFailure,
    answer_of,
    backoff_delay,
    classify,
    customer_hash,
    retry_after_seconds,
)
from services.responder.main import DEFAULT_INSTRUCTIONS, check_settings, load_instructions
from services.responder.state_store import (
    KEEP_TEXTS,
    MAX_BATCHES,
    MAX_CLAIMS,
    StateStore,
    claimant_of,
    empty_state,
    find_batch,
    note_claim,
    note_hold,
    wait_for_claim,
    with_claim,
    with_conversation,
    with_progress,
)
from services.responder.worker import outcome_of, request_problem

# ------------------------------------------------------------------------------------------ ai


@pytest.mark.parametrize(("status", "code", "reason", "retryable"), [
    (None, None, "connection_error", True),
    (400, "conversation_locked", "conversation_locked", True),
    (400, None, "bad_request", False),
    (400, "invalid_image", "bad_request", False),
    (401, "invalid_api_key", "unauthorized", False),
    (403, None, "unauthorized", False),
    (404, None, "not_found", False),  # names nothing: the replier checks the conversation
    (404, "model_not_found", "model_not_found", False),
    (408, None, "timeout", True),
    (409, None, "conflict", True),
    (429, "rate_limit_exceeded", "rate_limited", True),
    (429, None, "rate_limited", True),
    (429, "insufficient_quota", "insufficient_quota", False),
    (500, None, "server_error", True),
    (503, "server_is_overloaded", "server_error", True),
])
def test_classify(status: int | None, code: str | None, reason: str, retryable: bool) -> None:
    kind = classify(status, ErrorBody(code=code))
    assert (kind.reason, kind.retryable) == (reason, retryable)
    assert kind.locked == (code == "conversation_locked")
    assert not kind.gone  # only a 404 naming the conversation: tests/unit/test_openai_errors.py


def test_retry_after_headers() -> None:
    assert retry_after_seconds(None) is None
    assert retry_after_seconds({}) is None
    assert retry_after_seconds({"retry-after-ms": "250"}) == 0.25
    assert retry_after_seconds({"retry-after": "3"}) == 3.0
    assert retry_after_seconds({"retry-after-ms": "100", "retry-after": "9"}) == 0.1
    assert retry_after_seconds({"retry-after-ms": "soon", "retry-after": "2"}) == 2.0
    assert retry_after_seconds({"retry-after": "-1"}) is None


def test_backoff_is_exponential_capped_with_jitter_unless_the_server_says() -> None:
    assert backoff_delay(1, None, rand=lambda: 0.0) == 0.5
    assert backoff_delay(2, None, rand=lambda: 0.0) == 1.0
    assert backoff_delay(3, None, rand=lambda: 0.0) == 2.0
    assert backoff_delay(10, None, rand=lambda: 0.0) == MAX_DELAY
    assert backoff_delay(1, None, rand=lambda: 1.0) == 0.375
    assert backoff_delay(5, 0.001) == 0.001


def test_customer_hash_is_stable_and_hides_the_number() -> None:
    h = customer_hash("wati:50372927077")
    assert h == customer_hash("wati:50372927077") and len(h) == 32
    assert "50372927077" not in h and h != customer_hash("wati:50372927078")


def response(text: str = "Hola", status: str = "completed", parts: list[Any] | None = None,
             incomplete: str | None = None) -> Any:
    content = parts if parts is not None else [SimpleNamespace(type="output_text", text=text)]
    return SimpleNamespace(
        id="resp_1", status=status, output_text=text,
        output=[SimpleNamespace(type="message", content=content)],
        incomplete_details=SimpleNamespace(reason=incomplete) if incomplete else None,
        usage=SimpleNamespace(input_tokens=12, output_tokens=3),
    )


def test_answer_of_a_good_response() -> None:
    got = answer_of(response("  Hola, ¿en qué le ayudo?\n"))
    assert (got.text, got.response_id, got.input_tokens, got.output_tokens) == (
        "Hola, ¿en qué le ayudo?", "resp_1", 12, 3)


@pytest.mark.parametrize(("resp", "reason"), [
    (response(""), "empty_output"),
    (response("   "), "empty_output"),
    (response("", parts=[SimpleNamespace(type="refusal", refusal="No puedo")]), "refusal"),
    (response("Texto cortado", status="incomplete", incomplete="max_output_tokens"), "incomplete"),
    (response("", status="incomplete", incomplete="content_filter"), "incomplete"),
    (response("x", status="failed"), "failed"),
])
def test_answer_of_failures(resp: Any, reason: str) -> None:
    with pytest.raises(AIFailure) as info:
        answer_of(resp)
    assert info.value.reason == reason
    assert "resp_1" in info.value.detail


# ------------------------------------------------------------------------------------------ state


def progress(n: int, status: str = "sent", text: str = "t") -> BatchProgress:
    return {"batch_id": f"b{n}", "status": status, "text": f"{text}{n}", "response_id": f"r{n}",  # type: ignore[typeddict-item]
            "provider_message_ids": [], "input_tokens": 0, "output_tokens": 0}


def test_with_progress_replaces_and_moves_to_the_end() -> None:
    state = with_progress(with_progress(empty_state("wati:1"), progress(1, "generated")), progress(2))
    state = with_progress(state, progress(1, "sent"))
    assert [(b["batch_id"], b["status"]) for b in state["batches"]] == [("b2", "sent"), ("b1", "sent")]
    found = find_batch(state, "b1")
    assert found is not None and found["status"] == "sent"
    assert find_batch(state, "b9") is None


def test_state_is_bounded_and_old_texts_dropped_but_never_an_unsent_one() -> None:
    state: ResponderState = empty_state("wati:1")
    state = with_progress(state, progress(0, "generated"))  # a generated batch stays textful
    for n in range(1, MAX_BATCHES + 10):
        state = with_progress(state, progress(n))
    assert len(state["batches"]) == MAX_BATCHES
    assert state["batches"][-1]["batch_id"] == f"b{MAX_BATCHES + 9}"
    texts = [b["text"] for b in state["batches"]]
    assert all(texts[-KEEP_TEXTS:]) and not any(texts[:-KEEP_TEXTS])
    # a generated entry keeps its text however old
    state = empty_state("wati:1")
    state = with_progress(state, progress(0, "generated"))
    for n in range(1, 10):
        state = with_progress(state, progress(n))
    assert find_batch(state, "b0")["text"] == "t0"  # type: ignore[index]


def test_with_conversation_and_pure_updates() -> None:
    base = empty_state("wati:1")
    now = datetime(2025, 1, 1, tzinfo=UTC)
    changed = with_conversation(base, "conv_1", now)
    assert changed["conversation_id"] == "conv_1" and changed["updated_at"] == now
    assert base["conversation_id"] is None  # the input is not modified


def test_the_newest_claim_on_a_batch_wins_whatever_order_it_is_seen_in() -> None:
    """The fence's bookkeeping: a claim counts from where it FIRST appeared in the partition."""
    claims: dict[tuple[str, str], int] = {}
    assert claimant_of(claims, "b1") is None
    note_claim(claims, 10, {"batch_id": "b1", "owner": "old"})
    assert claimant_of(claims, "b1") == "old"
    note_claim(claims, 14, {"batch_id": "b1", "owner": "new"})  # the new owner's claim
    assert claimant_of(claims, "b1") == "new"
    note_claim(claims, 15, {"batch_id": "b1", "owner": "old"})  # a stale worker's later write
    assert claimant_of(claims, "b1") == "new"
    note_claim(claims, 16, None)  # a record of a version without claims
    assert claimant_of(claims, "b1") == "new"
    # the reader may see a write after the writer's ack, or before: the first offset is kept
    late: dict[tuple[str, str], int] = {}
    note_claim(late, 15, {"batch_id": "b1", "owner": "old"})
    note_claim(late, 14, {"batch_id": "b1", "owner": "new"})
    note_claim(late, 10, {"batch_id": "b1", "owner": "old"})
    assert claimant_of(late, "b1") == "new"
    # claims on other batches of the customer do not touch this one
    note_claim(claims, 20, {"batch_id": "b2", "owner": "third"})
    assert claimant_of(claims, "b1") == "new" and claimant_of(claims, "b2") == "third"


def test_claims_are_bounded_oldest_first() -> None:
    claims: dict[tuple[str, str], int] = {}
    for n in range(MAX_CLAIMS + 3):
        note_claim(claims, n, {"batch_id": f"b{n}", "owner": f"o{n}"})
    assert len(claims) == MAX_CLAIMS
    last = MAX_CLAIMS + 2
    assert claimant_of(claims, "b0") is None and claimant_of(claims, f"b{last}") == f"o{last}"


def test_a_record_written_between_a_claims_base_and_the_claim_is_found() -> None:
    """The claim's re-base (worker `_claim`): what the reader saw strictly between the state the
    claim was based on and the claim itself was written by another worker, and is handed back."""
    store = StateStore(Settings(), cast(Any, None))
    key = "wati:1"

    def read(offset: int, state: ResponderState) -> None:  # what the state reader does per record
        store._read(key.encode(), offset, codec.encode("ResponderState", cast(dict[str, Any], state)))

    now = datetime(2025, 1, 1, tzinfo=UTC)
    read(5, empty_state(key))
    base = store.watch(key)
    assert base is not None and base["batches"] == []
    theirs = with_progress(with_claim(empty_state(key), {"batch_id": "b1", "owner": "old"}, now),
                           progress(1, "generated"), now)
    read(6, theirs)  # the old owner's `generated`, landed before our claim
    ours = with_claim(base, {"batch_id": "b1", "owner": "new"}, now)
    read(7, ours)  # our claim
    read(8, theirs)  # a later write of the old owner does not count (ordered after our claim)
    missed = store.written_between(key, 7)
    assert missed is not None and find_batch(missed, "b1") is not None
    assert store.claimant(key, "b1") == "new"
    # no record in between: nothing to take in; the watch is over either way
    store.watch(key)
    read(9, ours)
    assert store.written_between(key, 9) is None
    assert store.written_between(key, 9) is None


def test_a_worker_waits_only_for_another_claim_that_holds_on_an_unsent_batch() -> None:
    """`wait_for_claim`: one OpenAI call per batch — wait while another handling's claim holds."""
    now = datetime(2025, 1, 1, tzinfo=UTC)
    later = now + timedelta(seconds=42)
    assert wait_for_claim(None, "old", later, now) == 42.0  # claimed, calling OpenAI
    assert wait_for_claim(progress(1, "generated"), "old", later, now) == 42.0  # sending
    assert wait_for_claim(progress(1, "sent"), "old", later, now) == 0.0  # done: republish only
    assert wait_for_claim(None, None, None, now) == 0.0  # nobody claimed it
    assert wait_for_claim(None, "old", None, now) == 0.0  # an older version's claim: no hold
    assert wait_for_claim(None, "old", now, now) == 0.0  # released (held until its write time)
    assert wait_for_claim(None, "old", now - timedelta(seconds=1), now) == 0.0  # expired: its owner died


def test_a_claims_hold_is_its_latest_records_whatever_order_it_is_seen_in() -> None:
    """The claimant renews its hold with `generated` and ends it with a release: the LATEST record
    of a (batch, owner) claim counts, also when our own write's ack is applied before a read."""
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    claimed, renewed = t0 + timedelta(seconds=60), t0 + timedelta(seconds=90)
    released = t0 + timedelta(seconds=5)
    holds: dict[tuple[str, str], tuple[int, datetime | None]] = {}
    note_hold(holds, 10, {"batch_id": "b1", "owner": "old", "expires_at": claimed})
    note_hold(holds, 12, {"batch_id": "b1", "owner": "old", "expires_at": renewed})
    assert holds[("b1", "old")] == (12, renewed)
    note_hold(holds, 10, {"batch_id": "b1", "owner": "old", "expires_at": claimed})  # read after the ack
    assert holds[("b1", "old")] == (12, renewed)
    note_hold(holds, 13, {"batch_id": "b1", "owner": "old", "expires_at": released})
    assert holds[("b1", "old")] == (13, released)
    note_hold(holds, 14, None)
    note_hold(holds, 15, {"batch_id": "b1", "owner": "legacy"})  # no `expires_at`: no hold
    assert holds[("b1", "legacy")] == (15, None)
    for n in range(MAX_CLAIMS + 3):  # bounded like the claims, oldest first
        note_hold(holds, 100 + n, {"batch_id": f"b{n}", "owner": "o", "expires_at": claimed})
    assert len(holds) == MAX_CLAIMS and ("b1", "old") not in holds


def test_the_store_tells_the_newest_claimants_hold_through_the_avro_records() -> None:
    store = StateStore(Settings(), cast(Any, None))
    key = "wati:1"
    t0 = datetime(2025, 1, 1, tzinfo=UTC)

    def read(offset: int, state: ResponderState) -> None:
        store._read(key.encode(), offset, codec.encode("ResponderState", cast(dict[str, Any], state)))

    assert store.hold(key, "b1") == (None, None)
    old_until = t0 + timedelta(seconds=60)
    read(1, with_claim(empty_state(key), {"batch_id": "b1", "owner": "old", "expires_at": old_until}, t0))
    assert store.hold(key, "b1") == ("old", old_until)
    new_until = t0 + timedelta(seconds=120)
    read(2, with_claim(empty_state(key), {"batch_id": "b1", "owner": "new", "expires_at": new_until}, t0))
    read(3, with_claim(empty_state(key), {"batch_id": "b1", "owner": "old", "expires_at": t0}, t0))
    assert store.hold(key, "b1") == ("new", new_until)  # a stale release does not end the new hold
    read(4, with_claim(empty_state(key), {"batch_id": "b1", "owner": "v3"}, t0))  # older writer: no field
    assert store.hold(key, "b1") == ("v3", None)


async def test_a_waiter_wakes_on_the_customers_next_record_not_on_others() -> None:
    store = StateStore(Settings(), cast(Any, None))
    key, other = "wati:1", "wati:2"
    state = codec.encode("ResponderState", cast(dict[str, Any], empty_state(key)))
    waiter = asyncio.create_task(store.wait_change(key, 60))
    await asyncio.sleep(0)
    store._read(other.encode(), 1, codec.encode("ResponderState", cast(dict[str, Any], empty_state(other))))
    await asyncio.sleep(0)
    assert not waiter.done()
    store._read(key.encode(), 2, state)
    await asyncio.wait_for(waiter, 5)
    await store.wait_change(key, 0.01)  # nothing comes: returns at its timeout


def test_with_claim_is_pure() -> None:
    base = empty_state("wati:1")
    now = datetime(2025, 1, 1, tzinfo=UTC)
    claimed = with_claim(base, {"batch_id": "b1", "owner": "o1"}, now)
    assert claimed["claim"] == {"batch_id": "b1", "owner": "o1"} and claimed["updated_at"] == now
    assert "claim" not in base


# ------------------------------------------------------------------------------------------ worker


def request(**overrides: Any) -> dict[str, Any]:
    value: dict[str, Any] = {"batch_id": "b1", "customer_key": "wati:5037", "channel": "wati",
                             "provider_id": "5037", "messages": [{"text": "hola"}], "images": []}
    value.update(overrides)
    return value


@pytest.mark.parametrize(("overrides", "problem"), [
    ({}, None),
    ({"customer_key": "manychat:77", "channel": "instagram", "provider_id": "77"}, None),
    ({"customer_key": "manychat:77", "channel": "facebook", "provider_id": "77"}, None),
    ({"messages": [], "images": [{"file_id": "f"}]}, None),
    ({"batch_id": " "}, "empty batch_id"),
    ({"customer_key": "5037"}, "malformed customer_key"),
    ({"customer_key": "sms:5037"}, "malformed customer_key"),
    ({"channel": "instagram"}, "channel instagram does not match the customer key's provider wati"),
    ({"customer_key": "manychat:77"}, "channel wati does not match the customer key's provider manychat"),
    ({"provider_id": ""}, "empty provider_id"),
    ({"messages": []}, "no messages"),
    # tenant keys are well-formed requests; whether their account exists is the worker's second
    # check (`request_account_problem`, tests/unit/test_tenant_clients.py)
    ({"customer_key": "hotel-a/centro/wati:5037"}, None),
    ({"customer_key": "default/default/wati:5037"}, "malformed customer_key"),
])
def test_request_problem(overrides: dict[str, Any], problem: str | None) -> None:
    assert request_problem(request(**overrides)) == problem


def test_outcome_of_stored_progress() -> None:
    assert outcome_of(progress(1)) == "answered"
    assert outcome_of({**progress(1), "response_id": None}) == "fallback"
    assert outcome_of({**progress(1), "text": ""}) == "nothing_sent"


# ------------------------------------------------------------------------------------------ config


def good_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {"openai_api_key": "sk-x", "kafka_bootstrap_servers": "127.0.0.1:9092",
                              "wati_api_url": "http://wati", "wati_api_token": "t",
                              "manychat_api_token": "m", "system_prompt_file": ""}
    values.update(overrides)
    return Settings(**values)


def test_check_settings() -> None:
    assert check_settings(good_settings()) == [
        "SYSTEM_PROMPT_FILE is not set: using the built-in instructions"]
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        check_settings(good_settings(openai_api_key=""))
    with pytest.raises(ConfigError, match="PROMPT_LOCALE"):
        check_settings(good_settings(prompt_locale="fr"))
    with pytest.raises(ConfigError, match="no channel enabled"):
        check_settings(good_settings(wati_api_token="", manychat_api_token=""))
    warnings = check_settings(good_settings(manychat_api_token="", system_prompt_file="/x"))
    assert warnings == ["ManyChat is not configured: Facebook/Instagram batches will be dead-lettered"]


def test_load_instructions(tmp_path: Path) -> None:
    assert load_instructions(good_settings()) == DEFAULT_INSTRUCTIONS
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("  Eres el asistente de la tienda.\n", encoding="utf-8")
    loaded = load_instructions(good_settings(system_prompt_file=str(prompt)))
    assert loaded == "Eres el asistente de la tienda."
    with pytest.raises(ConfigError, match="cannot be read"):
        load_instructions(good_settings(system_prompt_file=str(tmp_path / "missing.txt")))
    (tmp_path / "empty.txt").write_text(" \n", encoding="utf-8")
    with pytest.raises(ConfigError, match="empty"):
        load_instructions(good_settings(system_prompt_file=str(tmp_path / "empty.txt")))
