"""Pure helpers of the ingest shell: secret checks, JSON parsing, mime guessing, field checks."""

from __future__ import annotations

import json
import logging

import pytest
from aiokafka.partitioner import DefaultPartitioner, murmur2
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter

from services.common.metrics import Children
from services.ingest.app import event_ref, parse_json, parse_json_stdlib
from services.ingest.auth import check_token, presented_token
from services.ingest.main import Throttle
from services.ingest.outcomes import (
    MAX_FIELD_CHARS,
    MAX_TEXT_CHARS,
    Invalid,
    guess_mime,
    opt_bool,
    opt_obj,
    opt_str,
)
from services.ingest.producer import KeyHashCache

TOKEN = "s3cret-token-value"


@pytest.mark.parametrize(("header", "query", "expected"), [
    (f"Bearer {TOKEN}", {}, TOKEN),
    (f"bearer   {TOKEN} ", {}, TOKEN),
    (None, {"token": TOKEN}, TOKEN),
    (f"Bearer {TOKEN}", {"token": "other"}, TOKEN),  # the header wins
    ("Basic dXNlcjpwYXNz", {"token": TOKEN}, TOKEN),  # not a bearer header: the query is used
    ("Bearer ", {}, None),
    (None, {}, None),
    (None, {"token": ""}, None),
])
def test_presented_token(header: str | None, query: dict[str, str], expected: str | None) -> None:
    assert presented_token(header, query) == expected


def test_check_token() -> None:
    assert check_token(TOKEN, TOKEN) is None
    missing = check_token(None, TOKEN)
    assert missing is not None and "missing" in missing
    assert check_token("nope", TOKEN) == "wrong webhook secret"
    assert check_token(TOKEN + "x", TOKEN) == "wrong webhook secret"
    assert check_token("ünïcode", TOKEN) == "wrong webhook secret"  # non-ASCII does not raise
    assert check_token(TOKEN, "") is not None  # no configured secret: nobody passes


@pytest.mark.parametrize(("body", "value"), [
    (b'{"a": 1}', {"a": 1}),
    (b"\xef\xbb\xbf{\"a\": 1}", {"a": 1}),  # UTF-8 BOM
    (b"[1, 2]", [1, 2]),
    (b'"x"', "x"),
])
def test_parse_json_ok(body: bytes, value: object) -> None:
    assert parse_json(body) == (value, None)


@pytest.mark.parametrize(("body", "words"), [
    (b"", "empty"),
    (b"  \n", "empty"),
    (b"{not json", "not valid JSON"),
    (b'{"a": NaN}', "NaN is not JSON"),
    (b'{"a": Infinity}', "Infinity"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
])
def test_parse_json_problems(body: bytes, words: str) -> None:
    value, problem = parse_json(body)
    assert value is None and problem is not None and words in problem


@pytest.mark.parametrize(("ref", "mime"), [
    ("data/images/a.JPG", "image/jpeg"),
    ("https://x.wati.io/1/api/file/showFile?fileName=data/documents/a.pdf", "application/pdf"),
    ("https://cdn.example/v/1_n.png?oh=abc&x=1", "image/png"),
    ("data/audios/voice.opus", "audio/ogg"),
    ("data/images/noext", None),
    ("https://x/file.unknownext", None),
    (None, None),
    ("", None),
])
def test_guess_mime(ref: str | None, mime: str | None) -> None:
    assert guess_mime(ref) == mime


def test_event_ref_keeps_only_the_tail() -> None:
    wamid = "wamid.HBgLNTAzNzAwMDAwMDEVAgASGBQzQUY1QjU0QkMxRjZFNzlENUQ2NQA="
    assert event_ref(wamid) == wamid[-16:] and "NTAzNzAw" not in event_ref(wamid)


def test_field_checks() -> None:
    assert opt_str({"a": 5}, "a") == "5"
    assert opt_str({"a": "  "}, "a") is None
    assert opt_str({}, "a") is None
    with pytest.raises(Invalid) as err:
        opt_str({"a": 5}, "a", numbers=False)
    assert err.value.code == "bad_field" and "'a' must be a string, got a number" in err.value.reason
    assert opt_obj({"o": {"k": 1}}, "o") == {"k": 1}
    with pytest.raises(Invalid):
        opt_obj({"o": [1]}, "o")
    assert opt_bool({"b": "TRUE"}, "b") is True
    assert opt_bool({"b": False}, "b") is False
    assert opt_bool({}, "b") is None
    with pytest.raises(Invalid):
        opt_bool({"b": 1}, "b")


def test_throttle_lets_one_line_per_template_and_period_through() -> None:
    now = [100.0]
    throttle = Throttle(period=30, clock=lambda: now[0])

    def record(msg: str, *args: object) -> logging.LogRecord:
        return logging.LogRecord("aiokafka", logging.ERROR, __file__, 1, msg, args, None)

    assert throttle.filter(record("Unable connect to node with id %s", 1))
    assert not throttle.filter(record("Unable connect to node with id %s", 2))  # same template
    assert throttle.filter(record("another message"))
    now[0] += 30
    assert throttle.filter(record("Unable connect to node with id %s", 1))


def test_opt_str_checks_length_and_subclasses_like_before() -> None:
    assert opt_str({"a": "x" * MAX_FIELD_CHARS}, "a") == "x" * MAX_FIELD_CHARS
    with pytest.raises(Invalid) as err:
        opt_str({"a": "x" * (MAX_FIELD_CHARS + 1)}, "a", where="obj.")
    assert err.value.code == "field_too_long" and "'obj.a' is 1025 characters long" in err.value.reason
    with pytest.raises(Invalid) as err:
        opt_str({"t": "x" * (MAX_TEXT_CHARS + 1)}, "t", limit=MAX_TEXT_CHARS)
    assert err.value.code == "text_too_long"

    class Text(str):
        pass

    assert opt_str({"a": Text("v")}, "a") == "v" and opt_str({"a": Text(" ")}, "a") is None
    with pytest.raises(Invalid):
        opt_str({"a": True}, "a")


# --- orjson's answers are the stdlib's -------------------------------------------------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=25,
)


