"""Vision's classification request and the validation of the model's answer (pure)."""

from __future__ import annotations

import json

import jsonschema  # type: ignore[import-untyped]
import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.common.config import ConfigError, Settings
from services.vision import classify
from services.vision.classify import InvalidClassification

CATS = ("payment_proof", "general_inquiry", "other")


# -- categories --------------------------------------------------------------------------------
def test_default_categories_come_from_settings() -> None:
    assert classify.parse_categories(Settings().image_categories) == CATS


@pytest.mark.parametrize(("raw", "expected"), [
    ("payment_proof,general_inquiry,other", CATS),
    (" Payment_Proof , general_inquiry,, ", ("payment_proof", "general_inquiry", "other")),
    ("other,menu_photo,other,menu_photo", ("menu_photo", "other")),
    ("", ("other",)),
    ("id_document", ("id_document", "other")),
])
def test_categories_are_ordered_deduped_and_end_with_other(raw: str, expected: tuple[str, ...]) -> None:
    assert classify.parse_categories(raw) == expected


@pytest.mark.parametrize("raw", ["pay ment", "1st", "a-b", "x" * 65, "payment_proof,unreadable",
                                 "unclassified", "café"])
def test_bad_or_reserved_category_names_are_config_errors(raw: str) -> None:
    with pytest.raises(ConfigError, match="IMAGE_CATEGORIES"):
        classify.parse_categories(raw)


# -- the request -------------------------------------------------------------------------------
def test_schema_is_strict_and_lists_the_configured_categories() -> None:
    schema = classify.classification_schema(("menu_photo", "other"))
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) == set(schema["properties"]) == {"category", "confidence", "description"}
    assert schema["properties"]["category"]["enum"] == ["menu_photo", "other"]
    fmt = classify.text_format(CATS)["format"]
    assert fmt["type"] == "json_schema" and fmt["name"] == "image_class" and fmt["strict"] is True
    validator = jsonschema.Draft202012Validator(fmt["schema"])
    assert validator.is_valid({"category": "other", "confidence": 0.5, "description": "x"})
    assert not validator.is_valid({"category": "unreadable", "confidence": 0.5, "description": "x"})
    assert not validator.is_valid({"category": "other", "confidence": 1.5, "description": "x"})
    assert not validator.is_valid({"category": "other", "confidence": 0.5, "description": "x", "y": 1})


def test_request_is_made_outside_any_conversation_with_a_low_detail_file_image() -> None:
    kwargs = classify.classification_request("gpt-x", "file-abc", CATS, caption="mi pago")
    assert "conversation" not in kwargs and "previous_response_id" not in kwargs
    assert kwargs["store"] is False
    assert kwargs["model"] == "gpt-x"
    assert kwargs["text"] == classify.text_format(CATS)
    [item] = kwargs["input"]
    assert item["role"] == "user"
    text_part, image_part = item["content"]
    assert image_part == {"type": "input_image", "file_id": "file-abc", "detail": "low"}
    assert text_part["type"] == "input_text"
    for name in CATS:
        assert name in text_part["text"]
    assert "mi pago" in text_part["text"]
    json.dumps(kwargs)  # plain JSON: nothing but data goes to the SDK


def test_instructions_are_stable_without_caption_and_bound_the_caption() -> None:
    assert classify.instructions(CATS) == classify.instructions(CATS, "  ")
    long = classify.instructions(CATS, "a" * 5000)
    assert len(long) < len(classify.instructions(CATS)) + classify.MAX_CAPTION_CHARS + 100
    assert "custom thing" in classify.instructions(("custom_thing", "other"))


# -- the answer --------------------------------------------------------------------------------
def test_a_valid_answer_is_parsed() -> None:
    text = json.dumps({"category": "payment_proof", "confidence": 0.92,
                       "description": "  Bank transfer\nreceipt,   $50.  "})
    result = classify.parse_classification(text, CATS)
    assert result == classify.Classification("payment_proof", 0.92, "Bank transfer receipt, $50.")
    assert classify.parse_classification(
        '{"category": "other", "confidence": 1, "description": ""}', CATS).confidence == 1.0


