"""The responder across rebalances and restarts, on the real broker (issue 13, points 4 and 5).

Point 4: a batch whose OpenAI call is still running when its partition moves to a second responder
costs one OpenAI call and is sent to the customer exactly once: the old owner finishes its call and
send under its claim in `responder-state` while the new owner waits for that claim; a claim whose
owner died holds the new owner off until it expires, then the new owner answers once. (A cancelled
old owner releases its claim: the new owner calls again, and still sends once.)
Point 5: a batch resumed after a crash mid-send reports the time its first part went out, not the
time of the restart.

Each test runs its responders on topics of its own, with its own stand-ins.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import sys
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from services.common import codec, metrics
from services.common.config import Settings
from services.common.kafka import Topics, ensure_topics, make_producer
from services.common.records import ResponderRequest
from services.common.timeparse import utcnow
from services.responder.ai import customer_hash
from services.responder.main import Responder
from services.responder.state_store import StateStore, empty_state, find_batch
from services.standins import StandIns
from tests.conftest import unique_prefix
from tests.integration.test_responder_service import (
    INSTRUCTIONS,
    LONG,
    Outputs,
    batch,
    eventually,
    new_customer,
    responder_settings,
)

pytestmark = pytest.mark.broker

#: how long the old owner's OpenAI call takes: long enough to overlap the second responder's join
#: (a join takes ~2-4 s here: the first responder rejoins at its next heartbeat, SESSION / 3)
OPENAI_LATENCY = 9.0
#: the claims' hold (OPENAI_DEADLINE_SECONDS) where the old owner lives: never reached
LONG_DEADLINE = 60.0
#: the claims' hold where the old owner is killed: the new owner answers once it passed. It must
#: outlast the dead owner's eviction from the group (SESSION) and the new owner's catch-up.
SHORT_DEADLINE = 14.0
#: the group session timeout: the broker's minimum (`group.min.session.timeout.ms`), so a killed
#: member is evicted, and a live one rejoins a rebalance, as fast as the broker allows
SESSION = 6.0
#: how long a revoked partition's in-flight batches may run on before they are cancelled
REVOKE_GRACE = 1.0


@dataclasses.dataclass
class Rig:
    s: StandIns
    settings: Settings
    producer: AIOKafkaProducer
    out: Outputs
    #: the killed-owner test: the first responder process is dead (its slow calls no longer apply)
    killed: bool = False

    async def send(self, request: ResponderRequest, partition: int | None = None) -> None:
        await self.producer.send_and_wait(
            Topics.from_settings(self.settings).responder_requests,
            codec.encode("ResponderRequest", dict(request)), key=request["customer_key"].encode(),
            partition=partition,
        )

    def responder(self, **kwargs: Any) -> Responder:
        return Responder(self.settings, instructions=INSTRUCTIONS, serve_http=False, **kwargs)

    def wati_sends(self, contact: str) -> list[Any]:
        return [m for m in self.s.wati.sent if m.contact_id == contact]

    def conversations_created_for(self, customer_key: str) -> int:
        h = customer_hash(customer_key)
        return sum(1 for r in self.s.openai.requests
                   if r.path == "/v1/conversations" and r.method == "POST" and isinstance(r.body, dict)
                   and (r.body.get("metadata") or {}).get("customer") == h)

    def responses_completed_for(self, customer_key: str) -> int:
        """OpenAI responses generated for the customer (a call abandoned by its client included)."""
        h = customer_hash(customer_key)
        return sum(1 for r in self.s.openai.responses.values() if r.request.get("safety_identifier") == h)


def inflight() -> float:
    """Batches being answered now, by every responder of this process."""
    return metrics.REGISTRY.get_sample_value("watistream_inflight_batches") or 0.0


def fenced() -> float:
    """Batches whose handler was refused by the claim fence, in this process."""
    return metrics.REGISTRY.get_sample_value(
        "watistream_dedupe_hits_total", {"kind": "responder_fenced"}) or 0.0


def claim_waits() -> float:
    """Batches whose handler waited for another handling's claim instead of calling OpenAI."""
    return metrics.REGISTRY.get_sample_value(
        "watistream_dedupe_hits_total", {"kind": "responder_claim_wait"}) or 0.0


