"""`python -m services.devtools.audit`: the dependency audit of the test command.

Checks every distribution installed in this interpreter's environment against the vulnerability
data PyPI publishes (sourced from OSV: PyPA's advisory database and GitHub's). pip-audit cannot run
on our machines: it asks PyPI's per-version JSON API (`/pypi/<name>/<version>/json`), which the
package index reachable here answers with 404 — pip-audit then reports every dependency as "not
found" and audits nothing — and api.osv.dev is unreachable. The project JSON API
(`/pypi/<name>/json`) does answer, and its `vulnerabilities` list is the one for the project's
LATEST release. So:

- installed version == latest release → audited: any vulnerability (not withdrawn) fails the audit;
- installed version older than the latest (a dependency pins it) → cannot be audited here: listed
  by name with who pins it, never counted as clean;
- PyPI not answering for a distribution → the audit fails: an unreachable index must not pass as a
  clean audit (what `pip-audit --strict` does).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import httpx
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

PYPI_URL = "https://pypi.org/pypi"
#: The project itself is not on PyPI.
OWN_DISTRIBUTIONS = frozenset({"watistream"})


@dataclass(frozen=True)
class Finding:
    """What the audit concluded about one installed distribution."""

    name: str
    version: str
    verdict: str  # "clean" | "vulnerable" | "unaudited" | "error"
    detail: str = ""


def installed(exclude: Iterable[str] = OWN_DISTRIBUTIONS) -> dict[str, str]:
    """{canonical name: version} of every distribution in this environment."""
    skip = {canonicalize_name(n) for n in exclude}
    found: dict[str, str] = {}
    for dist in metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"] or "")
        if name and name not in skip:
            found[name] = dist.version
    return found


def pinned_by(name: str, dists: Iterable[metadata.Distribution] | None = None) -> list[str]:
    """Requirements of other installed distributions on `name` that carry an upper bound or pin."""
    pins: list[str] = []
    for dist in dists if dists is not None else metadata.distributions():
        for line in dist.requires or []:
            try:
                requirement = Requirement(line)
            except InvalidRequirement:
                continue
            if canonicalize_name(requirement.name) != name or requirement.marker is not None:
                continue
            if any(spec.operator in ("<", "<=", "==", "~=", "===") for spec in requirement.specifier):
                pins.append(f"{dist.metadata['Name']} requires {requirement}")
    return pins


def judge(name: str, version: str, project: Mapping[str, Any] | None, error: str | None = None) -> Finding:
    """The verdict on one distribution from PyPI's project JSON (None: it could not be fetched)."""
    if project is None:
        return Finding(name, version, "error", error or "no answer from PyPI")
    try:
        latest = str(project["info"]["version"])
        vulnerabilities = list(project.get("vulnerabilities") or [])
        current = Version(version) == Version(latest)
    except (KeyError, TypeError, InvalidVersion) as exc:
        return Finding(name, version, "error", f"unexpected PyPI answer ({type(exc).__name__}: {exc})")
    if not current:
        return Finding(name, version, "unaudited",
                       f"PyPI's vulnerability data here covers only the latest release, {latest}")
    live = [v for v in vulnerabilities if isinstance(v, Mapping) and not v.get("withdrawn")]
    if not live:
        return Finding(name, version, "clean")
    ids = ", ".join(
        f"{v.get('id', '?')} (fixed in {', '.join(v.get('fixed_in') or []) or 'no release yet'})"
        for v in live
    )
    return Finding(name, version, "vulnerable", ids)


async def fetch_projects(
    names: Iterable[str], *, base_url: str = PYPI_URL, concurrency: int = 16, timeout: float = 60.0,
    attempts: int = 3, retry_delay: float = 1.0,
) -> dict[str, tuple[dict[str, Any] | None, str | None]]:
    """{name: (project JSON or None, error or None)}, fetched concurrently; 5xx and network errors
    are tried `attempts` times."""
    limit = asyncio.Semaphore(concurrency)
    results: dict[str, tuple[dict[str, Any] | None, str | None]] = {}

    async with httpx.AsyncClient(timeout=timeout, follow_redirects=True) as client:
        async def one(name: str) -> None:
            async with limit:
                for attempt in range(attempts):  # a blip must not fail the test command
                    try:
                        response = await client.get(f"{base_url}/{name}/json")
                        if response.status_code == 200:
                            body = response.json()
                            results[name] = (body, None) if isinstance(body, dict) else (None, "not JSON")
                            return
                        results[name] = (None, f"PyPI answered HTTP {response.status_code}")
                        if response.status_code < 500:
                            return
                    except (httpx.HTTPError, ValueError) as exc:
                        results[name] = (None, f"{type(exc).__name__}: {exc}")
                    if attempt + 1 < attempts:
                        await asyncio.sleep(retry_delay * 2**attempt)

        await asyncio.gather(*(one(n) for n in names))
    return results


def report(findings: list[Finding]) -> tuple[str, int]:
    """The text to print and the exit status (1: a vulnerability or a failed fetch)."""
    by_verdict: dict[str, list[Finding]] = {}
    for finding in sorted(findings, key=lambda f: f.name):
        by_verdict.setdefault(finding.verdict, []).append(finding)
    verdicts = ("clean", "vulnerable", "unaudited", "error")
    counts = ", ".join(f"{len(by_verdict.get(v, []))} {v}" for v in verdicts)
    lines = [f"dependency audit: {len(findings)} distributions; {counts}"]
    for verdict in ("vulnerable", "error", "unaudited"):
        for finding in by_verdict.get(verdict, []):
            lines.append(f"  {verdict.upper():10} {finding.name} {finding.version}: {finding.detail}")
    failed = bool(by_verdict.get("vulnerable") or by_verdict.get("error"))
    return "\n".join(lines), 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.devtools.audit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index-url", default=PYPI_URL, help="PyPI's JSON API base (default: %(default)s)")
    args = parser.parse_args(argv)
    versions = installed()
    projects = asyncio.run(fetch_projects(sorted(versions), base_url=args.index_url.rstrip("/")))
    findings = []
    for name, version in versions.items():
        project, error = projects.get(name, (None, "not fetched"))
        finding = judge(name, version, project, error)
        if finding.verdict == "unaudited":
            pins = "; ".join(pinned_by(name)) or "no installed distribution pins it"
            finding = Finding(name, version, "unaudited", f"{finding.detail} ({pins})")
        findings.append(finding)
    text, status = report(findings)
    print(text)
    return status


if __name__ == "__main__":
    sys.exit(main())
