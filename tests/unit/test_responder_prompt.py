"""The model input: the labelled missed-message block and the customer's batch, with no internal data."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from services.common.records import ImageContext, InboundMessage, MissedItem, ResponderRequest
from services.responder.prompt import (
    LABELS,
    UnknownLocale,
    batch_text,
    build_input,
    describe,
    format_time,
    labels_for,
    missed_block,
)

T0 = datetime(2025, 10, 7, 17, 40, 12, tzinfo=UTC)
PHONE = "50372927077"
KEY = f"wati:{PHONE}"

ES_INTRO = LABELS["es"].missed_intro
EN_INTRO = LABELS["en"].missed_intro


def msg(text: str | None, kind: str = "text", caption: str | None = None, minute: int = 0,
        **extra: Any) -> InboundMessage:
    m: InboundMessage = {
        "event_id": f"wamid.{minute}{kind}", "customer_key": KEY, "channel": "wati", "provider_id": PHONE,
        "message_type": kind, "text": text, "caption": caption, "media_ref": None, "media_mime": None,
        "sender_name": PHONE, "provider_message_ids": [f"id-{minute}"],
        "provider_time": T0 + timedelta(minutes=minute), "received_at": T0 + timedelta(minutes=minute),
    }
    m.update(extra)  # type: ignore[typeddict-item]
    return m


def item(minute: int, role: str, text: str, agent: str | None = None, kind: str = "text") -> MissedItem:
    return {"at": T0 + timedelta(minutes=minute), "role": role, "agent_name": agent,  # type: ignore[typeddict-item]
            "text": text, "message_type": kind, "source": "history", "item_ids": [f"item-{minute}"]}


def request(messages: list[InboundMessage], missed: list[MissedItem] | None = None, dropped: int = 0,
            images: list[ImageContext] | None = None) -> ResponderRequest:
    return {
        "batch_id": "batch-secret-id", "customer_key": KEY, "channel": "wati", "provider_id": PHONE,
        "messages": messages, "prior_last_inbound_at": T0 - timedelta(hours=3),
        "prior_last_reply_at": T0 - timedelta(hours=3), "gap_seconds": 10800.0,
        "missed_check_ran": bool(missed), "missed_messages": missed or [],
        "missed_dropped_oldest": dropped, "images": images or [], "created_at": T0,
    }


def test_missed_block_exact_spanish() -> None:
    items = [
        item(2, "customer", "Hola, ¿ya está mi pedido?"),
        item(0, "agent", "Que paso con lo que pedi?", agent="Ana"),
        item(1, "event", "Chat asignado a ana@example.com", kind="ticket"),
        item(3, "agent", "Sí, sale hoy", agent=None),
    ]
    assert missed_block(items, 0, labels_for("es")) == "\n".join([
        "MENSAJES ENTRE EL CLIENTE Y AGENTES HUMANOS",
        ES_INTRO,
        "[2025-10-07 17:40] Agente (Ana): Que paso con lo que pedi?",
        "[2025-10-07 17:41] Evento: Chat asignado a ana@example.com",
        "[2025-10-07 17:42] Cliente: Hola, ¿ya está mi pedido?",
        "[2025-10-07 17:43] Agente: Sí, sale hoy",
    ])


def test_missed_block_english_and_dropped_note() -> None:
    items = [item(5, "customer", "Any news?"), item(4, "agent", "Checking", agent="Bob")]
    assert missed_block(items, 3, labels_for("en")) == "\n".join([
        "MESSAGES BETWEEN THE CUSTOMER AND HUMAN AGENTS",
        EN_INTRO,
        "(3 older messages were left out.)",
        "[2025-10-07 17:44] Agent (Bob): Checking",
        "[2025-10-07 17:45] Customer: Any news?",
    ])


def test_missed_block_equal_times_keep_given_order() -> None:
    items = [item(1, "agent", "primero", agent="A"), item(1, "customer", "segundo"), item(0, "agent", "cero")]
    lines = missed_block(items, 0, labels_for("es")).splitlines()[2:]
    assert [line.split(": ", 1)[1] for line in lines] == ["cero", "primero", "segundo"]


def test_missed_block_non_text_items() -> None:
    items = [item(0, "customer", "", kind="image"), item(1, "customer", "", kind="voice"),
             item(2, "agent", "factura.pdf", agent="Ana", kind="document")]
    lines = missed_block(items, 0, labels_for("es")).splitlines()[2:]
    assert lines == [
        "[2025-10-07 17:40] Cliente: [Imagen]",
        "[2025-10-07 17:41] Cliente: [Nota de voz]",
        "[2025-10-07 17:42] Agente (Ana): [Documento] factura.pdf",
    ]


def test_time_format_is_utc() -> None:
    from datetime import timezone
    plus2 = timezone(timedelta(hours=2))
    assert format_time(datetime(2025, 1, 2, 5, 6, 59, tzinfo=plus2)) == "2025-01-02 03:06"
    assert format_time(datetime(2025, 1, 2, 5, 6)) == "2025-01-02 05:06"  # naive = UTC


@pytest.mark.parametrize(("kind", "text", "expected"), [
    ("text", "hola", "hola"),
    ("text", "  ", "(mensaje vacío)"),
    ("button", "Sí, confirmar", "Sí, confirmar"),
    ("interactive", "Opción 2", "Opción 2"),
    ("image", None, "[Imagen]"),
    ("video", "mira", "[Video] mira"),
    ("audio", None, "[Audio]"),
    ("voice", None, "[Nota de voz]"),
    ("document", "contrato.pdf", "[Documento] contrato.pdf"),
    ("location", "13.69,-89.19", "[Ubicación] 13.69,-89.19"),
    ("sticker", None, "[Sticker]"),
    ("reaction", "👍", "[Reacción] 👍"),
    ("contacts", "Juan", "[Contacto compartido] Juan"),
    ("order", None, "[Pedido]"),
    ("catalog", None, "[Catálogo]"),
    ("template", "Su pedido fue enviado", "Su pedido fue enviado"),
    ("ticket", "Chat asignado", "Chat asignado"),
    ("media_placeholder", None, "[Archivo multimedia]"),
    ("hologram", None, "[mensaje de tipo hologram]"),
])
def test_describe_every_type_spanish(kind: str, text: str | None, expected: str) -> None:
    assert describe(kind, text, labels_for("es")) == expected


def test_describe_english() -> None:
    en = labels_for("en")
    assert describe("voice", None, en) == "[Voice note]"
    assert describe("hologram", "x", en) == "[hologram message] x"


def test_batch_text_in_arrival_order_with_captions_and_recovered() -> None:
    messages = [
        msg("Hola", minute=0),
        msg(None, kind="image", caption="mi comprobante", minute=1),
        msg("¿Lo recibieron?", minute=2, recovered=True),
        msg(None, kind="audio", minute=3),
        msg("Estoy aquí", kind="location", minute=4),
    ]
    assert batch_text(messages, labels_for("es")) == "\n".join([
        "Hola", "[Imagen] mi comprobante", "¿Lo recibieron?", "[Audio]", "[Ubicación] Estoy aquí",
    ])


def test_build_input_without_missed_messages_is_only_the_user_message() -> None:
    assert build_input(request([msg("Hola")]), "es") == [
        {"role": "user", "content": [{"type": "input_text", "text": "Hola"}]}
    ]


def test_build_input_with_missed_messages_puts_the_block_first() -> None:
    missed = [item(1, "customer", "¿Hay envío?"), item(0, "agent", "Hola, soy Ana", agent="Ana")]
    result = build_input(request([msg("Sigo esperando", minute=30)], missed=missed), "es")
    assert [m["role"] for m in result] == ["developer", "user"]
    assert result[0]["content"] == [{"type": "input_text", "text": "\n".join([
        "MENSAJES ENTRE EL CLIENTE Y AGENTES HUMANOS", ES_INTRO,
        "[2025-10-07 17:40] Agente (Ana): Hola, soy Ana",
        "[2025-10-07 17:41] Cliente: ¿Hay envío?",
    ])}]
    assert result[1]["content"] == [{"type": "input_text", "text": "Sigo esperando"}]


def test_build_input_with_images_from_vision() -> None:
    images: list[ImageContext] = [
        {"media_ref": "data/images/a.jpg", "file_id": "file-abc", "mime": "image/jpeg",
         "category": "payment_proof", "confidence": 0.934, "description": "Transferencia de $20"},
        {"media_ref": "data/images/b.jpg", "file_id": None, "mime": "image/png",
         "category": "selfie", "confidence": 0.5, "description": None},
    ]
    result = build_input(request([msg(None, kind="image", caption="pago")], images=images), "es")
    assert result == [{"role": "user", "content": [
        {"type": "input_text", "text": "[Imagen] pago"},
        {"type": "input_text", "text": "Imagen 1: clasificada como comprobante de pago (confianza 93%). "
                                       "Descripción: Transferencia de $20"},
        {"type": "input_image", "file_id": "file-abc", "detail": "low"},
        {"type": "input_text", "text": "Imagen 2: clasificada como selfie (confianza 50%)."},
    ]}]


def test_no_internal_data_reaches_the_prompt() -> None:
    missed = [item(1, "customer", "hola"), item(0, "agent", "buenas", agent="Ana")]
    images: list[ImageContext] = [{"media_ref": "data/images/secret-ref.jpg", "file_id": "file-x",
                                   "mime": "image/jpeg", "category": "other", "confidence": 1.0,
                                   "description": None}]
    result = build_input(request([msg("texto", minute=9), msg(None, kind="image", minute=10)],
                                 missed=missed, images=images), "es")
    dumped = json.dumps(result, ensure_ascii=False)
    for secret in (PHONE, KEY, "batch-secret-id", "wamid.", "id-9", "item-0", "secret-ref", "history"):
        assert secret not in dumped


def test_locales() -> None:
    assert labels_for("es") is LABELS["es"]
    assert labels_for("es_SV") is LABELS["es"]
    assert labels_for("EN-us") is LABELS["en"]
    with pytest.raises(UnknownLocale):
        labels_for("fr")
    with pytest.raises(UnknownLocale):
        build_input(request([msg("x")]), "de")


def test_every_locale_has_the_same_kinds() -> None:
    kinds = {frozenset(labels.kinds) for labels in LABELS.values()}
    assert len(kinds) == 1


def test_history_media_placeholder_is_not_repeated() -> None:
    assert describe("image", "[image]", labels_for("es")) == "[Imagen]"
    assert describe("image", "[IMAGE]", labels_for("en")) == "[Image]"
    assert describe("image", "foto del recibo", labels_for("es")) == "[Imagen] foto del recibo"
