"""`watistream check` against the real broker and the stand-ins, one fault at a time: each fault
fails exactly its own line with a reason that names the setting to change, and the exit code says so."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from services.common.broker import free_port
from services.common.config import Settings
from services.common.kafka import Topics
from services.devtools.check import SERVICE_NEEDS, Check, exit_code, run_checks
from services.standins import StandIns

from ..conftest import unique_prefix

pytestmark = pytest.mark.broker
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
async def stand_ins() -> AsyncIterator[StandIns]:
    async with StandIns.running() as running:
        yield running


def healthy(settings: Settings, stand_ins: StandIns, name: str, **overrides: object) -> Settings:
    """Settings that pass every check: the stand-ins, fresh topics of this test."""
    values: dict[str, object] = {
        "topic_prefix": unique_prefix(name), "wati_api_url": stand_ins.wati_url,
        "manychat_api_url": stand_ins.manychat_url, "openai_base_url": stand_ins.openai_url,
    }
    return dataclasses.replace(settings, **{**values, **overrides})  # type: ignore[arg-type]


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


def only_failures(checks: list[Check]) -> list[Check]:
    return [c for c in checks if not c.ok]


async def test_a_healthy_setup_passes_and_creates_the_missing_topics(
    settings: Settings, stand_ins: StandIns
) -> None:
    cfg = healthy(settings, stand_ins, "healthy")
    checks = await run_checks(cfg)
    assert only_failures(checks) == []
    assert exit_code(checks) == 0
    found = by_name(checks)
    assert set(found) >= {"channels", "kafka", "topics", "wati", "manychat", "openai", "conversations",
                          "system prompt"}
    assert f"{len(Topics.from_settings(cfg).all())} created now" in found["topics"].detail
    assert "Tienda Demo" in found["manychat"].detail
    # the test conversation is not left behind
    assert all(stand_ins.openai.is_deleted(cid) for cid in stand_ins.openai.conversations)
    # a second run finds them all, creates nothing
    again = by_name(await run_checks(cfg))
    assert again["topics"].ok and "created" not in again["topics"].detail


async def test_bad_tokens_fail_their_own_lines(settings: Settings, stand_ins: StandIns) -> None:
    cfg = healthy(settings, stand_ins, "tokens", wati_api_token="Bearer wrong", manychat_api_token="wrong",
                  openai_api_key="sk-wrong")
    failures = by_name(only_failures(await run_checks(cfg)))
    assert set(failures) == {"wati", "manychat", "openai"}
    assert "WATI refused WATI_API_TOKEN (HTTP 401)" in failures["wati"].detail
    assert "WATI_API_TOKEN" in failures["wati"].fix
    assert "ManyChat refused MANYCHAT_API_TOKEN" in failures["manychat"].detail
    assert "OpenAI refused OPENAI_API_KEY (HTTP 401)" in failures["openai"].detail


async def test_a_pasted_bearer_prefix_is_not_a_fault(settings: Settings, stand_ins: StandIns) -> None:
    cfg = healthy(settings, stand_ins, "bearer", wati_api_token=f"Bearer {stand_ins.wati.token}")
    assert by_name(await run_checks(cfg, ("wati",)))["wati"].ok


async def test_wrong_wati_tenant_says_the_url(settings: Settings, stand_ins: StandIns) -> None:
    cfg = healthy(settings, stand_ins, "tenant", wati_api_url=stand_ins.wati_url.rsplit("/", 1)[0] + "/other")
    wati = by_name(await run_checks(cfg, ("wati",)))["wati"]
    assert not wati.ok and "WATI_API_URL not found" in wati.detail and "tenant id" in wati.fix


async def test_unknown_model(settings: Settings, stand_ins: StandIns) -> None:
    cfg = healthy(settings, stand_ins, "model", openai_model="gpt-9-imaginary", vision_model="gpt-4o")
    checks = await run_checks(cfg, ("openai",))
    failures = only_failures(checks)
    assert [c.name for c in failures] == ["openai"]
    assert "model 'gpt-9-imaginary' does not exist" in failures[0].detail
    assert "OPENAI_MODEL" in failures[0].fix
    assert by_name(checks)["openai vision"].ok
    assert "conversations" not in by_name(checks)  # not tried with a broken model: one reason at a time


async def test_missing_topic_when_creating_is_not_allowed(settings: Settings, stand_ins: StandIns) -> None:
    cfg = healthy(settings, stand_ins, "missing", kafka_create_topics=False)
    failures = only_failures(await run_checks(cfg, ("kafka",)))
    topics = Topics.from_settings(cfg).all()
    assert [c.detail for c in failures] == [f"{t} is missing" for t in topics]
    assert all("KAFKA_CREATE_TOPICS=true" in c.fix for c in failures)


async def test_wrong_partitions(settings: Settings, stand_ins: StandIns) -> None:
    cfg = healthy(settings, stand_ins, "partitions")
    topics = Topics.from_settings(cfg)
    admin = AIOKafkaAdminClient(bootstrap_servers=cfg.kafka_bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topics.replies, num_partitions=2, replication_factor=1)])
    finally:
        await admin.close()
    failures = only_failures(await run_checks(cfg, ("kafka",)))
    assert len(failures) == 1
    assert failures[0].detail.startswith(f"{topics.replies} has 2 partitions, TOPIC_PARTITIONS=4")
    assert "TOPIC_PARTITIONS=2" in failures[0].fix


async def test_a_state_topic_that_is_not_compacted(settings: Settings, stand_ins: StandIns) -> None:
    cfg = healthy(settings, stand_ins, "compaction")
    topics = Topics.from_settings(cfg)
    admin = AIOKafkaAdminClient(bootstrap_servers=cfg.kafka_bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topics.responder_state, num_partitions=4, replication_factor=1)])
    finally:
        await admin.close()
    failures = only_failures(await run_checks(cfg, ("kafka",)))
    assert [c.detail.split(" (")[0] for c in failures] == [
        f"{topics.responder_state} has cleanup.policy=delete, not compact"]
    assert "cleanup.policy=compact" in failures[0].fix


async def test_unreachable_broker(settings: Settings, stand_ins: StandIns) -> None:
    cfg = healthy(settings, stand_ins, "unreachable", kafka_bootstrap_servers=f"127.0.0.1:{free_port()}")
    checks = await run_checks(cfg, ("kafka",), timeout=5.0)
    assert [c.name for c in checks] == ["kafka"]
    assert not checks[0].ok and checks[0].detail.startswith(f"{cfg.kafka_bootstrap_servers}: cannot connect")
    assert "KAFKA_BOOTSTRAP_SERVERS" in checks[0].fix


async def test_a_wrong_kafka_password_fails_the_check_with_a_clear_reason(
    settings: Settings, stand_ins: StandIns, secured_kafka: Settings
) -> None:
    secured = {f.name: getattr(secured_kafka, f.name) for f in dataclasses.fields(Settings)
               if f.name.startswith("kafka_")}
    cfg = healthy(settings, stand_ins, "secured", **{**secured, "kafka_sasl_password": "not-it"})
    checks = await run_checks(cfg, ("kafka",), timeout=10.0)
    assert [c.name for c in checks] == ["kafka"] and not checks[0].ok
    assert "rejected user 'watistream'" in checks[0].detail and "KAFKA_SASL_PASSWORD" in checks[0].detail
    assert "not-it" not in checks[0].detail + checks[0].fix
    assert exit_code(checks) != 0
    good = healthy(settings, stand_ins, "secured-ok", **secured)
    passed = await run_checks(good, ("kafka",), timeout=20.0)
    assert passed and all(c.ok for c in passed), passed


async def test_unreadable_prompt_and_a_disabled_channel_is_not_checked(
    settings: Settings, stand_ins: StandIns, tmp_path: Path
) -> None:
    cfg = healthy(settings, stand_ins, "prompt", channels="manychat", wati_api_token="wrong",
                  system_prompt_file=str(tmp_path / "absent.txt"))
    checks = by_name(await run_checks(cfg))
    assert "wati" not in checks
    assert checks["channels"].detail == "manychat"
    assert not checks["system prompt"].ok and "cannot be read" in checks["system prompt"].detail


def cli(settings: Settings, *args: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in {n for n, _, _ in Settings.documented()}}
    env.update({f.metadata["env"]: str(getattr(settings, f.name)).lower()
                if isinstance(getattr(settings, f.name), bool) else str(getattr(settings, f.name))
                for f in dataclasses.fields(settings)})
    env.update(extra_env)
    return subprocess.run([sys.executable, "-m", "services.cli", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


async def test_the_command_prints_one_line_per_check_and_exits_non_zero_on_failure(
    settings: Settings, stand_ins: StandIns
) -> None:
    good = healthy(settings, stand_ins, "cli")
    # the stand-ins run in this test's event loop: run the subprocess in a thread so they can answer
    import asyncio

    done = await asyncio.to_thread(cli, good, "check")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[-1].startswith("all ") and all(line.startswith("ok ") for line in lines[:-1])
    bad = dataclasses.replace(good, openai_api_key="sk-wrong")
    done = await asyncio.to_thread(cli, bad, "check")
    assert done.returncode == 1
    assert any(line.startswith("FAIL openai") and "OPENAI_API_KEY" in line
               for line in done.stdout.splitlines())
    # a malformed setting is a FAIL line too, naming the variable
    done = await asyncio.to_thread(cli, good, "check", INGEST_PORT="99999")
    assert done.returncode == 1
    assert done.stdout.startswith("FAIL settings       INGEST_PORT must be <= 65535, got 99999")
    # a service refuses to start on the same failure
    done = await asyncio.to_thread(cli, dataclasses.replace(bad, responder_web_port=free_port()), "responder")
    assert done.returncode == 1 and "FAIL openai" in done.stderr and "--skip-checks" in done.stderr


def test_skip_checks_starts_the_service_anyway(settings: Settings) -> None:
    """ingest with no broker: refused by its check; with --skip-checks it serves (503 until Kafka)."""
    port = free_port()
    cfg = dataclasses.replace(settings, kafka_bootstrap_servers=f"127.0.0.1:{free_port()}", ingest_port=port)
    done = cli(cfg, "ingest")
    assert done.returncode == 1 and "FAIL kafka" in done.stderr
    env = {k: v for k, v in os.environ.items() if k not in {n for n, _, _ in Settings.documented()}}
    env.update({"KAFKA_BOOTSTRAP_SERVERS": cfg.kafka_bootstrap_servers, "WEBHOOK_TOKEN": "t",
                "INGEST_PORT": str(port)})
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "ingest", "--skip-checks"], env=env,
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import httpx

        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, "ingest --skip-checks exited"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "ingest --skip-checks did not serve"
            time.sleep(0.2)  # polling a child process's port: there is no event to await
    finally:
        proc.terminate()
        proc.wait(timeout=30)


async def test_each_tenants_account_is_checked_on_its_own_line_and_not_at_a_services_start(
    settings: Settings, stand_ins: StandIns, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tenants file: each tenant's WATI / ManyChat account is asked with its own URL and token, and
    a wrong one fails its own line, named as the file names the account; a service's start checks
    leave them out (one tenant's wrong token must not stop the service for the others)."""
    good = stand_ins.wati.add_tenant("check-good", "good-token")
    cfg_model = settings.openai_model
    stand_ins.wati.add_tenant("check-wrong", "right-token")
    (tmp_path / "good-token").write_text("Bearer good-token\n")  # as WATI's dashboard shows it
    monkeypatch.setenv("CHECK_WRONG_WATI_TOKEN", "not-the-token")
    monkeypatch.setenv("CHECK_MANYCHAT_TOKEN", stand_ins.manychat.token)
    monkeypatch.setenv("CHECK_SECRET", "s3cret-webhook")
    stand_ins.openai.add_key("sk-tenant-good")
    monkeypatch.setenv("CHECK_GOOD_OPENAI_KEY", "sk-tenant-good")
    monkeypatch.setenv("CHECK_WRONG_OPENAI_KEY", "sk-tenant-wrong")
    tenants = [
        {"id": "good", "webhook_secret": "env:CHECK_SECRET",
         "wati": {"api_url": good.url, "token": f"file:{tmp_path / 'good-token'}"},
         "manychat": {"api_url": stand_ins.manychat_url, "token": "env:CHECK_MANYCHAT_TOKEN"},
         "openai": {"model": cfg_model, "api_key": "env:CHECK_GOOD_OPENAI_KEY", "project": "proj_good"}},
        {"id": "wrong", "webhook_secret": "env:CHECK_SECRET",
         "openai": {"model": cfg_model, "api_key": "env:CHECK_WRONG_OPENAI_KEY"},
         "wati": [{"id": "reception", "api_url": f"{stand_ins.wati.origin}/check-wrong",
                   "token": "env:CHECK_WRONG_WATI_TOKEN"},
                  {"id": "bar", "api_url": f"{stand_ins.wati.origin}/no-such-tenant",
                   "token": f"file:{tmp_path / 'good-token'}"}]},
    ]
    path = tmp_path / "tenants.json"
    path.write_text(json.dumps({"tenants": tenants}))
    cfg = healthy(settings, stand_ins, "tenant-accounts", tenants_file=str(path))
    checks = by_name(await run_checks(cfg))
    assert checks["wati good wati[default]"].ok
    assert checks["manychat good manychat[default]"].ok and "Tienda Demo" in checks[
        "manychat good manychat[default]"].detail
    wrong = checks["wati wrong wati[reception]"]
    assert not wrong.ok
    assert wrong.detail == "WATI refused TENANTS_FILE wrong wati[reception].token (HTTP 401)"
    assert "TENANTS_FILE wrong wati[reception].token" in wrong.fix
    missing = checks["wati wrong wati[bar]"]
    assert not missing.ok and missing.detail == "TENANTS_FILE wrong wati[bar].api_url not found (HTTP 404)"
    # a tenant's own OpenAI key, in its project: its own line; a refused one names where it is set
    own = checks["openai good"]
    assert own.ok and "TENANTS_FILE good openai.api_key accepted" in own.detail
    assert any(r.headers.get("OpenAI-Project") == "proj_good" for r in stand_ins.openai.requests)
    refused = checks["openai wrong"]
    assert not refused.ok and "OpenAI refused TENANTS_FILE wrong openai.api_key (HTTP 401)" in refused.detail
    assert checks["openai"].ok  # the deployment's own key is still its own line
    assert exit_code(list(checks.values())) == 1
    text = "\n".join(f"{c.detail} {c.fix}" for c in checks.values())
    assert not any(secret in text for secret in ("good-token", "not-the-token", "sk-tenant"))  # no secrets
    # each account was asked with its own token, on its own WATI tenant
    assert any(r.headers.get("Authorization") == "Bearer good-token" for r in good.requests)
    # a service's start: the tenants file is checked, its accounts are not called
    at_start = by_name(await run_checks(cfg, SERVICE_NEEDS["context"]))
    assert "tenants" in at_start and not any(name.startswith(("wati ", "openai ")) for name in at_start)
