"""End to end, the real processes: a contact known only by BSUID, an agent seen by both sources.

A WhatsApp-username contact (no phone number: `message_bsuid` webhooks, `waId` absent) is keyed,
answered and has its history fetched by BSUID. A human agent writes in the inbox; WATI reports it
in real time (`sessionMessageSent_v2_bsuid`) AND getMessages lists it: the bot steps aside while
the agent is active, and when the hold ends it answers what nobody answered by itself, with the
agent's words exactly once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.common.broker import free_port
from services.common.config import Settings
from services.devtools import scenario
from services.devtools.dev import DevStack
from services.standins import StandIns
from services.standins.wati import object_id, wamid

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

BSUID = "US.1231241415120077"
AGENT_TEXT = "Hola, soy Marta. Tu pedido sale mañana a primera hora."
GAP, HOLD = 6.0, 4.0


def bsuid_webhook(event_type: str, text: str, at: datetime, **extra: Any) -> dict[str, Any]:
    """A BSUID-first WATI payload: `bsuid` always present, no `waId` (docs/wati.md)."""
    payload = {
        "eventType": event_type, "id": object_id(), "whatsappMessageId": wamid(),
        "created": at.strftime("%Y-%m-%dT%H:%M:%S.%f") + "0Z", "timestamp": str(int(at.timestamp())),
        "conversationId": "c1", "ticketId": "t1", "text": text, "type": "text", "data": None,
        "owner": event_type.startswith("sessionMessageSent"), "statusString": "SENT",
        "bsuid": BSUID, "parentBsuid": "US.ENT.1234567", "username": "@bob", "channelPhoneNumber": "1",
    }
    payload.update(extra)
    return payload


@pytest.fixture
async def stack(settings: Settings, tmp_path: Path) -> AsyncIterator[tuple[DevStack, StandIns]]:
    async with StandIns.running() as standins:
        env = standins.env()
        cfg = dataclasses.replace(
            settings,
            wati_api_url=env["WATI_API_URL"], wati_api_token=env["WATI_API_TOKEN"],
            manychat_api_url=env["MANYCHAT_API_URL"], manychat_api_token=env["MANYCHAT_API_TOKEN"],
            openai_base_url=env["OPENAI_BASE_URL"], openai_api_key=env["OPENAI_API_KEY"],
            ingest_port=free_port(), context_web_port=free_port(), responder_web_port=free_port(),
            vision_web_port=free_port(), console_port=free_port(), data_dir=str(tmp_path),
            quiet_window_seconds=1,
            flush_scan_interval_seconds=0.2, missed_gap_seconds=GAP, human_hold_seconds=HOLD,
            broker_session_timeout_seconds=10,
        )
        async with DevStack(cfg, out=io.StringIO()) as running:
            yield running, standins


async def test_bsuid_contact_answered_with_agent_context_once_after_the_hold(
    stack: tuple[DevStack, StandIns],
) -> None:
    dev, s = stack
    headers = {"Authorization": f"Bearer {dev.settings.webhook_token}"}
    sent_to = lambda: [m for m in s.wati.sent if m.contact_id == BSUID]  # noqa: E731
    async with httpx.AsyncClient(timeout=10) as http:

        async def post(payload: dict[str, Any], history: bool = True) -> None:
            if history:  # WATI's history has every message (keyed by the BSUID here)
                s.wati.add_history(BSUID, dict(payload, eventType="message"))
            answer = await http.post(f"{dev.ingest_url}/webhooks/wati", json=payload, headers=headers)
            assert answer.status_code == 200, answer.text

        # 1. First contact by BSUID: keyed, answered and sent by BSUID.
        first_at = datetime.now(UTC)
        await post(bsuid_webhook("message_bsuid", "Hola, ¿dónde está mi pedido?", first_at))
        await scenario.wait_for(lambda: len(sent_to()) == 1, 60, "the first answer")

        # 2. A human agent answers in the inbox: seen in real time AND in the history.
        agent_seen = time.monotonic()  # when the agent wrote (the webhook's time is this second)
        agent = bsuid_webhook("sessionMessageSent_v2_bsuid", AGENT_TEXT, datetime.now(UTC),
                              operatorName="Marta Soporte", operatorEmail="marta@example.com",
                              localMessageId="4f1c2d3e-0000-4000-8000-000000000001")
        await post(agent)

        # 3. Within the hold the bot stays silent (no OpenAI call, nothing sent).
        await post(bsuid_webhook("message_bsuid", "Gracias Marta", datetime.now(UTC)))
        calls_before = len(scenario.reply_requests(s))
        await asyncio.sleep(dev.settings.quiet_window_seconds + 1.5)  # the held batch's own window
        assert len(sent_to()) == 1 and len(scenario.reply_requests(s)) == calls_before

        # 4. Nobody answered "Gracias Marta": when the hold ends (HOLD after the agent's message),
        #    the bot answers it by itself — the customer need not write again — with the agent's
        #    message as context (once), and the answer goes to the BSUID.
        await scenario.wait_for(lambda: len(sent_to()) == 2, 60, "the answer when the hold ends")
        assert time.monotonic() >= agent_seen + HOLD

    last = scenario.reply_requests(s)[-1]
    block = scenario.developer_text(last)
    assert block.count(AGENT_TEXT) == 1, block
    assert "Marta Soporte" in block
    assert "Gracias Marta" not in block, "a held message is answered, not listed as missed"
    assert "Gracias Marta" in str(last.request["input"])
    assert len(scenario.reply_requests(s)) == 2, "one call per answered burst, none while held"
    fetched = [r for r in s.wati.requests if "getMessages" in r.path]
    assert fetched and all(BSUID in r.path for r in fetched), "history fetched by BSUID"
