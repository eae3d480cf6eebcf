"""`watistream demo`: the whole system against local stand-ins, no account and no network.

Runs the stand-ins for WATI, ManyChat and OpenAI in this process, `DevStack` (embedded broker +
the five services as child processes) pointed at them, plays `scenario.play` on a compressed
clock, prints the transcript and where to look, then keeps running until Ctrl-C (or exits with
`--once`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from services.common.broker import free_port
from services.common.config import Settings
from services.standins import StandIns

from . import scenario
from .dev import DevStack


def demo_settings(base: Settings, standins: StandIns, data_dir: Path) -> Settings:
    """The user's settings, with the stand-ins, free ports and the compressed clock."""
    env = standins.env()
    compressed = {f.name: type(getattr(base, f.name))(scenario.COMPRESSED[f.metadata["env"]])
                  for f in dataclasses.fields(base) if f.metadata["env"] in scenario.COMPRESSED}
    return dataclasses.replace(
        base,
        wati_api_url=env["WATI_API_URL"], wati_api_token=env["WATI_API_TOKEN"],
        manychat_api_url=env["MANYCHAT_API_URL"], manychat_api_token=env["MANYCHAT_API_TOKEN"],
        openai_base_url=env["OPENAI_BASE_URL"], openai_api_key=env["OPENAI_API_KEY"],
        webhook_token=base.webhook_token or secrets.token_urlsafe(16),
        web_token=base.web_token or secrets.token_urlsafe(16),
        ingest_port=free_port(), context_web_port=free_port(),
        responder_web_port=free_port(), vision_web_port=free_port(), console_port=free_port(),
        topic_prefix=f"demo{secrets.token_hex(3)}.",
        data_dir=str(data_dir),
        **compressed,
    )


async def run(base: Settings, once: bool, out: Any = None) -> int:
    out = out or sys.stdout

    def say(text: str = "") -> None:
        print(text, file=out, flush=True)

    log_path = Path(base.data_dir) / "demo.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="watistream-demo-") as tmp, \
            open(log_path, "w", encoding="utf-8") as service_log:  # noqa: ASYNC230 - once, at start
        data_dir = Path(tmp)  # a throwaway broker and store: the demo leaves nothing behind
        async with StandIns.running() as standins:
            settings = demo_settings(base, standins, data_dir)
            say("watistream demo: stand-ins for WATI, ManyChat and OpenAI run in this process;")
            say(f"starting the embedded Kafka and the five services (their logs: {log_path}) ...")
            async with DevStack(settings, out=service_log) as stack:
                say("\n=== the scripted conversation (compressed clock) ===")
                transcript = await scenario.play(
                    standins, stack.ingest_url, settings.webhook_token,
                    gap_seconds=settings.missed_gap_seconds, hold_seconds=settings.human_hold_seconds,
                    echo=lambda who, text: say(_row(who, text)),
                )
                calls = len(scenario.reply_requests(standins))
                say("\n=== summary ===")
                say(f"OpenAI reply calls: {calls} for 3 bursts; "
                    f"WATI sends: {len(standins.wati.sent)}; "
                    f"missed-message blocks injected: {sum(1 for b in transcript.context_blocks if b)}")
                say("\n=== where to look ===")
                say(f"customer state: curl -H 'Authorization: Bearer {settings.web_token}' "
                    f"{stack.context_url}/customers/wati:{scenario.CUSTOMER}/")
                say(f"metrics: {stack.ingest_url}/metrics  {stack.context_url}/metrics  "
                    f"http://127.0.0.1:{settings.responder_web_port}/metrics")
                say(f"service logs: {log_path}")
                say(f"operator console: {stack.console_url}/ " + (
                    f"(log in as {stack.console_login[0]} / {stack.console_login[1]})"
                    if stack.console_login else "(log in with an account of CONSOLE_USERS)"))
                say(f"audit report: KAFKA_BOOTSTRAP_SERVERS={stack.settings.kafka_bootstrap_servers} "
                    f"TOPIC_PREFIX={settings.topic_prefix} watistream report --since 1h")
                if once:
                    return 0
                say("\nrunning until Ctrl-C")
                stop = asyncio.Event()
                loop = asyncio.get_running_loop()
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.add_signal_handler(sig, stop.set)
                crash = asyncio.create_task(stack.wait_crash())
                waiter = asyncio.create_task(stop.wait())
                await asyncio.wait({crash, waiter}, return_when=asyncio.FIRST_COMPLETED)
                crash.cancel()
                waiter.cancel()
    return 0


def _row(who: str, text: str) -> str:
    """One transcript row; continuation lines of a multi-line text stay in the text column."""
    first, *rest = text.splitlines() or [""]
    lines = [f"  {who:>22} │ {first}"] + [f"  {'':>22} │ {line}" for line in rest]
    return "\n".join(lines)


def main(args: Any, settings: Settings) -> int:
    return asyncio.run(run(settings, bool(getattr(args, "once", False))))
