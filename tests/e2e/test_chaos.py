"""Chaos drills (issue 7, points 1 and 2): the real process tree under load, hit by SIGKILL.

1. `test_sigkill_under_load_loses_nothing_and_answers_once`: a steady load of WATI webhooks while
   ingest, context, responder and vision are each SIGKILLed at random moments (seeded RNG; the seed
   is printed, `CHAOS_SEED=<n>` replays its schedule) and restarted through the supervisor.
2. `test_broker_outage_under_load`: the broker itself is SIGKILLed under load and restarted on the
   same data directory; ingest must answer 503 within its bound meanwhile and the workers must
   reconnect without a restart.
3. `test_sigkill_after_whatsapp_accepted_the_reply_does_not_send_it_twice`: drill 1's narrowest
   window made deterministic (WATI has the reply, the responder dies before recording `sent`), and
   `test_a_resumed_send_skips_exactly_the_parts_wati_already_has`, the fix's behaviour part by part.

For 1 and 2: every webhook that got a 200 must end in exactly ONE batch, and that batch must have been
answered (the customer received it, and the model saw the message) or dead-lettered; no reply may
reach the customer twice (the WATI stand-in records every send with the responder's deterministic
`localMessageId`). The accounting reads the pipeline's own topics back (responder and vision
requests, replies, dead letters, inbound) and what the stand-ins received. Figures are printed as a
table (`pytest -s` or `-rA`); RELIABILITY.md sections 1 and 2 quote a run.

The load is the scripted part: an open-loop schedule (bounded count and time, loopback only) whose
webhooks are retried like WATI would (same payload, short backoff) when ingest refuses, is dead or
answers 503. Everything else is awaited by polling conditions with generous deadlines.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka.structs import TopicPartition

from services.common import codec
from services.common.broker import EmbeddedKafka, free_port
from services.common.config import Settings
from services.common.kafka import Topics, ensure_topics, make_producer
from services.common.wati import WatiClient
from services.devtools import scenario
from services.devtools.dev import SERVICES, DevStack, _settings_env
from services.devtools.supervisor import Child, Supervisor
from services.responder.ai import batch_reference
from services.responder.channels import ChannelSender, local_message_id
from services.responder.splitting import limit_for, split_message
from services.standins import StandIns
from tests.conftest import unique_prefix
from tests.e2e.topic_tail import TopicTail

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(360)]

#: Accounting deadline after the load ended (a loaded 2-core machine: generous).
SETTLE_TIMEOUT = 120.0
#: A service must be ready again this long after its restart at the latest.
RECOVERY_TIMEOUT = 90.0


# -------------------------------------------------------------------------------- configuration

def chaos_settings(base: Settings, standins: StandIns, tmp: Path, **overrides: Any) -> Settings:
    """The stack against the stand-ins on a compressed clock; a killed group member is evicted fast."""
    env = standins.env()
    values: dict[str, Any] = dict(
        wati_api_url=env["WATI_API_URL"], wati_api_token=env["WATI_API_TOKEN"],
        manychat_api_url=env["MANYCHAT_API_URL"], manychat_api_token=env["MANYCHAT_API_TOKEN"],
        openai_base_url=env["OPENAI_BASE_URL"], openai_api_key=env["OPENAI_API_KEY"],
        ingest_port=free_port(), context_web_port=free_port(), responder_web_port=free_port(),
        vision_web_port=free_port(), console_port=free_port(), data_dir=str(tmp), context_store="rocksdb",
        quiet_window_seconds=0.8, max_batch_wait_seconds=4, flush_scan_interval_seconds=0.2,
        # first contact fetches the (empty) history once per customer; later bursts need none
        missed_gap_seconds=3600, human_hold_seconds=0, history_timeout_seconds=5,
        broker_session_timeout_seconds=6,  # the broker's group.min.session.timeout.ms
        produce_timeout_seconds=3,
        # a killed responder's claims hold its batches off the restarted one until they expire
        openai_deadline_seconds=20, responder_send_hold_seconds=5,
    )
    values.update(overrides)
    return dataclasses.replace(base, **values)


def seeded_rng(label: str) -> tuple[int, random.Random]:
    seed = int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(1_000_000))
    print(f"\n{label}: seed {seed} (replay the schedule with CHAOS_SEED={seed})")
    return seed, random.Random(seed)


# -------------------------------------------------------------------------------- the load

@dataclass
class Attempt:
    """One HTTP attempt of a webhook: when, how long, and the answer (status None = no answer)."""

    sent_at: float
    took: float
    status: int | None
    error: str | None = None

    @property
    def ended_at(self) -> float:
        return self.sent_at + self.took


@dataclass
class Webhook:
    """One customer message; `marker` is unique text that must reach the model's input."""

    n: int
    at: float  # planned offset from the start of the load
    wa_id: str
    kind: str
    marker: str
    media: str | None = None
    payload: dict[str, Any] | None = None
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def event_id(self) -> str:
        return f"wamid.CHAOS{self.n:06d}"

    @property
    def accepted(self) -> bool:
        return any(a.status == 200 for a in self.attempts)

    def build(self) -> dict[str, Any]:
        """The WATI webhook, built once at the first attempt: retries resend the same payload."""
        if self.payload is None:
            text = f"{self.marker} ¿tienen habitación para este fin de semana?"
            payload = scenario.wati_webhook(text, datetime.now(UTC), kind=self.kind, data=self.media)
            payload.update(waId=self.wa_id, senderName=f"Cliente {self.wa_id[-3:]}",
                           whatsappMessageId=self.event_id, conversationId=f"conv-{self.wa_id}")
            self.payload = payload
        return self.payload


