"""Security drills (issue 7, drill 5), against the real services and the session's real Kafka.

- webhooks without / with a wrong secret (header and `?token=`) → 401, nothing produced; the secret
  is compared with `hmac.compare_digest` (a spy proves the header and the query paths use it);
- every HTTP listener (ingest, context views, responder and vision ops) binds loopback when its
  *_HOST setting is not given (read from /proc/net/tcp[6]; nothing connects to a non-loopback
  address); the views answer 401 without / with a wrong token, and faust's built-in table / router /
  stats endpoints are off (404 even WITH the token);
- request size limits: 413 for an oversized body declared by Content-Length (answered before the body
  is sent), for an oversized chunked body, on the webhooks and on the views' command endpoints;
- no phone number, token or API key in any log line at INFO: the four services run as real
  `watistream` processes with planted secrets and phone numbers, a customer journey goes through all
  of them (WATI text + image + contact card, ManyChat, views, wrong secrets), then every line of
  every log is scanned.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import ipaddress
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from services.common.config import Settings
from services.common.kafka import Topics, ensure_topics
from services.context import views
from services.ingest.app import MANYCHAT_ROUTE, WATI_ROUTE, serve
from services.standins import StandIns
from tests.conftest import unique_prefix
from tests.integration.test_fuzz_webhooks import report
from tests.integration.test_poison_topics import ServiceProcess, eventually, free_port
from tests.unit.test_vision_images import png_bytes

pytestmark = pytest.mark.broker

# Planted secrets: distinctive, so a leak is found whatever the formatting around it.
WEBHOOK_TOKEN = "whsec-Zq7Lm2Xp9Kd4Rt8V"
WEB_TOKEN = "webtok-Hn3Jc8Qw5Ey1Ua6P"
WATI_TOKEN = "watitok-Bv4Nx7Mz2Lk9Jp3R"
MANYCHAT_TOKEN = "mctok-Gs5Df8Hj1Kl4Zx7C"
OPENAI_KEY = "sk-proj-Tq8Wm3Rn6Yb9Vc2X"
SECRETS = (WEBHOOK_TOKEN, WEB_TOKEN, WATI_TOKEN, MANYCHAT_TOKEN, OPENAI_KEY)
# Planted phone numbers: the customer's waId, one written in a message, one on a shared contact card,
# the business number WATI puts in every payload.
CUSTOMER_PHONE = "50376543210"
PHONES = (CUSTOMER_PHONE, "50378881100", "50371112299", "17435002445")
MANYCHAT_SUBSCRIBER = "4455667788"

HOST_SETTINGS = frozenset({"INGEST_HOST", "CONTEXT_WEB_HOST", "OPS_WEB_HOST"})


# -- log scanning (pure, tested below so the scan itself can fail) --------------------------------------

_SEPARATORS = re.compile(r"[\s()+\-]")
_SK_KEY = re.compile(r"(?<![A-Za-z0-9])sk-(?!\*\*\*)[A-Za-z0-9_-]{4,}")
_BEARER = re.compile(r"(?i)bearer\s+(?!\*\*\*)[A-Za-z0-9._~+/=-]{6,}")


def leaks(line: str, secrets: tuple[str, ...] = SECRETS, phones: tuple[str, ...] = PHONES) -> list[str]:
    """What a log line reveals: planted secrets, any `sk-` key or Bearer value, any 7 consecutive
    digits of a planted phone number (also when written with spaces, dashes, `+` or parentheses)."""
    found = [f"secret {s[:6]}…" for s in secrets if s in line]
    found += [f"api key {m.group()[:6]}…" for m in _SK_KEY.finditer(line)]
    found += [f"bearer {m.group()[:10]}…" for m in _BEARER.finditer(line)]
    squeezed = _SEPARATORS.sub("", line)
    for phone in phones:
        windows = {phone[i:i + 7] for i in range(len(phone) - 6)}
        if any(w in squeezed for w in windows):
            found.append(f"phone …{phone[-3:]}")
    return found


def test_the_log_scan_finds_what_it_looks_for() -> None:
    assert leaks('{"msg": "calling +503 7654-3210"}') == ["phone …210"]
    assert leaks('{"customer": "wati:50376543210"}') == ["phone …210"]
    assert leaks('{"customer": "wati:********210"}') == []
    assert leaks(f"token={WEBHOOK_TOKEN}")[0].startswith("secret")
    assert "api key sk-pro…" in leaks('{"key": "sk-proj-abcdefgh"}')
    assert leaks('{"key": "sk-***"}') == []
    assert leaks("Authorization: Bearer abcdef123") == ["bearer Bearer abc…"]
    assert leaks("Authorization: Bearer ***") == []


# -- listening sockets ----------------------------------------------------------------------------------

def listen_addresses(port: int) -> set[str]:
    """Local addresses with a LISTEN socket on `port`, from /proc/net/tcp and tcp6 (this host's netns)."""
    found: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address_hex, port_hex = fields[1].split(":")
            if fields[3] != "0A" or int(port_hex, 16) != port:  # 0A = TCP_LISTEN
                continue
            raw = bytes.fromhex(address_hex)
            # the kernel prints each 32-bit word in host (little-endian) order
            found.add(str(ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)))))
    return found


