"""The model input for one batch: a developer message with what was missed, then the customer's batch.

Pure. The missed-message block is clearly labelled (like the old system's "MENSAJES ENTRE EL CLIENTE
Y AGENTES HUMANOS"), chronological, one line per item: `[YYYY-MM-DD HH:MM] <who>: <text>` in UTC.
Labels are localisable (`PROMPT_LOCALE`, Spanish by default). Nothing internal reaches the model:
no customer key, phone number, provider or event ids, sender names of the customer (WATI often puts
the phone number there) — only what people said, when, and who (customer / agent name / event).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ..common.records import ImageContext, InboundMessage, MissedItem, ResponderRequest


@dataclass(frozen=True)
class Labels:
    """The words of the prompt in one language."""

    missed_header: str
    missed_intro: str
    customer: str
    agent: str
    agent_named: str  # "{name}" is replaced
    event: str
    dropped: str  # "{count}" is replaced
    image: str  # "{n}", "{category}", "{confidence}" are replaced
    image_description: str  # "{description}"
    empty: str
    other_kind: str  # "{kind}"
    kinds: Mapping[str, str] = field(default_factory=dict)
    categories: Mapping[str, str] = field(default_factory=dict)


LABELS: dict[str, Labels] = {
    "es": Labels(
        missed_header="MENSAJES ENTRE EL CLIENTE Y AGENTES HUMANOS",
        missed_intro=(
            "Mientras el asistente no respondía, el cliente y agentes humanos intercambiaron estos "
            "mensajes (hora UTC, en orden cronológico). Tenlos en cuenta al responder: no repitas "
            "preguntas que ya se respondieron y no contradigas a los agentes."
        ),
        customer="Cliente",
        agent="Agente",
        agent_named="Agente ({name})",
        event="Evento",
        dropped="(Se omitieron {count} mensajes más antiguos.)",
        image="Imagen {n}: clasificada como {category} (confianza {confidence}%).",
        image_description="Descripción: {description}",
        empty="(mensaje vacío)",
        other_kind="mensaje de tipo {kind}",
        kinds={
            "image": "Imagen", "video": "Video", "audio": "Audio", "voice": "Nota de voz",
            "document": "Documento", "file": "Archivo", "location": "Ubicación", "sticker": "Sticker",
            "reaction": "Reacción", "contacts": "Contacto compartido", "contact": "Contacto compartido",
            "order": "Pedido", "catalog": "Catálogo", "media_placeholder": "Archivo multimedia",
            "gif": "GIF",
        },
        categories={
            "payment_proof": "comprobante de pago", "general_inquiry": "consulta general",
            "other": "otra",
        },
    ),
    "en": Labels(
        missed_header="MESSAGES BETWEEN THE CUSTOMER AND HUMAN AGENTS",
        missed_intro=(
            "While the assistant was not answering, the customer and human agents exchanged these "
            "messages (UTC times, in chronological order). Take them into account: do not repeat "
            "questions that were already answered and do not contradict the agents."
        ),
        customer="Customer",
        agent="Agent",
        agent_named="Agent ({name})",
        event="Event",
        dropped="({count} older messages were left out.)",
        image="Image {n}: classified as {category} (confidence {confidence}%).",
        image_description="Description: {description}",
        empty="(empty message)",
        other_kind="{kind} message",
        kinds={
            "image": "Image", "video": "Video", "audio": "Audio", "voice": "Voice note",
            "document": "Document", "file": "File", "location": "Location", "sticker": "Sticker",
            "reaction": "Reaction", "contacts": "Shared contact", "contact": "Shared contact",
            "order": "Order", "catalog": "Catalog", "media_placeholder": "Media file", "gif": "GIF",
        },
        categories={
            "payment_proof": "payment proof", "general_inquiry": "general inquiry", "other": "other",
        },
    ),
}

# types whose `text` is what was said: interactive answers carry the chosen title, templates their
# final text, ticket events their description
TEXT_TYPES = frozenset({
    "text", "button", "interactive", "list_reply", "button_reply", "quick_reply", "template",
    "broadcast", "ticket", "event",
})


class UnknownLocale(ValueError):
    """PROMPT_LOCALE names a language without labels."""


def labels_for(locale: str) -> Labels:
    """Labels of `locale` ("es", "en", "es_SV", "en-US" ...): exact, then the language part."""
    wanted = (locale or "").strip().lower().replace("-", "_")
    if wanted in LABELS:
        return LABELS[wanted]
    language = wanted.split("_", 1)[0]
    if language in LABELS:
        return LABELS[language]
    raise UnknownLocale(f"no prompt labels for locale {locale!r}; known: {', '.join(sorted(LABELS))}")


def format_time(at: datetime) -> str:
    """UTC, minute precision: `2025-10-07 17:40`."""
    aware = at if at.tzinfo is not None else at.replace(tzinfo=UTC)
    return aware.astimezone(UTC).strftime("%Y-%m-%d %H:%M")


def _clean(text: str | None) -> str:
    return (text or "").strip()


def describe(message_type: str, text: str | None, labels: Labels) -> str:
    """One item as readable text: the text itself, or `[Kind] text` for non-text items."""
    body = _clean(text)
    kind = (message_type or "text").strip().lower()
    if kind in TEXT_TYPES or not kind:
        return body or labels.empty
    if body.lower() == f"[{kind}]":  # history's placeholder for a media item without caption
        body = ""
    name = labels.kinds.get(kind) or labels.other_kind.format(kind=kind)
    return f"[{name}] {body}" if body else f"[{name}]"


def speaker(item: MissedItem, labels: Labels) -> str:
    if item["role"] == "customer":
        return labels.customer
    if item["role"] == "agent":
        name = _clean(item.get("agent_name"))
        return labels.agent_named.format(name=name) if name else labels.agent
    return labels.event


def missed_block(items: Iterable[MissedItem], dropped_oldest: int, labels: Labels) -> str:
    """The developer message text: header, explanation, the omission note, one line per item."""
    ordered = sorted(items, key=lambda i: i["at"])  # stable: equal times keep the given order
    lines = [labels.missed_header, labels.missed_intro]
    if dropped_oldest > 0:
        lines.append(labels.dropped.format(count=dropped_oldest))
    for item in ordered:
        text = describe(item.get("message_type") or "text", item.get("text"), labels)
        lines.append(f"[{format_time(item['at'])}] {speaker(item, labels)}: {text}")
    return "\n".join(lines)


def message_text(message: InboundMessage, labels: Labels) -> str:
    """One customer message: its text, or the description of a non-text item with its caption."""
    kind = (message.get("message_type") or "text").strip().lower()
    if kind in TEXT_TYPES or not kind:
        return describe(kind, message.get("text") or message.get("caption"), labels)
    parts = [p for p in (_clean(message.get("caption")), _clean(message.get("text"))) if p]
    return describe(kind, " ".join(dict.fromkeys(parts)), labels)


def batch_text(messages: Iterable[InboundMessage], labels: Labels) -> str:
    """The customer's burst, one message per line, in arrival order."""
    lines = [message_text(m, labels) for m in messages]
    return "\n".join(lines) if lines else labels.empty


def image_text(n: int, image: ImageContext, labels: Labels) -> str:
    category = labels.categories.get(image["category"], image["category"])
    confidence = round(max(0.0, min(1.0, float(image["confidence"]))) * 100)
    text = labels.image.format(n=n, category=category, confidence=confidence)
    description = _clean(image.get("description"))
    if description:
        text += " " + labels.image_description.format(description=description)
    return text


def build_input(request: ResponderRequest, locale: str) -> list[dict[str, Any]]:
    """The Responses API `input`: [developer message (only with missed messages), user message]."""
    labels = labels_for(locale)
    items: list[dict[str, Any]] = []
    if request["missed_messages"]:
        block = missed_block(request["missed_messages"], request.get("missed_dropped_oldest", 0), labels)
        items.append({"role": "developer", "content": [{"type": "input_text", "text": block}]})
    content: list[dict[str, Any]] = [{"type": "input_text", "text": batch_text(request["messages"], labels)}]
    for n, image in enumerate(request.get("images") or [], start=1):
        content.append({"type": "input_text", "text": image_text(n, image, labels)})
        if image.get("file_id"):
            content.append({"type": "input_image", "file_id": image["file_id"], "detail": "low"})
    items.append({"role": "user", "content": content})
    return items
