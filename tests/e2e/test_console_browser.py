"""The operator console in a real browser (Chromium driven by Playwright) over the real processes.

The demo's conversation runs first (a burst, a human agent in WATI's inbox, the customer again:
the bot's request carries the agent's words, then a payment screenshot). Then an operator logs in,
pauses the customer, the customer writes and is held; the operator finds them on "Held and
paused", opens the timeline and sees the block given to the model — equal to what the OpenAI
stand-in received — resumes, and sees the bot's answer to the next message. A poison record is
dead-lettered and replayed once to its source topic. Any script error or console error in a page
fails the test. Screenshots of every page, at a laptop and a phone width, are kept in
$CONSOLE_SCREENSHOT_DIR (default test-output/console/).

Needs Debian's `chromium` (`apt-get install -y chromium`; scripts/test installs it when run as
root); Playwright cannot download its own browser here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import os
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition

from services.common.broker import free_port
from services.common.config import Settings
from services.common.kafka import Topics
from services.devtools import scenario
from services.devtools.dev import DevStack
from services.standins import StandIns

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
ROOT = Path(__file__).resolve().parents[2]
SHOTS = Path(os.environ.get("CONSOLE_SCREENSHOT_DIR", ROOT / "test-output" / "console"))
WIDTHS = {"laptop": (1366, 860), "phone": (390, 844)}
KEY = f"wati:{scenario.CUSTOMER}"
HELD_TEXT = "¿Tienen estacionamiento en el hotel?"
AFTER_RESUME = "Perfecto, muchas gracias"


@pytest.fixture
async def stack(settings: Settings, tmp_path: Path) -> AsyncIterator[tuple[DevStack, StandIns]]:
    if not CHROMIUM.exists():
        pytest.fail(f"missing {CHROMIUM}: install Debian's chromium package (apt-get install -y chromium)")
    async with StandIns.running() as standins:
        env = standins.env()
        compressed = {f.name: type(getattr(settings, f.name))(scenario.COMPRESSED[f.metadata["env"]])
                      for f in dataclasses.fields(settings) if f.metadata["env"] in scenario.COMPRESSED}
        # the scenario waits out the gap and the hold before its second message: shorter than the
        # demo's readable ones (tests/e2e/test_dev_and_demo.py's stack settings use the same)
        compressed.update(missed_gap_seconds=4.0, human_hold_seconds=2.0)
        cfg = dataclasses.replace(
            settings,
            wati_api_url=env["WATI_API_URL"], wati_api_token=env["WATI_API_TOKEN"],
            manychat_api_url=env["MANYCHAT_API_URL"], manychat_api_token=env["MANYCHAT_API_TOKEN"],
            openai_base_url=env["OPENAI_BASE_URL"], openai_api_key=env["OPENAI_API_KEY"],
            ingest_port=free_port(), context_web_port=free_port(), responder_web_port=free_port(),
            vision_web_port=free_port(), console_port=free_port(), data_dir=str(tmp_path), **compressed,
        )
        async with DevStack(cfg, out=io.StringIO()) as running:
            yield running, standins


class Browser:
    """One Chromium page that records every console error and script error, and takes screenshots."""

    def __init__(self, page: Any, base: str) -> None:
        self.page = page
        self.base = base
        self.errors: list[str] = []
        page.on("console",
                lambda msg: self.errors.append(f"console: {msg.text}") if msg.type == "error" else None)
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))

    async def goto(self, path: str) -> None:
        await self.page.goto(self.base + path)

    async def until(self, path: str, selector: str, timeout: float = 60.0) -> Any:
        """Reloads `path` until `selector` matches (the console shows what its consumer stored)."""
        deadline = time.monotonic() + timeout
        while True:
            await self.goto(path)
            found = self.page.locator(selector)
            if await found.count():
                return found
            if time.monotonic() > deadline:
                raise TimeoutError(f"{path}: {selector} not shown after {timeout:.0f}s")
            await asyncio.sleep(0.5)

    async def shoot(self, name: str) -> None:
        SHOTS.mkdir(parents=True, exist_ok=True)
        for label, (width, height) in WIDTHS.items():
            await self.page.set_viewport_size({"width": width, "height": height})
            await self.page.screenshot(path=str(SHOTS / f"{name}-{label}.png"), full_page=True)
        await self.page.set_viewport_size({"width": WIDTHS["laptop"][0], "height": WIDTHS["laptop"][1]})


async def customer_says(dev: DevStack, s: StandIns, text: str) -> None:
    payload = scenario.wati_webhook(text, datetime.now(UTC))
    s.wati.add_history(scenario.CUSTOMER, dict(payload))
    async with httpx.AsyncClient(timeout=10) as http:
        answer = await http.post(f"{dev.ingest_url}/webhooks/wati", json=payload,
                                 headers={"Authorization": f"Bearer {dev.settings.webhook_token}"})
        answer.raise_for_status()


async def topic_tail(settings: Settings, topic: str) -> AIOKafkaConsumer:
    """A group-less consumer positioned at the current end of every partition of `topic`."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers, enable_auto_commit=False)
    await consumer.start()
    parts = [TopicPartition(topic, p) for p in range(settings.topic_partitions)]
    consumer.assign(parts)
    await consumer.seek_to_end(*parts)
    for tp in parts:
        await consumer.position(tp)
    return consumer


