"""The repository explains itself: no comment or document points outside it, and every citation of
docs/ names a file (and section) that exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
SCANNED_DIRS = ("services", "tests", "bench", "scripts", "deploy", "docs", "schemas")
SCANNED_FILES = ("Dockerfile", "docker-compose.yml", "pyproject.toml", ".env.example", ".dockerignore")
SUFFIXES = {".py", ".md", ".yml", ".yaml", ".json", ".toml", ".txt", ".avsc", ".sh", ""}

# Design notes, API references and the old system's write-up used to live outside the repository.
OUTSIDE = [
    (re.compile(r"\breference/\w+\.md"), "an API reference outside the repository"),
    (re.compile(r"\bDESIGN\.md"), "the design notes outside the repository"),
    (re.compile(r"\bshared/"), "the shared folder outside the repository"),
    (re.compile(r"\bseed/"), "the seed folder outside the repository"),
    (re.compile(r"/work/"), "an absolute path of a development machine"),
    # the old system's write-up, cited as a document (identifiers such as test_postmortem_bug1 are fine)
    (re.compile(r"(?<![\w-])post-?mortem(?![\w-])", re.IGNORECASE), "the old system's write-up"),
]
CITATION = re.compile(r"""docs/([\w-]+\.md)(?:'s)?,?\s+"([^"\n]+)\"""")
DOC_FILE = re.compile(r"\bdocs/([\w-]+\.md)\b")


def scanned() -> list[Path]:
    files = [ROOT / name for name in SCANNED_FILES if (ROOT / name).is_file()]
    files += sorted(ROOT.glob("*.md"))
    for folder in SCANNED_DIRS:
        files += [
            p for p in sorted((ROOT / folder).rglob("*"))
            if p.is_file() and p.suffix in SUFFIXES and "__pycache__" not in p.parts
        ]
    return [p for p in files if p != Path(__file__).resolve()]


def outside_references(text: str) -> list[str]:
    """`line: what` for every line that points outside the repository."""
    return [
        f"{number}: {what}: {line.strip()[:120]}"
        for number, line in enumerate(text.splitlines(), 1)
        for pattern, what in OUTSIDE
        if pattern.search(line)
    ]


def broken_citations(text: str) -> list[str]:
    """docs/ files that do not exist, and quoted sections that are no heading of the cited file."""
    problems = [f"docs/{name} does not exist"
                for name in DOC_FILE.findall(text) if not (DOCS / name).is_file()]
    for name, section in CITATION.findall(text):
        path = DOCS / name
        if not path.is_file():
            continue
        headings = [line.lstrip("#").strip().lower() for line in path.read_text(encoding="utf-8").splitlines()
                    if line.startswith("#")]
        if not any(section.lower() in heading for heading in headings):
            problems.append(f'docs/{name} has no section "{section}"')
    return problems


def test_nothing_points_outside_the_repository() -> None:
    files = scanned()
    assert len(files) > 100 and ROOT / "services" / "context" / "state.py" in files
    found = {
        str(path.relative_to(ROOT)): hits
        for path in files
        if (hits := outside_references(path.read_text(encoding="utf-8", errors="replace")))
    }
    assert found == {}


def test_every_docs_citation_names_an_existing_file_and_section() -> None:
    found = {
        str(path.relative_to(ROOT)): problems
        for path in scanned()
        if (problems := broken_citations(path.read_text(encoding="utf-8", errors="replace")))
    }
    assert found == {}
    cited = {name for path in scanned() for name in DOC_FILE.findall(path.read_text(errors="replace"))}
    expected = {"design.md", "old-system.md", "wati.md", "manychat.md", "openai.md", "faust.md", "broker.md"}
    assert expected <= cited


def test_the_docs_index_lists_every_document() -> None:
    index = (DOCS / "README.md").read_text(encoding="utf-8")
    for path in DOCS.glob("*.md"):
        if path.name != "README.md":
            assert f"]({path.name})" in index, path.name


def test_the_checks_catch_what_they_are_for() -> None:
    """Each pattern fires on the kind of line it is meant for, and not on identifiers or docs/ paths."""
    bad = "\n".join([
        "# see reference/wati.md", '"""as DESIGN.md says"""', "# /work/shared/seed/x.md",
        "(post-mortem bug 6)", "the old system's Postmortem",
    ])
    assert len(outside_references(bad)) == 7  # the third line names three outside places
    fine = "def test_postmortem_bug1(): ...  # docs/old-system.md, bug 1; unit/test_context_postmortem.py"
    assert outside_references(fine) == []
    assert broken_citations('docs/design.md, "Outer contract"') == []
    assert broken_citations('docs/design.md "Nope"') == ['docs/design.md has no section "Nope"']
    assert broken_citations("docs/nothing.md") == ["docs/nothing.md does not exist"]
