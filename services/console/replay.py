"""Replaying a dead letter to its source topic: the plan (pure) and the send (thin).

`plan_replay` says what would be produced — the original key and payload to the topic the record
came from — or why it cannot be (no payload, no source topic, a topic that is not one of ours).
`replay` produces it with headers naming the dead letter and the operator, so a replayed record is
recognisable on the topic. The once-only guard and the record of who did it live in the store
(`Store.mark_replayed`, `Store.record_action`); a CLI replay can share `plan_replay` and `replay`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer


class NotReplayable(ValueError):
    """The dead letter cannot be replayed; the message says why (safe to show)."""


@dataclass(frozen=True)
class ReplayPlan:
    letter_id: str
    topic: str
    key: bytes | None
    payload: bytes


def plan_replay(letter: Mapping[str, Any], known_topics: Collection[str]) -> ReplayPlan:
    if letter.get("replayed_at"):
        raise NotReplayable(f"already replayed by {letter.get('replayed_by') or 'someone'}")
    topic = letter.get("source_topic")
    if not topic:
        raise NotReplayable("the dead letter names no source topic")
    if topic not in known_topics:
        raise NotReplayable(f"{topic} is not one of this deployment's topics")
    payload = letter.get("payload")
    if not payload:
        raise NotReplayable("the dead letter carries no payload")
    key = letter.get("record_key")
    return ReplayPlan(str(letter["id"]), str(topic), bytes(key) if key else None, bytes(payload))


async def replay(producer: AIOKafkaProducer, plan: ReplayPlan, operator: str) -> tuple[int, int]:
    """Produces the plan's record (acks=all); returns (partition, offset) it landed at."""
    meta = await producer.send_and_wait(
        plan.topic, plan.payload, key=plan.key,
        headers=[("watistream-replay-of", plan.letter_id.encode()),
                 ("watistream-replayed-by", operator.encode())],
    )
    return int(meta.partition), int(meta.offset)
