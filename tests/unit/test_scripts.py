"""scripts/watistream works from any directory, also through a symlink (e.g. from /usr/local/bin),
and always runs in the project's root (its `.env`, its relative paths) unless WATISTREAM_DIR says
otherwise. Runs the real script against the already-bootstrapped virtualenv (no install happens)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "watistream"
VENV = Path(sys.prefix)

pytestmark = pytest.mark.skipif(
    not list(VENV.glob(".installed-*")), reason="needs the virtualenv made by scripts/bootstrap"
)


def run(command: Path, *args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    # KAFKA_BOOTSTRAP_SERVERS empty (the real environment wins over any `.env`): commands stop right
    # after reading the settings, touching nothing
    environ = {**os.environ, "WATISTREAM_VENV": str(VENV), "KAFKA_BOOTSTRAP_SERVERS": "", **env}
    return subprocess.run([str(command), *args], cwd=cwd, env=environ, capture_output=True, text=True,
                          timeout=120)


def test_runs_from_another_directory_and_through_a_symlink(tmp_path: Path) -> None:
    link = tmp_path / "bin" / "watistream"
    link.parent.mkdir()
    link.symlink_to(SCRIPT)
    for command in (SCRIPT, link):
        done = run(command, "--help", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert "usage: watistream" in done.stdout


def test_reads_the_projects_dotenv_wherever_it_is_started(tmp_path: Path) -> None:
    """`check` reports a `.env` line error with its line number: a broken `.env` in the cwd is not
    read (the project's is), and WATISTREAM_DIR makes it the one read."""
    (tmp_path / ".env").write_text("this line is not a setting\n", encoding="utf-8")
    here = run(SCRIPT, "dead-letters", "show", "0:1", cwd=tmp_path)
    assert here.returncode == 2 and "KAFKA_BOOTSTRAP_SERVERS" in here.stderr
    assert ".env line 1" not in here.stderr
    there = run(SCRIPT, "dead-letters", "show", "0:1", cwd=ROOT, WATISTREAM_DIR=str(tmp_path))
    assert there.returncode == 2 and ".env line 1 cannot be parsed" in there.stderr