def plan_load(
    rng: random.Random, *, count: int, rate: float, customers: int, burst_p: float = 0.35,
    image_p: float = 0.08,
) -> list[Webhook]:
    """`count` messages at `rate`/s; a message continues the previous customer's burst with
    probability `burst_p` (so batches of several messages form), else comes from a random customer."""
    wa_ids = [f"5039{i:07d}" for i in range(customers)]
    hooks: list[Webhook] = []
    wa_id = rng.choice(wa_ids)
    for n in range(count):
        if n and rng.random() >= burst_p:
            wa_id = rng.choice(wa_ids)
        image = rng.random() < image_p
        hooks.append(Webhook(
            n=n, at=n / rate, wa_id=wa_id, kind="image" if image else "text", marker=f"[m{n:06d}]",
            media=f"data/images/chaos-{n}.png" if image else None,
        ))
    return hooks


async def deliver(
    client: httpx.AsyncClient, url: str, token: str, hook: Webhook, *, max_attempts: int,
    max_backoff: float = 4.0,
) -> None:
    """Posts one webhook like WATI would: a refused connection, a lost answer, a 5xx or 429 is retried
    with the same payload after a short backoff (Retry-After honoured, capped); a 4xx is final."""
    delay = 0.5
    for _ in range(max_attempts):
        started = time.monotonic()
        status: int | None = None
        error: str | None = None
        retry_after: float | None = None
        try:
            answer = await client.post(url, json=hook.build(), headers={"Authorization": f"Bearer {token}"})
            status = answer.status_code
            if status == 200:
                body = answer.json()
                if body.get("event_id") != hook.event_id or body.get("status") != "accepted":
                    error = f"unexpected 200 body {body}"
            with contextlib.suppress(ValueError, TypeError):
                retry_after = float(answer.headers.get("Retry-After", ""))
        except httpx.HTTPError as exc:
            error = type(exc).__name__
        hook.attempts.append(Attempt(started, time.monotonic() - started, status, error))
        if status is not None and (status < 500 and status != 429):
            return
        wait = delay if retry_after is None else max(delay, min(retry_after, max_backoff))
        await asyncio.sleep(wait)  # the sender's own backoff: part of the scripted load
        delay = min(delay * 2, max_backoff)


async def run_load(
    url: str, token: str, hooks: list[Webhook], *, stop: Callable[[], bool] = lambda: False,
    max_attempts: int = 6,
) -> list[Webhook]:
    """Sends `hooks` on their schedule (open loop) until done or `stop()`; returns the ones sent."""
    started = time.monotonic()
    sent: list[Webhook] = []
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=50)
    async with httpx.AsyncClient(timeout=httpx.Timeout(15.0), limits=limits) as client:
        tasks: list[asyncio.Task[None]] = []
        for hook in hooks:
            pause = started + hook.at - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)  # the schedule of the load itself
            if stop():
                break
            sent.append(hook)
            tasks.append(asyncio.create_task(deliver(
                client, f"{url}/webhooks/wati", token, hook, max_attempts=max_attempts)))
        await asyncio.gather(*tasks)
    return sent


# -------------------------------------------------------------------------------- the ledger

