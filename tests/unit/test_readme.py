"""The README's configuration table documents every setting with its real default."""

from __future__ import annotations

from pathlib import Path

from services.common.config import Settings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")


def test_readme_documents_every_setting_with_its_default() -> None:
    for name, default, _meaning in Settings.documented():
        shown = f"`{default}`" if default else "(empty)"
        assert f"| `{name}` | {shown} |" in README, f"README lacks {name} (default {shown})"


def test_readme_quick_start_has_the_two_commands() -> None:
    assert "scripts/watistream demo" in README
    assert "scripts/test" in README
