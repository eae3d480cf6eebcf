"""Pure helpers of the ingest shell: secret checks, JSON parsing, mime guessing, field checks."""

from __future__ import annotations

import logging

import pytest

from services.ingest.app import event_ref, parse_json
from services.ingest.auth import check_token, presented_token
from services.ingest.main import Throttle
from services.ingest.outcomes import Invalid, guess_mime, opt_bool, opt_obj, opt_str

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
