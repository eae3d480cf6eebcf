"""`watistream report` on the real broker: the scripted day produced to the audit and dead-letter
topics (with Kafka timestamps = the records' own times, some older than --since, some garbage), then
the real `main` / CLI run in-process for both formats."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import socket
from datetime import datetime, timedelta
from typing import Any

import pytest

from services import cli
from services.common import codec
from services.common.config import ConfigError, Settings
from services.common.kafka import ensure_topics, make_producer
from services.common.timeparse import utcnow
from services.context import report
from tests.conftest import unique_prefix
from tests.unit.test_report import (
    EXPECTED_OVERALL,
    LABEL,
    A,
    B,
    C,
    D,
    E,
    F,
    assert_no_phone_numbers,
    decision,
    expected_customer,
    scripted_day,
    tenant_day,
)

pytestmark = pytest.mark.broker


@pytest.fixture(scope="module")
async def produced(settings: Settings) -> datetime:
    """Produces the scripted day (ending now) in time order; returns `now`."""
    topics = await ensure_topics(settings)
    now = utcnow()
    decisions, dead_letters = scripted_day(now)
    # read (within the seek slack) but dated before the window: must not be counted
    decisions.append(decision("b-edge", A, now - timedelta(hours=24, minutes=2), gap=9000, check=True))
    out: list[tuple[datetime, str, str, bytes]] = []
    out += [(d["decided_at"], topics.audit, d["customer_key"], codec.encode("BatchDecision", d))
            for d in decisions]
    out += [(x["failed_at"], topics.dead_letter, x["customer_key"] or "unknown",
             codec.encode("DeadLetter", x)) for x in dead_letters]
    recent = now - timedelta(minutes=30)
    out += [
        (recent, topics.audit, C, b"not avro at all"),
        (recent, topics.audit, C, codec.encode("DeadLetter", dead_letters[1])),  # wrong schema for the topic
        (recent, topics.dead_letter, "unknown", b"\xc3\x01garbage"),
    ]
    producer = make_producer(settings)
    await producer.start()
    try:
        for at, topic, key, value in sorted(out, key=lambda row: row[0]):
            await producer.send_and_wait(
                topic, value, key=key.encode(), timestamp_ms=int(at.timestamp() * 1000)
            )
    finally:
        await producer.stop()
    return now


async def run_main(
    settings: Settings, since: str, fmt: str, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str, str]:
    """The real `main`, in a thread (it runs its own event loop, as under the console script)."""
    capsys.readouterr()
    code = await asyncio.to_thread(report.main, argparse.Namespace(since=since, format=fmt), settings)
    out, err = capsys.readouterr()
    return code, out, err


async def test_json_report_of_the_scripted_day(
    settings: Settings, produced: datetime, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = await run_main(settings, "24h", "json", capsys)
    assert code == 0, err
    doc: dict[str, Any] = json.loads(out)
    assert doc["overall"] == EXPECTED_OVERALL
    rows = {row.pop("customer"): row for row in doc["customers"]}
    assert rows == {LABEL[key]: expected_customer(key) for key in (A, B, C, D, E, F)}
    # the two records older than 24 h + slack were never read (seek by time); the edge one was read
    # and left out by its own time; the three garbage records are counted, not fatal
    assert doc["records"] == {
        "decisions": 11, "dead_letters": 4, "duplicate_decisions": 1, "outside_window": 1,
        "undecodable": {"audit": 2, "dead_letter": 1},
    }
    assert doc["complete"] is True and doc["notes"] == []
    assert_no_phone_numbers(out)


async def test_markdown_report_through_the_console_script(
    settings: Settings,
    produced: datetime,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", settings.kafka_bootstrap_servers)
    monkeypatch.setenv("TOPIC_PREFIX", settings.topic_prefix)
    capsys.readouterr()
    code = await asyncio.to_thread(cli.main, ["report", "--since", "24h"])
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = out.splitlines()
    for row in (
        "| Batches | 9 (held 2, responder 6, vision 1) |",
        "| Gaps detected (history checked) | 3 |",
        "| Missed messages injected | 7 (history 4, realtime 2, both 1) |",
        "| Webhooks missing | 1 |",
        "| Messages recovered | 1 |",
        "| Batches held | 2 (human_active 1, paused 1) |",
        "| History-fetch failures | 1 |",
        "| Dead letters | 4 |",
        f"| `{LABEL[C]}` | 1 | 1 | 2 (1/0/1) | 1 | 1 | 1 | 0 | 0 | 0 |",
        "| responder | openai_failed | 2 |",
        "- 2 undecodable record(s) on the audit topic were skipped",
        "- 1 undecodable record(s) on the dead_letter topic were skipped",
    ):
        assert row in lines, row
    assert_no_phone_numbers(out)


async def test_short_window_reads_only_its_records(
    settings: Settings, produced: datetime, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = await run_main(settings, "90m", "json", capsys)
    assert code == 0, err
    doc = json.loads(out)
    # only D's paused batch (1 h ago) and the garbage of 30 min ago were read: the seek skipped the rest
    assert doc["records"] == {
        "decisions": 1, "dead_letters": 0, "duplicate_decisions": 0, "outside_window": 0,
        "undecodable": {"audit": 2, "dead_letter": 1},
    }
    assert doc["overall"]["held"] == {"total": 1, "by_reason": {"paused": 1}}
    assert [c["customer"] for c in doc["customers"]] == [LABEL[D]]


async def test_a_window_longer_than_the_log_reads_everything(
    settings: Settings, produced: datetime, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = await run_main(settings, "10000w", "json", capsys)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["records"] == {
        "decisions": 12, "dead_letters": 5, "duplicate_decisions": 1, "outside_window": 0,
        "undecodable": {"audit": 2, "dead_letter": 1},
    }
    assert doc["overall"]["batches"] == 11
    assert doc["overall"]["injected"]["by_source"]["history"] == 4 + 5


async def test_topics_that_do_not_exist_give_an_empty_report(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    fresh = dataclasses.replace(settings, topic_prefix=unique_prefix("report-empty"))
    code, out, err = await run_main(fresh, "24h", "json", capsys)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["overall"]["batches"] == 0 and doc["customers"] == []
    assert len(doc["notes"]) == 2 and all("does not exist" in n for n in doc["notes"])


async def test_unreachable_broker_exits_2_quickly(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    loop = asyncio.get_running_loop()
    start = loop.time()
    unreachable = Settings(kafka_bootstrap_servers=f"127.0.0.1:{port}")
    code, out, err = await run_main(unreachable, "24h", "json", capsys)
    assert code == 2
    assert out == ""
    assert "cannot read from Kafka" in err
    assert loop.time() - start < report.CONNECT_TIMEOUT_SECONDS + 5


async def test_bad_input_is_refused_before_kafka(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match="KAFKA_BOOTSTRAP_SERVERS"):
        report.main(argparse.Namespace(since="24h", format="json"), Settings())
    never_contacted = Settings(kafka_bootstrap_servers="127.0.0.1:1")
    code, out, err = await run_main(never_contacted, "yesterday", "json", capsys)
    assert code == 2 and out == ""
    assert "--since 'yesterday' is not a duration" in err


async def test_a_tenants_report_from_the_topics_shows_only_that_tenant(
    settings: Settings, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two tenants' days with the same phone numbers on the real topics; `--tenant` through the CLI."""
    own = dataclasses.replace(settings, topic_prefix=unique_prefix("report-tenants"))
    topics = await ensure_topics(own)
    now = utcnow()
    days = [scripted_day(now), tenant_day(now, "hotel-a/centro/")]
    producer = make_producer(own)
    await producer.start()
    try:
        for decisions, dead_letters in days:
            for d in decisions:
                await producer.send_and_wait(topics.audit, codec.encode("BatchDecision", d),
                                             key=d["customer_key"].encode())
            for x in dead_letters:
                await producer.send_and_wait(topics.dead_letter, codec.encode("DeadLetter", x),
                                             key=(x["customer_key"] or "unknown").encode())
    finally:
        await producer.stop()
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", own.kafka_bootstrap_servers)
    monkeypatch.setenv("TOPIC_PREFIX", own.topic_prefix)
    for tenant, prefix in (("hotel-a", "hotel-a/centro/"), ("default", "")):
        capsys.readouterr()
        code = await asyncio.to_thread(cli.main, ["report", "--since", "24h", "--format", "json",
                                                  "--tenant", tenant])
        out, err = capsys.readouterr()
        assert code == 0, err
        doc = json.loads(out)
        assert doc["tenant"] == tenant and doc["overall"]["batches"] == EXPECTED_OVERALL["batches"]
        rows = {row.pop("customer"): row for row in doc["customers"]}
        assert rows == {prefix + LABEL[key]: expected_customer(key) for key in (A, B, C, D, E, F)}
        if tenant == "hotel-a":
            assert doc["notes"] == ["tenant 'hotel-a' is not in the tenants configuration"]
        else:
            assert doc["notes"] == [] and "hotel-a" not in out
        assert_no_phone_numbers(out)
    code = await asyncio.to_thread(cli.main, ["report", "--tenant", "Hotel A"])
    assert code == 2 and "is not a tenant id" in capsys.readouterr().err
