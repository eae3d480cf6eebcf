"""`python -m bench.chaos`: the SIGKILL drill of the test suite as a longer soak (not part of the suite).

Same machinery as `tests/e2e/test_chaos.py` (stack, load, kills, accounting): a real `watistream`
process tree against the stand-ins, a steady load of WATI webhooks, and SIGKILLs of the chosen
services about every `--kill-every` seconds, each restarted through the supervisor. Starts its own
embedded Kafka in a temporary directory (or uses `--bootstrap`). Prints the figures and exits 1
when an invariant broke (an accepted webhook lost or in two batches, a reply sent twice, ...).

    python -m bench.chaos --seconds 600 --rate 8 --kill-every 10
    python -m bench.chaos --services responder --seconds 300 --seed 42     # one service only
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from services.common.broker import EmbeddedKafka
from services.common.config import Settings
from services.devtools.dev import SERVICES
from services.responder.channels import local_message_id
from services.standins import StandIns
from tests.conftest import unique_prefix
from tests.e2e.test_chaos import DrillResult, assert_exactly_once, sigkill_drill, table


def explain_duplicates(result: DrillResult, standins: StandIns) -> None:
    """The timeline of each batch sent twice: kills, OpenAI generations, WATI sends (monotonic s)."""
    kills = [(k.killed_at, f"kill {k.service} pid {k.pid}") for k in result.kills]
    now_wall, now_mono = time.time(), time.monotonic()
    for part in list(result.verdict.duplicate_sends)[:10]:
        batch = part.rsplit("#", 1)[0]
        events = list(kills)
        for r in standins.openai.responses.values():
            if (r.request.get("metadata") or {}).get("batch_id") == batch:
                events.append((r.started, "openai started"))
                events.append((r.finished, "openai finished"))
        for sent in standins.wati.sent:
            if sent.local_message_id == local_message_id(batch, 0):
                events.append((now_mono - (now_wall - sent.at.timestamp()), "wati send recorded"))
        print(f"-- {batch}")
        first = min(t for t, what in events if not what.startswith("kill"))
        for at, what in sorted(events):
            if abs(at - first) < 30:
                print(f"   {at - first:+8.3f}  {what}")


def soak_plan(
    rng: random.Random, seconds: float, every: float, services: list[str]
) -> list[tuple[float, str]]:
    """Kill times about `every` seconds apart (±50 %) within the load; each service at least once."""
    times: list[float] = []
    at = rng.uniform(3.0, every)
    while at < seconds - 6.0:
        times.append(at)
        at += rng.uniform(0.5 * every, 1.5 * every)
    names = list(services)
    rng.shuffle(names)
    names += [rng.choice(services) for _ in range(max(0, len(times) - len(names)))]
    return list(zip(times, names[: len(times)], strict=True))


async def soak(args: argparse.Namespace) -> int:
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1_000_000)
    rng = random.Random(seed)
    tmp = tempfile.mkdtemp(prefix="watistream-chaos-")
    try:
        broker: EmbeddedKafka | None = None
        bootstrap = args.bootstrap
        if not bootstrap:
            broker = EmbeddedKafka(Path(tmp) / "broker", partitions=4)
            bootstrap = await asyncio.to_thread(broker.start)
        try:
            settings = Settings(
                kafka_bootstrap_servers=bootstrap,
                topic_prefix=unique_prefix("chaos-soak"),
                topic_partitions=4,
                webhook_token="soak-webhook-token",
                web_token="soak-web-token",
            )
            plan = soak_plan(rng, args.seconds, args.kill_every, args.services.split(","))
            print(f"chaos soak: seed {seed}, {len(plan)} kills over {args.seconds:.0f} s at {args.rate:g}/s")
            async with StandIns.running() as standins:
                standins.openai.latency = 0.15
                standins.wati.latency = 0.05
                standins.openai.json_fn = lambda request, schema: {
                    "category": "payment_proof",
                    "confidence": 0.9,
                    "description": "receipt",
                }
                result = await sigkill_drill(
                    settings,
                    standins,
                    Path(tmp),
                    rng,
                    rate=args.rate,
                    max_count=int(args.seconds * args.rate),
                    customers=args.customers,
                    plan=plan,
                    min_seconds=args.seconds,
                )
        finally:
            if broker is not None:
                await asyncio.to_thread(broker.stop)
        print(table(f"chaos soak, seed {seed}", result.rows))
        if args.keep:
            print(f"stack log: {result.log}")
        slowest: dict[str, float] = {}
        for kill in result.kills:
            slowest[kill.service] = max(slowest.get(kill.service, 0.0), kill.recovered_after)
        print("slowest recovery per service (s):", {k: round(v, 1) for k, v in slowest.items()})
        if result.verdict.duplicate_sends:
            explain_duplicates(result, standins)
        try:
            assert result.accounted, "not every accepted webhook was accounted for"
            assert_exactly_once(result.verdict, result.log)
        except AssertionError as failure:
            print(f"INVARIANT BROKEN: {failure}", file=sys.stderr)
            return 1
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    # a killed client leaves the stand-ins' handlers with "Connection lost" tracebacks: expected here
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=300.0, help="load duration (default 300)")
    parser.add_argument("--rate", type=float, default=6.0, help="webhooks per second (default 6)")
    parser.add_argument("--customers", type=int, default=40)
    parser.add_argument("--kill-every", type=float, default=10.0, help="mean seconds between kills")
    parser.add_argument("--services", default=",".join(SERVICES), help="comma-separated victims")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the data and stack.log (path printed)")
    parser.add_argument("--bootstrap", default="", help="use this Kafka instead of an embedded one")
    args = parser.parse_args(argv)
    if not 0 < args.rate <= 50:
        parser.error("--rate must be in (0, 50]: this is a loopback drill, not a load test")
    unknown = set(args.services.split(",")) - set(SERVICES)
    if unknown:
        parser.error(f"unknown services: {sorted(unknown)}")
    return asyncio.run(soak(args))


if __name__ == "__main__":
    sys.exit(main())
