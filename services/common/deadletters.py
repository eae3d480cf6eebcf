"""Dead letters an operator can act on: list, show, and replay ONCE to the source topic, recorded.

Shared by `watistream dead-letters` and any other front end (a web console): the selection, the
refusals and the replay live here, front ends only parse arguments and print.

- A dead letter's id is where it sits: `<partition>:<offset>` on the dead-letter topic. Stable,
  unique, and what `show` and `replay` take.
- A replay produces the dead letter's original key and payload to its `source_topic` (acks=all),
  with the header `watistream-replay-of: <id>`, then records a `DeadLetterReplay` on the compacted
  `dead-letter-replays` topic keyed by the dead letter's id. A dead letter with a replay record
  is refused; so is one without a source topic (a webhook the normaliser failed on: fixed code
  must receive it again from the provider) or without a payload. Two operators replaying the same
  id at the same instant could both pass the check; the record of the second then shows it.
- What the service then does is what it does with any redelivery: a record it never recorded as
  handled (an invalid or undecodable one, once the code is fixed; a context event that failed) is
  handled now. A responder batch it closed after an OpenAI or send failure stays closed: the
  responder republishes the batch's outcome and does not answer again (its batch dedupe cannot
  tell a replay from a redelivery yet; the header is there for it to do so).

Pure (unit-tested): `DeadLetterEntry`, `Filters`, `refusal`, `format_list`, `format_entry`, ids.
I/O: `read_entries`, `read_replays` (each reads its topic from the start to the end offsets taken
when it starts), `replay`, and `send_replay` (one replay and its record; the console's too).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.structs import TopicPartition

from . import codec
from .config import Settings
from .kafka import Topics, make_admin, make_consumer, make_producer
from .records import DeadLetter, DeadLetterReplay
from .timeparse import utcnow

READ_TIMEOUT_SECONDS = 20.0
#: set on every replayed record: the dead letter's id (a consumer may treat a replay differently)
REPLAY_HEADER = "watistream-replay-of"


class DeadLetterError(RuntimeError):
    """Kafka could not be read or written; the message says what to check."""


# ------------------------------------------------------------------ pure


def entry_id(partition: int, offset: int) -> str:
    return f"{partition}:{offset}"


def parse_id(text: str) -> tuple[int, int]:
    """`"3:1542"` -> (3, 1542); ValueError with the expected shape otherwise."""
    partition, sep, offset = text.strip().partition(":")
    if not sep or not partition.isdigit() or not offset.isdigit():
        raise ValueError(f"{text!r} is not a dead-letter id (<partition>:<offset>, as `list` shows)")
    return int(partition), int(offset)


@dataclass(frozen=True)
class DeadLetterEntry:
    """One dead letter and where it sits on the dead-letter topic."""

    id: str
    record: DeadLetter

    @property
    def failed_at(self) -> datetime:
        return self.record["failed_at"]


@dataclass(frozen=True)
class Filters:
    """What `list` (and a filtered `replay`) select; None = any."""

    reason: str | None = None
    customer: str | None = None
    service: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    replayed: bool | None = None

    def matches(self, entry: DeadLetterEntry, replays: Mapping[str, DeadLetterReplay]) -> bool:
        r = entry.record
        return (
            (self.reason is None or r["reason"] == self.reason)
            and (self.customer is None or r["customer_key"] == self.customer)
            and (self.service is None or r["service"] == self.service)
            and (self.since is None or entry.failed_at >= self.since)
            and (self.until is None or entry.failed_at < self.until)
            and (self.replayed is None or (entry.id in replays) == self.replayed)
        )


def select(
    entries: Iterable[DeadLetterEntry], filters: Filters, replays: Mapping[str, DeadLetterReplay]
) -> list[DeadLetterEntry]:
    return [e for e in entries if filters.matches(e, replays)]


def refusal(entry: DeadLetterEntry, replays: Mapping[str, DeadLetterReplay]) -> str | None:
    """Why `entry` cannot be replayed, or None when it can."""
    done = replays.get(entry.id)
    if done is not None:
        by = done["replayed_by"]
        return f"already replayed at {_when(done['replayed_at'])} UTC by {by} ({_where(done)})"
    if not entry.record["source_topic"]:
        return ("no source topic: it failed before reaching Kafka (a webhook the normaliser could not "
                "handle); once fixed, the provider must send it again")
    if entry.record["payload"] is None:
        return "no payload was kept: nothing to replay"
    return None


def _when(at: datetime) -> str:
    return f"{at:%Y-%m-%d %H:%M:%S}"


def _where(replay: DeadLetterReplay) -> str:
    at = entry_id(replay["replayed_partition"], replay["replayed_offset"])
    return f"now {replay['source_topic']} {at}"


def format_list(entries: Sequence[DeadLetterEntry], replays: Mapping[str, DeadLetterReplay]) -> str:
    """One line per dead letter: id, time (UTC), service, reason, customer, replayed or not."""
    if not entries:
        return "no dead letters match"
    rows = [("id", "failed at (UTC)", "service", "reason", "customer", "replayed")]
    for e in entries:
        r = e.record
        rows.append((e.id, _when(e.failed_at), r["service"], r["reason"], r["customer_key"] or "-",
                     "yes" if e.id in replays else "no"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join([*lines, f"{len(entries)} dead letter(s)"])


def describe_payload(payload: bytes | None, limit: int = 2000) -> str:
    """The payload as an operator can read it: JSON pretty-printed, a project record decoded, else a
    byte count (never raw binary on a terminal)."""
    if payload is None:
        return "(none)"
    with contextlib.suppress(codec.CodecError):
        name, value = codec.decode_any(payload)
        return f"{name} " + json.dumps(value, default=str, ensure_ascii=False, indent=2)[:limit]
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return f"({len(payload)} bytes, not text)"
    with contextlib.suppress(ValueError):
        return json.dumps(json.loads(text), ensure_ascii=False, indent=2)[:limit]
    return text[:limit]


def format_entry(entry: DeadLetterEntry, replay: DeadLetterReplay | None) -> str:
    """Everything about one dead letter, for `show`."""
    r = entry.record
    lines = [
        f"id:           {entry.id}",
        f"failed at:    {_when(entry.failed_at)} UTC",
        f"service:      {r['service']}",
        f"reason:       {r['reason']}",
        f"error:        {r['error']}",
        f"customer:     {r['customer_key'] or '-'}",
        f"batch:        {r['batch_id'] or '-'}",
        f"source:       {r['source_topic'] or '-'} partition {r['partition']} offset {r['offset']}",
        f"key:          {r['key'].decode('utf-8', 'replace') if r['key'] is not None else '-'}",
    ]
    if replay is not None:
        lines.append(f"replayed:     {_when(replay['replayed_at'])} UTC by {replay['replayed_by']}, "
                     f"{_where(replay)}")
    else:
        reason = refusal(entry, {})
        lines.append("replayed:     no" + (f" (cannot be: {reason})" if reason else ""))
    lines.append("payload:      " + describe_payload(r["payload"]).replace("\n", "\n              "))
    return "\n".join(lines)


# ------------------------------------------------------------------ I/O


Record = tuple[int, int, bytes | None, bytes]  # partition, offset, key, value


async def _partitions(settings: Settings, topic: str, timeout: float) -> list[int]:
    """Partition ids of `topic`, [] when it does not exist. Asks for every topic's metadata: naming
    the topic could auto-create it on a broker with auto.create.topics.enable."""
    admin = make_admin(settings, request_timeout_ms=int(timeout * 1000), client_id="watistream-dead-letters")
    try:
        await admin.start()
        described = await admin.describe_topics(None)
    finally:
        with contextlib.suppress(KafkaError, OSError):
            await admin.close()
    return sorted(int(p["partition"]) for t in described if t["topic"] == topic and not t["error_code"]
                  for p in t["partitions"])


async def _read_topic(settings: Settings, topic: str, timeout: float) -> list[Record]:
    """(partition, offset, key, value) of every record of `topic`, up to the end offsets taken at
    start. A topic that does not exist reads as empty."""
    consumer = make_consumer(
        settings, group_id=None, enable_auto_commit=False,
        auto_offset_reset="earliest", isolation_level="read_committed",
        request_timeout_ms=int(timeout * 1000), client_id="watistream-dead-letters",
    )
    out: list[Record] = []
    try:
        async with asyncio.timeout(timeout):
            await consumer.start()
            tps = [TopicPartition(topic, p) for p in await _partitions(settings, topic, timeout)]
            if not tps:
                return out
            consumer.assign(tps)
            ends: dict[TopicPartition, int] = await consumer.end_offsets(tps)
            starts: dict[TopicPartition, int] = await consumer.beginning_offsets(tps)
            for tp in tps:  # explicit offsets: a reset racing a leader election could fall back to latest
                consumer.seek(tp, starts[tp])
            pending = {tp: end for tp, end in ends.items() if end > starts[tp]}
            idle: dict[TopicPartition, int] = {}
            while pending:
                fetched = await consumer.getmany(*pending, timeout_ms=200)
                for tp, records in fetched.items():
                    out += [(tp.partition, rec.offset, rec.key, rec.value) for rec in records
                            if rec.offset < ends[tp] and rec.value is not None]
                    if records and records[-1].offset >= ends[tp] - 1:
                        del pending[tp]  # the last record before the end: done
                if fetched:
                    continue
                # the end may sit past a gap (a transaction marker): the fetch position passing it,
                # with nothing more fetched three times in a row, ends the partition too
                for tp in list(pending):
                    if await consumer.position(tp) >= pending[tp]:
                        idle[tp] = idle.get(tp, 0) + 1
                        if idle[tp] >= 3:
                            del pending[tp]
    except (KafkaError, OSError, TimeoutError) as exc:
        raise DeadLetterError(f"cannot read {topic} from {settings.kafka_bootstrap_servers}: "
                              f"{str(exc) or type(exc).__name__} (check KAFKA_BOOTSTRAP_SERVERS)") from exc
    finally:
        with contextlib.suppress(KafkaError, OSError):
            await consumer.stop()
    return out


async def read_entries(settings: Settings, timeout: float = READ_TIMEOUT_SECONDS) -> list[DeadLetterEntry]:
    """Every dead letter, oldest first (undecodable records are skipped: there is nothing to replay)."""
    entries = []
    topic = Topics.from_settings(settings).dead_letter
    for partition, offset, _, value in await _read_topic(settings, topic, timeout):
        with contextlib.suppress(codec.CodecError):
            record = cast(DeadLetter, codec.decode("DeadLetter", value))
            entries.append(DeadLetterEntry(entry_id(partition, offset), record))
    return sorted(entries, key=lambda e: (e.failed_at, e.id))


async def read_replays(
    settings: Settings, timeout: float = READ_TIMEOUT_SECONDS
) -> dict[str, DeadLetterReplay]:
    """Dead-letter id -> its replay record."""
    replays: dict[str, DeadLetterReplay] = {}
    topic = Topics.from_settings(settings).dead_letter_replays
    for _, _, _, value in await _read_topic(settings, topic, timeout):
        with contextlib.suppress(codec.CodecError):
            record = cast(DeadLetterReplay, codec.decode("DeadLetterReplay", value))
            replays.setdefault(record["dead_letter_id"], record)  # the first replay is the one
    return replays


async def send_replay(
    producer: AIOKafkaProducer, topics: Topics, letter_id: str, source_topic: str, key: bytes | None,
    payload: bytes, *, by: str, headers: Sequence[tuple[str, bytes]] = (),
) -> DeadLetterReplay:
    """Produces a dead letter's record to its source topic, then its `DeadLetterReplay` (the one
    record of replays, for the CLI and the console alike) keyed by the dead letter's id; both
    acks=all. Raises what the producer raises: nothing is recorded unless the record was taken."""
    sent = await producer.send_and_wait(source_topic, payload, key=key,
                                        headers=[(REPLAY_HEADER, letter_id.encode()), *headers])
    done: DeadLetterReplay = {
        "dead_letter_id": letter_id, "source_topic": source_topic,
        "replayed_partition": sent.partition, "replayed_offset": sent.offset,
        "replayed_by": by, "replayed_at": utcnow(),
    }
    await producer.send_and_wait(topics.dead_letter_replays,
                                 codec.encode("DeadLetterReplay", cast(dict[str, Any], done)),
                                 key=letter_id.encode())
    return done


@dataclass(frozen=True)
class ReplayOutcome:
    id: str
    replayed: DeadLetterReplay | None
    refused: str | None = None


async def replay(
    settings: Settings, entries: Sequence[DeadLetterEntry], *, by: str,
    replays: Mapping[str, DeadLetterReplay] | None = None,
) -> list[ReplayOutcome]:
    """Replays each entry that can be (see `refusal`), once, and records it. `replays` defaults to a
    fresh read of the replay topic (pass it only when just read)."""
    known = dict(replays if replays is not None else await read_replays(settings))
    topics = Topics.from_settings(settings)
    outcomes: list[ReplayOutcome] = []
    producer = make_producer(settings)
    try:
        await producer.start()
        for entry in entries:
            reason = refusal(entry, known)
            if reason is not None:
                outcomes.append(ReplayOutcome(entry.id, None, reason))
                continue
            record = entry.record
            assert record["source_topic"] is not None and record["payload"] is not None
            done = await send_replay(producer, topics, entry.id, record["source_topic"], record["key"],
                                     record["payload"], by=by)
            known[entry.id] = done
            outcomes.append(ReplayOutcome(entry.id, done))
    except (KafkaError, OSError) as exc:
        raise DeadLetterError(f"replay failed: {str(exc) or type(exc).__name__}") from exc
    finally:
        with contextlib.suppress(KafkaError, OSError):
            await producer.stop()
    return outcomes