class Ledger(TopicTail):
    """What the pipeline wrote, read back from its topics from offset 0 (no consumer group)."""

    task_name = "chaos-ledger"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings.kafka_bootstrap_servers)
        self.settings = settings
        self.topics = Topics.from_settings(settings)
        self.inbound: collections.Counter[str] = collections.Counter()
        self.batches: dict[str, list[frozenset[str]]] = collections.defaultdict(list)
        self.event_batches: dict[str, set[str]] = collections.defaultdict(set)
        self.replies: dict[str, list[str]] = collections.defaultdict(list)
        self.dead: list[dict[str, Any]] = []
        self.dead_batches: dict[str, list[str]] = collections.defaultdict(list)
        self.dead_events: dict[str, list[str]] = collections.defaultdict(list)
        self.undecodable = 0
        self.last_record_at = time.monotonic()

    def watched(self) -> list[TopicPartition]:
        names = [self.topics.inbound, self.topics.responder_requests, self.topics.vision_requests,
                 self.topics.replies, self.topics.dead_letter]
        return [TopicPartition(t, p) for t in names for p in range(self.settings.topic_partitions)]

    def on_record(self, tp: TopicPartition, record: Any) -> None:
        self._read(record.topic, record.value)

    def _read(self, topic: str, value: bytes | None) -> None:
        self.last_record_at = time.monotonic()
        try:
            name, record = codec.decode_any(value)
        except codec.CodecError:
            self.undecodable += 1
            return
        if topic == self.topics.inbound and name == "InboundMessage":
            self.inbound[record["event_id"]] += 1
        elif name == "ResponderRequest":
            self._batch(record)
        elif name == "VisionRequest":
            self._batch(record["request"])
        elif name == "AssistantReply":
            self.replies[record["batch_id"]].append(str(record["outcome"]))
        elif name == "DeadLetter":
            self._dead(record)

    def _batch(self, request: dict[str, Any]) -> None:
        events = frozenset(str(m["event_id"]) for m in request["messages"])
        self.batches[request["batch_id"]].append(events)
        for event_id in events:
            self.event_batches[event_id].add(request["batch_id"])

    def _dead(self, record: dict[str, Any]) -> None:
        self.dead.append(record)
        reason = f"{record['service']}:{record['reason']}"
        if record.get("batch_id"):
            self.dead_batches[record["batch_id"]].append(reason)
        with contextlib.suppress(codec.CodecError, KeyError, TypeError):
            name, payload = codec.decode_any(record.get("payload"))
            if name == "InboundMessage":
                self.dead_events[payload["event_id"]].append(reason)
            elif name in ("ResponderRequest", "VisionRequest"):
                request = payload["request"] if name == "VisionRequest" else payload
                self.dead_batches[request["batch_id"]].append(reason)
                for message in request["messages"]:
                    self.dead_events[message["event_id"]].append(reason)

    def settled(self, event_ids: list[str]) -> bool:
        """Every event is in a batch, and each of its batches has a reply or a dead letter."""
        for event_id in event_ids:
            if event_id in self.dead_events:
                continue
            batches = self.event_batches.get(event_id)
            if not batches or any(b not in self.replies and b not in self.dead_batches for b in batches):
                return False
        return True


# -------------------------------------------------------------------------------- the verdict

@dataclass
class Verdict:
    """The figures of one run, and the violations the assertions name."""

    sent: int = 0
    attempts: int = 0
    statuses: collections.Counter[str] = field(default_factory=collections.Counter)
    accepted: int = 0
    answered: int = 0
    dead_lettered: int = 0
    batches: int = 0
    inbound_copies: int = 0
    late_accepted: int = 0
    duplicate_sends: dict[str, int] = field(default_factory=dict)
    lost: list[str] = field(default_factory=list)
    in_several_batches: dict[str, list[str]] = field(default_factory=dict)
    not_received: list[str] = field(default_factory=list)
    not_in_prompt: list[str] = field(default_factory=list)
    regenerated: int = 0
    republished: int = 0
    dead_reasons: collections.Counter[str] = field(default_factory=collections.Counter)

    def rows(self) -> list[tuple[str, object]]:
        return [
            ("webhooks sent (distinct event ids)", self.sent),
            ("HTTP attempts (incl. retries)", self.attempts),
            ("  answers", ", ".join(f"{k}: {v}" for k, v in sorted(self.statuses.items()))),
            ("accepted (got a 200)", self.accepted),
            ("  answered (reply sent to the customer)", self.answered),
            ("  dead-lettered", self.dead_lettered),
            ("  lost", len(self.lost)),
            ("  in more than one batch", len(self.in_several_batches)),
            ("duplicate replies to the customer", sum(self.duplicate_sends.values())),
            ("batches", self.batches),
            ("inbound records beyond one per event (deduped)", self.inbound_copies),
            ("refused or failed webhooks that reached Kafka anyway", self.late_accepted),
            ("batches generated more than once by OpenAI", self.regenerated),
            ("batches whose AssistantReply was republished", self.republished),
            ("dead-letter reasons", dict(self.dead_reasons) or "-"),
        ]


