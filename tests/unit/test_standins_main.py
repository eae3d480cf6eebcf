"""`watistream standins`: prints a usable .env block and stops cleanly on SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from services.common.config import Settings
from services.standins.main import main, serve


def parse_env(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


async def test_serve_prints_env_and_serves(capsys: pytest.CaptureFixture[str]) -> None:
    ready, stop = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(serve(0, ready=ready, stop=stop, install_signals=False))
    await asyncio.wait_for(ready.wait(), 5)
    env = parse_env(capsys.readouterr().out)
    assert set(env) == {"WATI_API_URL", "WATI_API_TOKEN", "MANYCHAT_API_URL", "MANYCHAT_API_TOKEN",
                        "OPENAI_BASE_URL", "OPENAI_API_KEY"}
    async with httpx.AsyncClient() as http:
        wati = await http.get(f"{env['WATI_API_URL']}/api/v1/getMessages/5037",
                              headers={"Authorization": f"Bearer {env['WATI_API_TOKEN']}"})
        assert wati.json()["result"] == "success"
        conv = await http.post(f"{env['OPENAI_BASE_URL']}/conversations", json={},
                               headers={"Authorization": f"Bearer {env['OPENAI_API_KEY']}"})
        assert conv.json()["object"] == "conversation"
    stop.set()
    await asyncio.wait_for(task, 5)


def test_main_rejects_bad_port() -> None:
    assert main(argparse.Namespace(port=70000), Settings()) == 2


def test_cli_runs_until_sigterm(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("watistream")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([str(script), "standins"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=tmp_path, env=env)
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 30
        assert proc.stdout is not None
        while len(lines) < 6 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.strip())
        env_lines = parse_env("\n".join(lines))
        assert env_lines["OPENAI_BASE_URL"].endswith("/v1"), lines
        response = httpx.post(f"{env_lines['MANYCHAT_API_URL']}/fb/sending/sendContent",
                              headers={"Authorization": f"Bearer {env_lines['MANYCHAT_API_TOKEN']}"},
                              json={"subscriber_id": 1, "data": {"version": "v2", "content": {
                                  "messages": [{"type": "text", "text": "hi"}]}}})
        assert response.json() == {"status": "success"}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
