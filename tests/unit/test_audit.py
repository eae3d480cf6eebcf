"""The dependency audit's verdicts (services/devtools/audit.py): pure judging, and fetching from a
local server shaped like PyPI's JSON API."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from services.devtools.audit import Finding, fetch_projects, judge, pinned_by, report


def project(latest: str, *vulns: dict[str, Any]) -> dict[str, Any]:
    return {"info": {"version": latest}, "vulnerabilities": list(vulns)}


VULN = {"id": "PYSEC-2099-1", "aliases": ["CVE-2099-1"], "fixed_in": ["2.0.1"], "withdrawn": None}


def test_the_latest_release_without_vulnerabilities_is_clean() -> None:
    assert judge("lib", "2.0", project("2.0")).verdict == "clean"
    assert judge("lib", "2.0.0", project("2.0")).verdict == "clean"  # versions compare as versions


def test_a_vulnerability_of_the_installed_release_fails_with_its_id_and_fix() -> None:
    finding = judge("lib", "2.0", project("2.0", VULN))
    assert finding.verdict == "vulnerable"
    assert "PYSEC-2099-1" in finding.detail and "2.0.1" in finding.detail


def test_a_withdrawn_advisory_does_not_count() -> None:
    assert judge("lib", "2.0", project("2.0", {**VULN, "withdrawn": "2099-02-01"})).verdict == "clean"


def test_an_older_release_is_unaudited_never_clean() -> None:
    """PyPI's project JSON lists the latest release's vulnerabilities only: an older one is unknown."""
    finding = judge("lib", "1.9", project("2.0"))
    assert finding.verdict == "unaudited" and "2.0" in finding.detail


@pytest.mark.parametrize("answer", [None, {"info": {}}, {"info": {"version": "not a version!"}}, {"x": 1}])
def test_no_or_a_broken_answer_is_an_error(answer: dict[str, Any] | None) -> None:
    assert judge("lib", "1.0", answer, "HTTP 404").verdict == "error"


def test_the_report_fails_on_a_vulnerability_or_an_error_but_lists_the_unaudited() -> None:
    clean, old = Finding("a", "1", "clean"), Finding("b", "1", "unaudited", "pinned")
    text, status = report([clean, old])
    assert status == 0 and "1 clean" in text and "UNAUDITED  b 1: pinned" in text
    assert report([clean, Finding("c", "1", "vulnerable", "X")])[1] == 1
    assert report([clean, Finding("d", "1", "error", "HTTP 404")])[1] == 1


def test_pinned_by_names_the_distribution_that_holds_a_package_back() -> None:
    class Dist:
        def __init__(self, name: str, requires: list[str]) -> None:
            self.metadata = {"Name": name}
            self.requires = requires

    dists = [Dist("faust-streaming", ["click<8.4,>=6.7", "venusian==3.1.0"]),
             Dist("httpx", ["click==8.*; extra == 'cli'"]), Dist("other", ["click>=7"])]
    assert pinned_by("click", dists) == ["faust-streaming requires click<8.4,>=6.7"]  # type: ignore[arg-type]
    assert pinned_by("venusian", dists) == ["faust-streaming requires venusian==3.1.0"]  # type: ignore[arg-type]


@pytest.fixture
async def fake_pypi() -> AsyncIterator[str]:
    calls: dict[str, int] = {}

    async def project_json(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name == "missing":
            return web.Response(status=404)
        if name == "garbage":
            return web.Response(text="<html>", content_type="text/html")
        if name == "flaky":
            calls[name] = calls.get(name, 0) + 1
            if calls[name] < 3:
                return web.Response(status=503)
        return web.json_response(project("1.0", VULN) if name == "bad" else project("1.0"))

    app = web.Application()
    app.router.add_get("/pypi/{name}/json", project_json)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/pypi"
    finally:
        await runner.cleanup()


async def test_fetching_reports_each_projects_answer_or_why_not(fake_pypi: str) -> None:
    got = await fetch_projects(["good", "bad", "missing", "garbage", "flaky"], base_url=fake_pypi,
                               retry_delay=0.01)
    assert judge("flaky", "1.0", *got["flaky"]).verdict == "clean"  # two 503s, then an answer
    assert judge("good", "1.0", *got["good"]).verdict == "clean"
    assert judge("bad", "1.0", *got["bad"]).verdict == "vulnerable"
    assert got["missing"] == (None, "PyPI answered HTTP 404")
    assert judge("missing", "1.0", *got["missing"]).verdict == "error"
    assert got["garbage"][0] is None and judge("garbage", "1.0", *got["garbage"]).verdict == "error"
