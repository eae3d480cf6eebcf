"""`python -m bench.run [--quick] [--only ingest,pipeline,...] [--profile]`: every benchmark, one table.

Starts ONE embedded Kafka in a temporary directory for the whole run (or uses `--bootstrap`), runs
the selected benchmarks in order, prints the table of figures (each headline figure next to the
baseline measured in the same run, and their ratio), and writes `bench/results/latest.json` and
`bench/results/latest.md` (or `--results DIR`) with the machine's cores, memory and CPU model.
A benchmark that fails is reported as failed; the others still run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from services.common.broker import EmbeddedKafka

from . import behind, cost, growth, history, idle, ingest, pipeline, responder, state, tenants
from .common import SCALES, BenchEnv, machine_info

Benchmark = Callable[[BenchEnv], Awaitable[dict[str, Any]]]
BENCHMARKS: dict[str, Benchmark] = {
    "ingest": ingest.run,
    "pipeline": pipeline.run,
    "responder": responder.run,
    "cost": cost.run,
    "state": state.run,
    "idle": idle.run,
    "history": history.run,
    "tenants": tenants.run,
    "growth": growth.run,
    "behind": behind.run,
}
ON_REQUEST = frozenset({"tenants", "growth", "behind"})
"""Run only when named in --only: the tenants benchmark takes ~50 min at full size."""
RESULTS = Path(__file__).resolve().parent / "results"


async def run_all(
    bench: BenchEnv, names: list[str], echo: Callable[[str], None] = print
) -> list[dict[str, Any]]:
    """Runs the named benchmarks one after another; a failure becomes a result with `error`."""
    results = []
    for name in names:
        echo(f"[bench] {name}: running ({bench.scale.name})")
        started = time.monotonic()
        try:
            result = await BENCHMARKS[name](bench)
        except Exception as exc:
            result = {
                "name": name,
                "title": name,
                "figures": [],
                "details": {},
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(),
            }
        result["seconds"] = round(time.monotonic() - started, 1)
        echo(
            f"[bench] {name}: {'FAILED ' + result['error'] if 'error' in result else 'done'} "
            f"in {result['seconds']:.0f}s"
        )
        results.append(result)
    return results


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}" if abs(value) < 1 else f"{value:.1f}"
    else:
        text = str(value)
    return f"{text} {unit}".strip()


def table_rows(results: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for result in results:
        if "error" in result:
            rows.append([result["name"], "FAILED: " + result["error"][:90], "", "", "", "", ""])
            continue
        for f in result["figures"]:
            rows.append(
                [
                    result["name"],
                    f["metric"],
                    _fmt(f["value"], f["unit"]),
                    _fmt(f["baseline"], f["unit"]) if f["baseline"] is not None else "-",
                    f"{f['ratio']:.2f}x" if f["ratio"] is not None else "-",
                    f["target"] or "-",
                    _fmt(f["met"]) if f["met"] is not None else "-",
                ]
            )
    return rows


HEADER = ["bench", "figure", "value", "baseline (same run)", "ratio", "target", "met"]


def render_text(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(HEADER, widths, strict=True)),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def render_markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    lines = [
        f"# Benchmark results ({doc['scale']}, {doc['finished_at']})",
        "",
        f"Machine: {m['cores']} cores, {m['memory_gib']} GiB, {m['cpu_model']}; load average at start "
        f"{m['load_average_at_start']}; commit {m.get('commit', 'unknown')}; Python {m['python']}; "
        f"{m['java']}. Run took {doc['seconds']:.0f} s.",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
    ]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in table_rows(doc["results"])]
    for result in doc["results"]:
        notes = [f"- {f['metric']}: {f['note']}" for f in result.get("figures", []) if f.get("note")]
        notes += [f"- {n}" for n in result.get("notes", [])]
        profile = result.get("details", {}).get("profile_top")
        if notes or profile:
            lines += ["", f"## {result.get('title', result['name'])}", "", *notes]
            if profile:
                lines += ["", "Profile (py-spy, share of samples):", "", "```", *profile, "```"]
    return "\n".join(lines) + "\n"


async def main_async(args: argparse.Namespace) -> int:
    # aiokafka warns about leaderless partitions of topics created a moment ago: noise here
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    names = [n.strip() for n in args.only.split(",")] if args.only else [
        n for n in BENCHMARKS if n not in ON_REQUEST
    ]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    scale = SCALES["smoke" if args.smoke else "quick" if args.quick else "full"]
    workdir = Path(tempfile.mkdtemp(prefix="watistream-bench-"))
    machine = machine_info()
    print(
        f"[bench] machine: {machine['cores']} cores, {machine['memory_gib']} GiB, {machine['cpu_model']}, "
        f"load {machine['load_average_at_start']}"
    )
    broker = None
    started = time.monotonic()
    try:
        bootstrap = args.bootstrap
        if not bootstrap:
            broker = EmbeddedKafka(workdir / "broker", partitions=8)
            bootstrap = await asyncio.to_thread(broker.start)
            print(f"[bench] embedded Kafka at {bootstrap}")
        bench = BenchEnv(
            bootstrap,
            workdir,
            scale,
            profile=args.profile,
            broker_pid=broker.process.pid if broker is not None and broker.process else None,
            broker_gc_log=broker.gc_log_file if broker is not None else None,
        )
        results = await run_all(bench, names)
    finally:
        if broker is not None:
            await asyncio.to_thread(broker.stop)
        if args.keep:
            print(f"[bench] work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    doc = {
        "scale": scale.name,
        "finished_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "seconds": round(time.monotonic() - started, 1),
        "machine": machine,
        "load_average_at_end": [round(x, 2) for x in __import__("os").getloadavg()],
        "benchmarks": names,
        "results": results,
    }
    print()
    print(render_text(table_rows(results)))
    out = Path(args.results) if args.results else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    stem = "latest" if scale.name == "full" else f"latest-{scale.name}"
    (out / f"{stem}.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    (out / f"{stem}.md").write_text(render_markdown(doc))
    print(f"\n[bench] wrote {out / (stem + '.json')} and {stem}.md ({doc['seconds']:.0f} s)")
    return 1 if any("error" in r for r in results) else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="short runs (~2.5 min in all)")
    parser.add_argument("--smoke", action="store_true", help="seconds per benchmark (the test suite's)")
    parser.add_argument("--only", help=f"comma-separated subset of: {', '.join(BENCHMARKS)} "
                        f"({', '.join(sorted(ON_REQUEST))} only when named)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="attach py-spy (if installed in the venv) to the slowest stages",
    )
    parser.add_argument("--bootstrap", help="use this Kafka instead of starting an embedded one")
    parser.add_argument("--results", help="directory for the results files (default bench/results)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, data)")
    return parser


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(main_async(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
