"""`python -m bench.context_chaos`: the context worker drill of the test suite as a longer run.

Same machinery as `tests/e2e/test_context_chaos.py` (its own embedded Kafka with a PROXIED
listener, the fault proxy on the context worker's broker path only, the real process tree against
the stand-ins, a steady WATI load, SIGKILLs of the context worker at random moments). Prints the
figures (a)-(d) and exits 1 when any of them is not zero.

    python -m bench.context_chaos --kills 100
    python -m bench.context_chaos --kills 60 --seed 7 --delay-ms 150-400 --commit-interval 1
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import random
import shutil
import sys
import tempfile
from pathlib import Path

from services.standins import StandIns
from tests.e2e.test_chaos import table
from tests.e2e.test_context_chaos import DrillPlan, context_drill, failure_report


def _span(text: str) -> tuple[float, float]:
    low, _, high = text.partition("-")
    return float(low), float(high or low)


async def run(args: argparse.Namespace) -> int:
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1_000_000)
    rng = random.Random(seed)
    plan = dataclasses.replace(
        DrillPlan(), kills=args.kills, rate=args.rate, customers=args.customers,
        delay_ms=_span(args.delay_ms), commit_interval=args.commit_interval,
        after_commit_p=args.after_commit, stall_p=args.stall, settle_timeout=args.settle,
        producer_max_batch_size=args.max_batch,
    )
    print(f"context drill: seed {seed} (replay with --seed {seed}), {plan}")
    tmp = Path(tempfile.mkdtemp(prefix="watistream-context-chaos-"))
    try:
        async with StandIns.running() as standins:
            standins.openai.latency = 0.15
            standins.wati.latency = 0.05
            standins.openai.json_fn = lambda request, schema: {
                "category": "payment_proof", "confidence": 0.9, "description": "receipt"}
            result = await context_drill(plan, standins, tmp, rng)
        print(table(f"context SIGKILL drill, seed {seed}", result.rows))
        if not result.figures.clean or not result.accounted:
            print(f"INVARIANT BROKEN:\n{failure_report(result)}", file=sys.stderr)
            return 1
        return 0
    finally:
        if args.keep:
            print(f"kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    # a killed client leaves the stand-ins' handlers with "Connection lost" tracebacks: expected here
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    parser = argparse.ArgumentParser(prog="python -m bench.context_chaos",
                                     description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--kills", type=int, default=100, help="SIGKILLs of the context worker (100)")
    parser.add_argument("--rate", type=float, default=5.0, help="webhooks per second (5)")
    parser.add_argument("--customers", type=int, default=30)
    parser.add_argument("--delay-ms", default="80-300", help="proxy latency per cycle, each way (80-300)")
    parser.add_argument("--commit-interval", type=float, default=None,
                        help="faust's commit interval in s (default: faust's own, 2.8)")
    parser.add_argument("--max-batch", type=int, default=DrillPlan.producer_max_batch_size,
                        help="faust's producer max batch size in bytes (0: faust's default)")
    parser.add_argument("--after-commit", type=float, default=0.5, help="share of kills right after a commit")
    parser.add_argument("--stall", type=float, default=0.3, help="share of kills during a proxy stall")
    parser.add_argument("--settle", type=float, default=60.0, help="accounting deadline after the load (s)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the data and stack.log (path printed)")
    args = parser.parse_args(argv)
    if args.kills < 1 or not 0 < args.rate <= 50:
        parser.error("--kills must be >= 1 and --rate in (0, 50]: a loopback drill, not a load test")
    if args.after_commit + args.stall > 1:
        parser.error("--after-commit + --stall must be <= 1")
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
