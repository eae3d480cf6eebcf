"""Each channel alone: `watistream dev` (every service a real process) with only WATI or only ManyChat
configured starts without the other channel's settings, answers its own channel's timeline, and
refuses the other channel's webhooks with 404 `channel_disabled`. (Both together:
test_dev_and_demo.py.)"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from services.common.config import Settings
from services.common.kafka import Topics
from services.devtools import scenario
from services.devtools.dev import DevStack, _settings_env
from services.standins import StandIns

from .test_dev_and_demo import _copy, _wait_ready, read_topic_to_end, stack_settings

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "manychat"


@pytest.fixture
async def standins() -> AsyncIterator[StandIns]:
    async with StandIns.running() as running:
        yield running


def checked_channels(log: str) -> list[str]:
    """The channels `watistream dev`'s start-up check reported."""
    return re.findall(r"ok   channels\s+(.+?)\s*$", log, re.MULTILINE)


class Dev:
    """`watistream dev` as a child process with these settings, its output in a log file."""

    def __init__(self, cfg: Settings, tmp: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k not in {n for n, _, _ in Settings.documented()}}
        env.update(_settings_env(cfg))
        env.update({"KAFKA_CREATE_TOPICS": "true"})
        self.proc = subprocess.Popen([sys.executable, "-m", "services.cli", "dev"], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.log = tmp / "dev.log"
        self.pump = asyncio.create_task(asyncio.to_thread(_copy, self.proc, self.log))
        self.stack = DevStack(cfg)

    async def ready(self) -> None:
        await _wait_ready(self.stack, self.proc, self.log)

    async def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(self.proc.wait, 60)
        await self.pump
        return self.proc.returncode


async def post(url: str, token: str, payload: object) -> httpx.Response:
    async with httpx.AsyncClient(timeout=15.0) as client:
        return await client.post(url, json=payload, headers={"Authorization": f"Bearer {token}"})


async def test_whatsapp_only(settings: Settings, standins: StandIns, tmp_path: Path) -> None:
    cfg = dataclasses.replace(stack_settings(settings, standins, tmp_path), manychat_api_token="")
    assert cfg.enabled_channels == ("wati",)
    dev = Dev(cfg, tmp_path)
    try:
        await dev.ready()
        refused = await post(f"{dev.stack.ingest_url}/webhooks/manychat", cfg.webhook_token,
                             json.loads((FIXTURES / "full_subscriber.json").read_text()))
        await scenario.play(standins, dev.stack.ingest_url, cfg.webhook_token, timeout=120,
                            gap_seconds=cfg.missed_gap_seconds, hold_seconds=cfg.human_hold_seconds)
    finally:
        code = await dev.stop()
    assert refused.status_code == 404 and refused.json()["error"] == "channel_disabled"
    assert checked_channels(dev.log.read_text()) == ["wati"]
    assert len(scenario.reply_requests(standins)) == 3, "the WhatsApp timeline: one call per burst"
    assert len(standins.wati.sent) == 3 and standins.manychat.sent == []
    assert await read_topic_to_end(cfg, Topics.from_settings(cfg).dead_letter) == []
    assert code == 0


async def test_facebook_instagram_only(settings: Settings, standins: StandIns, tmp_path: Path) -> None:
    cfg = dataclasses.replace(stack_settings(settings, standins, tmp_path), wati_api_url="",
                              wati_api_token="")
    assert cfg.enabled_channels == ("manychat",)
    subscriber = json.loads((FIXTURES / "full_subscriber.json").read_text())
    dev = Dev(cfg, tmp_path)
    try:
        await dev.ready()
        refused = await post(f"{dev.stack.ingest_url}/webhooks/wati", cfg.webhook_token,
                             scenario.wati_webhook("hola", scenario.datetime.now(scenario.UTC)))
        for text in ("hola", "¿tienen envíos a Santa Ana?"):
            answer = await post(f"{dev.stack.ingest_url}/webhooks/manychat", cfg.webhook_token,
                                {**subscriber, "last_input_text": text})
            assert answer.status_code == 200, answer.text
        await scenario.wait_for(lambda: bool(standins.manychat.sent), 120, "the ManyChat reply")
    finally:
        code = await dev.stop()
    assert refused.status_code == 404 and refused.json()["error"] == "channel_disabled"
    assert checked_channels(dev.log.read_text()) == ["manychat"]
    calls = scenario.reply_requests(standins)
    assert len(calls) == 1, "the burst of two messages is answered by one OpenAI call"
    assert "hola" in str(calls[0].request["input"]) and "Santa Ana" in str(calls[0].request["input"])
    assert [s.subscriber_id for s in standins.manychat.sent] == [subscriber["id"]]
    assert standins.wati.sent == [] and not [r for r in standins.wati.requests if "getMessages" in r.path]
    assert await read_topic_to_end(cfg, Topics.from_settings(cfg).dead_letter) == []
    assert code == 0