# -- fixtures -------------------------------------------------------------------------------------------

@dataclass
class Stack:
    """The four services as `watistream` processes with planted secrets; default bind addresses."""

    settings: Settings
    stand_ins: StandIns
    processes: dict[str, ServiceProcess]
    ports: dict[str, int]

    @property
    def ingest(self) -> str:
        return f"http://127.0.0.1:{self.settings.ingest_port}"

    @property
    def views(self) -> str:
        return f"http://127.0.0.1:{self.settings.context_web_port}"

    def stop(self) -> None:
        for process in self.processes.values():
            process.stop()

    def log_lines(self) -> Iterator[tuple[str, str]]:
        for name, process in self.processes.items():
            for line in process.log_path.read_text(errors="replace").splitlines():
                yield name, line


@pytest.fixture(scope="module")
async def stand_ins() -> AsyncIterator[StandIns]:
    async with StandIns.running(wati_token=WATI_TOKEN, manychat_token=MANYCHAT_TOKEN,
                                openai_key=OPENAI_KEY) as s:
        yield s


@pytest.fixture(scope="module")
async def stack(settings: Settings, stand_ins: StandIns, tmp_path_factory: pytest.TempPathFactory
                ) -> AsyncIterator[Stack]:
    s = stand_ins
    logs = tmp_path_factory.mktemp("security-logs")
    cfg = dataclasses.replace(
        settings, topic_prefix=unique_prefix("security-stack"), webhook_token=WEBHOOK_TOKEN,
        web_token=WEB_TOKEN, wati_api_url=s.wati_url, wati_api_token=WATI_TOKEN,
        manychat_api_url=s.manychat_url, manychat_api_token=MANYCHAT_TOKEN, openai_base_url=s.openai_url,
        openai_api_key=OPENAI_KEY, openai_max_attempts=2, ingest_port=free_port(),
        context_web_port=free_port(), responder_web_port=free_port(), vision_web_port=free_port(),
        quiet_window_seconds=1.0, flush_scan_interval_seconds=0.2, history_timeout_seconds=5.0,
        data_dir=str(tmp_path_factory.mktemp("security-data")), log_level="INFO",
    )
    await ensure_topics(cfg)
    ports = {"ingest": cfg.ingest_port, "context": cfg.context_web_port,
             "responder": cfg.responder_web_port, "vision": cfg.vision_web_port}
    processes = {
        name: ServiceProcess(name, cfg, logs / f"{name}.log", f"http://127.0.0.1:{port}/readyz",
                             omit_env=HOST_SETTINGS).start()
        for name, port in ports.items()
    }
    running = Stack(cfg, s, processes, ports)
    try:
        await asyncio.gather(*(p.wait_ready() for p in processes.values()))
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def ingest_settings(settings: Settings) -> Settings:
    """For the in-process ingest: topics of its own, so 'nothing produced' is exact."""
    return dataclasses.replace(settings, topic_prefix=unique_prefix("security-ingest"),
                               webhook_token=WEBHOOK_TOKEN, max_body_bytes=16 * 1024)


@pytest.fixture(scope="module")
async def ingest(ingest_settings: Settings) -> AsyncIterator[str]:
    async with serve(ingest_settings, port=0) as url:
        async with httpx.AsyncClient() as http:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while (await http.get(url + "/readyz")).status_code != 200:
                assert loop.time() < deadline, "ingest never became ready"
                await asyncio.sleep(0.1)
        yield url


async def produced(settings: Settings) -> int:
    """Records on every topic of the settings' prefix (inbound, agent-activity, dead-letter, ...)."""
    topics = Topics.from_settings(settings)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers)
    await consumer.start()
    try:
        tps = [TopicPartition(t, p) for t in topics.all() for p in range(settings.topic_partitions)]
        return sum((await consumer.end_offsets(tps)).values())
    finally:
        await consumer.stop()