def judge(hooks: list[Webhook], ledger: Ledger, standins: StandIns) -> Verdict:
    v = Verdict(sent=len(hooks))
    for hook in hooks:
        for attempt in hook.attempts:
            v.attempts += 1
            v.statuses[str(attempt.status) if attempt.status is not None else str(attempt.error)] += 1
    accepted = [h for h in hooks if h.accepted]
    v.accepted = len(accepted)
    v.batches = len(ledger.batches)
    v.inbound_copies = sum(n - 1 for n in ledger.inbound.values() if n > 1)
    v.late_accepted = sum(1 for h in hooks if not h.accepted and h.event_id in ledger.inbound)
    sends = collections.Counter(s.local_message_id for s in standins.wati.sent if s.local_message_id)
    part_of = {local_message_id(b, i): f"{b}#{i}" for b in ledger.batches for i in range(4)}
    v.duplicate_sends = {part_of.get(lmid, lmid): n - 1 for lmid, n in sends.items() if n > 1}
    prompts: dict[str, list[str]] = collections.defaultdict(list)  # batch id → inputs of its generations
    # OpenAI sees a batch by its pseudonymous reference (no phone number): map it back
    batch_of_reference = {batch_reference(b, b.rpartition(":")[0]): b for b in ledger.batches}
    for r in standins.openai.responses.values():
        if r.conversation_id:  # a reply (vision's classifications run outside any conversation)
            reference = str((r.request.get("metadata") or {}).get("batch"))
            prompts[batch_of_reference.get(reference, reference)].append(str(r.request.get("input")))
    v.regenerated = sum(1 for inputs in prompts.values() if len(inputs) > 1)
    v.republished = sum(1 for outcomes in ledger.replies.values() if len(outcomes) > 1)
    for record in ledger.dead:
        v.dead_reasons[f"{record['service']}:{record['reason']}"] += 1
    for hook in accepted:
        batches = ledger.event_batches.get(hook.event_id, set())
        if len(batches) > 1:
            v.in_several_batches[hook.event_id] = sorted(batches)
            continue
        batch = next(iter(batches), None)
        if batch is not None and "answered" in ledger.replies.get(batch, []):
            v.answered += 1
            if local_message_id(batch, 0) not in sends:
                v.not_received.append(batch)
            if not any(hook.marker in prompt for prompt in prompts.get(batch, [])):
                v.not_in_prompt.append(hook.event_id)
        elif hook.event_id in ledger.dead_events or (batch is not None and batch in ledger.dead_batches):
            v.dead_lettered += 1
        else:
            v.lost.append(hook.event_id)
    return v


def assert_exactly_once(v: Verdict, log: Path) -> None:
    tail = log.read_text(errors="replace")[-6000:] if log.exists() else ""
    assert not v.lost, f"accepted but neither answered nor dead-lettered: {v.lost[:10]}\n{tail}"
    several = list(v.in_several_batches.items())[:5]
    assert not v.in_several_batches, f"accepted events in several batches: {several}"
    assert not v.duplicate_sends, f"replies sent to the customer twice: {v.duplicate_sends}"
    assert not v.not_received, f"batches answered but never sent through WATI: {v.not_received[:10]}"
    assert not v.not_in_prompt, f"answered without the message in the model's input: {v.not_in_prompt[:10]}"
    assert v.answered + v.dead_lettered == v.accepted


