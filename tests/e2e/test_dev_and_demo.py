"""End to end: the real `watistream dev` process tree, driven through the demo scenario.

The stand-ins run in the test process (so the test can read what OpenAI and WATI received); the
services run as the child processes of `watistream dev`, exactly as an operator starts them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer

from services.common.broker import free_port
from services.common.config import Settings
from services.common.kafka import Topics
from services.devtools import scenario
from services.devtools.dev import DevStack, _settings_env
from services.standins import StandIns

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]


def stack_settings(settings: Settings, standins: StandIns, tmp: Path) -> Settings:
    env = standins.env()
    return dataclasses.replace(
        settings,
        wati_api_url=env["WATI_API_URL"], wati_api_token=env["WATI_API_TOKEN"],
        manychat_api_url=env["MANYCHAT_API_URL"], manychat_api_token=env["MANYCHAT_API_TOKEN"],
        openai_base_url=env["OPENAI_BASE_URL"], openai_api_key=env["OPENAI_API_KEY"],
        ingest_port=free_port(), context_web_port=free_port(), responder_web_port=free_port(),
        vision_web_port=free_port(), console_port=free_port(), data_dir=str(tmp), context_store="rocksdb",
        quiet_window_seconds=2, max_batch_wait_seconds=10, flush_scan_interval_seconds=0.25,
        # the scenario waits out the gap and the hold before its second message: short ones, as the
        # waits are only the compressed clock (the demo's own defaults, 8 s and 4 s, are for reading)
        missed_gap_seconds=4, human_hold_seconds=2, broker_session_timeout_seconds=10,
    )


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
async def standins() -> AsyncIterator[StandIns]:
    async with StandIns.running() as running:
        yield running


async def read_topic_to_end(settings: Settings, topic: str) -> list[bytes]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=settings.kafka_bootstrap_servers,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    try:
        values: list[bytes] = []
        while True:
            batch = await consumer.getmany(timeout_ms=1000)
            if not batch:
                return values
            values.extend(r.value for records in batch.values() for r in records)
    finally:
        await consumer.stop()


async def test_demo_scenario_through_watistream_dev(
    settings: Settings, standins: StandIns, tmp_path: Path
) -> None:
    """One OpenAI call per burst, the exact missed-message block, replies through WATI, no DLQ."""
    cfg = stack_settings(settings, standins, tmp_path)
    env = {**os.environ, **_settings_env(cfg)}
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "dev"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    log = tmp_path / "dev.log"
    pump = asyncio.create_task(asyncio.to_thread(_copy, proc, log))
    try:
        stack = DevStack(cfg)
        await _wait_ready(stack, proc, log)
        transcript = await scenario.play(
            standins, stack.ingest_url, cfg.webhook_token, gap_seconds=cfg.missed_gap_seconds,
            hold_seconds=cfg.human_hold_seconds, timeout=120,
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, 60)
        await pump

    calls = scenario.reply_requests(standins)
    assert len(calls) == 3, "one OpenAI call per burst (3 bursts)"
    first_user = str(calls[0].request["input"])
    assert all(text in first_user for text in scenario.FIRST_BURST)
    block = transcript.context_blocks[0]
    # Exactly the human conversation, in order, and nothing of the bot's own first answer.
    positions = [block.index(text) for _, text in scenario.INBOX]
    assert positions == sorted(positions)
    assert scenario.AGENT in block
    bot_first_answer = standins.wati.sent[0].text
    assert bot_first_answer not in block
    assert all(text not in block for text in scenario.FIRST_BURST[1:])
    assert scenario.SECOND_MESSAGE not in block
    # The image went through vision (classified outside any conversation), answered inside one.
    classification = [r for r in standins.openai.responses.values() if not r.conversation_id]
    assert len(classification) == 1
    assert "comprobante" in standins.wati.sent[2].text
    assert len(standins.wati.sent) == 3
    assert len({c.conversation_id for c in calls}) == 1, "one conversation for the customer"
    dead = await read_topic_to_end(cfg, Topics.from_settings(cfg).dead_letter)
    assert dead == []
    assert proc.returncode == 0


async def test_dev_refuses_to_start_without_required_settings(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI", "WATI", "WEB"))}
    env.update({"DATA_DIR": str(tmp_path), "WEBHOOK_TOKEN": "x" * 12})
    result = subprocess.run([sys.executable, "-m", "services.cli", "dev"], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "OPENAI_API_KEY" in result.stderr and "WATI_API_URL" in result.stderr
    assert not (tmp_path / "broker").exists(), "nothing was started"


async def test_sigterm_stops_every_child_and_the_embedded_broker(
    settings: Settings, standins: StandIns, tmp_path: Path
) -> None:
    cfg = dataclasses.replace(stack_settings(settings, standins, tmp_path), kafka_bootstrap_servers="")
    env = {**os.environ, **_settings_env(cfg)}
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "dev"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    log = tmp_path / "dev.log"
    pump = asyncio.create_task(asyncio.to_thread(_copy, proc, log))
    try:
        await _wait_ready(DevStack(cfg), proc, log, settle_on_log="all services ready")
        tree = descendants(proc.pid)
        assert len(tree) >= 5, "broker + five services"
        assert any("kafka.Kafka" in _cmdline(p) for p in tree)
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, 60)
        await pump
    assert proc.returncode == 0
    deadline = time.monotonic() + 10
    while any(alive(p) for p in tree) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert not [p for p in tree if alive(p)], "orphans left behind"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _copy(proc: subprocess.Popen[bytes], log: Path) -> None:
    assert proc.stdout is not None
    with open(log, "wb") as fh:
        for line in proc.stdout:
            fh.write(line)
            fh.flush()


async def _wait_ready(
    stack: DevStack, proc: subprocess.Popen[bytes], log: Path, settle_on_log: str = "all services ready",
    timeout: float = 180,
) -> None:
    """Waits for the supervisor's own readiness line (it polls every service's /readyz)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"watistream dev exited {proc.returncode}:\n{log.read_text()[-5000:]}")
        if log.exists() and settle_on_log in log.read_text():
            return
        await asyncio.sleep(0.2)
    pytest.fail(f"watistream dev not ready after {timeout}s:\n{log.read_text()[-5000:]}")
