"""`watistream report`: what the bot missed, injected, held and recovered, from the audit topic.

The context service publishes one `BatchDecision` per batch to the audit topic, and every service
puts what it could not handle on the dead-letter topic. This command reads both for a window
(`--since 24h`) and prints, overall and per customer, the counts an operator asks after an incident:
gaps detected, missed messages injected by source, exclusions by reason, webhooks WATI never
delivered and the messages recovered, holds, history-fetch failures, dead letters.

Pure part (`Summary`, `summarise`, `render_markdown`, `render_json`, `parse_since`): plain data in,
text out, unit-tested. Thin I/O part (`collect`, `main`): one plain consumer WITHOUT a group (it never
commits, so it can never move a service's offsets), assigned every partition of the two topics,
seeked by time and read up to the end offsets taken at start, then it stops.

Per tenant (`--tenant hotel-a`, docs/tenants.md "Per-tenant visibility"): only the records whose
customer key belongs to that tenant are read into the report, every count included (records read,
duplicates, outside the window); a record that cannot be attributed to the tenant (a dead letter
with neither a customer key nor a customer's Kafka key, an undecodable record, a malformed key) is
left out, so no line, count or
customer of another tenant can appear.

Privacy: customer keys are printed only masked (`keys.mask`); free-text fields of the records
(texts, errors, history errors) are never printed, and the short reason codes that are printed go
through the log redactor, so neither format can carry a phone number.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import re
import sys
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from services.common import codec, logs
from services.common.config import Settings
from services.common.kafka import Topics, make_admin, make_consumer
from services.common.keys import SLUG_PATTERN, KeyError_, mask, parse_key
from services.common.logs import redact
from services.common.records import BatchDecision, DeadLetter
from services.common.timeparse import utcnow

SOURCES = ("history", "realtime", "both")
"""MissedItem.source symbols, always listed (zero included) so scripts can rely on the keys."""

UNSPECIFIED = "unspecified"
MAX_LABEL_CHARS = 80

CONNECT_TIMEOUT_SECONDS = 15.0
"""Bound on reaching the broker (connect + metadata + offsets) before exiting 2."""
STALL_TIMEOUT_SECONDS = 30.0
"""Reading stops (report marked incomplete) when no partition advanced for this long."""
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
SEEK_SLACK = timedelta(minutes=5)
"""The seek starts this much before `since`: a record's Kafka timestamp (producer clock) may be a
little earlier than its `decided_at`/`failed_at`; records are then filtered by their own time."""


# ---------------------------------------------------------------- window


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str) -> timedelta:
    """`"24h"`, `"30m"`, `"7d"`, `"90s"`, `"2w"`, or combined (`"1h30m"`) -> a positive timedelta."""
    raw = (text or "").strip().lower()
    hint = "use a number and a unit s, m, h, d or w, e.g. 90s, 30m, 24h, 7d, 1h30m"
    if not raw or _DURATION_PART.sub("", raw) != "":
        raise ValueError(f"--since {text!r} is not a duration: {hint}")
    seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(raw))
    if seconds <= 0:
        raise ValueError(f"--since {text!r} must be longer than zero: {hint}")
    try:
        return timedelta(seconds=seconds)
    except OverflowError:
        raise ValueError(f"--since {text!r} is too long") from None


# ---------------------------------------------------------------- counting


def _label(value: str | None) -> str:
    """A reason/service code fit to print: redacted (no phone numbers, tokens), short, never empty."""
    text = redact(" ".join((value or "").split()))[:MAX_LABEL_CHARS]
    return text or UNSPECIFIED


@dataclass
class Tally:
    """The counts of one customer, or of everyone."""

    batches: int = 0
    routed_to: Counter[str] = field(default_factory=Counter)
    gaps_detected: int = 0  # batches whose missed-message (history) check ran
    batches_with_injected: int = 0
    injected_by_source: Counter[str] = field(default_factory=Counter)
    injected_by_role: Counter[str] = field(default_factory=Counter)
    excluded_by_reason: Counter[str] = field(default_factory=Counter)
    webhooks_missing: int = 0
    recovered: int = 0
    held: int = 0
    holds_by_reason: Counter[str] = field(default_factory=Counter)
    history_fetch_failures: int = 0
    dead_letters: Counter[tuple[str, str]] = field(default_factory=Counter)  # (service, reason)

    @property
    def injected(self) -> int:
        return sum(self.injected_by_source.values())

    @property
    def excluded(self) -> int:
        return sum(self.excluded_by_reason.values())

    @property
    def dead_letter_count(self) -> int:
        return sum(self.dead_letters.values())

    def notable(self) -> bool:
        """Anything beyond routine batches (worth a row in the markdown per-customer table)."""
        return bool(
            self.gaps_detected or self.injected or self.excluded or self.webhooks_missing
            or self.recovered or self.held or self.history_fetch_failures or self.dead_letter_count
        )

    def add_decision(self, decision: BatchDecision) -> None:
        self.batches += 1
        self.routed_to[_label(decision.get("routed_to"))] += 1
        if decision.get("missed_check_ran"):
            self.gaps_detected += 1
        injected = decision.get("injected") or []
        if injected:
            self.batches_with_injected += 1
        for item in injected:
            self.injected_by_source[_label(str(item.get("source") or ""))] += 1
            self.injected_by_role[_label(str(item.get("role") or ""))] += 1
        for excluded in decision.get("excluded") or []:
            self.excluded_by_reason[_label(excluded.get("reason"))] += 1
        self.webhooks_missing += int(decision.get("webhooks_missing") or 0)
        self.recovered += len(decision.get("recovered_event_ids") or [])
        if decision.get("held"):
            self.held += 1
            self.holds_by_reason[_label(decision.get("hold_reason"))] += 1
        if decision.get("history_error"):
            self.history_fetch_failures += 1

    def add_dead_letter(self, letter: DeadLetter) -> None:
        self.dead_letters[(_label(letter.get("service")), _label(letter.get("reason")))] += 1

    def as_dict(self) -> dict[str, Any]:
        by_service: dict[str, dict[str, int]] = {}
        for (service, reason), count in sorted(self.dead_letters.items()):
            by_service.setdefault(service, {})[reason] = count
        return {
            "batches": self.batches,
            "routed_to": dict(sorted(self.routed_to.items())),
            "gaps_detected": self.gaps_detected,
            "batches_with_injected": self.batches_with_injected,
            "injected": {
                "total": self.injected,
                "by_source": {
                    **{s: self.injected_by_source.get(s, 0) for s in SOURCES},
                    **{s: n for s, n in sorted(self.injected_by_source.items()) if s not in SOURCES},
                },
                "by_role": dict(sorted(self.injected_by_role.items())),
            },
            "excluded": {"total": self.excluded, "by_reason": dict(sorted(self.excluded_by_reason.items()))},
            "webhooks_missing": self.webhooks_missing,
            "recovered": self.recovered,
            "held": {"total": self.held, "by_reason": dict(sorted(self.holds_by_reason.items()))},
            "history_fetch_failures": self.history_fetch_failures,
            "dead_letters": {"total": self.dead_letter_count, "by_service": by_service},
        }


@dataclass
class CustomerTally:
    customer: str  # masked label, never the raw key
    tally: Tally


@dataclass
class Report:
    since: datetime
    until: datetime
    overall: Tally
    customers: list[CustomerTally]
    decisions_read: int = 0
    dead_letters_read: int = 0
    duplicate_decisions: int = 0  # same batch id seen again (at-least-once redelivery), counted once
    outside_window: int = 0  # read (seek slack, clock skew) but dated outside [since, until]
    undecodable: dict[str, int] = field(default_factory=dict)  # topic role -> records
    complete: bool = True  # False when reading stopped before the end offsets (broker stalled)
    notes: list[str] = field(default_factory=list)
    tenant: str | None = None  # the one tenant reported on (`--tenant`), None for every tenant

    def as_dict(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant,
            "since": _iso(self.since),
            "until": _iso(self.until),
            "complete": self.complete,
            "records": {
                "decisions": self.decisions_read,
                "dead_letters": self.dead_letters_read,
                "duplicate_decisions": self.duplicate_decisions,
                "outside_window": self.outside_window,
                "undecodable": {k: self.undecodable.get(k, 0) for k in ("audit", "dead_letter")},
            },
            "notes": list(self.notes),
            "overall": self.overall.as_dict(),
            "customers": [{"customer": c.customer, **c.tally.as_dict()} for c in self.customers],
        }


class Summary:
    """Accumulates decisions and dead letters one at a time (the reader streams, memory stays small).

    One audit event per batch is the contract, so a batch id seen again is a redelivery: counted
    once (the first seen wins), and reported as a duplicate. With `tenant`, every record not proven
    to be that tenant's (by its customer key, or a dead letter's Kafka key) is dropped before
    anything counts it.
    """

    def __init__(self, since: datetime, until: datetime, tenant: str | None = None) -> None:
        if since.tzinfo is None or until.tzinfo is None:
            raise ValueError("since and until must be timezone-aware")
        if tenant is not None and not re.fullmatch(SLUG_PATTERN, tenant):
            raise ValueError(f"--tenant {tenant!r} is not a tenant id ({SLUG_PATTERN})")
        self.since = since
        self.until = until
        self.tenant = tenant
        self.overall = Tally()
        self._by_key: dict[str, Tally] = {}
        self._batch_ids: set[str] = set()
        self.decisions_read = 0
        self.dead_letters_read = 0
        self.duplicates = 0
        self.outside_window = 0

    def _inside(self, at: datetime | None) -> bool:
        if at is None or not self.since <= at <= self.until:
            self.outside_window += 1
            return False
        return True

    def _customer(self, key: str) -> Tally:
        return self._by_key.setdefault(key, Tally())

    def ours(self, customer_key: object) -> bool:
        """Whether a record of this customer key belongs in the report (always, without a tenant)."""
        if self.tenant is None:
            return True
        if not isinstance(customer_key, str):
            return False
        try:
            return parse_key(customer_key).tenant == self.tenant
        except KeyError_:
            return False

    def add_decision(self, decision: BatchDecision) -> None:
        if not self.ours(decision.get("customer_key")):
            return
        self.decisions_read += 1
        if not self._inside(decision.get("decided_at")):
            return
        batch_id = decision.get("batch_id") or ""
        if batch_id in self._batch_ids:
            self.duplicates += 1
            return
        self._batch_ids.add(batch_id)
        self.overall.add_decision(decision)
        self._customer(decision.get("customer_key") or UNSPECIFIED).add_decision(decision)

    def add_dead_letter(self, letter: DeadLetter) -> None:
        # an undecodable record has no customer key, but its Kafka key is one on every customer topic
        raw_key = letter.get("key")
        kafka_key = bytes(raw_key).decode("utf-8", "replace") if raw_key else None
        if not self.ours(letter.get("customer_key") or kafka_key):
            return
        self.dead_letters_read += 1
        if not self._inside(letter.get("failed_at")):
            return
        self.overall.add_dead_letter(letter)
        if letter.get("customer_key"):
            self._customer(str(letter["customer_key"])).add_dead_letter(letter)

    def report(self) -> Report:
        return Report(
            since=self.since, until=self.until, overall=self.overall,
            customers=[CustomerTally(label, self._by_key[key]) for label, key in _labels(self._by_key)],
            decisions_read=self.decisions_read, dead_letters_read=self.dead_letters_read,
            duplicate_decisions=self.duplicates, outside_window=self.outside_window, tenant=self.tenant,
        )


def _labels(keys: Iterable[str]) -> list[tuple[str, str]]:
    """(masked label, raw key), sorted by label; keys that mask alike get `#1`, `#2` (by raw key)
    so two customers never merge into one row."""
    by_mask: dict[str, list[str]] = {}
    for key in keys:
        by_mask.setdefault(_label(mask(key)), []).append(key)
    out: list[tuple[str, str]] = []
    for masked, raw in sorted(by_mask.items()):
        if len(raw) == 1:
            out.append((masked, raw[0]))
        else:
            out.extend((f"{masked}#{i}", key) for i, key in enumerate(sorted(raw), 1))
    return out


def summarise(
    decisions: Iterable[BatchDecision],
    dead_letters: Iterable[DeadLetter],
    since: datetime,
    until: datetime,
    *,
    undecodable: Mapping[str, int] | None = None,
    complete: bool = True,
    tenant: str | None = None,
) -> Report:
    """The report of the records dated within [since, until] (decided_at / failed_at), of one
    tenant's customers only when `tenant` is given."""
    summary = Summary(since, until, tenant)
    for decision in decisions:
        summary.add_decision(decision)
    for letter in dead_letters:
        summary.add_dead_letter(letter)
    report = summary.report()
    report.undecodable = dict(undecodable or {}) if tenant is None else {}  # nobody's: not the tenant's
    report.complete = complete
    return report


