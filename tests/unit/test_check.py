"""The pure half of `watistream check`: formatting, and the judgement of each dependency's answer."""

from __future__ import annotations

from pathlib import Path

from services.common.config import Settings
from services.devtools.check import (
    Check,
    compaction_checks,
    exit_code,
    failed,
    format_check,
    format_report,
    judge_conversations,
    judge_openai_model,
    passed,
    prompt_check,
    settings_checks,
    topic_checks,
)
from services.providers.manychat import judge_manychat
from services.providers.wati import judge_wati


def test_format_one_line_per_check_with_the_fix_on_failures() -> None:
    assert format_check(passed("kafka", "k:9092 reachable")) == "ok   kafka          k:9092 reachable"
    assert format_check(failed("wati", "refused", "set X")) == "FAIL wati           refused -> set X"
    report = format_report([passed("a", "x"), failed("b", "y", "z")])
    assert report.splitlines()[-1] == "1 of 2 checks FAILED"
    assert format_report([passed("a", "x")]).splitlines()[-1] == "all 1 checks passed"


def test_exit_code() -> None:
    assert exit_code([passed("a", "x")]) == 0
    assert exit_code([passed("a", "x"), Check("b", False, "y")]) == 1


def test_topics_all_right_is_one_line() -> None:
    checks = topic_checks(["p.a", "p.b"], 8, {"p.a": 8, "p.b": 8}, ["p.b"], True)
    assert checks == [passed("topics", "2 topics with 8 partitions (1 created now)")]


def test_topics_missing_and_wrong_partitions_each_get_a_line() -> None:
    checks = topic_checks(["p.a", "p.b", "p.c"], 8, {"p.a": 8, "p.b": 4}, [], False)
    assert [c.ok for c in checks] == [False, False]
    assert checks[0].detail.startswith("p.b has 4 partitions, TOPIC_PARTITIONS=8")
    assert "TOPIC_PARTITIONS=4" in checks[0].fix
    assert checks[1].detail == "p.c is missing" and "KAFKA_CREATE_TOPICS=true" in checks[1].fix


def test_compaction() -> None:
    assert compaction_checks(["p.state"], {"p.state": "compact"}) == []
    assert compaction_checks(["p.state"], {"p.state": "compact,delete"}) == []
    assert compaction_checks(["p.state"], {}) == []  # missing: the topic lines say so
    [check] = compaction_checks(["p.state"], {"p.state": "delete"})
    assert not check.ok and check.detail.startswith("p.state has cleanup.policy=delete, not compact")


def test_provider_answers() -> None:
    assert judge_wati(200, {"result": "success", "contact_list": []}).ok
    assert "WATI_API_TOKEN" in judge_wati(401, None).detail
    assert "tenant id" in judge_wati(404, None).fix
    assert not judge_wati(200, {"result": False, "info": "x"}).ok
    assert "unexpected HTTP 500" in judge_wati(500, {"info": "down"}).detail
    page = {"status": "success", "data": {"id": 7, "name": "Shop"}}
    assert "'Shop' (7)" in judge_manychat(200, page).detail
    assert "MANYCHAT_API_TOKEN" in judge_manychat(401, {"status": "error"}).detail
    assert judge_openai_model(200, {}, "m", "OPENAI_MODEL").ok
    refused = judge_openai_model(401, {"error": {"message": "bad"}}, "m", "OPENAI_MODEL")
    assert "OPENAI_API_KEY" in refused.detail and "bad" in refused.detail
    unknown = judge_openai_model(404, {}, "gpt-x", "VISION_MODEL")
    assert unknown.name == "openai vision" and "VISION_MODEL" in unknown.fix
    assert judge_conversations(200, {"id": "conv_1"}).ok
    assert "Conversations API" in judge_conversations(404, None).detail


def test_prompt_file(tmp_path: Path) -> None:
    assert prompt_check(Settings()).ok
    prompt = tmp_path / "p.txt"
    prompt.write_text("Eres el asistente.\n", encoding="utf-8")
    assert prompt_check(Settings(system_prompt_file=str(prompt))).ok
    prompt.write_text("  \n", encoding="utf-8")
    assert "is empty" in prompt_check(Settings(system_prompt_file=str(prompt))).detail
    assert "cannot be read" in prompt_check(Settings(system_prompt_file=str(tmp_path / "x"))).detail


def test_settings_checks_name_what_is_missing() -> None:
    checks = {c.name: c for c in settings_checks(Settings(wati_api_token="w", prompt_locale="xx"))}
    assert not checks["channels"].ok and "WATI_API_URL" in checks["channels"].detail
    assert not checks["required"].ok
    assert {"KAFKA_BOOTSTRAP_SERVERS", "OPENAI_API_KEY"} <= set(checks["required"].detail[7:].split(", "))
    assert not checks["settings"].ok and "PROMPT_LOCALE" in checks["settings"].detail
    good = Settings(kafka_bootstrap_servers="k:9092", webhook_token="a", web_token="b", openai_api_key="c",
                    manychat_api_token="m")
    assert all(c.ok for c in settings_checks(good))