async def replayed_record(consumer: AIOKafkaConsumer, timeout: float = 30.0) -> Any:
    """The first record the consumer reads that carries the replay header."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for records in (await consumer.getmany(timeout_ms=500)).values():
            for record in records:
                if any(k == "watistream-replay-of" for k, _ in record.headers or ()):
                    return record
    raise TimeoutError("no replayed record")


async def test_an_operator_finds_a_held_customer_sees_the_block_resumes_and_replays_a_dead_letter(
    stack: tuple[DevStack, StandIns],
) -> None:
    from playwright.async_api import async_playwright

    dev, s = stack
    assert dev.console_login is not None
    user, password = dev.console_login
    topics = Topics.from_settings(dev.settings)

    # the demo's conversation: its second request carries the human agent's messages
    await scenario.play(s, dev.ingest_url, dev.settings.webhook_token,
                        gap_seconds=dev.settings.missed_gap_seconds,
                        hold_seconds=dev.settings.human_hold_seconds)
    blocks = [scenario.developer_text(r) for r in scenario.reply_requests(s)]
    sent_block = next(b for b in blocks if b)

    async with async_playwright() as p:
        chromium = await p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = await chromium.new_page(viewport={"width": 1366, "height": 860})
            b = Browser(page, dev.console_url)

            # log in (a wrong password first: refused)
            await b.goto("/login")
            await b.shoot("login")
            await page.fill("input[name=user]", user)
            await page.fill("input[name=password]", "wrong")
            await page.click("button[type=submit]")
            assert "Wrong operator name or password" in await page.content()
            assert [e for e in b.errors if "401" in e] == b.errors and len(b.errors) == 1, b.errors
            b.errors.clear()  # that refusal is the one error expected
            await page.fill("input[name=user]", user)
            await page.fill("input[name=password]", password)
            await page.click("button[type=submit]")
            await page.wait_for_url(dev.console_url + "/")
            await b.until("/", "text=Customers served")

            # the operator pauses the customer; the customer writes and is held
            await b.until(f"/customers?q={scenario.CUSTOMER}", f"a[href='/customers/{quote(KEY, safe='')}']")
            await b.shoot("customers")
            await page.click(f"a[href='/customers/{quote(KEY, safe='')}']")
            await page.get_by_role("button", name="Pause the bot").click()
            await page.get_by_role("button", name="Resume the bot").wait_for()
            calls_before = len(scenario.reply_requests(s))
            await customer_says(dev, s, HELD_TEXT)
            link = f"a[href='/customers/{quote(KEY, safe='')}']"
            row = await b.until("/waiting", f"tr:has({link}):has(.badge.held)")
            assert user in await row.inner_text(), "paused by the operator, by name"
            await b.shoot("waiting")
            assert len(scenario.reply_requests(s)) == calls_before, "held: no OpenAI call"

            # the timeline: the block shown is byte-for-byte what the OpenAI stand-in received
            await page.click(f"a[href='/customers/{quote(KEY, safe='')}']")
            shown = [await el.text_content() for el in await page.locator("[data-testid=block]").all()]
            assert sent_block in shown, (sent_block, shown)
            assert HELD_TEXT in await page.content() and "held: paused" in await page.content()
            assert f"operator {user}: pause" in await page.locator("[data-testid=action]").first.inner_text()
            await b.shoot("timeline")

            # resume; the customer's next message is answered and the answer shows on the timeline
            await page.get_by_role("button", name="Resume the bot").click()
            await page.get_by_role("button", name="Pause the bot").wait_for()
            sent_before = len([m for m in s.wati.sent if m.contact_id == scenario.CUSTOMER])
            await customer_says(dev, s, AFTER_RESUME)
            await scenario.wait_for(
                lambda: len([m for m in s.wati.sent if m.contact_id == scenario.CUSTOMER]) > sent_before,
                60, "the answer after the resume")
            answer = [m for m in s.wati.sent if m.contact_id == scenario.CUSTOMER][-1].text
            replies = await b.until(f"/customers/{quote(KEY, safe='')}",
                                    f"article.batch:has-text('{AFTER_RESUME}') [data-testid=reply]")
            assert await replies.last.text_content() == answer
            await b.shoot("timeline-resumed")
            await b.until("/", "svg.chart")
            await b.shoot("overview")

            # a poison record on the inbound topic is dead-lettered; replay it once, with confirmation
            producer = AIOKafkaProducer(bootstrap_servers=dev.settings.kafka_bootstrap_servers)
            await producer.start()
            try:
                await producer.send_and_wait(topics.inbound, b"not an avro record", key=KEY.encode())
            finally:
                await producer.stop()
            link = await b.until("/dead-letters", f"tr:has-text('{topics.inbound}') a")
            await b.shoot("dead-letters")
            await link.first.click()
            await b.shoot("dead-letter")
            tail = await topic_tail(dev.settings, topics.inbound)
            await page.get_by_role("button", name="Replay").click()  # unticked: the browser does not send
            assert await page.locator("tr:has(th:text-is('Replayed')) td").inner_text() == "no"
            await page.check("input[name=confirm]")
            await page.get_by_role("button", name="Replay").click()
            await page.locator(f"text=by {user}").first.wait_for()
            assert await page.get_by_role("button", name="Replay").count() == 0, "replayed once only"
            try:
                record = await replayed_record(tail)
            finally:
                await tail.stop()
            assert record.value == b"not an avro record" and record.key == KEY.encode()
            assert dict(record.headers)["watistream-replayed-by"] == user.encode()

            assert b.errors == [], b.errors
        finally:
            await chromium.close()
