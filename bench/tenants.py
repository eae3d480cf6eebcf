"""Benchmark 9 — many tenants: 50 tenants x 2,000 customers against ONE tenant of 100,000, same run.

Issue 17 point 5. Two configurations side by side on the run's broker, each with its own topics,
services and a generated TENANTS_FILE (docs/tenants.md format; webhook secrets by `env:` reference,
WATI tokens by `file:`):

- **tenants**: `t00` … `t49`, 2,000 customers each, each tenant's webhooks posted to its own route
  `/webhooks/{tenant}/wati` with its own secret;
- **single** (the baseline): one tenant, `solo`, with all 100,000 customers, same route shape.

Same schedule in both: customer n (waId `wa_id_of(n)`) sends one message at the same moment in both
(a seeded random order, open loop at a fixed total rate); in the tenants configuration customer n
belongs to tenant n // 2,000. Both are non-default tenants, so both take the same code path and the
only difference is how the customers are spread over tenants. The schedule is played in parts,
alternating between the configurations (A B, B A, …), so a shared machine's load drift weighs on
both alike. Services per configuration (real processes): `watistream ingest`, `watistream context`
(quiet window 1 s, RocksDB store, every other setting at its default); the load generator is a
process, the WATI stand-in runs in the bench process. Sizes: `SIZES`, changed by the
`BENCH_TENANTS_*` environment variables (`OVERRIDES`; BENCHMARKS.md section 9).

**What is measured** (`until="request"`, the default): per ResponderRequest,

    overhead = record timestamp of the request - received_at of the batch's last message - quiet window

i.e. webhook accepted by ingest → request produced by the context service, per tenant. Each
tenant's first-contact history check reads its own WATI account: the WATI stand-in hosts one WATI
tenant per bench tenant (`wati_tenant_of`), so that round trip is in the path of both configurations.
`until="reply"` adds `watistream responder` (OpenAI stand-in at zero latency) and measures to the
AssistantReply record instead (`BENCH_TENANTS_UNTIL=reply`). Before the measured parts each
configuration plays a warm-up part of other customers over every tenant, not counted.

**Figures.** Per tenant: p50/p99 of its requests (2,000 each). The issue's figure: the worst tenant's
p99 against the single tenant's p99 (target <= 1.2x). Because the worst of 50 p99s of 2,000 samples is
the largest of 50 noisy estimates — above the pooled p99 even when the tenants are identical — the
single run is also cut into the same 50 slices of 2,000 customers (customers n // 2,000, the same
people who form the tenants) and its worst slice's p99 is reported beside it: the like-for-like
baseline for "worst tenant". Also the pooled p99 of all tenants, throughput (requests/s against the
offered rate; a part "kept up" at 90 % of it), CPU per message of ingest and context, and the broker
records and bytes per message (the per-process figures the README's scaling text uses). Commit and
load averages are recorded with the result.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import math
import os
import random
import secrets
import sys
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka.structs import TopicPartition

from services.common.config import Settings
from services.common.kafka import Topics, ensure_topics, make_admin, make_consumer
from services.common.keys import parse_key
from services.standins import StandIns

from . import cpu_probe, stall_report
from .common import (
    BenchEnv,
    ServiceProcess,
    cpu_seconds_of,
    figure,
    git_commit,
    percentile,
    read_probe,
    run_loadgen,
    with_probes,
)
from .gcprobe import stalls
from .loadgen import wa_id_of
from .stack import Seen, TopicReader

QUIET = 1.0
TARGET_RATIO = 1.2
UNTIL = "request"  # the figure is the pipeline's overhead; "reply" adds the responder (docstring)
SINGLE_TENANT = "solo"


@dataclass(frozen=True)
class Size:
    """How many tenants and customers, and the total message rate (msg/s, open loop)."""

    tenants: int
    customers_per_tenant: int
    rate: float
    rounds: int  # the schedule is played in this many parts per configuration, alternating
    warmup_seconds: float = 0.0  # each configuration's warm-up lasts at least this long (`warmup_count`)

    @property
    def customers(self) -> int:
        return self.tenants * self.customers_per_tenant

    @property
    def seconds(self) -> float:
        return self.customers / self.rate


SIZES = {
    # the size: 100,000 messages at 70 msg/s = 1,430 s per configuration, ~50 min in all.
    # Each message opens a batch (3 context events: message, flush, history result; ~8.5 ms of the
    # worker's CPU). At 100 msg/s the worker used ~0.85 of a core and the whole machine (broker,
    # ingest, load generator, this process) nearly both: two runs of the same code gave the single
    # tenant a p99 of 0.6 s and 14 s (BENCHMARKS.md section 9), a measure of the queue, not of the
    # tenants. At 70 msg/s every process keeps a margin.
    "full": Size(50, 2000, 70.0, 4, warmup_seconds=120.0),
    # same 50 tenants, 100 customers each (a tenant's p99 is then its largest value), at a rate the
    # shared 2-core machine sustained under a load average of ~15 (50 msg/s did not), in 4 parts
    "quick": Size(50, 100, 30.0, 4),
    "smoke": Size(3, 20, 30.0, 2),
}
OVERRIDES = {  # environment variables that change the size of a run (BENCHMARKS.md section 9)
    "BENCH_TENANTS_CUSTOMERS_PER_TENANT": "customers_per_tenant",
    "BENCH_TENANTS_RATE": "rate",
    "BENCH_TENANTS_ROUNDS": "rounds",
    "BENCH_TENANTS_WARMUP_SECONDS": "warmup_seconds",
}
SUSTAINED = 0.9  # a part kept up when its results/s reached this share of the offered rate
# Before the measured parts each configuration plays a warm-up part (discarded, recorded in "warmup"):
# other customers, spread over every tenant, at the same rate. A quick run without it had its whole
# tail in the first part played (p99 634 ms against 27-43 ms in the other parts): the first message
# of each tenant creates its per-tenant clients and the worker's caches fill, which the alternation
# between configurations does not cancel. The full size warms up for `Size.warmup_seconds` at the
# full rate besides: its parts last minutes, and a few seconds of warm-up left the first part played
# exposed to whatever settles in a fresh broker and fresh services (a warm-up's and each part's
# `timeline` show what is left; in the first run with it, nothing: the warm-up's first 30 s already
# had the parts' p99).
WARMUP_PER_TENANT = 4
WARMUP_MIN = 100
TIMELINE_SECONDS = 30  # a part's results are also summarised per this many seconds of arrivals
# A result later than this is part of a stall: the seconds of arrivals with one are set beside what
# the stall probes saw then (bench/gcprobe/stalls.py in the bench process and each service; the
# broker's GC log; the context table's RocksDB LOG)
STALL_MS = 1500.0


def size_for(scale: str, environ: Mapping[str, str]) -> Size:
    """The scale's size, with the BENCH_TENANTS_* overrides of `environ` (e.g. a smaller full run)."""
    size = SIZES[scale]
    changes: dict[str, Any] = {}
    for name, field_name in OVERRIDES.items():
        if environ.get(name):
            kind = float if field_name in ("rate", "warmup_seconds") else int
            changes[field_name] = kind(environ[name])
    return dataclasses.replace(size, **changes)


