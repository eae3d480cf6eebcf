"""The scripted conversation of `watistream demo` and of the end-to-end test.

A customer writes a burst; the bot answers once. A human agent then talks with the customer in
WATI's inbox (the stand-in's history; WATI sends the bot no webhook for it). After the gap the
customer writes again: the bot's request must carry exactly that human conversation, in order,
without the bot's own message. Finally the customer sends a payment screenshot, which goes
through vision. Times run on a compressed clock (seconds instead of minutes): see COMPRESSED.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx

from services.standins import StandIns
from services.standins.wati import object_id, wamid

#: Settings of the compressed clock (env var → value) used by the demo and the e2e test.
COMPRESSED = {
    "QUIET_WINDOW_SECONDS": "2",
    "MAX_BATCH_WAIT_SECONDS": "10",
    "FLUSH_SCAN_INTERVAL_SECONDS": "0.25",
    "MISSED_GAP_SECONDS": "8",
    "HUMAN_HOLD_SECONDS": "4",
    "BROKER_SESSION_TIMEOUT_SECONDS": "10",
}
CUSTOMER = "50376000111"
CUSTOMER_NAME = "Valeria"
AGENT = "Ana Reservas"
FIRST_BURST = ["Hola", "Quiero reservar una habitación", "para 2 personas"]
INBOX = [  # (who, text) — what happened in WATI's inbox while the bot was not involved
    ("agent", "Hola Valeria, soy Ana del equipo de reservas. ¿Para qué fechas sería?"),
    ("customer", "Del 12 al 14 de diciembre"),
    ("agent", "Perfecto, tenemos una habitación doble con vista al mar disponible."),
]
SECOND_MESSAGE = "Genial, ¿cuánto cuesta por noche?"
IMAGE_CAPTION = "Ya hice el depósito"
IMAGE_FILE = "data/images/comprobante.png"
# A 1x1 PNG: enough for the vision pipeline's magic-byte check.
PNG_1X1 = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYGBgAAAABQABpfZFQAAAAABJRU5ErkJggg=="
)


@dataclass
class Transcript:
    lines: list[tuple[str, str]] = field(default_factory=list)
    context_blocks: list[str] = field(default_factory=list)

    def add(self, who: str, text: str) -> None:
        self.lines.append((who, text))

    def render(self) -> str:
        width = max((len(w) for w, _ in self.lines), default=8)
        return "\n".join(f"{who:>{width}} │ {text}" for who, text in self.lines)


def demo_reply(request: dict[str, Any]) -> str:
    """The OpenAI stand-in's answers in the demo: plausible, and visibly aware of the context."""
    text = str(request.get("input"))
    if "Ya hice el depósito" in text or "payment_proof" in text:
        return "¡Gracias, Valeria! Recibimos tu comprobante de pago; confirmamos la reserva en breve."
    if "cuánto cuesta" in text:
        if "12 al 14 de diciembre" in text:
            return ("La habitación doble con vista al mar que te ofreció Ana, del 12 al 14 de "
                    "diciembre, cuesta 120 USD por noche.")
        return "¿Para qué fechas te gustaría reservar?"
    return "¡Hola! Con gusto te ayudo con tu reserva. ¿Para cuántas noches?"


def wati_webhook(text: str, at: datetime, *, kind: str = "text", data: str | None = None) -> dict[str, Any]:
    """A customer-message webhook as WATI sends it (docs/wati.md)."""
    return {
        "id": object_id(), "created": at.strftime("%Y-%m-%dT%H:%M:%S.%f") + "0Z",
        "whatsappMessageId": wamid(), "conversationId": "demo-conversation", "ticketId": "demo-ticket",
        "text": text, "type": kind, "data": data, "sourceId": None, "sourceUrl": None,
        "timestamp": str(int(at.timestamp())), "owner": False, "eventType": "message",
        "statusString": "SENT", "avatarUrl": None, "assignedId": None, "operatorName": None,
        "operatorEmail": None, "waId": CUSTOMER, "messageContact": None, "senderName": CUSTOMER_NAME,
        "listReply": None, "interactiveButtonReply": None, "buttonReply": None, "replyContextId": "",
        "sourceType": 0, "frequentlyForwarded": False, "forwarded": False, "channelId": None,
        "channelPhoneNumber": "50322220000",
    }


