"""What the benchmarks share: the run's broker and scale, service processes, stats, machine facts.

Every service under test runs as a real process (`python -m services.cli <service>`) with the
environment a deployment would give it; only the stand-ins (WATI, OpenAI) run inside the bench
process, because the benchmarks read their counters (calls, usage, `conversation_locked`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from aiohttp import web
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from services.common.broker import free_port
from services.common.config import Settings
from services.common.kafka import make_consumer

from .cpu_probe import process_times

ROOT = Path(__file__).resolve().parents[1]
WEBHOOK_TOKEN = "bench-webhook-token"
WEB_TOKEN = "bench-web-token"


@dataclass(frozen=True)
class Scale:
    """How big and how long each benchmark runs; `full` (~10 min), `quick` (~2.5 min), `smoke` (~1 min)."""

    name: str
    repeats: int  # repeated short runs of the ingest throughput (spread)
    ingest_closed_seconds: float
    ingest_open_seconds: float
    ingest_null_seconds: float
    pipeline_customers: int
    pipeline_step_seconds: float
    pipeline_target: int  # msg/s of the headline figure
    pipeline_rates: tuple[int, ...]  # ascending steps; stop at the first p99 > 1 s at or above the target
    pipeline_repeats: int  # runs at the target rate (the median p99 is the headline, all are listed)
    responder_customers: int
    responder_batches_per_customer: int
    cost_customers: int
    cost_gap_seconds: float
    cost_max_sessions: int
    state_customers: int
    settle_seconds: float  # pause after a worker is ready before its RSS is read


SCALES = {
    "full": Scale(
        "full",
        3,
        8.0,
        10.0,
        4.0,
        1000,
        12.0,
        200,
        (50, 100, 200, 400, 700, 1000, 1400, 2000),
        5,
        500,
        2,
        60,
        8.0,
        4,
        100_000,
        2.0,
    ),
    "quick": Scale("quick", 1, 3.0, 4.0, 2.0, 300, 6.0, 200, (200,), 1, 100, 2, 10, 6.0, 3, 10_000, 1.0),
    "smoke": Scale("smoke", 1, 1.0, 1.0, 1.0, 60, 2.0, 30, (30,), 1, 16, 2, 2, 3.0, 2, 300, 0.2),
}


@dataclass
class BenchEnv:
    """The run: one embedded broker, a work directory, the scale, whether to profile."""

    bootstrap: str
    workdir: Path
    scale: Scale
    profile: bool = False
    broker_pid: int | None = None  # the embedded broker's JVM, for CPU accounting (None: external)
    broker_gc_log: Path | None = None  # its GC log, one line per pause (None: external)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:6])

    def settings(self, name: str, **overrides: Any) -> Settings:
        """Settings of one benchmark: its own topics on the run's broker, stand-in tokens."""
        (self.workdir / name).mkdir(parents=True, exist_ok=True)  # the context worker needs it to exist
        base = Settings(
            kafka_bootstrap_servers=self.bootstrap,
            topic_prefix=f"bench{self.run_id}.{name}.",
            webhook_token=WEBHOOK_TOKEN,
            web_token=WEB_TOKEN,
            data_dir=str(self.workdir / name),
            ingest_port=free_port(),
            context_web_port=free_port(),
            responder_web_port=free_port(),
            vision_web_port=free_port(),
            broker_session_timeout_seconds=10,
        )
        return dataclasses.replace(base, **overrides)

    def log_path(self, name: str) -> Path:
        path = self.workdir / "logs" / f"{name}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path


def settings_env(settings: Settings) -> dict[str, str]:
    """The process environment that reproduces `settings` (every variable, so none leaks in)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {f.metadata["env"] for f in dataclasses.fields(Settings)}
    }
    env.update({f.metadata["env"]: str(getattr(settings, f.name)) for f in dataclasses.fields(settings)})
    env["PYTHONUNBUFFERED"] = "1"
    return env


#: `sitecustomize` and the probes it loads into a service whose PYTHONPATH starts with it
#: (`with_probes`): the GC probe (BENCH_GC_PROBE) and the stall probe (BENCH_STALL_PROBE)
PROBE_DIR = Path(__file__).resolve().parent / "gcprobe"


def with_probes(env: dict[str, str], **probe_files: str) -> None:
    """Loads the probes into the service started with `env`: PROBE_DIR first on its PYTHONPATH and
    each `BENCH_..._PROBE=<file>` given (the probe writes its figures there every second)."""
    env.update(probe_files)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROBE_DIR), env.get("PYTHONPATH", "")) if p)


def read_probe(path: Path) -> dict[str, Any]:
    """A probe's last written figures ({} before its first write)."""
    try:
        data: dict[str, Any] = json.loads(path.read_text())
        return data
    except (OSError, ValueError):
        return {}