def tenant_ids(count: int) -> list[str]:
    """`t00`, `t01`, … (slugs; two digits up to 100 tenants)."""
    width = max(2, len(str(count - 1)))
    return [f"t{n:0{width}d}" for n in range(count)]


def wati_tenant_of(tenant_id: str) -> str:
    """The WATI tenant id (the path part of its api_url) of a bench tenant's account."""
    return f"bench-{tenant_id}"


def secret_env_name(tenant_id: str) -> str:
    return "BENCH_TENANT_" + tenant_id.upper().replace("-", "_") + "_WEBHOOK_SECRET"


@dataclass
class TenantsFile:
    """A generated TENANTS_FILE, the environment its `env:` references need and each route's secret."""

    path: Path
    environ: dict[str, str]
    webhook_secrets: dict[str, str]  # tenant id → secret (the load generator presents it)


def write_tenants_file(ids: list[str], directory: Path, wati_origin: str, wati_token: str) -> TenantsFile:
    """One tenant per id, each with one WATI account (its own api_url, token in a file) and its own
    webhook secret in an environment variable: the format of services/common/tenants.py."""
    directory.mkdir(parents=True, exist_ok=True)
    tenants = []
    environ: dict[str, str] = {}
    webhook_secrets: dict[str, str] = {}
    for tenant_id in ids:
        token_file = directory / f"{tenant_id}-wati-token"
        token_file.write_text(wati_token + "\n")
        token_file.chmod(0o600)
        webhook_secrets[tenant_id] = secrets.token_urlsafe(24)
        environ[secret_env_name(tenant_id)] = webhook_secrets[tenant_id]
        tenants.append(
            {
                "id": tenant_id,
                # an account belongs to one tenant: each its own api_url (the WATI tenant id part)
                "wati": {
                    "api_url": f"{wati_origin}/{wati_tenant_of(tenant_id)}",
                    "token": f"file:{token_file}",
                },
                "webhook_secret": f"env:{secret_env_name(tenant_id)}",
            }
        )
    path = directory / "tenants.json"
    path.write_text(json.dumps({"tenants": tenants}, indent=1) + "\n")
    return TenantsFile(path, environ, webhook_secrets)


def schedule(size: Size, tag: str, route_of: list[int], seed: int = 17) -> list[list[Any]]:
    """`[[t, wa_id, text, route], ...]`: customer n's one message at slot perm(n) / rate.

    The order is random but seeded, so both runs send the same customers at the same moments;
    `route_of[n]` is the index of customer n's route (its tenant's webhook URL and secret)."""
    order = list(range(size.customers))
    random.Random(seed).shuffle(order)
    return [[slot / size.rate, wa_id_of(n), f"{tag} c{n}", route_of[n]] for slot, n in enumerate(order)]


def warmup_schedule(size: Size, tag: str, route_of_warmup: list[int]) -> list[list[Any]]:
    """The warm-up part: customers `size.customers` … (not in the measured schedule), one message
    each at the same rate; `route_of_warmup[i]` routes the i-th (round robin over the tenants)."""
    return [
        [i / size.rate, wa_id_of(size.customers + i), f"{tag} c{size.customers + i}", route]
        for i, route in enumerate(route_of_warmup)
    ]


def warmup_count(size: Size) -> int:
    """Messages of the warm-up: a few per tenant, and at least `warmup_seconds` at the rate."""
    return max(WARMUP_MIN, WARMUP_PER_TENANT * size.tenants, math.ceil(size.warmup_seconds * size.rate))


