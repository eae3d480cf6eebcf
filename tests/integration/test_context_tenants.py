"""The context service with a TENANTS_FILE on the real broker: it loads the file at start and gives each
customer its tenant's thresholds (docs/tenants.md "Thresholds per tenant")."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.common.config import Settings
from services.standins import StandIns
from tests.integration.test_context_service import (
    Bus,
    ContextWorker,
    clock,
    free_port,
    inbound,
    new_customer,
    texts,
)

pytestmark = pytest.mark.broker


@pytest.fixture(scope="module")
async def stand_ins() -> AsyncIterator[StandIns]:
    async with StandIns.running() as s:
        yield s


@pytest.fixture(scope="module")
def worker_settings(settings: Settings, stand_ins: StandIns, tmp_path_factory: pytest.TempPathFactory
                    ) -> Settings:
    """The deployment's quiet window is an hour; tenant `fast` has 1 s, the `default` tenant keeps
    the deployment's: only a customer of `fast` can be answered within the test."""
    folder = tmp_path_factory.mktemp("tenants")
    path: Path = folder / "tenants.json"
    wati = {"api_url": stand_ins.wati_url, "token": "env:WATI_API_TOKEN"}
    fast_secret = folder / "fast-webhook-secret"  # each tenant its own (`watistream check` insists)
    fast_secret.write_text("fast-tenant-webhook-secret\n", encoding="utf-8")
    path.write_text(json.dumps({"tenants": [
        {"id": "default", "wati": wati, "webhook_secret": "env:WEBHOOK_TOKEN"},
        {"id": "fast", "wati": {**wati, "api_url": stand_ins.wati_url + "/other"},
         "webhook_secret": f"file:{fast_secret}",
         "thresholds": {"quiet_window_seconds": 1, "max_batch_wait_seconds": 10}},
    ]}), encoding="utf-8")
    return dataclasses.replace(
        settings, tenants_file=str(path), wati_api_url=stand_ins.wati_url,
        wati_api_token=stand_ins.wati.token, quiet_window_seconds=3600.0, max_batch_wait_seconds=7200.0,
        flush_scan_interval_seconds=0.2, history_timeout_seconds=5.0, context_web_port=free_port(),
        context_store="memory", data_dir=str(folder / "data"), log_level="INFO",
    )


async def test_each_customer_is_batched_with_its_tenants_quiet_window(
    bus: Bus, worker: ContextWorker
) -> None:
    ours, _ = new_customer()
    theirs = f"fast/default/{ours}"  # the same phone number, at tenant `fast`
    now = clock()
    await bus.inbound(inbound(ours, "room for tonight?", now))
    await bus.inbound(inbound(theirs, "table for two?", now))
    (request,) = await bus.wait_for(bus.topics.responder_requests, theirs)
    assert texts(request) == ["table for two?"] and request["customer_key"] == theirs
    await bus.settle(2.0)  # twice `fast`'s window: the default tenant's hour has not passed
    assert bus.of(bus.topics.responder_requests, ours) == []


def test_a_broken_tenants_file_stops_the_worker_at_start(
    worker_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> None:
    folder = tmp_path_factory.mktemp("broken")
    path = folder / "tenants.json"
    path.write_text(json.dumps({"tenants": [{"id": "fast", "wati": {"api_url": "https://x/1",
                                                                   "token": "sk-inline-secret"}}]}),
                    encoding="utf-8")
    settings = dataclasses.replace(worker_settings, tenants_file=str(path), context_web_port=free_port())
    w = ContextWorker(settings, folder / "context.log").start()
    assert w.proc is not None
    code = w.proc.wait(120)
    log = w.log_tail()
    assert code != 0, log
    assert "tenant 'fast': wati[default].token: inline secrets are not allowed" in log
    assert "sk-inline-secret" not in log
