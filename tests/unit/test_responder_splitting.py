"""Splitting answers to the channels' limits: paragraph, then sentence, then word boundaries."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.responder.splitting import MANYCHAT_LIMIT, WATI_LIMIT, limit_for, split_message


def assert_preserved(text: str, parts: list[str]) -> None:
    """Each part appears in order in the text, and only whitespace lies between consecutive parts."""
    position = 0
    for part in parts:
        found = text.find(part, position)
        assert found >= 0, f"part not found in order: {part[:40]!r}"
        assert text[position:found].strip() == "", f"content lost before {part[:40]!r}"
        position = found + len(part)
    assert text[position:].strip() == ""


def test_short_text_is_one_part_stripped() -> None:
    assert split_message("  Hola, ¿cómo estás?\n", 100) == ["Hola, ¿cómo estás?"]


def test_empty_and_blank_give_no_parts() -> None:
    assert split_message("", 10) == []
    assert split_message(" \n\t ", 10) == []


def test_exact_limit_is_not_split() -> None:
    assert split_message("a" * 50, 50) == ["a" * 50]


def test_paragraphs_are_preferred() -> None:
    first = "Primer párrafo. Tiene dos frases."
    second = "Segundo párrafo, corto."
    text = f"{first}\n\n{second}"
    assert split_message(text, len(first) + 5) == [first, second]


def test_paragraphs_are_packed_greedily() -> None:
    text = "Uno.\n\nDos.\n\nTres."
    assert split_message(text, 11) == ["Uno.\n\nDos.", "Tres."]


def test_sentences_when_a_paragraph_is_too_long() -> None:
    text = "Esta es la primera frase. Esta es la segunda frase! ¿Y la tercera? Sí."
    parts = split_message(text, 30)
    assert parts == ["Esta es la primera frase.", "Esta es la segunda frase!", "¿Y la tercera? Sí."]


def test_sentence_end_keeps_closing_quote() -> None:
    text = 'Él dijo "hola." Luego se fue.'
    assert split_message(text, 16) == ['Él dijo "hola."', "Luego se fue."]


def test_words_when_a_sentence_is_too_long() -> None:
    text = "palabra " * 10
    parts = split_message(text, 20)
    assert parts == ["palabra palabra", "palabra palabra", "palabra palabra", "palabra palabra",
                     "palabra palabra"]


def test_only_an_overlong_word_is_cut_inside() -> None:
    url = "https://example.com/" + "x" * 30
    parts = split_message(f"Mira {url} ahora", 20)
    assert parts == ["Mira", url[:20], url[20:40], url[40:] + " ahora"]
    assert_preserved(f"Mira {url} ahora", parts)


def test_line_breaks_before_sentences() -> None:
    text = "Lista:\n- uno\n- dos\n- tres"
    assert split_message(text, 14) == ["Lista:\n- uno", "- dos\n- tres"]


def test_channel_limits() -> None:
    assert limit_for("wati") == WATI_LIMIT == 4096
    assert limit_for("facebook") == limit_for("instagram") == MANYCHAT_LIMIT == 2000


def test_realistic_long_answer_for_both_channels() -> None:
    paragraph = ("Gracias por escribirnos. Nuestro horario es de lunes a viernes. "
                 "Puede pagar con tarjeta o transferencia. ") * 12
    text = "\n\n".join([paragraph.strip()] * 6)
    for limit in (WATI_LIMIT, MANYCHAT_LIMIT):
        parts = split_message(text, limit)
        assert len(parts) > 1
        assert all(0 < len(p) <= limit for p in parts)
        assert all(p.endswith(".") for p in parts)  # cut at sentence or paragraph ends
        assert_preserved(text, parts)


def test_bad_limit() -> None:
    with pytest.raises(ValueError):
        split_message("x", 0)


_alphabet = st.sampled_from(list("abcdefghij ÁéñüΩ😀.!?…\"'»)\n\t,;:-"))


@settings(max_examples=400, deadline=None)
@given(text=st.text(alphabet=_alphabet, max_size=400), limit=st.integers(min_value=1, max_value=60))
def test_properties(text: str, limit: int) -> None:
    parts = split_message(text, limit)
    assert all(0 < len(p) <= limit for p in parts)
    assert all(p == p.strip() for p in parts)
    assert_preserved(text, parts)
    if text.strip() and len(text.strip()) <= limit:
        assert parts == [text.strip()]


@settings(max_examples=200, deadline=None)
@given(words=st.lists(st.text(alphabet="abcdefgh", min_size=1, max_size=8), min_size=1, max_size=80),
       limit=st.integers(min_value=8, max_value=40))
def test_words_shorter_than_the_limit_are_never_cut(words: list[str], limit: int) -> None:
    text = " ".join(words)
    parts = split_message(text, limit)
    assert [w for p in parts for w in p.split()] == words