def timeline(arrivals_ms: list[float], overheads_ms: list[float], *,
             bucket_seconds: int = TIMELINE_SECONDS) -> list[dict[str, Any]]:
    """A part's results per `bucket_seconds` of arrivals from its first: when in the part its tail
    was (its start: a warm-up left short; one bucket: a stall), as {from_s, n, p50, p99, max}."""
    if not arrivals_ms:
        return []
    first = min(arrivals_ms)
    buckets: dict[int, list[float]] = {}
    for arrived, overhead in zip(arrivals_ms, overheads_ms, strict=True):
        buckets.setdefault(int((arrived - first) / 1000.0 // bucket_seconds), []).append(overhead)
    return [
        {"from_s": n * bucket_seconds, "n": len(values), "p50": percentile(values, 0.5),
         "p99": percentile(values, 0.99), "max": max(values)}
        for n, values in sorted(buckets.items())
    ]


def customer_of(text: str) -> int | None:
    """The customer number in a bench message text (`<tag> c<n>`), None for other texts."""
    _, _, rest = text.partition(" c")
    return int(rest) if rest.isdigit() else None


@dataclass
class Tally:
    """Requests (or replies) seen, by tenant: latencies in ms, and by customer slice of the schedule."""

    tag: str
    slice_size: int
    messages: int = 0
    by_tenant: dict[str, list[float]] = field(default_factory=dict)
    by_slice: dict[int, list[float]] = field(default_factory=dict)
    first_ms: float = math.inf
    last_ms: float = 0.0
    last_of_batch: dict[str, tuple[float, str, int]] = field(default_factory=dict)  # reply mode
    current_part: list[float] = field(default_factory=list)  # the samples of the part being played
    current_arrivals: list[float] = field(default_factory=list)  # their last messages' arrivals (ms)
    measuring: bool = True  # False during the warm-up: its results are counted, not sampled
    warmup_samples: int = 0
    # measured results by second of arrival (wall clock): when the tail happened, to set beside the
    # stall probes' events (`stall_details`)
    by_second: dict[int, stall_report.Second] = field(default_factory=dict)

    def update_requests(self, records: list[Seen], *, measure: bool) -> None:
        """Reads new ResponderRequests; with `measure` each is a sample, else only remembered for
        its reply (reply mode). Consumed records are dropped (100,000 of them would pile up)."""
        prefix = self.tag + " "
        for seen in records:
            batch = seen.value.get("messages") or []
            messages = [m for m in batch if str(m.get("text") or "").startswith(prefix)]
            if not messages:
                continue
            last = max(messages, key=lambda m: m["received_at"])
            last_ms = last["received_at"].timestamp() * 1000.0
            customer = customer_of(str(last["text"])) or 0
            tenant = parse_key(seen.key).tenant
            self.messages += len(messages)
            if measure:
                self._sample(tenant, customer, seen.timestamp_ms - last_ms - QUIET * 1000.0, last_ms, seen)
            else:
                self.last_of_batch[str(seen.value.get("batch_id"))] = (last_ms, tenant, customer)
        del records[: len(records)]

    def update_replies(self, records: list[Seen]) -> int:
        """Reply mode: each reply to a remembered batch is a sample. Returns replies matched."""
        matched = 0
        for seen in records:
            batch = self.last_of_batch.pop(str(seen.value.get("batch_id")), None)
            if batch is None:
                continue
            last_ms, tenant, customer = batch
            self._sample(tenant, customer, seen.timestamp_ms - last_ms - QUIET * 1000.0, last_ms, seen)
            matched += 1
        del records[: len(records)]
        return matched

    def _sample(self, tenant: str, customer: int, overhead_ms: float, last_ms: float, seen: Seen) -> None:
        self.current_part.append(overhead_ms)
        self.current_arrivals.append(last_ms)
        self.first_ms = min(self.first_ms, last_ms)
        self.last_ms = max(self.last_ms, float(seen.timestamp_ms))
        if not self.measuring:
            self.warmup_samples += 1
            return
        self.by_second.setdefault(int(last_ms // 1000), stall_report.Second()).add(overhead_ms, STALL_MS)
        self.by_tenant.setdefault(tenant, []).append(overhead_ms)
        self.by_slice.setdefault(customer // self.slice_size, []).append(overhead_ms)

    @property
    def measured_samples(self) -> int:
        return sum(len(v) for v in self.by_tenant.values())

    @property
    def samples(self) -> int:
        """Measured samples plus the warm-up's (a part's result count is a difference of these)."""
        return self.measured_samples + self.warmup_samples


def stats(values: list[float]) -> dict[str, float | None]:
    return {
        "p50": percentile(values, 0.5),
        "p99": percentile(values, 0.99),
        "max": max(values) if values else None,
        "n": float(len(values)),
    }


def group_stats(groups: dict[Any, list[float]], expected: int) -> dict[str, Any]:
    """p50/p99 per group (a missing sample counts as infinitely late), and the worst and median p99."""
    per = {str(k): stats(v + [math.inf] * max(0, expected - len(v))) for k, v in sorted(groups.items())}
    p99s = sorted((s["p99"] if s["p99"] is not None else math.inf, k) for k, s in per.items())
    return {
        "per_group": per,
        "worst": p99s[-1][1] if p99s else None,
        "worst_p99": p99s[-1][0] if p99s else None,
        "median_p99": p99s[len(p99s) // 2][0] if p99s else None,
        "best_p99": p99s[0][0] if p99s else None,
    }


def process_alive(pid: int) -> bool:
    """Whether the process runs (an exited child not yet waited for is a zombie: not alive)."""
    try:
        state = cpu_probe.process_times(Path(f"/proc/{pid}/stat").read_text()).state
    except (OSError, ValueError, IndexError):
        return False
    return state not in ("Z", "X")


class Stack:
    """One configuration's services (ingest + context, + responder for replies) with `ids` as its
    tenants, on its own topics; `play` sends a part of the schedule and waits for its results.
    Customer n belongs to ids[n // (customers / len(ids))]."""

    def __init__(
        self, bench: BenchEnv, standins: StandIns, name: str, ids: list[str], until: str, *,
        stall_probes: bool = False,
    ) -> None:
        self.bench = bench
        self.name = name
        self.ids = ids
        self.until = until
        self.size = size_for(bench.scale.name, os.environ)
        self.per_tenant = self.size.customers // len(ids)
        self.files = write_tenants_file(
            ids, bench.workdir / name / "tenants", standins.wati.origin, standins.wati.token
        )
        # each tenant's WATI account, on the stand-in's server as on WATI's shared hosts
        self.wati_accounts = {
            tenant_id: standins.wati.add_tenant(wati_tenant_of(tenant_id), standins.wati.token)
            for tenant_id in ids
        }
        self.history_reads = dict.fromkeys(ids, 0)  # getMessages per tenant's account (`count_history_reads`)
        self.stall_probes = stall_probes  # each service with the stall probe (`probe_file`)
        self.settings = bench.settings(
            name,
            quiet_window_seconds=QUIET,
            wati_api_url=standins.wati_url,
            wati_api_token=standins.wati.token,
            openai_base_url=standins.openai_url,
            openai_api_key=standins.openai.api_key,
            tenants_file=str(self.files.path),
        )
        services = ["ingest", "context"] + (["responder"] if until == "reply" else [])
        self.procs = {s: ServiceProcess.watistream(bench, s, self.settings, tag=f"-{name}") for s in services}
        self.tag = f"{name[:1]}{bench.run_id}"
        self.tally = Tally(self.tag, slice_size=self.size.customers_per_tenant)
        self.topics: Topics | None = None
        self.reader: TopicReader | None = None
        self.plays: list[dict[str, Any]] = []  # the measured parts
        self.warmup: dict[str, Any] | None = None  # the warm-up part (discarded)
        self.warmup_messages = 0
        self.cpu = dict.fromkeys([*services, "broker", "loadgen"], 0.0)
        self.replies_seen = 0

    async def start(self) -> None:
        self.topics = await ensure_topics(self.settings)
        watched = [self.topics.responder_requests, self.topics.dead_letter]
        self.reader = await TopicReader(
            self.settings, watched + ([self.topics.replies] if self.until == "reply" else [])
        ).start()
        for service, proc in self.procs.items():
            proc.env.update(self.files.environ)
            if self.stall_probes:
                with_probes(proc.env, BENCH_STALL_PROBE=str(self.probe_file(service)))
            proc.start()
        await self.procs["ingest"].wait_ready(f"http://127.0.0.1:{self.settings.ingest_port}/readyz")
        await self.procs["context"].wait_ready(f"http://127.0.0.1:{self.settings.context_web_port}/readyz")
        if "responder" in self.procs:
            await self.procs["responder"].wait_ready(
                f"http://127.0.0.1:{self.settings.responder_web_port}/readyz"
            )

    def count_history_reads(self) -> dict[str, int]:
        """Adds the history reads the stand-in recorded for each tenant's account to the count and
        forgets the requests (100,000s of them would fill this process); returns the counts."""
        for tenant_id, account in self.wati_accounts.items():
            self.history_reads[tenant_id] += sum(1 for r in account.requests if "/getMessages/" in r.path)
            account.requests.clear()
        return dict(self.history_reads)

    def probe_file(self, service: str) -> Path:
        """Where a service's stall probe writes (with `stall_probes`)."""
        return self.bench.workdir / self.name / f"stall-probe-{service}.json"

    async def stop(self) -> None:
        if self.reader is not None:
            await self.reader.stop()
        for proc in reversed(self.procs.values()):
            proc.stop()

    def _drained(self, accepted: int) -> bool:
        assert self.reader is not None and self.topics is not None
        broker = self.bench.broker_pid
        if broker is not None and not process_alive(broker):
            raise RuntimeError(f"the embedded broker (pid {broker}) is gone: the run cannot finish")
        records = self.reader.records
        self.tally.update_requests(records[self.topics.responder_requests], measure=self.until == "request")
        if self.until == "reply":
            self.replies_seen += self.tally.update_replies(records[self.topics.replies])
            return self.replies_seen >= accepted or bool(records[self.topics.dead_letter])
        return self.tally.messages >= accepted

    @property
    def accepted(self) -> int:
        """Messages accepted in the measured parts."""
        return sum(p["accepted"] for p in self.plays)

    async def warm_up(self, entries: list[list[Any]]) -> dict[str, Any]:
        """Plays `entries` like a part, but their results are not samples and their CPU is not
        counted; recorded as `warmup`."""
        self.tally.measuring = False
        cpu = dict(self.cpu)
        try:
            self.warmup = await self.play(entries, measured=False)
        finally:
            self.tally.measuring = True
            self.cpu = cpu
        self.warmup_messages = self.tally.messages
        return self.warmup

    async def play(self, entries: list[list[Any]], *, measured: bool = True) -> dict[str, Any]:
        """Sends `entries` (times rebased to their first), waits until every accepted message's
        request (reply) is seen or the drain timeout, adds the CPU used to the stack's account."""
        assert self.reader is not None and self.topics is not None
        t0 = entries[0][0]
        plan = [[t - t0, *rest] for t, *rest in entries]
        seconds = plan[-1][0] + 1.0 / self.size.rate
        base = f"http://127.0.0.1:{self.settings.ingest_port}/webhooks"
        routes = [[f"{base}/{t}/wati", self.files.webhook_secrets[t]] for t in self.ids]
        pids = {s: p.pid for s, p in self.procs.items()} | {"broker": self.bench.broker_pid}
        cpu0 = {s: cpu_seconds_of(pid) for s, pid in pids.items()}
        load = os.getloadavg()[0]
        samples0 = self.tally.samples
        self.tally.current_part, self.tally.current_arrivals = [], []
        self.tally.first_ms, self.tally.last_ms = math.inf, 0.0
        wall0, play_from = time.monotonic(), time.time()
        gen = await run_loadgen(
            {
                "url": routes[0][0],
                "token": routes[0][1],
                "routes": routes,
                "mode": "script",
                "schedule": plan,
                "duration": seconds + 1.0,
                "max_requests": len(plan) + 1,
                "connections": 128,
            },
            timeout=seconds + 120.0,
        )
        accepted = int(gen["statuses"].get("200", 0))
        play = {
            "messages": len(plan),
            "accepted": accepted,
            "not_accepted": len(plan) - accepted,
            "loadgen_errors": gen["errors"],
            "accept_latency_p99_ms": gen["latency_ms"]["p99"],
            "max_scheduler_lag_ms": gen["max_scheduler_lag_ms"],
            "load_average_at_start": round(load, 2),
            "wall_span": [play_from, time.time()],  # the load, then the drain (set below)
        }
        if measured:
            self.plays.append(play)
        # the worker may lag behind the load: give it 3 times as long as the load took, at least 2 min
        warmed = self.warmup["accepted"] if self.warmup else 0
        total = self.accepted + warmed + (0 if measured else accepted)
        play["drained"] = await self.reader.wait_until(lambda: self._drained(total), max(120.0, 3 * seconds))
        play["wall_seconds"] = round(time.monotonic() - wall0, 1)
        play["wall_span"][1] = time.time()  # where `stall_details` looks up the CPU used
        self.count_history_reads()
        # results over the span from the play's first measured message + the quiet window to its
        # last result: at a load the services sustain this is the offered rate; above, what they did
        play["results"] = self.tally.samples - samples0
        # per part: the p99 of a few minutes is set by the machine's worst seconds in them (a stall
        # of the shared VM delays every customer at once), so the parts show how much that moves
        play["overhead_ms"] = {
            "p50": percentile(self.tally.current_part, 0.5),
            "p99": percentile(self.tally.current_part, 0.99),
        }
        play["timeline"] = timeline(self.tally.current_arrivals, self.tally.current_part)
        play["span_seconds"] = max(1e-3, (self.tally.last_ms - self.tally.first_ms) / 1000.0 - QUIET)
        play["results_per_s"] = play["results"] / play["span_seconds"]
        play["kept_up"] = bool(play["drained"]) and play["results_per_s"] >= SUSTAINED * self.size.rate
        used = {s: cpu_seconds_of(pid) - cpu0[s] for s, pid in pids.items()}
        for s, seconds_used in used.items():
            self.cpu[s] += seconds_used
        # per part: whether a part (the table fuller, the worker behind) cost more per message
        play["cpu_ms_per_message"] = {s: round(1000 * v / max(1, accepted), 2) for s, v in used.items()}
        self.cpu["loadgen"] += gen["cpu_seconds"]
        return play

    async def summary(self) -> dict[str, Any]:
        assert self.reader is not None and self.topics is not None
        log_dir = self.bench.workdir / "broker" / "logs"
        traffic = await broker_traffic(self.settings, log_dir if log_dir.is_dir() else None)
        dead = self.reader.records[self.topics.dead_letter]
        if self.until == "reply" and dead:
            reasons = sorted({f"{d.value.get('reason')}: {d.value.get('error')}" for d in dead})
            raise RuntimeError(
                f"{len(dead)} requests dead-lettered instead of answered ({'; '.join(reasons)[:300]}); "
                "every tenant's requests must be answered for until='reply'"
            )
        tally, accepted = self.tally, self.accepted
        on_topics = accepted + (self.warmup["accepted"] if self.warmup else 0)
        counted = tally.measured_samples if self.until == "reply" else tally.messages - self.warmup_messages
        missing = max(0, accepted - counted)
        wall = sum(p["wall_seconds"] for p in self.plays)
        samples = [v for vs in tally.by_tenant.values() for v in vs]
        return {
            "tenants": len(self.ids),
            "customers": self.size.customers,
            "customers_per_tenant": self.per_tenant,
            "until": self.until,
            "offered_rate": self.size.rate,
            "accepted": accepted,
            "not_accepted": sum(p["not_accepted"] for p in self.plays),
            "samples": tally.measured_samples,
            "warmup": self.warmup,
            # history checks read from each tenant's own WATI account (warm-up included)
            "history_reads_by_tenant": self.count_history_reads(),
            "missing": missing,
            "drained": all(p["drained"] for p in self.plays),
            "kept_up": all(p["kept_up"] for p in self.plays),
            "dead_letters": len(dead),
            "throughput_per_s": sum(p["results"] for p in self.plays)
            / sum(p["span_seconds"] for p in self.plays),
            "overhead_ms": stats(samples + [math.inf] * missing),
            "part_p99_ms": [p["overhead_ms"]["p99"] for p in self.plays],
            "median_part_p99_ms": percentile(
                [
                    p["overhead_ms"]["p99"] if p["overhead_ms"]["p99"] is not None else math.inf
                    for p in self.plays
                ],
                0.5,
            ),
            "by_tenant": group_stats(tally.by_tenant, self.per_tenant),
            "by_slice": group_stats(tally.by_slice, self.size.customers_per_tenant),
            "plays": self.plays,
            "wall_seconds": round(wall, 1),
            "cpu_seconds": {s: round(v, 1) for s, v in self.cpu.items()},
            "cpu_us_per_message": {s: 1e6 * v / max(1, accepted) for s, v in self.cpu.items()},
            "cpu_share": {s: round(v / wall, 2) for s, v in self.cpu.items()},
            "context_rss_mib": round(self.procs["context"].rss_kib() / 1024, 1),
            "broker_traffic": traffic,
            # the topics hold the warm-up's records too
            "broker_records_per_message": sum(v["records"] for v in traffic.values()) / max(1, on_topics),
            "broker_bytes_per_message": sum(v["bytes"] for v in traffic.values()) / max(1, on_topics),
        }


async def broker_traffic(settings: Settings, log_dir: Path | None) -> dict[str, dict[str, int]]:
    """Records (end offsets) and bytes of log segments (one replica; 0 without the broker's
    directory) of every topic of this configuration, by topic name without the prefix: what one
    customer message costs the brokers, incl. the context table's changelog."""
    admin = make_admin(settings)
    await admin.start()
    try:
        names = sorted(t for t in await admin.list_topics() if t.startswith(settings.topic_prefix))
        described = await admin.describe_topics(names)
    finally:
        await admin.close()
    partitions = [TopicPartition(t["topic"], p["partition"]) for t in described for p in t["partitions"]]
    consumer = make_consumer(settings, enable_auto_commit=False)
    await consumer.start()
    try:
        ends = await consumer.end_offsets(partitions)
    finally:
        await consumer.stop()
    traffic: dict[str, dict[str, int]] = {}
    for tp, end in ends.items():
        entry = traffic.setdefault(tp.topic[len(settings.topic_prefix) :], {"records": 0, "bytes": 0})
        entry["records"] += end
        if log_dir is not None:
            segments = (log_dir / f"{tp.topic}-{tp.partition}").glob("*.log")
            entry["bytes"] += sum(f.stat().st_size for f in segments)
    return {t: v for t, v in sorted(traffic.items()) if v["records"]}


def settle_between_parts() -> None:
    """Collects and freezes this process's heap. It serves every history check (the WATI stand-in),
    so a collection of its garbage delays them all: part after part its heap grew and its full
    collections took 0.4-1.3 s (stall probe, 50 x 2,000 at 100 msg/s). Frozen between parts, each
    collection walks what one part adds (`run` unfreezes at its end)."""
    gc.collect()
    gc.freeze()


def process_names(bench: BenchEnv, stacks: list[Stack]) -> dict[int, str]:
    """pid → name of the run's own processes, for the CPU probe (`tenants-context`, `broker`, ...)."""
    names = {os.getpid(): "bench"} | ({bench.broker_pid: "broker"} if bench.broker_pid else {})
    for stack in stacks:
        for service, proc in stack.procs.items():
            if proc.proc is not None:
                names[proc.proc.pid] = f"{stack.name}-{service}"
    return names


def stall_details(
    bench: BenchEnv, stacks: list[Stack], bench_probe: dict[str, Any], cpu: dict[str, Any]
) -> dict[str, Any]:
    """Each configuration's stall windows (arrivals with a result later than STALL_MS) with what the
    probes of every process and the CPU probe (`cpu`, a `CpuProbe.snapshot`) saw in them, the
    loops' sampled stacks, RocksDB's stall summary, and per measured part the CPU the machine and
    its busiest processes used (the other configuration's idle services included)."""
    probes = {"bench": bench_probe}
    for stack in stacks:
        for service in stack.procs:
            probes[f"{stack.name}-{service}"] = read_probe(stack.probe_file(service))
    sources: stall_report.Sources = {
        name: {"gc_pauses": probe.get("gc_pauses", []), "lags": probe.get("lags", [])}
        for name, probe in probes.items()
    }
    if bench.broker_gc_log is not None:
        sources["broker"] = {"gc_pauses": stall_report.jvm_gc_pauses(bench.broker_gc_log)}
    for name, events in cpu["by_process"].items():
        sources.setdefault(name, {})["cpu"] = events
    sources["machine"] = {"machine": cpu["machine"]}
    rocks = {stack.name: stall_report.rocksdb_stalls(bench.workdir / stack.name) for stack in stacks}
    for name, found in rocks.items():
        sources[f"{name}-rocksdb"] = {"stalls": found["events"]}
    windows = {
        stack.name: stall_report.describe(
            stall_report.stall_windows(stack.tally.by_second, tail_seconds=QUIET), sources
        )
        for stack in stacks
    }
    lines = [stall_report.summary_line(name, w) for name, ws in windows.items() for w in ws]
    return {
        "late_ms": STALL_MS,
        "windows": windows,
        "lines": lines or [f"no result later than {STALL_MS / 1000:.1f} s in either configuration"],
        "loop_stacks": {name: probe.get("stacks", [])[:10] for name, probe in probes.items()},
        "lags_over_1s": {
            name: sum(1 for e in kinds["lags"] if e[1] >= 1.0)
            for name, kinds in sources.items()
            if "lags" in kinds
        },
        "rocksdb_cumulative": {name: found["cumulative"] for name, found in rocks.items()},
        "cpu_by_part": {
            stack.name: [cpu_probe.span_summary(cpu, *play["wall_span"]) for play in stack.plays]
            for stack in stacks
        },
    }


def cpu_lines(by_part: dict[str, list[dict[str, Any]]], top: int = 4) -> list[str]:
    """One line per measured part: the machine's mean busy / iowait / steal cores and its busiest
    processes' (the other configuration's idle services show here if they were not idle)."""
    lines = []
    for name, parts in by_part.items():
        for number, part in enumerate(parts, 1):
            machine = part["machine"]
            busiest = ", ".join(f"{p} {c:.2f}" for p, c in list(part["processes"].items())[:top])
            lines.append(
                f"{name} part {number} CPU (mean cores): machine busy {machine['busy']:.2f}, iowait "
                f"{machine['iowait']:.2f}, steal {machine['steal']:.2f}; {busiest or 'no process'}"
            )
    return lines


def timeline_lines(name: str, plays: list[dict[str, Any]]) -> list[str]:
    """One line per measured part: its p99 per TIMELINE_SECONDS of arrivals, in order."""
    return [
        f"{name} part {number} p99 per {TIMELINE_SECONDS} s (ms): "
        + ", ".join(_fmt_ms(bucket["p99"]) for bucket in play.get("timeline", []))
        for number, play in enumerate(plays, 1)
    ]


def round_order(rounds: int) -> list[tuple[int, int]]:
    """(round, stack) pairs, alternating which stack goes first (A B, B A, A B, ...), so a machine
    whose load drifts during the run weighs on both configurations alike."""
    return [(r, s) for r in range(rounds) for s in ((0, 1) if r % 2 == 0 else (1, 0))]


def _fmt_ms(value: float | None) -> str:
    return "-" if value is None else "inf" if math.isinf(value) else f"{value:.0f}"


async def run(bench: BenchEnv, *, until: str | None = None) -> dict[str, Any]:
    """Both configurations, their parts alternating; `until` (default BENCH_TENANTS_UNTIL, else
    "request"): where the overhead is measured to."""
    until = until or os.environ.get("BENCH_TENANTS_UNTIL") or UNTIL
    if until not in ("request", "reply"):
        raise ValueError(f"until must be 'request' or 'reply', not {until!r}")
    size = size_for(bench.scale.name, os.environ)
    commit = git_commit()
    # this process serves every history check (the WATI stand-in): its own pauses are in the
    # measured path, so it carries the stall probe too
    bench_probe = stalls.install(str(bench.workdir / "stall-probe-bench.json"), asyncio.get_running_loop())
    stacks: list[Stack] = []
    cpu = cpu_probe.CpuProbe(lambda: process_names(bench, stacks)).start()
    try:
        async with StandIns.running() as standins:
            stacks += [
                Stack(bench, standins, "tenants", tenant_ids(size.tenants), until, stall_probes=True),
                Stack(bench, standins, "single", [SINGLE_TENANT], until, stall_probes=True),
            ]
            try:
                for stack in stacks:
                    await stack.start()
                # the same seeded schedule for both (customer n's route: its tenant in each stack)
                plans = [
                    schedule(size, st.tag, [n // st.per_tenant for n in range(size.customers)])
                    for st in stacks
                ]
                for stack in stacks:  # a warm-up part each (discarded), its customers over every tenant
                    routes = [i % len(stack.ids) for i in range(warmup_count(size))]
                    await stack.warm_up(warmup_schedule(size, stack.tag, routes))
                    settle_between_parts()
                per_round = math.ceil(size.customers / size.rounds)
                for number, which in round_order(size.rounds):
                    await stacks[which].play(plans[which][number * per_round : (number + 1) * per_round])
                    settle_between_parts()
                many, single = [await st.summary() for st in stacks]
                try:
                    stalls_seen = stall_details(bench, stacks, bench_probe.snapshot(), cpu.snapshot())
                except Exception:  # a diagnostic must not cost the run's figures
                    stalls_seen = {"error": traceback.format_exc()[-2000:], "cpu_by_part": {},
                                   "lines": ["the stall details failed (details.stalls.error)"]}
            finally:
                for stack in stacks:
                    await stack.stop()
    finally:
        bench_probe.stop()
        cpu.stop()
        gc.unfreeze()
    worst = many["by_tenant"]["worst_p99"]
    single_p99 = single["overhead_ms"]["p99"]
    finite = worst is not None and single_p99 and math.isfinite(worst) and math.isfinite(single_p99)
    ratio = worst / single_p99 if finite else None  # a missing result (inf) leaves no ratio
    what = "webhook accepted -> ResponderRequest produced" if until == "request" else "webhook -> reply"
    count = f"{size.tenants} tenants x {size.customers_per_tenant:,} customers"
    kept_up = (
        "the services kept up with the offered rate in every part"
        if many["kept_up"] and single["kept_up"]
        else "OVERLOADED: results/s fell below 90 % of the offered rate in a part (tenants "
        f"{[round(p['results_per_s']) for p in many['plays']]}, single "
        f"{[round(p['results_per_s']) for p in single['plays']]}): the latencies measure a growing queue"
    )
    load = "load average at the start of each part: tenants {} / single {}".format(
        ", ".join(f"{p['load_average_at_start']:.1f}" for p in many["plays"]),
        ", ".join(f"{p['load_average_at_start']:.1f}" for p in single["plays"]),
    )
    figures = [
        figure(
            f"worst tenant's p99 vs single tenant p99 ({count})",
            worst,
            "ms",
            baseline=single_p99,
            ratio=ratio,
            target=f"<= {TARGET_RATIO}x",
            met=(ratio <= TARGET_RATIO) if ratio is not None else None,
            note=f"{what}, minus the 1 s quiet window; baseline = one tenant with all {size.customers:,} "
            f"customers, same schedule, same run; worst tenant {many['by_tenant']['worst']}; {kept_up}; "
            f"{load}; commit {commit}",
        ),
        figure(
            "worst tenant's p99 vs the single run's worst slice of the same customers",
            worst,
            "ms",
            baseline=single["by_slice"]["worst_p99"],
            note="the single run cut into the same groups of customers as the tenants: the worst of "
            f"{size.tenants} p99s in both (so the selection bias of 'worst' is in both)",
        ),
        figure(
            "p99, all tenants pooled vs single tenant",
            many["overhead_ms"]["p99"],
            "ms",
            baseline=single_p99,
            note=f"median tenant p99 {_fmt_ms(many['by_tenant']['median_p99'])} ms, best "
            f"{_fmt_ms(many['by_tenant']['best_p99'])} ms",
        ),
        figure(
            "median of the parts' p99, tenants vs single tenant",
            many["median_part_p99_ms"],
            "ms",
            baseline=single["median_part_p99_ms"],
            note="p99 of each part (in the order played): tenants "
            + ", ".join(_fmt_ms(v) for v in many["part_p99_ms"])
            + " / single "
            + ", ".join(_fmt_ms(v) for v in single["part_p99_ms"])
            + " ms",
        ),
        figure(
            "p50, all tenants pooled vs single tenant",
            many["overhead_ms"]["p50"],
            "ms",
            baseline=single["overhead_ms"]["p50"],
        ),
        figure(
            f"{'requests' if until == 'request' else 'replies'}/s produced (offered {size.rate:.0f} msg/s)",
            many["throughput_per_s"],
            "/s",
            baseline=single["throughput_per_s"],
            note=f"missing {many['missing']} / {single['missing']}, not accepted {many['not_accepted']} / "
            f"{single['not_accepted']}, dead letters {many['dead_letters']} / {single['dead_letters']}",
        ),
        figure(
            "context CPU per message",
            many["cpu_us_per_message"]["context"],
            "us",
            baseline=single["cpu_us_per_message"]["context"],
            note=f"ingest {many['cpu_us_per_message']['ingest']:.0f} / "
            f"{single['cpu_us_per_message']['ingest']:.0f} us per webhook (tenants / single)",
        ),
        figure(
            "broker records / bytes per customer message",
            many["broker_records_per_message"],
            "records",
            baseline=single["broker_records_per_message"],
            note=f"{many['broker_bytes_per_message']:,.0f} / {single['broker_bytes_per_message']:,.0f} "
            "bytes of log segments per message (one replica, all topics incl. the changelog; tenants / "
            "single)",
        ),
    ]
    return {
        "name": "tenants",
        "title": "9. Many tenants",
        "figures": figures,
        "notes": [
            f"measured: {what} (until={until!r}); each tenant's history check reads its own WATI "
            f"account on the stand-in; a warm-up part of {warmup_count(size)} other customers per "
            "configuration before the measured parts, not counted (details.tenants.warmup)",
            f"commit {commit}",
            *stalls_seen["lines"],
            *cpu_lines(stalls_seen["cpu_by_part"]),
            *timeline_lines("tenants", many["plays"]),
            *timeline_lines("single", single["plays"]),
        ],
        "details": {
            "commit": commit,
            "size": size.__dict__,
            "tenants": many,
            "single": single,
            "stalls": stalls_seen,
        },
    }


if __name__ == "__main__":  # pragma: no cover - `python -m bench.run --only tenants` is the way in
    sys.exit("run it with: python -m bench.run --only tenants [--quick]")
