"""The HTTP load generator, run in its OWN process (`python -m bench.loadgen`, spec on stdin as JSON).

It lives outside the measured process so the server's event loop does not share a core with its
client by construction (the machine has 2 cores, so both still compete for CPU with the broker:
the report gives the generator's own CPU time so the reader can see how much it took).

Modes (all bounded by `max_requests` AND `duration` seconds; only 127.0.0.1 is accepted):
- `closed`: `concurrency` workers post back to back; throughput = 2xx answers per second counted in
  the window after `warmup` seconds.
- `open`: fixed arrival rate `rate`/s (request i is due at start + i/rate, whatever happened to the
  earlier ones), sent by a fixed pool of `connections` workers; latency is measured from the DUE
  time, so a server or client that falls behind shows it in the figures (no coordinated omission).
- `script`: open loop over an explicit schedule `[[t, wa_id, text], ...]` (pipeline benchmark); with
  `routes` (`[[url, token], ...]`, all 127.0.0.1) an entry `[t, wa_id, text, route]` is posted to that
  route's URL with its token (the tenants benchmark: one webhook route and secret per tenant).

Bodies are WATI customer-message webhooks with unique ids, built from one template (cheap).
Output (stdout, one JSON object): counts by status, errors, rate, latency percentiles in ms, how
late the latest-starting open-loop request started (all workers busy, or the generator itself
starved of CPU), and the generator's CPU seconds.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import resource
import sys
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import aiohttp

# A WATI `message` webhook (docs/wati.md, the shape of services/devtools/scenario.py), with
# placeholders for what varies; built with %-formatting, which costs ~1 µs per body.
_TEMPLATE = (
    '{"id": "%(oid)s", "created": "%(created)s", "whatsappMessageId": "wamid.HBgL%(wamid)s", '
    '"conversationId": "bench-conversation", "ticketId": "bench-ticket", "text": "%(text)s", '
    '"type": "text", "data": null, "sourceId": null, "sourceUrl": null, "timestamp": "%(ts)d", '
    '"owner": false, "eventType": "message", "statusString": "SENT", "avatarUrl": null, '
    '"assignedId": null, "operatorName": null, "operatorEmail": null, "waId": "%(wa_id)s", '
    '"messageContact": null, "senderName": "Bench Customer", "listReply": null, '
    '"interactiveButtonReply": null, "buttonReply": null, "replyContextId": "", "sourceType": 0, '
    '"frequentlyForwarded": false, "forwarded": false, "channelId": null, '
    '"channelPhoneNumber": "50322220000"}'
)
_counter = itertools.count()
_RUN = "%06x" % (int(time.time() * 1000) & 0xFFFFFF)


def wa_id_of(customer: int) -> str:
    """The waId of bench customer n (11 digits, like a Salvadoran mobile number)."""
    return f"503{70000000 + customer:08d}"


def webhook_body(wa_id: str, text: str) -> bytes:
    n = next(_counter)
    now = datetime.now(UTC)
    return (
        _TEMPLATE
        % {
            "oid": f"{_RUN}{n:018x}",
            "created": now.strftime("%Y-%m-%dT%H:%M:%S.%f") + "0Z",
            "wamid": f"{_RUN}{n:026X}",
            "text": text,
            "ts": int(now.timestamp()),
            "wa_id": wa_id,
        }
    ).encode()


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "max": None, "mean": None}
    ordered = sorted(values)

    def q(p: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(p * (len(ordered) - 1))))]

    return {
        "p50": q(0.50),
        "p90": q(0.90),
        "p99": q(0.99),
        "max": ordered[-1],
        "mean": sum(ordered) / len(ordered),
    }


class Recorder:
    def __init__(self, window_start: float) -> None:
        self.window_start = window_start
        self.statuses: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.latencies_ms: list[float] = []
        self.window_ok = 0
        self.last_done = 0.0
        self.max_lag_ms = 0.0

    def done(self, status: int | None, due: float, finished: float, error: str | None = None) -> None:
        if error is not None:
            self.errors[error] = self.errors.get(error, 0) + 1
            return
        key = str(status)
        self.statuses[key] = self.statuses.get(key, 0) + 1
        if status is not None and 200 <= status < 300:
            if due >= self.window_start:
                self.latencies_ms.append((finished - due) * 1000.0)
                self.window_ok += 1
            self.last_done = max(self.last_done, finished)


async def _post(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    rec: Recorder,
    due: float,
    timeout: float,
    token: str | None = None,
) -> None:
    headers = {"Content-Type": "application/json"}
    if token is not None:  # a route's own secret, in place of the session's
        headers["Authorization"] = f"Bearer {token}"
    try:
        async with session.post(
            url,
            data=body,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as answer:
            await answer.read()
            rec.done(answer.status, due, time.monotonic())
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        rec.done(None, due, time.monotonic(), type(exc).__name__)


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    url = spec["url"]
    routes = [(str(u), str(t)) for u, t in spec.get("routes", [])]
    if any(urlsplit(u).hostname != "127.0.0.1" for u in [url, *(r[0] for r in routes)]):
        raise SystemExit("bench.loadgen targets 127.0.0.1 only")
    mode = spec["mode"]
    duration = float(spec["duration"])
    max_requests = int(spec["max_requests"])
    warmup = float(spec.get("warmup", 0.0))
    customers = int(spec.get("customers", 1000))
    timeout = float(spec.get("timeout", 10.0))
    headers = {"Authorization": f"Bearer {spec['token']}"} if spec.get("token") else {}
    connector = aiohttp.TCPConnector(limit=int(spec.get("connections", 128)), force_close=False)
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        # one request before the clock starts: connection set-up and first-request costs
        await session.post(
            url, data=webhook_body(wa_id_of(0), "warm-up"), headers={"Content-Type": "application/json"}
        )
        start = time.monotonic()
        deadline = start + duration
        rec = Recorder(start + warmup)
        sent = 0
        if mode == "closed":
            remaining = itertools.count()

            async def worker() -> None:
                nonlocal sent
                while time.monotonic() < deadline:
                    n = next(remaining)
                    if n >= max_requests:
                        return
                    sent += 1
                    await _post(
                        session,
                        url,
                        webhook_body(wa_id_of(n % customers), f"closed {n}"),
                        rec,
                        time.monotonic(),
                        timeout,
                    )

            await asyncio.gather(*(worker() for _ in range(int(spec["concurrency"]))))
        else:
            if mode == "open":
                rate = float(spec["rate"])
                count = min(max_requests, int(duration * rate))
                schedule = [(i / rate, wa_id_of(i % customers), f"open {i}", -1) for i in range(count)]
            elif mode == "script":
                # an entry's optional 4th element picks its route (url, token); default: `url`
                schedule = [(float(e[0]), str(e[1]), str(e[2]), int(e[3]) if len(e) > 3 else -1)
                            for e in spec["schedule"]][:max_requests]
            else:
                raise SystemExit(f"unknown mode {mode}")
            # A fixed pool of workers (as many as `connections`) takes the requests in schedule order;
            # each waits for its request's due time, so at most `connections` are in flight and no task
            # is created per request (cheap, like the closed loop). When every worker is busy a request
            # starts late, and its latency, counted from the due time, shows it (wrk2's approach).
            positions = itertools.count()

            async def scheduled() -> None:
                nonlocal sent
                while True:
                    n = next(positions)
                    if n >= len(schedule):
                        return
                    offset, wa_id, text, route = schedule[n]
                    due = start + offset
                    if due > deadline:
                        return
                    delay = due - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    else:
                        rec.max_lag_ms = max(rec.max_lag_ms, -delay * 1000.0)
                    sent += 1
                    target, token = routes[route] if route >= 0 else (url, None)
                    await _post(session, target, webhook_body(wa_id, text), rec, due, timeout, token)

            await asyncio.gather(*(scheduled() for _ in range(int(spec.get("connections", 128)))))
        end = time.monotonic()
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    window = (
        max(1e-9, min(end, deadline) - (start + warmup))
        if mode == "closed"
        else max(1e-9, (rec.last_done or end) - (start + warmup))
    )
    return {
        "mode": mode,
        "sent": sent,
        "statuses": rec.statuses,
        "errors": rec.errors,
        "ok_in_window": rec.window_ok,
        "window_seconds": window,
        "rate": rec.window_ok / window,
        "latency_ms": percentiles(rec.latencies_ms),
        "max_scheduler_lag_ms": rec.max_lag_ms,
        "elapsed_seconds": end - start,
        "cpu_seconds": (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime),
    }


def main() -> None:
    spec = json.loads(sys.stdin.read())
    result = asyncio.run(run(spec))
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