async def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.1)


def reply_requests(standins: StandIns) -> list[Any]:
    """Responses made in a conversation (vision's classification calls have none)."""
    return [r for r in standins.openai.responses.values() if r.conversation_id]


def developer_text(record: Any) -> str:
    for item in record.request.get("input") or []:
        if isinstance(item, dict) and item.get("role") == "developer":
            content = item.get("content")
            if isinstance(content, str):
                return content
            return "".join(str(p.get("text", "")) for p in content or [] if isinstance(p, dict))
    return ""


async def play(
    standins: StandIns, ingest_url: str, webhook_token: str, *, gap_seconds: float = 8.0,
    hold_seconds: float = 4.0, timeout: float = 90.0, echo: Callable[[str, str], None] | None = None,
) -> Transcript:
    """Plays the scenario against a running stack; returns what happened."""
    transcript = Transcript()

    def note(who: str, text: str) -> None:
        transcript.add(who, text)
        if echo is not None:
            echo(who, text)

    standins.openai.reply_fn = demo_reply
    standins.openai.json_fn = lambda request, schema: {
        "category": "payment_proof", "confidence": 0.93, "description": "bank transfer receipt"}
    standins.wati.add_media(IMAGE_FILE, PNG_1X1, "image/png")
    wati = standins.wati

    async with httpx.AsyncClient(timeout=15.0) as client:

        async def customer_says(text: str, **kw: Any) -> datetime:
            at = datetime.now(UTC)
            payload = wati_webhook(text, at, **kw)
            wati.add_history(CUSTOMER, dict(payload))  # WATI's history has every message too
            answer = await client.post(
                f"{ingest_url}/webhooks/wati", json=payload,
                headers={"Authorization": f"Bearer {webhook_token}"},
            )
            answer.raise_for_status()
            note(f"{CUSTOMER_NAME} (WhatsApp)", text if kw.get("kind", "text") == "text"
                 else f"[{kw['kind']}: {kw.get('data')}] {text}")
            return at

        def bot_sent(count: int) -> bool:
            return len([s for s in wati.sent if s.contact_id == CUSTOMER]) >= count

        async def bot_answers(count: int) -> None:
            await wait_for(lambda: bot_sent(count), timeout, f"bot answer #{count}")
            note("bot", [s for s in wati.sent if s.contact_id == CUSTOMER][count - 1].text)

        # 1. A burst: three messages, one answer.
        first_at = datetime.now(UTC)
        for text in FIRST_BURST:
            await customer_says(text)
        await bot_answers(1)

        # 2. A human agent talks with the customer in WATI's inbox; the bot hears nothing of it.
        for who, text in INBOX:
            await asyncio.sleep(0.2)  # distinct timestamps, as in a real chat
            at = datetime.now(UTC)
            if who == "agent":
                wati.add_message(CUSTOMER, text=text, owner=True, operator_name=AGENT, at=at)
                note(f"{AGENT} (inbox)", text)
            else:
                wati.add_message(CUSTOMER, text=text, owner=False, at=at)
                note(f"{CUSTOMER_NAME} (inbox)", text)
        last_human_at = time.time()

        # 3. After the gap (compressed) and past the human hold, the customer writes again.
        wait_until = max(first_at.timestamp() + gap_seconds + 1.0, last_human_at + hold_seconds + 1.0)
        note("clock", f"… {wait_until - time.time():.0f} s pass (compressed gap of minutes) …")
        await asyncio.sleep(max(0.0, wait_until - time.time()))  # the scripted pause itself
        await customer_says(SECOND_MESSAGE)
        await bot_answers(2)
        block = developer_text(reply_requests(standins)[-1])
        transcript.context_blocks.append(block)
        note("context sent to OpenAI", block or "(none)")

        # 4. A payment screenshot goes through vision, then the responder answers in the conversation.
        await customer_says(IMAGE_CAPTION, kind="image", data=IMAGE_FILE)
        await bot_answers(3)
    return transcript