class ServiceProcess:
    """One service as a child process, its log in the run's work directory."""

    def __init__(
        self, name: str, argv: Sequence[str], env: dict[str, str], log_path: Path, cwd: Path | None = None
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = env
        self.log_path = log_path
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    @classmethod
    def watistream(
        cls, bench: BenchEnv, service: str, settings: Settings, *, tag: str = ""
    ) -> ServiceProcess:
        """`watistream <service>` with the settings as environment (cwd without a `.env`)."""
        cwd = bench.workdir / "cwd"
        cwd.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "services.cli", service]
        if service in ("ingest", "context", "responder", "vision"):
            # measured: the services; their start-up checks (a conversation made at the OpenAI
            # stand-in, calls that could take an injected fault) would blur restart timings
            argv.append("--skip-checks")
        return cls(service + tag, argv, settings_env(settings), bench.log_path(service + tag), cwd)

    def start(self) -> ServiceProcess:
        log = self.log_path.open("ab")
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            cwd=self.cwd or ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    async def wait_ready(self, url: str, timeout: float = 180.0) -> float:
        """Polls `url` until 200; returns seconds since start. Raises with the log tail on failure."""
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=2.0) as client:
            while True:
                if not self.alive():
                    raise RuntimeError(
                        f"{self.name} exited ({self.proc.returncode if self.proc else '?'}):\n"
                        f"{self.log_tail()}"
                    )
                try:
                    if (await client.get(url)).status_code == 200:
                        return time.monotonic() - self.started_at
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s:\n{self.log_tail()}")
                await asyncio.sleep(0.05)

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def cpu_seconds(self) -> float:
        """User + system CPU time the process used so far (/proc)."""
        return cpu_seconds_of(self.pid)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (the services stop cleanly), SIGKILL if it hangs."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return proc.returncode if proc else None
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()


def cpu_seconds_of(pid: int | None) -> float:
    """User + system CPU seconds of a process (0 when unknown or gone)."""
    if pid is None:
        return 0.0
    try:
        return process_times(Path(f"/proc/{pid}/stat").read_text()).cpu_seconds
    except OSError:
        return 0.0


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def run_loadgen(spec: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """Runs `python -m bench.loadgen` with the spec; returns its JSON result."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.loadgen",
        cwd=str(ROOT),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    limit = timeout if timeout is not None else float(spec["duration"]) + 60.0
    try:
        out, err = await asyncio.wait_for(proc.communicate(json.dumps(spec).encode()), limit)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise RuntimeError("load generator did not finish in time") from None
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed ({proc.returncode}): {err.decode()[-2000:]}")
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


class Profiler:
    """`py-spy record` attached to a service for a while (only with --profile and py-spy installed)."""

    def __init__(self, bench: BenchEnv, name: str) -> None:
        self.bench = bench
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None
        self.output = bench.workdir / "profiles" / f"{name}.txt"

    def start(self, pid: int, seconds: float) -> None:
        spy = Path(sys.executable).with_name("py-spy")
        if not self.bench.profile or not spy.exists():
            return
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                str(spy),
                "record",
                "--pid",
                str(pid),
                "--duration",
                str(max(1, int(seconds))),
                "--rate",
                "200",
                "--format",
                "raw",
                "--output",
                str(self.output),
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def finish(self, top: int = 12) -> list[str] | None:
        """Waits for py-spy; returns the functions with the most own samples, as text lines."""
        if self.proc is None:
            return None
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return None
        if not self.output.exists():
            return None
        return summarise_collapsed(self.output.read_text(), top)


def summarise_collapsed(text: str, top: int = 12) -> list[str]:
    """From py-spy's collapsed stacks: share of samples by leaf function and by our own frames."""
    own: dict[str, int] = {}
    ours: dict[str, int] = {}
    total = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        leaf = _frame_name(frames[-1])
        own[leaf] = own.get(leaf, 0) + count
        # the innermost frame of our code (services/*): where the project spends, inclusive
        for frame in reversed(frames):
            if "services/" in frame or "bench/" in frame:
                name = _frame_name(frame)
                ours[name] = ours.get(name, 0) + count
                break
    if not total:
        return []
    lines = [
        f"{100 * n / total:5.1f}%  self  {name}"
        for name, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]
    ]
    lines += [
        f"{100 * n / total:5.1f}%  under {name}"
        for name, n in sorted(ours.items(), key=lambda kv: -kv[1])[:top]
    ]
    return lines


def _frame_name(frame: str) -> str:
    match = re.match(r"(.*) \((.*?):?\d*\)$", frame.strip())
    if not match:
        return frame.strip()
    func, where = match.groups()
    short = "/".join(where.split("/")[-2:])
    return f"{func} ({short})"


