"""One record of dead-letter replays, on the real broker: the `dead-letter-replays` topic. A replay
from the console is produced there with the operator's name, so a console whose store is rebuilt
from the topics still refuses a second replay and the CLI refuses it too; a replay from the CLI
shows in the console as replayed (and is refused there), even before the console's consumer has
read it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from services.common import deadletters
from services.common.broker import free_port
from services.common.config import Settings
from services.common.kafka import Topics, dead_letter, ensure_topics, make_producer
from services.console.auth import hash_password
from services.console.main import ConsoleService

from ..conftest import unique_prefix

pytestmark = pytest.mark.broker
PASSWORD = "pw-for-tests"


@pytest.fixture
async def cfg(settings: Settings) -> Settings:
    own = dataclasses.replace(settings, topic_prefix=unique_prefix("console-replays"),
                              console_port=free_port(), console_users=f"ana:{hash_password(PASSWORD)}")
    await ensure_topics(own)
    return own


async def put_dead_letter(cfg: Settings, customer: str) -> None:
    topics = Topics.from_settings(cfg)
    producer = make_producer(cfg)
    await producer.start()
    try:
        await dead_letter(producer, topics, service="context", reason="undecodable", error="bad header",
                          source_topic=topics.inbound, partition=0, offset=7, key=customer.encode(),
                          payload=b"\x00not avro", customer_key=customer)
    finally:
        await producer.stop()


@dataclasses.dataclass
class Running:
    service: ConsoleService
    http: httpx.AsyncClient

    async def letter_id(self, customer: str) -> str:
        """The id of `customer`'s dead letter, once the console's consumer has stored it."""
        async with asyncio.timeout(60):
            while True:
                assert self.service.store is not None
                rows = self.service.store.dead_letters().rows
                found = [r["id"] for r in rows if r["customer_key"] == customer]
                if found:
                    return str(found[0])
                await asyncio.sleep(0.05)

    async def replayed_by(self, letter_id: str) -> str:
        """Who replayed it, once the console knows it was."""
        async with asyncio.timeout(60):
            while True:
                assert self.service.store is not None
                letter = self.service.store.dead_letter(letter_id)
                if letter and letter.get("replayed_by"):
                    return str(letter["replayed_by"])
                await asyncio.sleep(0.05)

    async def replay(self, letter_id: str) -> httpx.Response:
        page = (await self.http.get(f"/dead-letters/{letter_id}")).text
        csrf = re.search(r'name="csrf" value="([^"]+)"', page)
        assert csrf is not None
        return await self.http.post(f"/dead-letters/{letter_id}/replay",
                                    data={"csrf": csrf.group(1), "confirm": "yes"})


@contextlib.asynccontextmanager
async def console(cfg: Settings, data_dir: Path) -> AsyncIterator[Running]:
    """The console service with its own store under `data_dir`, and an operator logged in."""
    service = ConsoleService(dataclasses.replace(cfg, data_dir=str(data_dir)))
    await service.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{service.port}", timeout=30,
                                     follow_redirects=True) as http:
            answer = await http.post("/login", data={"user": "ana", "password": PASSWORD})
            assert answer.status_code == 200, answer.status_code
            yield Running(service, http)
    finally:
        await service.stop()


@contextlib.asynccontextmanager
async def console_with_a_dead_letter(
    cfg: Settings, data_dir: Path, customer: str
) -> AsyncIterator[tuple[Running, str]]:
    """A dead letter of `customer` on the topic, then the console, once it has stored it: (console, id)."""
    await put_dead_letter(cfg, customer)
    async with console(cfg, data_dir) as running:
        yield running, await running.letter_id(customer)


async def replay_from_the_cli(cfg: Settings, letter_id: str, by: str) -> deadletters.ReplayOutcome:
    """`watistream dead-letters replay` of that one letter, as operator `by`."""
    [entry] = [e for e in await deadletters.read_entries(cfg) if e.id == letter_id]
    [outcome] = await deadletters.replay(cfg, [entry], by=by)
    return outcome


async def test_a_console_replay_is_recorded_on_the_topic_and_survives_a_rebuilt_store(
    cfg: Settings, tmp_path: Path
) -> None:
    async with console_with_a_dead_letter(cfg, tmp_path / "first", "wati:50371111111") as (first, letter_id):
        answer = await first.replay(letter_id)
        assert answer.status_code == 200 and f"/dead-letters/{letter_id}" in str(answer.url)
        assert (await first.replay(letter_id)).status_code == 409

    replays = await deadletters.read_replays(cfg)  # the topic holds it, with the operator's name
    assert replays[letter_id]["replayed_by"] == "ana"
    assert replays[letter_id]["source_topic"] == Topics.from_settings(cfg).inbound

    async with console(cfg, tmp_path / "rebuilt") as rebuilt:  # an empty store: rebuilt from the topics
        await rebuilt.letter_id("wati:50371111111")
        assert await rebuilt.replayed_by(letter_id) == "ana"
        second = await rebuilt.replay(letter_id)
        assert second.status_code == 409 and "already replayed by ana" in second.text

    # the CLI refuses it too: one record for both
    outcome = await replay_from_the_cli(cfg, letter_id, by="bo")
    assert outcome.replayed is None and outcome.refused and "by ana" in outcome.refused


async def test_a_cli_replay_shows_as_replayed_in_the_console_and_is_refused_there(
    cfg: Settings, tmp_path: Path
) -> None:
    customer = "wati:50372222222"
    async with console_with_a_dead_letter(cfg, tmp_path / "store", customer) as (running, letter_id):
        assert running.service.consumer is not None
        await running.service.consumer.stop()  # the console does not read the replay yet...
        outcome = await replay_from_the_cli(cfg, letter_id, by="bo")
        assert outcome.replayed is not None
        refused = await running.replay(letter_id)  # ...and still refuses: it asks the topic itself
        assert refused.status_code == 409 and "already replayed by bo" in refused.text
        assert "by <b>bo</b>" in (await running.http.get(f"/dead-letters/{letter_id}")).text

    async with console(cfg, tmp_path / "store") as restarted:  # and once read, the page shows it
        assert await restarted.replayed_by(letter_id) == "bo"
        assert "replayed by bo" in (await restarted.http.get("/dead-letters")).text