@pytest.fixture
async def rig(settings: Settings) -> AsyncIterator[Rig]:
    async with StandIns.running() as s:
        rs = dataclasses.replace(  # the client waits out the slow call: no timeout, one call
            responder_settings(settings, s, topic_prefix=unique_prefix("responder-fence")),
            openai_timeout_seconds=OPENAI_LATENCY * 2, openai_deadline_seconds=LONG_DEADLINE,
            broker_session_timeout_seconds=SESSION)
        await ensure_topics(rs)
        producer = make_producer(rs)
        await producer.start()
        out = Outputs(rs)
        await out.start()
        try:
            yield Rig(s, rs, producer, out)
        finally:
            await out.stop()
            await producer.stop()


async def read_state(settings: Settings, producer: AIOKafkaProducer) -> StateStore:
    """A fresh reader of the state topic, caught up: what any responder would see now."""
    store = StateStore(settings, producer)
    await store.start()
    await store.wait_ready()
    return store


@pytest.mark.parametrize("old_owner",
                         ["runs_on_under_its_claim", "cancelled_on_revoke", "hold_ran_out_mid_call"])
async def test_second_responder_joining_mid_call_calls_openai_once_and_sends_once(
    rig: Rig, old_owner: str
) -> None:
    """One customer per partition, each OpenAI call 9 s long; a second responder joins meanwhile.

    The partitions it takes over hold batches whose call is running in the first responder. Before
    the fence both responders called OpenAI and both sent (2 sends per moved batch); then the
    sends were fenced but the new owner still called OpenAI again (2 calls per moved batch). Now
    the old owner (the default: not cancelled, as a worker whose session expired would not be)
    finishes its call and send under its claim, and the new owner waits for that claim and only
    re-publishes the stored reply: ONE OpenAI call and one send per batch. "cancelled_on_revoke"
    cancels the old owner, which releases its claim: the new owner calls again, still sends once.
    "hold_ran_out_mid_call": the old owner's clock is behind, so its claims stop holding 3 s after
    they are written while its calls run on (as with a worker stalled past its deadline): the new
    owner takes over and calls again, and the old owner, whose call ends after the new owner's
    claim, is refused by the claim fence — a stale owner never sends after the new owner took over.
    """
    customers = [new_customer() for _ in range(rig.settings.topic_partitions)]
    hashes = {customer_hash(key) for key, _ in customers}
    slowed: set[str] = set()

    def first_call_of_a_customer(body: dict[str, Any]) -> bool:
        h = body.get("safety_identifier")
        if h in hashes and h not in slowed:
            slowed.add(str(h))
            return True
        return False

    rig.s.openai.latency_for(first_call_of_a_customer, OPENAI_LATENCY)
    fenced_before, waits_before = fenced(), claim_waits()
    first = rig.responder(revoke_timeout=REVOKE_GRACE, cancel_revoked=old_owner == "cancelled_on_revoke")
    second: Responder | None = None
    try:
        await first.start()
        await first.wait_ready(60)
        if old_owner == "hold_ran_out_mid_call":
            assert first.worker is not None
            behind = timedelta(seconds=LONG_DEADLINE - 3)
            first.worker.clock = lambda: utcnow() - behind
        batches = [batch(key, ident, f"Hola {n}") for n, (key, ident) in enumerate(customers)]
        for partition, b in enumerate(batches):
            await rig.send(b, partition=partition)
        await eventually(lambda: len(slowed) == len(customers), what="every OpenAI call in flight")

        second = rig.responder(revoke_timeout=REVOKE_GRACE)
        await second.start()
        await second.wait_ready(60)
        assert second.consumer is not None
        moved = {tp.partition for tp in second.consumer.assignment()}
        assert moved, "the second responder took over partitions"

        await eventually(lambda: all(rig.out.for_batch(b["batch_id"]) for b in batches),
                         timeout=OPENAI_LATENCY * 3, what="a reply to every batch")
        # quiescent: no batch being answered by either responder, no OpenAI call running
        await eventually(lambda: inflight() == 0
                         and rig.s.openai.in_flight == 0, timeout=OPENAI_LATENCY * 3, what="quiescence")

        sends = {b["batch_id"]: len(rig.wati_sends(ident)) for b, (_, ident) in zip(batches, customers,
                                                                                     strict=True)}
        calls = {b["batch_id"]: rig.responses_completed_for(key)
                 for b, (key, _) in zip(batches, customers, strict=True)}
        print(f"{old_owner}: moved partitions {sorted(moved)}; WATI sends per batch "
              f"{list(sends.values())}; OpenAI responses per batch {list(calls.values())}")
        assert list(sends.values()) == [1] * len(batches), f"sends per batch: {sends}"
        if old_owner == "runs_on_under_its_claim":
            assert list(calls.values()) == [1] * len(batches), f"OpenAI responses per batch: {calls}"
            assert claim_waits() - waits_before == len(moved), "the new owner waited on each moved batch"
        if old_owner == "hold_ran_out_mid_call":
            assert fenced() - fenced_before == len(moved), "the stale owner refused on each moved batch"
        else:
            assert fenced() - fenced_before == 0  # nobody even got as far as the fence

        store = await read_state(rig.settings, rig.producer)
        try:
            for b, (key, ident) in zip(batches, customers, strict=True):
                # a record that ran on in its (returned) partition is redelivered and re-published
                # from the stored state: the same reply, which the context service dedupes
                reply, *again = rig.out.for_batch(b["batch_id"])
                fields = ("outcome", "text", "sent_at", "provider_message_ids", "response_id")
                assert all({f: r[f] for f in fields} == {f: reply[f] for f in fields} for r in again)
                [sent] = rig.wati_sends(ident)
                assert reply["outcome"] == "answered" and reply["text"] == sent.text
                state = store.get(key)
                assert state is not None
                progress = find_batch(state, b["batch_id"])
                assert progress is not None and progress["status"] == "sent"
                assert progress["text"] == sent.text
                assert progress["provider_message_ids"] == reply["provider_message_ids"]
                assert progress["sent_at"] == reply["sent_at"]
                assert state["conversation_id"] == reply["conversation_id"]
                assert rig.conversations_created_for(key) == 1
        finally:
            await store.stop()
    finally:
        if second is not None:
            await second.stop()
        await first.stop()