async def ack_rtt_ms(settings: Settings, topic: str, count: int = 40) -> dict[str, float | None]:
    """Sequential produce → ack round trips with the project's producer settings, from this process.

    The floor under every step that waits for an ack before the next (the responder's state writes,
    the context agent's effects): on an idle machine ~2-3 ms (linger 2 ms + loopback)."""
    from services.common.kafka import make_producer

    producer = make_producer(settings)
    await producer.start()
    try:
        times = []
        for n in range(count):
            started = time.monotonic()
            await producer.send_and_wait(topic, b"ack-probe %d" % n, key=b"ack-probe")
            times.append(1000.0 * (time.monotonic() - started))
    finally:
        await producer.stop()
    return {"p50": percentile(times, 0.5), "p90": percentile(times, 0.9), "max": max(times)}


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def spread(values: Sequence[float]) -> dict[str, float]:
    """min / median / max of repeated runs, and the max-min range relative to the median."""
    ordered = sorted(values)
    median = (
        ordered[len(ordered) // 2]
        if len(ordered) % 2
        else (ordered[len(ordered) // 2 - 1] + ordered[len(ordered) // 2]) / 2
    )
    return {
        "min": ordered[0],
        "median": median,
        "max": ordered[-1],
        "n": len(ordered),
        "range_pct": 100.0 * (ordered[-1] - ordered[0]) / median if median else 0.0,
    }


def git_commit() -> str:
    """The commit measured (short hash, `+dirty` when the work tree has changes), or "unknown"."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD")
    if not head:
        return "unknown"
    return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def machine_info() -> dict[str, Any]:
    """Cores, memory, CPU model, load, versions: printed and stored with every result."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    java = subprocess.run(["java", "-version"], capture_output=True, text=True, check=False).stderr
    return {
        "cores": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "java": java.splitlines()[0] if java else "",
        "commit": git_commit(),
    }


def figure(
    metric: str,
    value: float | None,
    unit: str,
    *,
    baseline: float | None = None,
    ratio: float | None = None,
    target: str = "",
    met: bool | None = None,
    note: str = "",
) -> dict[str, Any]:
    """One row of the results table."""
    if ratio is None and baseline and value is not None and math.isfinite(value) and math.isfinite(baseline):
        ratio = value / baseline  # no ratio of an infinite figure (a result that never came)
    return {
        "metric": metric,
        "value": value,
        "unit": unit,
        "baseline": baseline,
        "ratio": ratio,
        "target": target,
        "met": met,
        "note": note,
    }


def wati_text_message(
    wa_id: str, event_id: str, text: str, at: Any, sender: str | None = None
) -> dict[str, Any]:
    """An InboundMessage of a WATI customer, as ingest would produce it (bench traffic)."""
    return {
        "event_id": event_id, "customer_key": f"wati:{wa_id}", "channel": "wati", "provider_id": wa_id,
        "message_type": "text", "text": text, "caption": None, "media_ref": None, "media_mime": None,
        "sender_name": sender, "provider_message_ids": [], "provider_time": at, "received_at": at,
        "recovered": False, "username": None,
    }


def plain_request(batch_id: str, messages: list[dict[str, Any]], created_at: Any) -> dict[str, Any]:
    """A ResponderRequest for `messages` (one customer) with no missed-message context."""
    first = messages[0]
    return {
        "batch_id": batch_id, "customer_key": first["customer_key"], "channel": first["channel"],
        "provider_id": first["provider_id"], "messages": messages, "prior_last_inbound_at": None,
        "prior_last_reply_at": None, "gap_seconds": None, "missed_check_ran": False,
        "missed_messages": [], "missed_dropped_oldest": 0, "images": [], "created_at": created_at,
    }


# --- what the same-run baselines share -------------------------------------------------------------

async def assigned_consumer(settings: Settings, topic: str, *, offset_reset: str) -> AIOKafkaConsumer:
    """A plain consumer of every partition of `topic` (no group, no commits): the baselines' input."""
    consumer = make_consumer(
        settings,
        enable_auto_commit=False,
        auto_offset_reset=offset_reset,
        fetch_max_wait_ms=20,
    )
    await consumer.start()
    consumer.assign([TopicPartition(topic, p) for p in range(settings.topic_partitions)])
    return consumer


async def serve_until_signal(
    port: int, work: Awaitable[None] | None = None, app: web.Application | None = None
) -> None:
    """Serves `app` plus `GET /readyz` on 127.0.0.1:`port` and runs `work` until SIGTERM/SIGINT.

    The callers close their own clients afterwards (in a `finally` around this call)."""

    async def ready(request: web.Request) -> web.Response:
        return web.json_response({"status": "ready"})

    app = app if app is not None else web.Application()
    app.router.add_get("/readyz", ready)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    task = asyncio.ensure_future(work) if work is not None else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        if task is not None:
            task.cancel()
        await runner.cleanup()