def wati_text(wa_id: str, text: str | None, **extra: Any) -> dict[str, Any]:
    ident = uuid.uuid4().hex[:20].upper()
    return {
        "id": uuid.uuid4().hex[:24], "created": "2026-11-28T10:14:16.6268572Z",
        "whatsappMessageId": f"wamid.HBgL{ident}", "text": text, "type": "text", "data": None,
        "timestamp": "1764238454", "owner": False, "eventType": "message", "waId": wa_id,
        "senderName": "Ana Pérez", "channelPhoneNumber": PHONES[3], **extra,
    }


# -- webhooks: secrets ----------------------------------------------------------------------------------

async def test_webhooks_refuse_a_missing_or_wrong_secret_and_produce_nothing(
    ingest: str, ingest_settings: Settings
) -> None:
    body = wati_text(CUSTOMER_PHONE, "hola")
    before = await produced(ingest_settings)
    refused: list[tuple[dict[str, str], dict[str, str]]] = [
        ({}, {}),
        ({"Authorization": f"Bearer {WEBHOOK_TOKEN}x"}, {}),
        ({"Authorization": f"Bearer {WEBHOOK_TOKEN[:-1]}"}, {}),
        ({"Authorization": f"Bearer {WEBHOOK_TOKEN.upper()}"}, {}),
        ({"Authorization": "Bearer"}, {}),
        ({"Authorization": f"Basic {WEBHOOK_TOKEN}"}, {}),
        ({"Authorization": WEBHOOK_TOKEN}, {}),
        ({"X-Webhook-Token": WEBHOOK_TOKEN}, {}),
        ({}, {"token": ""}),
        ({}, {"token": f"{WEBHOOK_TOKEN} "}),
        ({}, {"token": WEB_TOKEN}),  # another of our secrets is not this one
        ({}, {"Token": WEBHOOK_TOKEN}),
        # a Bearer header wins over the query: a wrong header is refused even with the right query
        ({"Authorization": "Bearer wrong"}, {"token": WEBHOOK_TOKEN}),
    ]
    async with httpx.AsyncClient() as http:
        for route in (WATI_ROUTE, MANYCHAT_ROUTE):
            for headers, params in refused:
                response = await http.post(ingest + route, json=body, headers=headers, params=params)
                assert response.status_code == 401, (route, headers, params)
                doc = response.json()
                assert doc["error"] == "unauthorized" and doc["reason"], doc
                assert response.headers["WWW-Authenticate"] == "Bearer"
                assert WEBHOOK_TOKEN not in response.text
    assert await produced(ingest_settings) == before, "a refused webhook produced something"
    # and the right secret, both ways, is accepted (the refusals above were about the secret only)
    async with httpx.AsyncClient() as http:
        ok_header = await http.post(ingest + WATI_ROUTE, json=body,
                                    headers={"Authorization": f"Bearer {WEBHOOK_TOKEN}"})
        ok_query = await http.post(ingest + WATI_ROUTE, json=wati_text(CUSTOMER_PHONE, "hola"),
                                   params={"token": WEBHOOK_TOKEN})
    assert (ok_header.status_code, ok_query.status_code) == (200, 200)
    assert await produced(ingest_settings) == before + 2


async def test_secrets_are_compared_in_constant_time(
    ingest: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The auth paths call `hmac.compare_digest` with the presented and the expected secret."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((bytes(a), bytes(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    body = wati_text(CUSTOMER_PHONE, "hola")
    expected = WEBHOOK_TOKEN.encode()
    async with httpx.AsyncClient() as http:
        cases = [
            ({"Authorization": f"Bearer {WEBHOOK_TOKEN}"}, {}, WEBHOOK_TOKEN, 200),
            ({}, {"token": WEBHOOK_TOKEN}, WEBHOOK_TOKEN, 200),
            ({"Authorization": "Bearer whsec-Zq7Lm2"}, {}, "whsec-Zq7Lm2", 401),  # a right prefix
            ({}, {"token": "x" * 200}, "x" * 200, 401),  # another length
        ]
        for headers, params, presented, status in cases:
            calls.clear()
            response = await http.post(ingest + WATI_ROUTE, json=body, headers=headers, params=params)
            assert response.status_code == status, (headers, params, response.text)
            assert (presented.encode(), expected) in calls, (headers, params, calls)
    # the context views' token check too
    calls.clear()
    assert views.bearer_ok(f"Bearer {WEB_TOKEN}", WEB_TOKEN)
    assert not views.bearer_ok("Bearer webtok-Hn3J", WEB_TOKEN)
    assert calls == [(WEB_TOKEN.encode(), WEB_TOKEN.encode()), (b"webtok-Hn3J", WEB_TOKEN.encode())]


# -- request size limits --------------------------------------------------------------------------------

async def chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    """The body as an async iterator: httpx sends it with `Transfer-Encoding: chunked`, no length."""
    for i in range(0, len(data), size):
        yield data[i:i + size]


async def raw_request(url: str, head: bytes, body: bytes = b"", timeout: float = 10.0) -> tuple[int, bytes]:
    """Sends a hand-written HTTP/1.1 request; returns the status and the raw answer (no body needed)."""
    parts = httpx.URL(url)
    reader, writer = await asyncio.open_connection(parts.host, parts.port)
    try:
        writer.write(head + body)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(65536), timeout)
    finally:
        writer.close()
    return int(answer.split(b" ", 2)[1]), answer


