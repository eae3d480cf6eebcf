"""`watistream dev`: the embedded broker (unless KAFKA_BOOTSTRAP_SERVERS is set) and the five
services as one supervised process tree. `DevStack` is also what the demo and the end-to-end
test run, so all three exercise the same start-up path.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import TextIO

import httpx

from services.common.broker import EmbeddedKafka
from services.common.config import SKIP_CHECKS_ENV, ConfigError, Settings
from services.common.kafka import ensure_topics
from services.common.tenants import load_tenants, require_served_channels

from .check import exit_code, format_report, run_checks
from .supervisor import Child, Supervisor

SERVICES = ("ingest", "context", "responder", "vision", "console")
REQUIRED = ("OPENAI_API_KEY", "WEBHOOK_TOKEN", "WEB_TOKEN")  # + the enabled channels' settings


class StackError(RuntimeError):
    """A service did not become ready, or exited on its own."""


class DevStack:
    """Broker + services; `async with DevStack(settings) as stack:` returns when all are ready."""

    def __init__(
        self, settings: Settings, *, env: Mapping[str, str] | None = None, out: TextIO | None = None,
        ready_timeout: float = 120.0, checks: bool = True,
        service_env: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        """`service_env`: variables for one service only (a drill points one at a fault proxy)."""
        problems = []
        for requirement in (lambda: settings.require(*REQUIRED),
                            lambda: require_served_channels(settings, load_tenants(settings))):
            try:
                requirement()
            except ConfigError as exc:
                problems.append(str(exc))
        if problems:
            raise ConfigError("; ".join(problems))
        self.console_login: tuple[str, str] | None = None
        if not settings.console_users and not settings.console_users_file:
            settings, self.console_login = with_console_operator(settings)
        self.settings = settings
        self.base_env = dict(os.environ if env is None else env)
        self.out = out or sys.stdout
        self.ready_timeout = ready_timeout
        self.checks = checks
        self.broker: EmbeddedKafka | None = None
        self.supervisor: Supervisor | None = None
        self.service_env = {name: dict(env) for name, env in (service_env or {}).items()}

    @property
    def ingest_url(self) -> str:
        return f"http://{self.settings.ingest_host}:{self.settings.ingest_port}"

    @property
    def context_url(self) -> str:
        return f"http://{self.settings.context_web_host}:{self.settings.context_web_port}"

    @property
    def console_url(self) -> str:
        return f"http://{self.settings.console_host}:{self.settings.console_port}"

    def health_urls(self) -> dict[str, str]:
        s = self.settings
        return {
            "console": f"{self.console_url}/readyz",
            "ingest": f"{self.ingest_url}/readyz",
            "context": f"{self.context_url}/readyz",
            "responder": f"http://127.0.0.1:{s.responder_web_port}/readyz",
            "vision": f"http://127.0.0.1:{s.vision_web_port}/readyz",
        }

    async def __aenter__(self) -> DevStack:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        env = dict(self.base_env)
        env.update(_settings_env(self.settings))
        env[SKIP_CHECKS_ENV] = "1"  # the stack checks once below; children (and restarts) skip theirs
        supervisor = self.supervisor = Supervisor(env, out=self.out)
        if not self.settings.kafka_bootstrap_servers:
            self.broker = EmbeddedKafka(
                Path(self.settings.data_dir) / "broker", partitions=self.settings.topic_partitions
            )
            supervisor.say(f"starting the embedded Kafka (data in {self.broker.data_dir})")
            bootstrap = await asyncio.to_thread(self.broker.start)
            self.settings = dataclasses.replace(self.settings, kafka_bootstrap_servers=bootstrap)
            env["KAFKA_BOOTSTRAP_SERVERS"] = bootstrap
            supervisor.say(f"embedded Kafka ready at {bootstrap}")
        # Topics must exist before any worker subscribes (a faust worker ignores missing ones).
        await ensure_topics(self.settings)
        if self.checks:  # once for the whole stack; the children then skip theirs
            checks = await run_checks(self.settings)
            for line in format_report(checks).splitlines():
                supervisor.say(line)
            if exit_code(checks):
                raise StackError("`watistream check` failed (see above; --skip-checks to start anyway)")
        for name in SERVICES:
            await supervisor.start(name, name, env=self.service_env.get(name))
        await self._wait_ready()
        supervisor.say("all services ready")

    async def _wait_ready(self) -> None:
        assert self.supervisor is not None
        pending = self.health_urls()
        deadline = time.monotonic() + self.ready_timeout
        async with httpx.AsyncClient(timeout=2.0) as client:
            while pending:
                for child in self.supervisor.children:
                    if child.process and child.process.returncode is not None:
                        raise StackError(f"{child.name} exited with {child.process.returncode}")
                for name, url in list(pending.items()):
                    try:
                        if (await client.get(url)).status_code == 200:
                            del pending[name]
                    except httpx.HTTPError:
                        pass
                if time.monotonic() > deadline:
                    raise StackError(f"not ready after {self.ready_timeout:.0f}s: {sorted(pending)}")
                await asyncio.sleep(0.2)

    async def wait_crash(self) -> Child:
        assert self.supervisor is not None
        return await self.supervisor.wait_any_exit()

    async def stop(self) -> None:
        if self.supervisor is not None:
            await self.supervisor.stop()
        if self.broker is not None:
            await asyncio.to_thread(self.broker.stop)
            self.broker = None


def with_console_operator(settings: Settings) -> tuple[Settings, tuple[str, str]]:
    """The settings with a one-off console operator (name, password) when none is configured."""
    from services.console.auth import hash_password

    name, password = "operator", secrets.token_urlsafe(12)
    return dataclasses.replace(settings, console_users=f"{name}:{hash_password(password)}"), (name, password)


def _settings_env(settings: Settings) -> dict[str, str]:
    """Every setting as the env var the children read (so overrides reach them)."""
    return {
        f.metadata["env"]: str(getattr(settings, f.name))
        for f in dataclasses.fields(settings)
    }


async def run(settings: Settings, checks: bool = True) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with DevStack(settings, checks=checks) as stack:
        assert stack.supervisor is not None
        stack.supervisor.say(
            f"webhooks: {stack.ingest_url}/webhooks/wati and /webhooks/manychat; "
            f"views: {stack.context_url}/customers/ (Bearer WEB_TOKEN); Ctrl-C stops everything"
        )
        stack.supervisor.say(f"operator console: {stack.console_url}/ " + (
            f"(log in as {stack.console_login[0]} / {stack.console_login[1]}, valid for this run)"
            if stack.console_login else "(log in with an account of CONSOLE_USERS / CONSOLE_USERS_FILE)"))
        stop_task = asyncio.create_task(stop.wait())
        crash_task = asyncio.create_task(stack.wait_crash())
        done, _ = await asyncio.wait({stop_task, crash_task}, return_when=asyncio.FIRST_COMPLETED)
        if crash_task in done and not stop.is_set():
            child = crash_task.result()
            code = child.process.returncode if child.process else None
            stack.supervisor.say(f"{child.name} exited ({code}); stopping everything (no silent restarts)")
            stop_task.cancel()
            return 1
        crash_task.cancel()
        stack.supervisor.say("stopping")
    return 0


def main(args: object, settings: Settings) -> int:
    return asyncio.run(run(settings, checks=not getattr(args, "skip_checks", False)))