async def test_resumed_send_reports_when_the_first_part_went_out(rig: Rig) -> None:
    """A long answer's first part reaches WATI, the rest fail until the responder stops; the
    restarted responder sends the rest and reports (and stores) the time the send began, before
    the first part: a human message written between the crash and the restart stays after it."""
    key, ident = new_customer()
    rig.s.openai.reply_fn = lambda body: LONG
    rig.s.wati.fail_next("send", 503, times=100, after=1)
    b = batch(key, ident, "Cuéntame todo")
    first = rig.responder(drain_timeout=0.1)
    first_stopped = False
    second: Responder | None = None
    try:
        await first.start()
        await first.wait_ready(60)
        await rig.send(b)
        send_paths = [f"/sendSessionMessage/{ident}"]
        await eventually(lambda: sum(1 for r in rig.s.wati.requests
                                     if any(r.path.endswith(p) for p in send_paths)) >= 2,
                         what="the first part sent and the second failing")
        await first.stop()  # backing off on the second part: generated, partly sent, not `sent`
        first_stopped = True
        assert rig.out.for_batch(b["batch_id"]) == []
        [first_part] = rig.wati_sends(ident)
        rig.s.wati.faults.clear()
        restarted_at: datetime = utcnow()
        second = rig.responder()
        await second.start()
        reply = await rig.out.wait_reply(b["batch_id"])
        sent = rig.wati_sends(ident)
        assert [m.text for m in sent] == reply["parts"] and len(sent) > 1  # each part once
        print(f"first part at {first_part.at.isoformat()}, restart at {restarted_at.isoformat()}, "
              f"reported sent_at {reply['sent_at'].isoformat()}")
        assert reply["sent_at"] <= first_part.at, "sent_at is when the send began, before the crash"
        assert reply["sent_at"] < restarted_at
        assert second.store is not None
        state = second.store.get(key)
        assert state is not None
        progress = find_batch(state, b["batch_id"])
        assert progress is not None and progress["status"] == "sent"
        assert progress["sent_at"] == reply["sent_at"]
    finally:
        if second is not None:
            await second.stop()
        if not first_stopped:
            await first.stop()


async def test_the_store_knows_which_partition_a_customer_is_written_to(rig: Rig) -> None:
    """The fence's read-to-end asks for the customer's partition only: it must be the one written."""
    store = await read_state(rig.settings, rig.producer)
    try:
        for _ in range(20):
            key, _ = new_customer()
            written, _offset = await store.put(empty_state(key))
            assert store.partition_of(key) == written
    finally:
        await store.stop()


