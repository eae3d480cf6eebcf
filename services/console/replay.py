"""Replaying a dead letter to its source topic: the plan (pure) and the send (thin).

`plan_replay` says what would be produced — the original key and payload to the topic the record
came from — or why it cannot be (already replayed, no payload, no source topic, a topic that is not
one of ours). `replay` produces it the way the CLI does (`deadletters.send_replay`): the record with
headers naming the dead letter and the operator, then a `DeadLetterReplay` on the
`dead-letter-replays` topic. That topic is the one record of replays: the console's store shows
what it holds (its consumer reads it) and the console asks it again before replaying.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer

from services.common.deadletters import send_replay
from services.common.kafka import Topics
from services.common.records import DeadLetterReplay


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


async def replay(
    producer: AIOKafkaProducer, topics: Topics, plan: ReplayPlan, operator: str
) -> DeadLetterReplay:
    """Produces the plan's record and its replay record (acks=all); returns the replay record."""
    return await send_replay(producer, topics, plan.letter_id, plan.topic, plan.key, plan.payload,
                             by=operator, headers=[("watistream-replayed-by", operator.encode())])
