"""Property-based fuzzing of both webhook endpoints of the REAL ingest service (issue 7, drill 4).

The service runs in this process (`services.ingest.app.serve`, a free loopback port) against the
session's real Kafka. Hypothesis generates the bodies; they are posted from a worker thread with a
synchronous client while the service keeps serving on the test's event loop. For every request:

- no 5xx, ever; the connection never breaks (a crash would show as a transport error);
- a rejection is a 4xx whose JSON body has a string `error` and a string `reason`;
- a 200 says `accepted` or `ignored`;
- without the secret / with a wrong one it is a 401; over MAX_BODY_BYTES a 413; not JSON a 415.

And over the whole module: the records on the inbound + agent-activity topics grew by exactly the
number of `accepted` answers (nothing accepted is dropped, nothing rejected is produced), and no
body reached the "normaliser failed" path (`unprocessable`), which would mean a normaliser crashed.

Bodies are built around the real payload shapes — the WATI and ManyChat fixtures, mutated (fields
set to wrong types, huge / unicode / empty strings, deep nesting, nulls, removed; event types and
ids varied) — so many go deep into the normalisers and get produced, plus fully random JSON values
and raw bytes, under every content type, with and without chunked transfer encoding.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.common.config import Settings
from services.common.kafka import Topics
from services.ingest.app import MANYCHAT_ROUTE, WATI_ROUTE, serve

pytestmark = pytest.mark.broker

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
#: Small enough that the fuzzer reaches it with generated strings; the 413 path is exercised too.
MAX_BODY = 32 * 1024
REJECT_STATUSES = {400, 401, 408, 413, 415}

# print_blob: a failure prints the `@reproduce_failure(...)` line that replays it exactly
_BASE = settings(deadline=None, database=None, print_blob=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                        HealthCheck.filter_too_much])


def fuzz(examples: int) -> settings:
    """No per-example deadline (a loaded 2-core CI box is slow); each test stays within ~30 s."""
    return settings(_BASE, max_examples=examples)


def load_fixtures(provider: str) -> list[dict[str, Any]]:
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted((FIXTURES / provider).glob("*.json"))]


WATI_FIXTURES = load_fixtures("wati")
MANYCHAT_FIXTURES = load_fixtures("manychat")


# -- the harness -------------------------------------------------------------------------------------

@dataclass
class Tally:
    """What the fuzzer saw, for the assertions over the module and the figures in RELIABILITY.md."""

    outcomes: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, outcome: str) -> None:
        with self.lock:
            self.outcomes[outcome] += 1

    @property
    def requests(self) -> int:
        return sum(self.outcomes.values())

    def count(self, predicate: Callable[[str], bool]) -> int:
        return sum(n for k, n in self.outcomes.items() if predicate(k))


@dataclass
class Target:
    base_url: str
    token: str
    client: httpx.Client
    tally: Tally

    def post(
        self, route: str, body: bytes, *, content_type: str | None = "application/json",
        auth: str = "header", chunked: bool = False,
    ) -> httpx.Response:
        """One POST; `auth` is header / query / none / wrong-header / wrong-query."""
        headers: dict[str, str] = {}
        params: dict[str, str] = {}
        if content_type is not None:
            headers["Content-Type"] = content_type
        if auth == "header":
            headers["Authorization"] = f"Bearer {self.token}"
        elif auth == "query":
            params["token"] = self.token
        elif auth == "wrong-header":
            headers["Authorization"] = f"Bearer {self.token}x"
        elif auth == "wrong-query":
            params["token"] = self.token[:-1]
        content: bytes | Iterator[bytes] = body
        if chunked:
            content = iter([body[i:i + 4096] for i in range(0, len(body), 4096)] or [b""])
        return self.client.post(self.base_url + route, content=content, headers=headers, params=params)

    def check(self, response: httpx.Response, *, expect: int | None = None) -> str:
        """Asserts the universal properties; returns and tallies the outcome (`200:accepted`, `400:...`)."""
        status = response.status_code
        if status >= 500:
            self.tally.add(f"{status}:server_error")
            raise AssertionError(f"{status} {response.text[:500]}")
        try:
            doc = response.json()
        except ValueError:
            raise AssertionError(f"{status} answer is not JSON: {response.text[:200]!r}") from None
        assert isinstance(doc, dict), doc
        if status == 200:
            assert doc.get("status") in ("accepted", "ignored"), doc
            outcome = f"200:{doc['status']}"
        else:
            assert status in REJECT_STATUSES, f"{status} {doc}"
            assert isinstance(doc.get("error"), str) and doc["error"], doc
            assert isinstance(doc.get("reason"), str) and doc["reason"], doc
            outcome = f"{status}:{doc['error']}"
        if expect is not None:
            assert status == expect, f"expected {expect}, got {status} {doc}"
        self.tally.add(outcome)
        return outcome


async def topic_size(settings: Settings, topics: Iterable[str]) -> int:
    """Records currently on the topics (sum of end offsets; the topics are this module's own)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers)
    await consumer.start()
    try:
        tps = [TopicPartition(t, p) for t in topics for p in range(settings.topic_partitions)]
        return sum((await consumer.end_offsets(tps)).values())
    finally:
        await consumer.stop()


@pytest.fixture(scope="module")
def fuzz_settings(settings: Settings) -> Settings:
    return replace(settings, max_body_bytes=MAX_BODY)


@pytest.fixture(scope="module")
def tally() -> Tally:
    return Tally()


@pytest.fixture(scope="module")
async def target(
    fuzz_settings: Settings, tally: Tally, request: pytest.FixtureRequest
) -> AsyncIterator[Target]:
    """The running service; at the end checks the topics against the `accepted` answers."""
    topics = Topics.from_settings(fuzz_settings)
    async with serve(fuzz_settings, port=0) as url:
        with httpx.Client(timeout=30.0) as client:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            # the client is synchronous: never call it on this loop, which serves the requests
            while (await asyncio.to_thread(client.get, url + "/readyz")).status_code != 200:
                assert loop.time() < deadline, "ingest never became ready"
                await asyncio.sleep(0.1)
            before = await topic_size(fuzz_settings, [topics.inbound, topics.agent_activity])
            dead_before = await topic_size(fuzz_settings, [topics.dead_letter])
            yield Target(url, fuzz_settings.webhook_token, client, tally)
    produced = await topic_size(fuzz_settings, [topics.inbound, topics.agent_activity]) - before
    dead = await topic_size(fuzz_settings, [topics.dead_letter]) - dead_before
    accepted = tally.count(lambda k: k == "200:accepted")
    summary = (f"webhook fuzzing: {tally.requests} requests, {accepted} accepted and produced, "
               f"{tally.count(lambda k: k == '200:ignored')} ignored, "
               f"{tally.count(lambda k: k.startswith('4'))} rejected with a 4xx, "
               f"{tally.count(lambda k: k.startswith('5'))} 5xx; "
               f"by outcome: {dict(sorted(tally.outcomes.items()))}")
    report(request, summary)
    assert produced == accepted, f"{produced} records produced for {accepted} accepted webhooks"
    assert dead == 0, "a webhook reached the normaliser-failure path (dead-lettered)"
    assert tally.count(lambda k: k.endswith(":unprocessable")) == 0


def report(request: pytest.FixtureRequest, line: str) -> None:
    """Prints the drill's figure on the terminal even while pytest captures output (RELIABILITY.md)."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        reporter.write_line(line)


async def run_fuzzer(test: Callable[[], None]) -> None:
    """Runs a hypothesis test in a worker thread: the service keeps serving on this event loop."""
    await asyncio.to_thread(test)


# -- strategies --------------------------------------------------------------------------------------

# JSON may escape a lone UTF-16 surrogate (`"\\ud800"`); such text cannot be stored (400 bad_json).
# Put in one body in twenty, not in every string: otherwise most bodies would stop at the parser.
_LONE_SURROGATE_TEXT = st.tuples(
    st.text(max_size=5), st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), st.text(max_size=5),
).map("".join)
_TEXT = st.one_of(
    st.text(max_size=30),
    st.text(alphabet=st.characters(min_codepoint=0x80, max_codepoint=0x10FFFF), max_size=30),  # unicode
    st.sampled_from(["", " ", "\n\t", "0", "-1", "1e400", "null", "true", "{{user_id}}", "wati:1",
                     "../../etc/passwd", "a b", "a/b?c=d", "%00", "\u202e", "🛒", "+50370000001",
                     "2025-11-27T10:14:16.6268572Z", "1764238454", "1764238454000", "24|11|2022",
                     '{"latitude": 13.1, "longitude": "x"}', "[1, 2", "13.69,-89.21"]),
    st.integers(1, 20_000).map(lambda n: "x" * n),  # up to twice MAX_TEXT_CHARS, some over MAX_BODY
)
_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-(2**70), 2**70),
                     st.floats(allow_nan=False, allow_infinity=False), _TEXT)


def _nested(depth: int) -> st.SearchStrategy[Any]:
    """A list or object nested `depth` levels (deep, but parseable: under the recursion limit)."""
    return st.sampled_from([lambda v: [v], lambda v: {"a": v}]).map(
        lambda wrap: _wrap(wrap, depth))


def _wrap(wrap: Callable[[Any], Any], depth: int) -> Any:
    value: Any = "deep"
    for _ in range(depth):
        value = wrap(value)
    return value


JSON_VALUES: st.SearchStrategy[Any] = st.one_of(
    st.recursive(_SCALARS, lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(_TEXT, children, max_size=4)), max_leaves=12),
    st.integers(1, 400).flatmap(_nested),
)

WATI_KEYS = sorted({k for doc in WATI_FIXTURES for k in doc} | {"bsuid", "finalText", "messageContact"})
WATI_EVENT_TYPES = ["message", "message_bsuid", "newContactMessageReceived", "sessionMessageSent_v2",
                    "sessionMessageSent_v2_bsuid", "templateMessageSent_v2", "templateMessageSent_v2_bsuid",
                    "sentMessageDELIVERED_v2", "templateMessageFailed", "messageStatus", "ticketClosed", ""]
WATI_TYPES = ["text", "image", "document", "voice", "audio", "video", "sticker", "location", "contacts",
              "reaction", "order", "catalog", "button", "interactive", "unknown", ""]
WATI_NESTED = {"listReply": ["id", "title", "description"], "interactiveButtonReply": ["id", "title"],
               "buttonReply": ["payload", "text"], "data": ["latitude", "longitude", "name", "address",
                                                            "emoji", "phones"]}


@st.composite
def mutate(draw: st.DrawFn, doc: dict[str, Any], keys: list[str], nested: dict[str, list[str]],
           specials: dict[str, list[Any]]) -> dict[str, Any]:
    """Zero to five mutations of a payload: fields set to anything, removed, or nested values changed;
    one body in twenty also gets a lone surrogate somewhere."""
    doc = json.loads(json.dumps(doc))
    for _ in range(draw(st.integers(0, 5))):
        how = draw(st.sampled_from(["set", "set", "special", "delete", "nested"]))
        key = draw(st.sampled_from(keys) | _TEXT)
        if how == "set":
            doc[key] = draw(JSON_VALUES)
        elif how == "special" and specials:
            name = draw(st.sampled_from(sorted(specials)))
            doc[name] = draw(st.sampled_from(specials[name]))
        elif how == "delete":
            doc.pop(draw(st.sampled_from(sorted(doc))) if doc else key, None)
        elif how == "nested":
            parent = draw(st.sampled_from(sorted(nested)))
            inner = doc.get(parent)
            if not isinstance(inner, dict):
                inner = doc[parent] = {}
            inner[draw(st.sampled_from(nested[parent]))] = draw(JSON_VALUES)
    if draw(st.sampled_from(range(20))) == 7:  # one body in twenty (not 0: hypothesis favours it)
        doc[draw(st.sampled_from(keys))] = draw(_LONE_SURROGATE_TEXT)
    return doc


def wati_bodies() -> st.SearchStrategy[dict[str, Any]]:
    specials: dict[str, list[Any]] = {
        "eventType": list(WATI_EVENT_TYPES), "type": list(WATI_TYPES),
        "owner": [True, False, "true", "no", 1],
        "waId": ["50370000001", "+50370000001", "", "503 7000", "x" * 200, 50370000001],
        "whatsappMessageId": [None, "", "wamid.X", 12], "id": [None, "", "1"]}
    return st.sampled_from(WATI_FIXTURES).flatmap(lambda doc: mutate(doc, WATI_KEYS, WATI_NESTED, specials))


MANYCHAT_KEYS = sorted({k for doc in MANYCHAT_FIXTURES for k in doc} | {
    "subscriber", "message", "subscriber_id", "user_id", "channel", "platform", "text"})
MANYCHAT_NESTED = {"subscriber": ["id", "subscriber_id", "last_input_text", "ig_id", "ig_username", "name",
                                  "first_name", "channel", "platform"],
                   "message": ["text", "attachments"]}


@st.composite
def manychat_bodies(draw: st.DrawFn) -> dict[str, Any]:
    specials: dict[str, list[Any]] = {"platform": ["manychat", "instagram", "facebook", "whatsapp", "", 3],
                "channel": ["ig", "messenger", "telegram"], "subscriber_id": ["123", "{{user_id}}", "", 7],
                "user_id": ["u.1", None]}
    doc = draw(st.sampled_from(MANYCHAT_FIXTURES).flatmap(
        lambda d: mutate(d, MANYCHAT_KEYS, MANYCHAT_NESTED, specials)))
    if draw(st.booleans()) and isinstance(doc.get("message"), dict):
        attachment = st.fixed_dictionaries({}, optional={
            "type": st.sampled_from(["image", "file", "video", "audio", ""]) | JSON_VALUES,
            "payload": st.fixed_dictionaries({}, optional={"url": _TEXT | JSON_VALUES}) | JSON_VALUES,
            "url": _TEXT})
        doc["message"]["attachments"] = draw(st.lists(attachment | JSON_VALUES, max_size=4) | JSON_VALUES)
    return doc


def encode_json(value: Any) -> bytes:
    """JSON text as a sender would write it; lone surrogates are kept as `\\udXXX` escapes."""
    return json.dumps(value, ensure_ascii=True).encode()


RAW_BODIES = st.one_of(
    st.binary(max_size=2048),
    st.text(max_size=200).map(str.encode),
    st.sampled_from([b"", b" ", b"null", b"[]", b"{}", b'"text"', b"42", b"NaN", b'{"a": NaN}',
                     b'{"a": Infinity}', b'{"a": -Infinity}', b"\xef\xbb\xbf{}", b"\xff\xfe{\x00}\x00",
                     b'{"waId": "1"', b'{"a": 1}{"b": 2}', b"[" * 100_000, b'{"a":' * 50_000,
                     b'{"text": "\xc3\x28"}', b'{"text": "\\ud800"}', b'{"a": 1e99999}',
                     b'{"a": 123456789012345678901234567890}']),
)
CONTENT_TYPES = st.sampled_from([
    "application/json", "application/json; charset=utf-8", "APPLICATION/JSON", "application/json;",
    "text/plain", "text/json", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
    "application/octet-stream", "", "application/jsonx", "application", ";;;", None])
AUTH = st.sampled_from(["header", "query", "none", "wrong-header", "wrong-query"])
ROUTES = st.sampled_from([WATI_ROUTE, MANYCHAT_ROUTE])


# -- the properties ------------------------------------------------------------------------------------

async def test_mutated_wati_payloads(target: Target) -> None:
    @fuzz(1200)
    @given(body=wati_bodies(), chunked=st.booleans())
    def run(body: dict[str, Any], chunked: bool) -> None:
        data = encode_json(body)
        target.check(target.post(WATI_ROUTE, data, chunked=chunked),
                     expect=413 if len(data) > MAX_BODY else None)

    await run_fuzzer(run)


async def test_mutated_manychat_payloads(target: Target) -> None:
    @fuzz(900)
    @given(body=manychat_bodies(), chunked=st.booleans())
    def run(body: dict[str, Any], chunked: bool) -> None:
        data = encode_json(body)
        target.check(target.post(MANYCHAT_ROUTE, data, chunked=chunked),
                     expect=413 if len(data) > MAX_BODY else None)

    await run_fuzzer(run)


async def test_random_json_values_on_both_routes(target: Target) -> None:
    @fuzz(500)
    @given(route=ROUTES, body=JSON_VALUES)
    def run(route: str, body: Any) -> None:
        data = encode_json(body)
        outcome = target.check(target.post(route, data), expect=413 if len(data) > MAX_BODY else None)
        assert outcome != "200:accepted" or isinstance(body, dict)

    await run_fuzzer(run)


async def test_raw_bytes_content_types_and_secrets(target: Target) -> None:
    """Any bytes under any content type, with or without the secret: the documented status, always."""
    @fuzz(900)
    @given(route=ROUTES, body=RAW_BODIES | wati_bodies().map(encode_json), content_type=CONTENT_TYPES,
           auth=AUTH, chunked=st.booleans())
    def run(route: str, body: bytes, content_type: str | None, auth: str, chunked: bool) -> None:
        response = target.post(route, body, content_type=content_type, auth=auth, chunked=chunked)
        if auth not in ("header", "query"):
            expect: int | None = 401
        elif len(body) > MAX_BODY:
            expect = 413
        elif content_type is None or content_type.split(";")[0].strip().lower() != "application/json":
            expect = 415
        else:
            expect = None
        target.check(response, expect=expect)

    await run_fuzzer(run)


async def test_known_nasty_bodies(target: Target) -> None:
    """The cases a fuzzer reaches rarely, pinned with the exact answer on both routes."""
    message = '"waId": "50370000001", "type": "text", "owner": false, "id": "sur-1", "subscriber_id": "7"'
    cases: list[tuple[bytes, str]] = [
        (b"[" * 15_000 + b"]" * 15_000, "400:bad_json"),  # deeper than the recursion limit
        (b"[" * 30_000, "400:bad_json"),
        (b'{"a":' * 5_000 + b"1" + b"}" * 5_000, "400:bad_json"),
        (b"[" * 500 + b"]" * 500, "400:not_an_object"),  # parses: a deep list is not an object
        (b'{"a": NaN}', "400:bad_json"),
        (b'{"a": -Infinity}', "400:bad_json"),
        (b'{"a": "\xc3\x28"}', "400:bad_json"),  # not UTF-8
        # A lone UTF-16 surrogate escape is JSON but not Unicode text: it cannot be stored (UTF-8), and
        # is the sender's fault — a 400 `bad_json`, not the normaliser-failure path (ERROR log with a
        # traceback and the raw body on the dead-letter topic for every such request).
        (('{"text": "\\ud800 hola", "last_input_text": "\\udc00", ' + message + "}").encode(),
         "400:bad_json"),
        (('{"senderName": "Ana \\udbff", "first_name": "\\udfff", ' + message + ', "text": "x"}').encode(),
         "400:bad_json"),
    ]
    for body, outcome in cases:
        for route in (WATI_ROUTE, MANYCHAT_ROUTE):
            response = await asyncio.to_thread(target.post, route, body)
            assert target.check(response) == outcome, (route, body[:80])
    # a correctly paired surrogate escape is ordinary text (an emoji)
    paired = ('{"text": "\\ud83d\\ude00", ' + message + "}").encode()
    assert target.check(await asyncio.to_thread(target.post, WATI_ROUTE, paired)) == "200:accepted"


def test_fuzzing_volume(tally: Tally, target: Target) -> None:
    """Runs last in the module: the drill really sent thousands of bodies and many went deep."""
    assert tally.requests >= 3000, tally.outcomes
    assert tally.count(lambda k: k == "200:accepted") >= 200, tally.outcomes
    assert tally.count(lambda k: k.startswith("400:")) >= 300, tally.outcomes
    for status in ("401", "413", "415"):
        assert any(k.startswith(status + ":") for k in tally.outcomes), (status, tally.outcomes)