async def test_oversized_webhook_bodies_get_413_and_produce_nothing(
    ingest: str, ingest_settings: Settings
) -> None:
    limit = ingest_settings.max_body_bytes
    auth = {"Authorization": f"Bearer {WEBHOOK_TOKEN}", "Content-Type": "application/json"}
    big = ('{"text": "' + "x" * limit + '"}').encode()
    before = await produced(ingest_settings)
    async with httpx.AsyncClient() as http:
        for route in (WATI_ROUTE, MANYCHAT_ROUTE):
            declared = await http.post(ingest + route, content=big, headers=auth)
            chunked = await http.post(ingest + route, headers=auth, content=chunks(big, 1000))
            for response in (declared, chunked):
                assert response.status_code == 413, response.text
                assert response.json()["error"] == "payload_too_large"
    # only the header: a 1 GB Content-Length is refused before any of the body is sent
    head = (f"POST {WATI_ROUTE} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {WEBHOOK_TOKEN}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n").encode()
    status, answer = await raw_request(ingest, head)
    assert status == 413 and b"payload_too_large" in answer
    # a header block larger than the server accepts is a 4xx from the HTTP layer, never a 5xx
    async with httpx.AsyncClient() as http:
        response = await http.post(ingest + WATI_ROUTE, json={}, headers={**auth, "X-Big": "y" * 20_000})
    assert 400 <= response.status_code < 500
    assert await produced(ingest_settings) == before


async def test_oversized_view_command_bodies_get_413(stack: Stack) -> None:
    auth = {"Authorization": f"Bearer {WEB_TOKEN}", "Content-Type": "application/json"}
    url = f"{stack.views}/customers/wati:50300000001/pause/"  # not the journey's customer
    body = ('{"actor": "ops"' + " " * (views.MAX_BODY_BYTES + 10) + "}").encode()  # valid JSON, too big
    async with httpx.AsyncClient() as http:
        declared = await http.post(url, content=body, headers=auth)
        chunked = await http.post(url, headers=auth, content=chunks(body, 512))
    assert declared.status_code == 413, declared.text
    assert chunked.status_code == 413, chunked.text


# -- views: binding, tokens, built-in endpoints ---------------------------------------------------------

async def test_every_listener_binds_loopback_by_default(stack: Stack) -> None:
    """INGEST_HOST, CONTEXT_WEB_HOST and OPS_WEB_HOST were not given: everything is on 127.0.0.1 only."""
    defaults = Settings()
    assert (defaults.ingest_host, defaults.context_web_host, defaults.ops_web_host) == ("127.0.0.1",) * 3
    for name, port in stack.ports.items():
        assert listen_addresses(port) == {"127.0.0.1"}, (name, port, listen_addresses(port))


async def test_views_refuse_without_or_with_a_wrong_token(stack: Stack) -> None:
    key = f"wati:{CUSTOMER_PHONE}"
    endpoints = [("GET", "/customers/"), ("GET", "/customers/?open=1"), ("GET", f"/customers/{key}/"),
                 ("GET", "/customers/wati%3A50376543210/"), ("POST", f"/customers/{key}/pause/"),
                 ("POST", f"/customers/{key}/resume/")]
    refused = [{}, {"Authorization": f"Bearer {WEB_TOKEN}x"}, {"Authorization": f"Bearer {WEB_TOKEN[:-1]}"},
               {"Authorization": "Bearer"}, {"Authorization": f"Basic {WEB_TOKEN}"},
               {"Authorization": WEB_TOKEN}, {"Authorization": f"Bearer {WEBHOOK_TOKEN}"}]
    async with httpx.AsyncClient() as http:
        for method, path in endpoints:
            for headers in refused:
                response = await http.request(method, stack.views + path, headers=headers)
                assert response.status_code == 401, (method, path, headers)
                assert response.json() == {"error": "unauthorized"}
            # the token in the query string is not accepted either (it would end up in access logs)
            response = await http.request(method, stack.views + path, params={"token": WEB_TOKEN})
            assert response.status_code == 401, (method, path, "query token")