def table(title: str, rows: list[tuple[str, object]]) -> str:
    width = max(len(k) for k, _ in rows)
    lines = [title, "-" * len(title)] + [f"{k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)


# -------------------------------------------------------------------------------- the stack

def register_media(standins: StandIns, hooks: list[Webhook]) -> None:
    for hook in hooks:
        if hook.media:
            standins.wati.add_media(hook.media, scenario.PNG_1X1, "image/png")


def current(stack: DevStack, name: str) -> Child:
    """The newest child of that service (killed ones stay in the list)."""
    assert stack.supervisor is not None
    return [c for c in stack.supervisor.children if c.name == name][-1]


async def wait_ready(stack: DevStack, name: str, child: Child, timeout: float, log: Path) -> float:
    """Polls the service's /readyz until 200; seconds waited. Fails if the child exits."""
    return await wait_url_ready(stack.health_urls()[name], name, child, timeout, log)


async def wait_url_ready(url: str, name: str, child: Child, timeout: float, log: Path) -> float:
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=2.0) as client:
        while True:
            assert child.process is not None
            if child.process.returncode is not None:
                pytest.fail(f"{name} exited with {child.process.returncode}:\n{log.read_text()[-5000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(url)).status_code == 200:
                    return time.monotonic() - started
            if time.monotonic() - started > timeout:
                pytest.fail(f"{name} not ready {timeout:.0f} s after its restart:\n{log.read_text()[-5000:]}")
            await asyncio.sleep(0.2)


async def settle(ledger: Ledger, standins: StandIns, event_ids: list[str], timeout: float) -> float | None:
    """Waits until every event is accounted for, then until nothing new arrives for 3 s (late
    duplicates would show up then); returns when the accounting was complete (monotonic), or None
    when it was not complete within `timeout`."""
    deadline = time.monotonic() + timeout
    while not ledger.settled(event_ids):
        if time.monotonic() > deadline:
            return None
        await asyncio.sleep(0.2)
    complete = time.monotonic()
    last_sends = len(standins.wati.sent)
    quiet_since = time.monotonic()
    while time.monotonic() - max(quiet_since, ledger.last_record_at) < 3.0 and time.monotonic() < deadline:
        if len(standins.wati.sent) != last_sends:
            last_sends, quiet_since = len(standins.wati.sent), time.monotonic()
        await asyncio.sleep(0.2)
    return complete


def _seconds(at: float | None, since: float) -> str:
    return "not within the deadline" if at is None else f"{at - since:.1f}"


# -------------------------------------------------------------------------------- drill 1

@dataclass
class Kill:
    service: str
    at: float  # seconds since the load started
    pid: int
    recovered_after: float = float("nan")  # kill → /readyz 200 of the new process
    killed_at: float = 0.0  # monotonic, the stand-ins' clock for responses


async def chaos(
    stack: DevStack, plan: list[tuple[float, str]], started: float, log: Path, kills: list[Kill],
) -> None:
    """SIGKILLs each planned service at its time (or as soon as the previous one recovered),
    restarts it through the supervisor and waits until the new process is ready."""
    assert stack.supervisor is not None
    for at, name in plan:
        pause = started + at - time.monotonic()
        if pause > 0:
            await asyncio.sleep(pause)  # the chaos schedule itself
        victim = current(stack, name)
        assert victim.process is not None and victim.process.returncode is None
        kill = Kill(name, time.monotonic() - started, victim.process.pid)
        kills.append(kill)
        killed_at = kill.killed_at = time.monotonic()
        victim.process.kill()
        await victim.process.wait()
        replacement = await stack.supervisor.start(name, name)
        await wait_ready(stack, name, replacement, RECOVERY_TIMEOUT, log)
        kill.recovered_after = time.monotonic() - killed_at
        stack.supervisor.say(f"chaos: {name} (pid {kill.pid}) killed at {kill.at:.1f} s, "
                             f"ready again after {kill.recovered_after:.1f} s")


def kill_plan(rng: random.Random, window: tuple[float, float], extra: int) -> list[tuple[float, str]]:
    """Every service once (random order) plus `extra` random ones, at random times in `window`."""
    names = list(SERVICES)
    rng.shuffle(names)
    names += [rng.choice(SERVICES) for _ in range(extra)]
    times = sorted(rng.uniform(*window) for _ in names)
    return list(zip(times, names, strict=True))


@dataclass
class DrillResult:
    verdict: Verdict
    rows: list[tuple[str, object]]
    kills: list[Kill]
    accounted: bool
    log: Path


async def sigkill_drill(
    settings: Settings, standins: StandIns, tmp: Path, rng: random.Random, *, rate: float,
    max_count: int, customers: int, plan: list[tuple[float, str]], min_seconds: float = 24.0,
) -> DrillResult:
    """Runs the stack, the load and the kill plan; returns the figures (the caller asserts).

    The load lasts at least `min_seconds` and goes on until the last victim is ready again plus 4 s
    (at most `max_count` webhooks)."""
    hooks = plan_load(rng, count=max_count, rate=rate, customers=customers)
    register_media(standins, hooks)
    cfg = chaos_settings(settings, standins, tmp)
    log = tmp / "stack.log"
    kills: list[Kill] = []
    with open(log, "w") as out:
        async with DevStack(cfg, out=out) as stack, Ledger(cfg) as ledger:
            started = time.monotonic()
            chaos_task = asyncio.create_task(chaos(stack, plan, started, log, kills))
            done_at: list[float] = []
            chaos_task.add_done_callback(lambda _: done_at.append(time.monotonic()))

            def enough() -> bool:
                now = time.monotonic()
                return bool(done_at) and now - done_at[0] > 4.0 and now - started >= min_seconds

            sent = await run_load(stack.ingest_url, cfg.webhook_token, hooks, stop=enough)
            await chaos_task
            load_seconds = time.monotonic() - started
            accepted = [h.event_id for h in sent if h.accepted]
            complete = await settle(ledger, standins, accepted, SETTLE_TIMEOUT)
            verdict = judge(sent, ledger, standins)
    by_service: dict[str, list[float]] = collections.defaultdict(list)
    for k in kills:
        by_service[k.service].append(k.recovered_after)
    rows = [
        *verdict.rows(),
        ("load duration (s)", f"{load_seconds:.1f} at {rate:g}/s, {len({h.wa_id for h in sent})} customers"),
        ("all accounted after the load (s)", _seconds(complete, started + load_seconds)),
        ("SIGKILLs (service @ s since start)", ", ".join(f"{k.service} @{k.at:.0f}" for k in kills)),
        ("recovery, kill → /readyz 200 (s)",
         "; ".join(f"{name} {', '.join(f'{t:.1f}' for t in times)}" for name, times in by_service.items())),
    ]
    return DrillResult(verdict, rows, kills, complete is not None, log)


async def test_sigkill_under_load_loses_nothing_and_answers_once(
    settings: Settings, standins: StandIns, tmp_path: Path
) -> None:
    seed, rng = seeded_rng("SIGKILL drill")
    plan = kill_plan(rng, (2.0, 20.0), extra=1)
    result = await sigkill_drill(settings, standins, tmp_path, rng, rate=6.0, max_count=360, customers=40,
                                 plan=plan)
    print(table(f"SIGKILL drill, seed {seed}", result.rows))
    assert {k.service for k in result.kills} == set(SERVICES), "every service was killed at least once"
    assert result.accounted, f"not every accepted webhook was accounted for in {SETTLE_TIMEOUT:.0f} s"
    verdict = result.verdict
    assert verdict.accepted >= 0.9 * verdict.sent, "the retries should get almost every webhook accepted"
    assert_exactly_once(verdict, result.log)
    bad = {k: n for k, n in verdict.statuses.items() if k.isdigit() and k not in ("200", "503")}
    assert not bad, f"ingest answered {bad}: only 200, or 503 while it cannot store, are acceptable"


# -------------------------------------------------------------------------------- drill 2

async def test_broker_outage_under_load(
    settings: Settings, standins: StandIns, tmp_path: Path, broker_factory: type[EmbeddedKafka],
) -> None:
    seed, rng = seeded_rng("broker outage drill")
    broker = broker_factory(port=free_port(), partitions=settings.topic_partitions)  # type: ignore[call-arg]
    bootstrap = await asyncio.to_thread(broker.start)
    bound = 2.0
    cfg = chaos_settings(settings, standins, tmp_path, kafka_bootstrap_servers=bootstrap,
                         produce_timeout_seconds=bound)
    rate = 3.0
    hooks = plan_load(rng, count=240, rate=rate, customers=20)  # ≤ 80 s of load
    register_media(standins, hooks)
    log = tmp_path / "stack.log"
    outage: dict[str, float] = {}
    with open(log, "w") as out:
        async with DevStack(cfg, out=out) as stack, Ledger(cfg) as ledger:
            assert stack.supervisor is not None
            pids = {c.name: c.process.pid for c in stack.supervisor.children if c.process}
            started = time.monotonic()

            def enough() -> bool:  # 6 s of load after the broker is back
                return "back" in outage and time.monotonic() - outage["back"] > 6.0

            load = asyncio.create_task(run_load(stack.ingest_url, cfg.webhook_token, hooks, stop=enough))
            await asyncio.sleep(rng.uniform(3.0, 5.0))  # load before the outage (scripted)
            outage["down"] = time.monotonic()
            await asyncio.to_thread(broker.kill)
            stack.supervisor.say("drill: broker SIGKILLed")
            # the outage itself (scripted); the broker's own restart (log recovery) adds ~13 s
            await asyncio.sleep(rng.uniform(2.0, 4.0))
            outage["restart"] = time.monotonic()
            await asyncio.to_thread(broker.start)  # same data directory, same ports
            outage["back"] = time.monotonic()
            stack.supervisor.say(f"drill: broker back after {outage['back'] - outage['down']:.1f} s")
            sent = await load
            accepted = [h.event_id for h in sent if h.accepted]
            complete = await settle(ledger, standins, accepted, SETTLE_TIMEOUT)
            verdict = judge(sent, ledger, standins)
            # the workers reconnected on their own: same processes, all ready again
            children = stack.supervisor.children
            now_pids = {c.name: c.process.pid for c in children if c.process and c.process.returncode is None}
            for child in children:
                await wait_ready(stack, child.name, child, RECOVERY_TIMEOUT, log)
    attempts = [a for h in sent for a in h.attempts]
    during = [a for a in attempts if outage["down"] <= a.sent_at <= outage["back"]]
    refused = [a for a in attempts if a.status == 503]
    first_200 = min((a.ended_at for a in attempts if a.status == 200 and a.sent_at >= outage["down"]),
                    default=float("nan"))
    down = outage["back"] - outage["down"]
    rows = [
        *verdict.rows(),
        ("load duration (s)", f"{max(a.ended_at for a in attempts) - started:.1f} at {rate:g}/s"),
        ("broker down (kill → start() returned, s)",
         f"{down:.1f} (its restart took {outage['back'] - outage['restart']:.1f})"),
        ("requests during the outage", len(during)),
        ("  of which 503", sum(1 for a in during if a.status == 503)),
        ("503 answers in total", len(refused)),
        ("max 503 latency (s)", f"{max((a.took for a in refused), default=0):.2f} (bound {bound:g} + 1)"),
        ("max latency of any answer (s)", f"{max(a.took for a in attempts):.2f}"),
        ("first 200 after the broker is back (s)", f"{first_200 - outage['back']:+.1f}"),
        ("all backlog answered after the broker is back (s)", _seconds(complete, outage["back"])),
        ("worker restarts", sum(1 for name, pid in pids.items() if now_pids.get(name) != pid)),
    ]
    print(table(f"broker outage drill, seed {seed}", rows))
    assert complete is not None, f"not every accepted webhook was accounted for in {SETTLE_TIMEOUT:.0f} s"
    assert now_pids == pids and len(children) == len(SERVICES), "a worker died or was restarted"
    assert during and any(a.status == 503 for a in during), "the load must have hit the outage"
    errors = [a for a in attempts if a.status is None]
    assert not errors, f"ingest must always answer: {collections.Counter(a.error for a in errors)}"
    bad = {k: n for k, n in verdict.statuses.items() if k not in ("200", "503")}
    assert not bad, f"ingest answered {bad}: only 200, or 503 while the broker is away"
    slow = [(a.status, round(a.took, 2)) for a in attempts if a.took > bound + 1.0]
    assert not slow, f"answers slower than PRODUCE_TIMEOUT_SECONDS + 1 s: {slow}"
    assert any(a.status == 200 and a.sent_at > outage["back"] for a in attempts), "ingest accepts again"
    assert_exactly_once(verdict, log)


# -------------------------------------------------------------------------------- drill 1, narrowed

def one_batch(customer: str, text: str) -> dict[str, Any]:
    """A ResponderRequest as the context service emits it: one text message, no missed context."""
    now = datetime.now(UTC)
    message: dict[str, Any] = {
        "event_id": f"wamid.WINDOW{random.randrange(10**9)}", "customer_key": f"wati:{customer}",
        "channel": "wati", "provider_id": customer, "message_type": "text", "text": text, "caption": None,
        "media_ref": None, "media_mime": None, "sender_name": "Cliente", "provider_message_ids": [],
        "provider_time": now, "received_at": now, "recovered": False, "username": None,
    }
    return {
        "batch_id": f"wati:{customer}:1", "customer_key": f"wati:{customer}", "channel": "wati",
        "provider_id": customer, "messages": [message], "prior_last_inbound_at": None,
        "prior_last_reply_at": None, "gap_seconds": None, "missed_check_ran": False,
        "missed_messages": [], "missed_dropped_oldest": 0, "images": [], "created_at": now,
    }


async def test_sigkill_after_whatsapp_accepted_the_reply_does_not_send_it_twice(
    settings: Settings, standins: StandIns, tmp_path: Path
) -> None:
    """Drill 1's narrowest window, made deterministic: WATI has the reply, but the responder is
    SIGKILLed before it recorded `sent` (its send call is still waiting for WATI's answer). The
    restarted responder must find the reply in WATI's history by its localMessageId and not send it
    again. (Found by `python -m bench.chaos --services responder`: 37 duplicate replies in 18 kills.)"""
    cfg = chaos_settings(settings, standins, tmp_path, topic_prefix=unique_prefix("chaos-send-window"))
    await ensure_topics(cfg)
    customer = "50391234567"
    request = one_batch(customer, "[window] ¿a qué hora abren?")
    batch_id = request["batch_id"]
    log = tmp_path / "responder.log"
    url = f"http://127.0.0.1:{cfg.responder_web_port}/readyz"
    standins.wati.latency = 2.0  # WATI takes its time to answer the send: the kill lands in between
    producer = make_producer(cfg)
    with open(log, "w") as out:
        supervisor = Supervisor({**os.environ, **_settings_env(cfg)}, out=out)
        try:
            async with Ledger(cfg) as ledger:
                first = await supervisor.start("responder", "responder")
                await wait_url_ready(url, "responder", first, RECOVERY_TIMEOUT, log)
                await producer.start()
                await producer.send_and_wait(Topics.from_settings(cfg).responder_requests,
                                             codec.encode("ResponderRequest", request),
                                             key=request["customer_key"].encode())
                await scenario.wait_for(
                    lambda: any("sendSessionMessage" in r.path for r in standins.wati.requests),
                    60, "the responder's send to WATI")
                assert first.process is not None
                first.process.kill()  # WATI is still working on the send
                await first.process.wait()
                await scenario.wait_for(lambda: bool(standins.wati.sent), 30, "WATI to accept the send")
                assert batch_id not in ledger.replies, "killed before the reply was recorded"
                second = await supervisor.start("responder", "responder")
                await wait_url_ready(url, "responder", second, RECOVERY_TIMEOUT, log)
                await scenario.wait_for(lambda: batch_id in ledger.replies, 60, "the AssistantReply")
                sends = [s for s in standins.wati.sent if s.local_message_id == local_message_id(batch_id, 0)]
                print(f"\nsend window drill: {len(sends)} send(s) of the reply, "
                      f"{len(standins.openai.responses)} generation(s), outcome {ledger.replies[batch_id]}")
                assert ledger.replies[batch_id] == ["answered"]
                assert len(sends) == 1, f"the reply reached the customer {len(sends)} times"
                assert len(standins.openai.responses) == 1, "the stored answer was sent, not a new one"
        finally:
            await supervisor.stop()
            await producer.stop()


async def test_a_resumed_send_skips_exactly_the_parts_wati_already_has(standins: StandIns) -> None:
    """The fix's unit behaviour (no processes): parts found in WATI's history by their
    localMessageId are not sent again, the others are; a failing lookup sends everything (a possible
    duplicate rather than no answer); a first send never asks the history."""
    text = "\n\n".join(f"parte {i} " + "x" * 3000 for i in range(3))  # three WATI parts
    contact, batch = "50391230000", "wati:50391230000:7"
    wati = WatiClient(standins.wati_url, standins.wati.token)
    sender = ChannelSender(wati, None, base_delay=0.01)
    try:
        parts = split_message(text, limit_for("wati"))
        assert len(parts) == 3
        # before the crash: part 0 reached WATI, then the responder died
        await wati.send_session_message(contact, parts[0], local_message_id=local_message_id(batch, 0))
        first_ids = [standins.wati.sent[0].message_id, standins.wati.sent[0].whatsapp_message_id]
        sent = await sender.send("wati", contact, text, batch, resume=True)
        assert sent.parts == parts
        assert all(i in sent.ids for i in first_ids), "the delivered part's ids are reported"
        by_part = collections.Counter(s.local_message_id for s in standins.wati.sent)
        assert [by_part[local_message_id(batch, i)] for i in range(3)] == [1, 1, 1]
        # everything delivered: a second resume sends nothing at all
        await sender.send("wati", contact, text, batch, resume=True)
        assert len(standins.wati.sent) == 3
        # the history cannot be read: send anyway (at-least-once)
        standins.wati.fail_next("getMessages", 500)
        await sender.send("wati", contact, "otra respuesta", "wati:50391230000:8", resume=True)
        assert standins.wati.sent[-1].local_message_id == local_message_id("wati:50391230000:8", 0)
        # not a resume: no history lookup
        lookups = sum(1 for r in standins.wati.requests if "getMessages" in r.path)
        await sender.send("wati", contact, "y otra", "wati:50391230000:9")
        assert sum(1 for r in standins.wati.requests if "getMessages" in r.path) == lookups
    finally:
        await sender.aclose()