@st.composite
def json_bodies(draw: st.DrawFn) -> bytes:
    """JSON documents in various layouts, and byte-level damage of them."""
    value = draw(_JSON)
    text = json.dumps(value, ensure_ascii=draw(st.booleans()), indent=draw(st.sampled_from([None, 0, 2])),
                      allow_nan=True)
    body = text.encode("utf-8", "surrogatepass")
    how = draw(st.sampled_from(["keep", "keep", "flip", "cut", "insert", "bom", "wrap"]))
    position = draw(st.integers(0, len(body)))
    if how == "flip" and body:
        position = min(position, len(body) - 1)
        body = body[:position] + bytes([body[position] ^ draw(st.integers(1, 255))]) + body[position + 1:]
    elif how == "cut":
        body = body[:position]
    elif how == "insert":
        piece = draw(st.sampled_from([
            b"NaN", b"-Infinity", b"1e400", b"\\ud800", b'"\\udc00"', b"\xef\xbb\xbf",
            b"12345678901234567890", b"[", b"}", b",", b" ", b"\x00", b"\xff"]))
        body = body[:position] + piece + body[position:]
    elif how == "bom":
        body = b"\xef\xbb\xbf" + body
    elif how == "wrap":
        body = b"[" * draw(st.integers(150, 260)) + body + b"]" * draw(st.integers(150, 260))
    return body


def _canonical(result: tuple[object, str | None]) -> str:
    """repr tells 1 from 1.0 and -0.0 from 0.0, which `==` does not."""
    return repr(result)


@settings(max_examples=1000, deadline=None)
@given(json_bodies())
def test_parse_json_equals_the_stdlib_path(body: bytes) -> None:
    assert _canonical(parse_json(body)) == _canonical(parse_json_stdlib(body))


@pytest.mark.parametrize("body", [
    b'{"n": 123456789012345678901234567890}', b'[-9223372036854775809, 1.5]', b"[18446744073709551616, 0.5]",
    b"1e400", b'{"a": "\\ud800"}', b'"\\udc00"', b'"\\ud83d\\ude00"', b"\xef\xbb\xbf[1.0]", b"[1,]", b"-0.0",
    b"[" * 199 + b"1.5" + b"]" * 199, b"[" * 900 + b"]" * 900, b"[" * 1100 + b"]" * 1100,
    b'{"a": 1, "a": 2}', b"[1E400]", b'"\x7f"', b" \t\r\n{} ", b"{}\x00",
])
def test_parse_json_edge_cases_equal_the_stdlib_path(body: bytes) -> None:
    assert _canonical(parse_json(body)) == _canonical(parse_json_stdlib(body))


# --- the partitioner and the counter children ---------------------------------------------------

@settings(max_examples=500, deadline=None)
@given(st.binary(min_size=0, max_size=40), st.integers(1, 64))
def test_key_hash_cache_picks_the_default_partitioners_partition(key: bytes, count: int) -> None:
    partitions = list(range(count))
    cache = KeyHashCache(size=4)
    expected = DefaultPartitioner()(key, partitions, partitions)
    assert cache(key, partitions, partitions) == expected
    assert cache(key, partitions, partitions) == expected  # from the cache
    assert cache(key, partitions[:1], partitions[:1]) == 0  # the partition count is read every time


def test_key_hash_cache_is_bounded_and_keeps_answering() -> None:
    cache = KeyHashCache(size=3)
    keys = [f"wati:5037000{n:04d}".encode() for n in range(10)]
    for key in keys * 2:
        assert cache(key, [0, 1, 2, 3], [0, 1, 2, 3]) == (murmur2(key) & 0x7FFFFFFF) % 4
        assert len(cache._hashes) <= 3
    assert cache(None, [0, 1, 2, 3], [2]) == 2  # no key: the default partitioner's random choice


def test_counter_children_are_the_labelled_children() -> None:
    counter = Counter("test_ingest_children_total", "test", ["a", "b"], registry=CollectorRegistry())
    children = Children(counter)
    children("x", "1").inc()
    children("x", "1").inc()
    children("y", "2").inc(5)
    assert children("x", "1") is counter.labels("x", "1")
    assert counter.labels("x", "1")._value.get() == 2 and counter.labels("y", "2")._value.get() == 5