async def test_faust_builtin_endpoints_are_off_even_with_the_token(stack: Stack) -> None:
    auth = {"Authorization": f"Bearer {WEB_TOKEN}"}
    key = f"wati:{CUSTOMER_PHONE}"
    async with httpx.AsyncClient() as http:
        for path in ("/table/", "/table/customers/", f"/table/customers/{key}/", "/router/",
                     f"/router/customers/{key}/", "/graph/", "/stats/", "/assignment/", "/signal/"):
            response = await http.get(stack.views + path, headers=auth)
            assert response.status_code == 404, (path, response.status_code, response.text[:200])


# -- logs -----------------------------------------------------------------------------------------------

async def test_no_phone_number_token_or_api_key_in_any_log_line(stack: Stack, request: pytest.FixtureRequest
                                                              ) -> None:
    """Runs last: a customer journey through all four services, then every log line is scanned."""
    s = stack.stand_ins
    image = f"data/images/sec-{uuid.uuid4().hex[:8]}.png"
    s.wati.add_media(image, png_bytes(4, 4), "image/png")
    auth = {"Authorization": f"Bearer {WEBHOOK_TOKEN}"}
    async with httpx.AsyncClient(timeout=30) as http:
        first = await http.post(stack.ingest + WATI_ROUTE, headers=auth, json=wati_text(
            CUSTOMER_PHONE, "Hola, soy Ana. Mi otro número es +503 7888-1100, llámenme"))
        picture = await http.post(stack.ingest + WATI_ROUTE, params={"token": WEBHOOK_TOKEN}, json=wati_text(
            CUSTOMER_PHONE, "el comprobante", type="image", data=image))
        card = await http.post(stack.ingest + WATI_ROUTE, headers=auth, json=wati_text(
            CUSTOMER_PHONE, None, type="contacts",
            data=[{"name": {"formatted_name": "Bob"}, "phones": [{"phone": "+503 7111 2299"}]}]))
        manychat = await http.post(stack.ingest + MANYCHAT_ROUTE, headers=auth, json={
            "subscriber_id": MANYCHAT_SUBSCRIBER, "last_input_text": "hola, mi teléfono es 5037111-2299",
            "first_name": "Ana"})
        assert [r.status_code for r in (first, picture, card, manychat)] == [200] * 4
        # wrong secrets: one CONTAINS the real secret, one is another of our secrets
        for headers, params in (({"Authorization": f"Bearer {WEBHOOK_TOKEN}-x"}, {}),
                                ({}, {"token": WEB_TOKEN}), ({}, {"token": OPENAI_KEY})):
            response = await http.post(stack.ingest + WATI_ROUTE, headers=headers, params=params,
                                       json=wati_text(CUSTOMER_PHONE, "x"))
            assert response.status_code == 401
        await eventually(lambda: any(m.contact_id == CUSTOMER_PHONE for m in s.wati.sent), "the WATI reply")
        await eventually(lambda: bool(s.manychat.texts_for(MANYCHAT_SUBSCRIBER)), "the ManyChat reply")
        views_auth = {"Authorization": f"Bearer {WEB_TOKEN}"}
        key = f"wati:{CUSTOMER_PHONE}"
        state = await http.get(f"{stack.views}/customers/{key}/", headers=views_auth)
        assert state.status_code == 200
        for command in ("pause", "resume"):
            response = await http.post(f"{stack.views}/customers/{key}/{command}/", headers=views_auth,
                                       json={"actor": "ops"})
            assert response.status_code == 202
        assert (await http.get(f"{stack.views}/customers/{key}/",
                               headers={"Authorization": "Bearer nope"})).status_code == 401
    stack.stop()  # SIGTERM: the shutdown lines are scanned too

    lines = list(stack.log_lines())
    by_service = {name: [line for n, line in lines if n == name] for name in stack.processes}
    for name, own in by_service.items():
        assert own, f"{name} logged nothing: the scan would prove nothing"
    masked = f"wati:{'*' * 8}{CUSTOMER_PHONE[-3:]}"
    assert any(masked in line for _, line in lines), "the customer's (masked) key is in no log line"
    assert any('"event": "webhook"' in line and '"status": 401' in line for line in by_service["ingest"])
    found = [(name, leak, line[:300]) for name, line in lines for leak in leaks(line)]
    report(request, f"log scan: {len(lines)} lines at INFO from {len(by_service)} services "
                    f"({', '.join(f'{n} {len(v)}' for n, v in by_service.items())}), {len(found)} leaks")
    assert not found, "\n".join(f"{name}: {leak}: {line}" for name, leak, line in found[:20])