@pytest.mark.parametrize(("text", "why"), [
    (None, "empty"),
    ("", "empty"),
    ("   ", "empty"),
    ("I can't help with that.", "not JSON"),
    ('{"category": "payment_proof", "confidence": 0.9', "not JSON"),
    ("[1, 2]", "not an object"),
    ('"payment_proof"', "not an object"),
    ('{"confidence": 0.9, "description": "x"}', "category"),
    ('{"category": "unreadable", "confidence": 0.9, "description": "x"}', "category"),
    ('{"category": "Payment_Proof", "confidence": 0.9, "description": "x"}', "category"),
    ('{"category": 3, "confidence": 0.9, "description": "x"}', "category"),
    ('{"category": "other", "confidence": "0.9", "description": "x"}', "confidence"),
    ('{"category": "other", "confidence": true, "description": "x"}', "confidence"),
    ('{"category": "other", "confidence": 1.01, "description": "x"}', "0..1"),
    ('{"category": "other", "confidence": -0.1, "description": "x"}', "0..1"),
    ('{"category": "other", "confidence": NaN, "description": "x"}', "0..1"),
    ('{"category": "other", "confidence": 0.5}', "description"),
    ('{"category": "other", "confidence": 0.5, "description": null}', "description"),
    ('{"category": "other", "confidence": 0.5, "description": "x", "extra": 1}', "unexpected"),
])
def test_invalid_answers_are_rejected_with_a_reason(text: str | None, why: str) -> None:
    with pytest.raises(InvalidClassification, match=why):
        classify.parse_classification(text, CATS)


def test_description_is_bounded() -> None:
    text = json.dumps({"category": "other", "confidence": 0.1, "description": "word " * 1000})
    assert len(classify.parse_classification(text, CATS).description) == classify.MAX_DESCRIPTION_CHARS


@given(st.text(max_size=200))
def test_any_text_parses_or_is_invalid(text: str) -> None:
    try:
        result = classify.parse_classification(text, CATS)
    except InvalidClassification:
        return
    assert result.category in CATS and 0 <= result.confidence <= 1


# -- image contexts ----------------------------------------------------------------------------
def test_contexts_of_classified_and_invalid_answers() -> None:
    result = classify.Classification("payment_proof", 0.9, "A receipt.")
    assert classify.classified_context("data/images/a.jpg", "file-1", "image/jpeg", result) == {
        "media_ref": "data/images/a.jpg", "file_id": "file-1", "mime": "image/jpeg",
        "category": "payment_proof", "confidence": 0.9, "description": "A receipt."}
    empty = classify.Classification("other", 0.3, "")
    assert classify.classified_context("r", "f", "image/png", empty)["description"] is None
    assert classify.invalid_output_context("r", "file-2", "image/png") == {
        "media_ref": "r", "file_id": "file-2", "mime": "image/png", "category": "other",
        "confidence": 0.0, "description": None}


@pytest.mark.parametrize("reason", [*sorted(classify.SAFE_DESCRIPTIONS), "something_new"])
def test_failed_images_get_a_safe_description(reason: str) -> None:
    context = classify.failed_context("data/images/a.jpg", reason)
    assert context["category"] == classify.UNREADABLE
    assert context["file_id"] is None and context["confidence"] == 0.0
    description = context["description"] or ""
    assert description.startswith("The customer sent")
    for internal in ("HTTP", "Error", "error", "exception", "_"):
        assert internal not in description


def test_an_uploaded_but_unclassified_image_keeps_its_file() -> None:
    context = classify.failed_context("r", "classification_failed", file_id="file-9", mime="image/png")
    assert context["category"] == classify.UNCLASSIFIED
    assert context["file_id"] == "file-9" and context["mime"] == "image/png"
