"""Benchmark 4 — cost per conversation: OpenAI calls, WATI history fetches and input tokens.

The whole stack runs (ingest, context, responder as real processes; WATI and OpenAI stand-ins in
the bench process) on a compressed clock: quiet window 1 s, gap threshold MISSED_GAP_SECONDS, human
hold 2 s. A seeded "day" of traffic: every customer has 2-4 sessions; a session is a burst of 1-4
messages 0.3 s apart (each also written to the WATI stand-in's history, as WATI would), then the
customer waits for the bot's answer; between sessions either a short pause (a follow-up, below
the gap threshold) or a long one (a gap), during which, for most gaps, a human agent and the
customer talk in WATI's inbox (history items only: WATI sends the bot nothing about them).

Measured: OpenAI reply calls (the stand-in's records), getMessages calls (the WATI stand-in's
requests) and input tokens per call (the stand-in's `usage`). The old design is computed on the
same traffic (the messages and gaps as they were sent), with the same token formula as the
stand-in (characters / 4 per text part + 4 per item) — see `old_design`.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp

from services.common.kafka import ensure_topics
from services.devtools.scenario import developer_text
from services.responder.prompt import build_input
from services.standins import StandIns
from services.standins.openai import _item_tokens, _normalize_item, approx_tokens, default_reply

from .common import WEBHOOK_TOKEN, BenchEnv, ServiceProcess, figure, plain_request, wati_text_message
from .loadgen import wa_id_of, webhook_body

_TAG = re.compile(r"\[c(\d+) s(\d+) m\d+\]")
QUIET = 1.0
HOLD = 2.0
PHRASES = [
    "Hola, buenas tardes",
    "Quisiera información sobre las habitaciones",
    "¿Tienen disponibilidad para el sábado?",
    "Somos dos adultos y un niño",
    "¿El desayuno está incluido?",
    "¿Cuánto cuesta la noche?",
    "Gracias",
    "¿Aceptan tarjeta de crédito?",
    "Perfecto, quiero reservar",
    "¿A qué hora es el check-in?",
    "Ya hice la transferencia",
    "¿Tienen estacionamiento?",
    "Ok",
    "¿Se puede llevar mascota?",
]
AGENT_LINES = [
    "Hola, soy Ana del equipo de reservas. ¿En qué le ayudo?",
    "Sí, tenemos una habitación doble disponible.",
    "El precio incluye desayuno buffet.",
    "Le envío el enlace de pago por aquí.",
]


@dataclass
class Burst:
    """One burst as the script sent it."""

    customer: int
    number: int
    texts: list[str]
    first_at: datetime
    last_at: datetime
    gap_seconds: float | None  # since the customer's previous message (None: first contact)
    agent_items: int = 0  # human-agent conversation items placed in the history before it
    answered: bool = False


@dataclass
class Day:
    bursts: list[Burst] = field(default_factory=list)

    def messages(self) -> int:
        return sum(len(b.texts) for b in self.bursts)


async def _customer(
    c: int,
    rng: random.Random,
    standins: StandIns,
    session: aiohttp.ClientSession,
    url: str,
    day: Day,
    start_delay: float,
    gap_seconds: float,
    max_sessions: int,
) -> None:
    """Plays one customer's day; waits for the bot's answer after each burst (like a person)."""
    await asyncio.sleep(start_delay)
    wa_id = wa_id_of(c)
    wati = standins.wati
    previous: datetime | None = None
    sessions = rng.randint(2, max_sessions)
    for number in range(sessions):
        agent_items = 0
        if number > 0:
            long_pause = rng.random() < 0.5
            if long_pause and rng.random() < 0.7:  # a human agent talks with the customer in the inbox
                await asyncio.sleep(0.5)
                for k in range(rng.randint(1, 3)):
                    at = datetime.now(UTC)
                    if k % 2 == 0:
                        wati.add_message(
                            wa_id,
                            text=rng.choice(AGENT_LINES),
                            owner=True,
                            operator_name="Ana Reservas",
                            at=at,
                        )
                    else:
                        wati.add_message(wa_id, text=rng.choice(PHRASES), owner=False, at=at)
                    agent_items += 1
                    await asyncio.sleep(0.3)
            pause = gap_seconds + rng.uniform(1.0, 2.0) if long_pause else rng.uniform(0.5, 1.0)
            await asyncio.sleep(pause)
        # each message carries a short tag, so a request can be traced to its burst (both designs pay it)
        texts = [f"{rng.choice(PHRASES)} [c{c} s{number} m{i}]" for i in range(rng.choice([1, 1, 2, 3, 4]))]
        sent_before = sum(1 for s in wati.sent if s.contact_id == wa_id)
        first_at = datetime.now(UTC)
        last_at = first_at
        for i, text in enumerate(texts):
            if i:
                await asyncio.sleep(0.3)
            body = webhook_body(wa_id, text)
            wati.add_history(wa_id, json.loads(body))  # WATI's history has every message too
            last_at = datetime.now(UTC)
            async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as answer:
                if answer.status != 200:
                    raise RuntimeError(f"ingest answered {answer.status}: {await answer.text()}")
        gap = None if previous is None else (first_at - previous).total_seconds()
        burst = Burst(c, number, texts, first_at, last_at, gap, agent_items)
        day.bursts.append(burst)
        previous = last_at
        deadline = time.monotonic() + 45.0
        while sum(1 for s in wati.sent if s.contact_id == wa_id) <= sent_before:
            if time.monotonic() > deadline:
                break  # counted as unanswered
            await asyncio.sleep(0.1)
        else:
            burst.answered = True


def old_design(
    day: Day, blocks: dict[tuple[int, int], str], instructions: str, locale: str, gap_seconds: float
) -> dict[str, float]:
    """What the old design would have spent on the same traffic (a model, stated in BENCHMARKS.md).

    One Responses call per customer message, in the customer's conversation (input = the conversation
    so far + the message, plus the missed-message block for every message of a burst after a gap);
    one getMessages call per message of a burst after a gap (each call ran its own check; first
    contacts were never checked). Tokens with the stand-in's formula; answers are the stand-in's.
    """
    calls = fetches = 0
    tokens: list[int] = []
    by_customer: dict[int, list[Burst]] = {}
    for burst in day.bursts:
        by_customer.setdefault(burst.customer, []).append(burst)
    for customer, bursts in by_customer.items():
        prefix: list[dict[str, Any]] = []
        for burst in sorted(bursts, key=lambda b: b.number):
            after_gap = burst.gap_seconds is not None and burst.gap_seconds > gap_seconds
            block = blocks.get((customer, burst.number))
            for text in burst.texts:
                calls += 1
                fetches += 1 if after_gap else 0
                request = _single_message_request(customer, text)
                items = build_input(request, locale)  # the same formatting as the responder's
                if after_gap and block:
                    items.insert(0, {"role": "developer", "content": [{"type": "input_text", "text": block}]})
                normalized = [_normalize_item(i, "input", {}) for i in items]
                tokens.append(_input_tokens(instructions, prefix + normalized))
                reply = default_reply({"input": items})
                prefix += [
                    *normalized,
                    _normalize_item({"role": "assistant", "content": reply}, "output", {}),
                ]
    return {
        "calls": calls,
        "fetches": fetches,
        "input_tokens": sum(tokens),
        "input_tokens_per_call": sum(tokens) / len(tokens) if tokens else 0.0,
    }


def _input_tokens(instructions: str, effective: list[dict[str, Any]]) -> int:
    return approx_tokens(instructions) + sum(_item_tokens(i) for i in effective)


def _single_message_request(customer: int, text: str) -> Any:
    now = datetime.now(UTC)
    wa_id = wa_id_of(customer)
    return plain_request("model", [wati_text_message(wa_id, "model", text, now)], now)


def _modelled_new(records: list[Any]) -> int:
    """The stand-in's formula replayed over the calls actually made (checks the model's arithmetic)."""
    total = 0
    prefixes: dict[str, list[dict[str, Any]]] = {}
    for record in sorted(records, key=lambda r: r.started):
        prefix = prefixes.setdefault(str(record.conversation_id), [])
        items = [_normalize_item(i, "input", {}) for i in record.request.get("input") or []]
        total += _input_tokens(str(record.request.get("instructions") or ""), prefix + items)
        prefix += [
            *items,
            _normalize_item({"role": "assistant", "content": record.output_text}, "output", {}),
        ]
    return total


async def run(bench: BenchEnv) -> dict[str, Any]:
    scale = bench.scale
    gap_seconds = scale.cost_gap_seconds
    rng = random.Random(20251004)
    day = Day()
    async with StandIns.running() as standins:
        settings = bench.settings(
            "cost",
            quiet_window_seconds=QUIET,
            flush_scan_interval_seconds=0.25,
            missed_gap_seconds=gap_seconds,
            human_hold_seconds=HOLD,
            max_batch_wait_seconds=30.0,
            wati_api_url=standins.wati_url,
            wati_api_token=standins.wati.token,
            openai_base_url=standins.openai_url,
            openai_api_key=standins.openai.api_key,
        )
        await ensure_topics(settings)
        services = [
            ServiceProcess.watistream(bench, name, settings, tag="-cost")
            for name in ("ingest", "context", "responder")
        ]
        for service in services:
            service.start()
        try:
            ports = {
                "ingest": settings.ingest_port,
                "context": settings.context_web_port,
                "responder": settings.responder_web_port,
            }
            for service in services:
                await service.wait_ready(
                    f"http://127.0.0.1:{ports[service.name.removesuffix('-cost')]}/readyz"
                )
            started = time.monotonic()
            url = f"http://127.0.0.1:{settings.ingest_port}/webhooks/wati"
            async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {WEBHOOK_TOKEN}"}) as session:
                await asyncio.gather(
                    *(
                        _customer(
                            c,
                            random.Random(rng.random()),
                            standins,
                            session,
                            url,
                            day,
                            rng.uniform(0, 2.0),
                            gap_seconds,
                            scale.cost_max_sessions,
                        )
                        for c in range(scale.cost_customers)
                    )
                )
            day_seconds = time.monotonic() - started
        finally:
            for service in services:
                service.stop()
        calls = [r for r in standins.openai.responses.values() if r.conversation_id]
        getmessages = [r for r in standins.wati.requests if "/getMessages/" in r.path]
    messages = day.messages()
    gaps = [b for b in day.bursts if b.gap_seconds is not None and b.gap_seconds > gap_seconds]
    first = [b for b in day.bursts if b.gap_seconds is None]
    checks = len(gaps) + len(first)
    usage = [int(r.response["usage"]["input_tokens"]) for r in calls]
    blocks = _blocks_by_burst(calls)
    instructions = str(calls[0].request.get("instructions") or "") if calls else ""
    old = old_design(day, blocks, instructions, settings.prompt_locale, gap_seconds)
    modelled_new = _modelled_new(calls)
    new_per_message = len(calls) / messages if messages else None
    new_tokens = sum(usage)
    figures = [
        figure(
            "OpenAI calls per customer message",
            new_per_message,
            "",
            baseline=old["calls"] / messages,
            note=f"{len(calls)} calls for {messages} messages in {len(day.bursts)} bursts "
            f"({sum(1 for b in day.bursts if b.answered)} answered); old design: one per message",
        ),
        figure(
            "getMessages calls per gap (incl. first contact)",
            len(getmessages) / checks if checks else None,
            "",
            baseline=old["fetches"] / len(gaps) if gaps else None,
            note=f"{len(getmessages)} calls for {len(gaps)} gaps + {len(first)} first contacts; old design: "
            f"{old['fetches']} (one per message after a gap, none on first contact)",
        ),
        figure(
            "input tokens per OpenAI call",
            new_tokens / len(usage) if usage else None,
            "tokens",
            baseline=old["input_tokens_per_call"],
        ),
        figure(
            "input tokens, whole day",
            float(new_tokens),
            "tokens",
            baseline=float(old["input_tokens"]),
            note=f"the old design is modelled; the same model replayed over the calls actually made gives "
            f"{modelled_new} vs {new_tokens} measured",
        ),
    ]
    return {
        "name": "cost",
        "title": "4. Cost per conversation",
        "figures": figures,
        "details": {
            "customers": scale.cost_customers,
            "messages": messages,
            "bursts": len(day.bursts),
            "gaps": len(gaps),
            "first_contacts": len(first),
            "bursts_with_agent_conversation": sum(1 for b in day.bursts if b.agent_items),
            "unanswered_bursts": sum(1 for b in day.bursts if not b.answered),
            "openai_reply_calls": len(calls),
            "getmessages_calls": len(getmessages),
            "input_tokens": new_tokens,
            "modelled_new_input_tokens": modelled_new,
            "calls_with_missed_block": sum(1 for r in calls if developer_text(r)),
            "old_design": old,
            "day_seconds": day_seconds,
            "settings": {
                "quiet_window_seconds": QUIET,
                "missed_gap_seconds": gap_seconds,
                "human_hold_seconds": HOLD,
            },
        },
    }


def _blocks_by_burst(calls: list[Any]) -> dict[tuple[int, int], str]:
    """The missed-message block the product sent with each burst (bursts are tagged `[c<n> s<k> m<i>]`)."""
    blocks: dict[tuple[int, int], str] = {}
    for record in calls:
        block = developer_text(record)
        if not block:
            continue
        user = json.dumps(record.request.get("input"), ensure_ascii=False)
        for customer, number in set(_TAG.findall(user)):
            blocks.setdefault((int(customer), int(number)), block)
    return blocks