# ---------------------------------------------------------------- rendering


def _iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def _breakdown(counts: Mapping[str, int], keep_zero: tuple[str, ...] = ()) -> str:
    """`a 1, b 2`: the `keep_zero` names first (even when 0), then the others by name."""
    parts = [f"{name} {counts.get(name, 0)}" for name in keep_zero]
    parts += [f"{_md(name)} {n}" for name, n in sorted(counts.items()) if name not in keep_zero]
    return ", ".join(parts)


def _with(total: int, breakdown: str) -> str:
    return f"{total} ({breakdown})" if breakdown and total else str(total)


def render_json(report: Report) -> str:
    return json.dumps(report.as_dict(), indent=2, ensure_ascii=False) + "\n"


def render_markdown(report: Report) -> str:
    o = report.overall
    undecodable = sum(report.undecodable.values())
    lines = [
        "# watistream report",
        "",
        *([f"Tenant: {report.tenant} (only its customers' records)"] if report.tenant is not None else []),
        f"Window: {_iso(report.since)} to {_iso(report.until)}",
        f"Read: {report.decisions_read} batch decisions, {report.dead_letters_read} dead letters "
        f"({undecodable} undecodable, {report.duplicate_decisions} duplicate decisions ignored, "
        f"{report.outside_window} outside the window)",
        "",
    ]
    warnings = list(report.notes)
    if not report.complete:
        warnings.append("reading stopped before the end of the topics: the counts are INCOMPLETE")
    for role, count in sorted(report.undecodable.items()):
        if count:
            warnings.append(f"{count} undecodable record(s) on the {role} topic were skipped")
    if warnings:
        lines += ["## Warnings", "", *[f"- {w}" for w in warnings], ""]
    lines += [
        "## Overall",
        "",
        "| What | Count |",
        "|---|---|",
        f"| Batches | {_with(o.batches, _breakdown(o.routed_to))} |",
        f"| Gaps detected (history checked) | {o.gaps_detected} |",
        f"| Missed messages injected | {_with(o.injected, _breakdown(o.injected_by_source, SOURCES))} |",
        f"| Batches with missed messages | {o.batches_with_injected} |",
        f"| Items excluded | {_with(o.excluded, _breakdown(o.excluded_by_reason))} |",
        f"| Webhooks missing | {o.webhooks_missing} |",
        f"| Messages recovered | {o.recovered} |",
        f"| Batches held | {_with(o.held, _breakdown(o.holds_by_reason))} |",
        f"| History-fetch failures | {o.history_fetch_failures} |",
        f"| Dead letters | {o.dead_letter_count} |",
        "",
        "## Per customer",
        "",
    ]
    notable = [c for c in report.customers if c.tally.notable()]
    routine = len(report.customers) - len(notable)
    if notable:
        lines += [
            "| Customer | Batches | Gaps | Injected (history/realtime/both) | Excluded | Webhooks missing "
            "| Recovered | Held | History failures | Dead letters |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for c in notable:
            t = c.tally
            injected = "/".join(str(t.injected_by_source.get(s, 0)) for s in SOURCES)
            lines.append(
                f"| `{_md(c.customer)}` | {t.batches} | {t.gaps_detected} | {t.injected} ({injected}) "
                f"| {t.excluded} | {t.webhooks_missing} | {t.recovered} "
                f"| {_with(t.held, _breakdown(t.holds_by_reason))} | {t.history_fetch_failures} "
                f"| {t.dead_letter_count} |"
            )
        lines.append("")
    if not report.customers:
        lines += ["No customer activity in the window.", ""]
    elif routine:
        lines += [f"{routine} other customer(s) had routine batches only (listed by --format json).", ""]
    if o.dead_letters:
        lines += ["## Dead letters", "", "| Service | Reason | Count |", "|---|---|---|"]
        lines += [f"| {_md(s)} | {_md(r)} | {n} |" for (s, r), n in sorted(o.dead_letters.items())]
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------- reading the topics


class BrokerUnreachable(RuntimeError):
    """Kafka could not be reached (or answered errors) within the bound; the message says why."""


@dataclass
class Collected:
    summary: Summary
    undecodable: dict[str, int]
    complete: bool
    notes: list[str]


def _ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


def _feed(summary: Summary, role: str, value: bytes | None) -> bool:
    """Decodes one record inside a guard; False when it is not a valid record of its topic."""
    try:
        if role == "audit":
            summary.add_decision(cast(BatchDecision, codec.decode("BatchDecision", value)))
        else:
            summary.add_dead_letter(cast(DeadLetter, codec.decode("DeadLetter", value)))
    except codec.CodecError:
        return False
    return True


async def _partitions(settings: Settings, names: list[str], timeout_ms: int) -> dict[str, list[int]]:
    """Partition ids of the named topics that exist. Asks for ALL topics' metadata: naming a topic in
    a metadata request could auto-create it on a broker with auto.create.topics.enable."""
    admin = make_admin(settings, request_timeout_ms=timeout_ms, client_id="watistream-report")
    try:
        await admin.start()
        described = await admin.describe_topics(None)
    finally:
        await admin.close()
    return {
        str(t["topic"]): sorted(int(p["partition"]) for p in t["partitions"])
        for t in described
        if t["topic"] in names and not t["error_code"]
    }


async def collect(
    settings: Settings,
    window: timedelta,
    *,
    connect_timeout: float = CONNECT_TIMEOUT_SECONDS,
    stall_timeout: float = STALL_TIMEOUT_SECONDS,
    tenant: str | None = None,
) -> Collected:
    """Reads the audit and dead-letter records of the last `window` into a `Summary`.

    The window ends when the end offsets are taken; records produced later are not read.
    """
    from aiokafka import AIOKafkaConsumer
    from aiokafka.errors import KafkaError
    from aiokafka.structs import TopicPartition

    topics = Topics.from_settings(settings)
    roles = {topics.audit: "audit", topics.dead_letter: "dead_letter"}
    notes: list[str] = []
    consumer: AIOKafkaConsumer | None = None  # created once there is something to read
    try:
        try:
            async with asyncio.timeout(connect_timeout):
                partitions = await _partitions(settings, list(roles), int(connect_timeout * 1000))
                tps = []
                for name in roles:
                    if not partitions.get(name):
                        notes.append(f"topic {name} does not exist (no service has created it yet)")
                    tps += [TopicPartition(name, p) for p in partitions.get(name, [])]
                until = utcnow()
                summary = Summary(until - min(window, until - EPOCH), until, tenant)  # `--since 9999w`
                if not tps:
                    return Collected(summary, {}, True, notes)
                consumer = make_consumer(
                    settings,
                    group_id=None,  # never commits: the report cannot move any service's offsets
                    enable_auto_commit=False,
                    auto_offset_reset="earliest",  # retention deleted the seeked offset: read what is left
                    isolation_level="read_committed",
                    request_timeout_ms=int(connect_timeout * 1000),
                    client_id="watistream-report",
                )
                await consumer.start()
                consumer.assign(tps)
                ends: dict[TopicPartition, int] = await consumer.end_offsets(tps)
                since_ms = max(0, _ms(summary.since - SEEK_SLACK))
                starts = await consumer.offsets_for_times({tp: since_ms for tp in tps})
        except (KafkaError, OSError, TimeoutError) as exc:
            raise BrokerUnreachable(
                f"cannot read from Kafka at {settings.kafka_bootstrap_servers} within "
                f"{connect_timeout:g} s: {str(exc) or type(exc).__name__}"
            ) from exc

        pending: dict[TopicPartition, int] = {}
        for tp in tps:
            found = starts.get(tp)
            start = found.offset if found is not None else ends[tp]
            consumer.seek(tp, start)
            if start < ends[tp]:
                pending[tp] = ends[tp]
            else:
                consumer.pause(tp)
        undecodable: Counter[str] = Counter()
        loop = asyncio.get_running_loop()
        last_progress = loop.time()
        seen_positions: dict[TopicPartition, int] = {}
        while pending:
            try:
                fetched = await consumer.getmany(*pending, timeout_ms=200)
                positions = {tp: await consumer.position(tp) for tp in pending}
            except KafkaError as exc:
                reason = str(exc) or type(exc).__name__
                raise BrokerUnreachable(f"reading from Kafka failed: {reason}") from exc
            for tp, records in fetched.items():
                role = roles[tp.topic]
                for record in records:
                    if record.offset >= ends[tp]:
                        continue
                    last_progress = loop.time()
                    if not _feed(summary, role, record.value) and tenant is None:
                        undecodable[role] += 1  # a tenant's report: an undecodable record is nobody's
            for tp, position in positions.items():
                if position != seen_positions.get(tp):  # also moves over control records
                    seen_positions[tp] = position
                    last_progress = loop.time()
                if position >= pending[tp]:
                    del pending[tp]
                    consumer.pause(tp)
            if pending and loop.time() - last_progress > stall_timeout:
                notes.append(f"{len(pending)} partition(s) stalled before their end offset")
                return Collected(summary, dict(undecodable), False, notes)
        return Collected(summary, dict(undecodable), True, notes)
    finally:
        if consumer is not None:
            with contextlib.suppress(KafkaError, OSError):
                await consumer.stop()


def _tenant_notes(settings: Settings, tenant: str | None) -> list[str]:
    """A warning when `--tenant` names no configured tenant (a typo reads as an empty report)."""
    if tenant is None:
        return []
    from services.common.config import ConfigError
    from services.common.tenants import load_tenants

    try:
        configured = load_tenants(settings).get(tenant) is not None
    except ConfigError:
        return ["the tenants configuration could not be read (`watistream check` says why)"]
    return [] if configured else [f"tenant {tenant!r} is not in the tenants configuration"]


def main(args: argparse.Namespace, settings: Settings) -> int:
    """`watistream report [--since 24h] [--format markdown|json] [--tenant ID]`: prints the report."""
    settings.require("KAFKA_BOOTSTRAP_SERVERS")
    if not logging.getLogger().handlers:  # the console script; an embedding process keeps its own
        logs.setup("report", settings.log_level)
    tenant: str | None = getattr(args, "tenant", None)
    try:
        window = parse_since(str(getattr(args, "since", "24h")))
        if tenant is not None:
            Summary(EPOCH, EPOCH, tenant)  # the id's check, before Kafka is contacted
    except ValueError as exc:
        print(f"watistream report: {exc}", file=sys.stderr)
        return 2
    notes = _tenant_notes(settings, tenant)
    aiokafka_log = logging.getLogger("aiokafka")
    previous_level = aiokafka_log.level
    if settings.log_level.upper() != "DEBUG":
        # a connection failure is reported once, clearly, by this command; not also by aiokafka
        aiokafka_log.setLevel(logging.CRITICAL)
    try:
        collected = asyncio.run(collect(settings, window, tenant=tenant))
    except BrokerUnreachable as exc:
        print(f"watistream report: {exc}", file=sys.stderr)
        return 2
    finally:
        aiokafka_log.setLevel(previous_level)
    report = collected.summary.report()
    report.undecodable = collected.undecodable
    report.complete = collected.complete
    report.notes = notes + collected.notes
    fmt = getattr(args, "format", "markdown")
    sys.stdout.write(render_json(report) if fmt == "json" else render_markdown(report))
    sys.stdout.flush()
    return 0