def responder_process_env(rig: Rig, deadline: float) -> dict[str, str]:
    """The environment of a `watistream responder` process on the rig's topics and stand-ins."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    rs = rig.settings
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("OPENAI", "WATI", "MANYCHAT", "KAFKA"))}
    environ.update(rig.s.env())
    environ.update({
        "KAFKA_BOOTSTRAP_SERVERS": rs.kafka_bootstrap_servers, "TOPIC_PREFIX": rs.topic_prefix,
        "TOPIC_PARTITIONS": str(rs.topic_partitions), "RESPONDER_WEB_PORT": str(port),
        "BROKER_SESSION_TIMEOUT_SECONDS": str(rs.broker_session_timeout_seconds),
        "OPENAI_TIMEOUT_SECONDS": str(rs.openai_timeout_seconds), "OPENAI_MAX_ATTEMPTS": "1",
        "OPENAI_DEADLINE_SECONDS": str(deadline), "WATISTREAM_SKIP_CHECKS": "1",
    })
    return environ


async def test_an_owner_killed_mid_call_is_answered_once_by_the_new_owner_after_its_claim_expires(
    rig: Rig, tmp_path: Any
) -> None:
    """A responder PROCESS claims two batches and is SIGKILLed while their OpenAI calls run; a
    second responder gets the partitions. It finds the dead owner's claims still holding and waits
    instead of calling OpenAI; once they expire (OPENAI_DEADLINE_SECONDS after the claim) it
    answers each batch exactly once. Before: it answered at once, while the old call could still
    have been finishing (nothing told it the old owner was dead)."""
    customers = [new_customer() for _ in range(2)]
    hashes = {customer_hash(key) for key, _ in customers}
    # the dead owner's calls outlast its hold (the stand-in finishes them, as OpenAI would, holding
    # the conversation until then); the new owner's calls are quick
    rig.s.openai.latency_for(lambda body: body.get("safety_identifier") in hashes and not rig.killed,
                             SHORT_DEADLINE + 2)
    batches = [batch(key, ident, f"Hola {n}") for n, (key, ident) in enumerate(customers)]
    waits_before = claim_waits()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "responder", cwd=str(tmp_path),
        env=responder_process_env(rig, SHORT_DEADLINE),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    second: Responder | None = None
    try:
        produced_at = utcnow()
        for b in batches:
            await rig.send(b)
        await eventually(lambda: rig.s.openai.in_flight == len(batches), timeout=90,
                         what="both OpenAI calls running in the first responder")
        proc.kill()  # SIGKILL: no release, no revoke, nothing written
        await proc.wait()
        rig.killed = True
        store = await read_state(rig.settings, rig.producer)
        try:  # the dead owner's claims, as the state topic holds them
            holds = [store.hold(key, b["batch_id"]) for b, (key, _) in zip(batches, customers, strict=True)]
        finally:
            await store.stop()
        assert all(owner is not None and until is not None for owner, until in holds), holds
        second = rig.responder()
        await second.start()
        replies = [await rig.out.wait_reply(b["batch_id"], timeout=SHORT_DEADLINE * 4) for b in batches]
        await eventually(lambda: inflight() == 0, timeout=30, what="quiescence")
        for b, (key, ident), reply, (_, until) in zip(batches, customers, replies, holds, strict=True):
            assert until is not None
            sent = rig.wati_sends(ident)
            print(f"killed owner: batch {b['batch_id'][:8]} sent {len(sent)} time(s), "
                  f"{(sent[0].at - until).total_seconds():+.1f} s after the dead owner's claim expired "
                  f"(held {(until - produced_at).total_seconds():.1f} s after the batch was produced); "
                  f"OpenAI responses {rig.responses_completed_for(key)}")
            assert len(sent) == 1 and reply["outcome"] == "answered" and reply["text"] == sent[0].text
            assert sent[0].at >= until, "the new owner answered only once the dead owner's claim expired"
            assert rig.out.for_batch(b["batch_id"]) == [reply]
        assert claim_waits() - waits_before == len(batches), "the new owner waited for each claim"
    finally:
        if second is not None:
            await second.stop()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
