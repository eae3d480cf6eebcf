"""`watistream` — the one console script (docs/design.md, "Outer contract").

Each sub-command imports only what it runs, so `watistream broker` starts without faust.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from .common.config import SKIP_CHECKS_ENV, ConfigError, Settings


def _broker(args: argparse.Namespace, settings: Settings) -> int:
    from .common.broker import EmbeddedKafka

    broker = EmbeddedKafka(
        Path(args.data_dir or Path(settings.data_dir) / "broker"),
        port=args.port, partitions=settings.topic_partitions,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    bootstrap = broker.start()
    print(bootstrap, flush=True)
    try:
        stop.wait()
    finally:
        broker.stop()
    return 0


def _service(module: str) -> Callable[[argparse.Namespace, Settings], int]:
    def run(args: argparse.Namespace, settings: Settings) -> int:
        import importlib

        main: Callable[[argparse.Namespace, Settings], int] = importlib.import_module(
            f"services.{module}"
        ).main
        return main(args, settings)

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="watistream", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("broker", help="start the embedded Kafka; print its bootstrap address")
    p.add_argument("--data-dir", help="storage directory (default: $DATA_DIR/broker)")
    p.add_argument("--port", type=int, default=0, help="listener port (default: a free one)")
    p.set_defaults(run=_broker)
    for name, module, text in (("ingest", "ingest.main", "the webhook HTTP service"),
                               ("context", "context.main", "the context faust worker"),
                               ("responder", "responder.main", "the responder worker"),
                               ("vision", "vision.main", "the vision worker")):
        p = sub.add_parser(name, help=f"{text} (runs the checks of what it uses first)")
        p.add_argument("--skip-checks", action="store_true",
                       help="start without reaching Kafka and the providers first")
        p.set_defaults(run=_service(module))
    p = sub.add_parser("check", help="validate the configuration and reach every dependency; "
                                     "exit 1 on any failure")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per dependency (default 10)")
    p.set_defaults(run=_service("devtools.check"))
    p = sub.add_parser("console", help="the operator console (web pages over the topics)")
    p.add_argument("--hash-password", action="store_true",
                   help="read a password on stdin, print its hash for CONSOLE_USERS and exit")
    p.set_defaults(run=_service("console.main"))
    p = sub.add_parser("standins", help="local stand-ins for WATI, ManyChat and OpenAI")
    p.add_argument("--port", type=int, default=0)
    p.set_defaults(run=_service("standins.main"))
    p = sub.add_parser("dev", help="broker + every service in one supervised process tree")
    p.add_argument("--skip-checks", action="store_true", help="start without `watistream check`")
    p.set_defaults(run=_service("devtools.dev"))
    p = sub.add_parser("demo", help="dev + stand-ins + a scripted conversation")
    p.add_argument("--once", action="store_true", help="exit after the scripted conversation")
    p.set_defaults(run=_service("devtools.demo"))
    p = sub.add_parser("report", help="what the bot missed, injected, held and recovered")
    p.add_argument("--since", default="24h", help="window, e.g. 30m, 24h, 7d")
    p.add_argument("--format", choices=("markdown", "json"), default="markdown")
    p.add_argument("--tenant", help="only this tenant's customers (docs/tenants.md)")
    p.set_defaults(run=_service("context.report"))
    from .devtools.dead_letters import add_arguments

    p = sub.add_parser("dead-letters", help="list, show and replay (once) dead letters")
    add_arguments(p)
    p.set_defaults(run=_service("devtools.dead_letters"))
    return parser


def _start_checks(service: str, settings: Settings) -> int:
    """The checks of what `service` uses (services/devtools/check.py); 0 when all pass.

    Lines go to stderr (stdout of a service is its JSON log); a failure names what to change."""
    import asyncio

    from .devtools.check import SERVICE_NEEDS, exit_code, format_report, run_checks

    checks = asyncio.run(run_checks(settings, SERVICE_NEEDS[service]))
    if exit_code(checks):
        print(format_report(checks), file=sys.stderr, flush=True)
        print(f"watistream {service}: not starting (fix the above, or --skip-checks)", file=sys.stderr)
        return 1
    return 0


def _bound_tenant_labels(settings: Settings) -> None:
    """The process's metric `tenant` label values: the configured tenants (docs/tenants.md,
    "Per-tenant visibility"); an invalid tenants file is the service's configuration error."""
    from .common import metrics
    from .common.tenants import load_tenants

    metrics.bound_tenants(load_tenants(settings).by_id)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        skip = getattr(args, "skip_checks", False) or os.environ.get(SKIP_CHECKS_ENV) == "1"
        if args.command in ("ingest", "context", "responder", "vision") and not skip:
            refused = _start_checks(args.command, settings)
            if refused:
                return refused
        if args.command in ("ingest", "context", "responder", "vision", "console"):
            _bound_tenant_labels(settings)
        return int(args.run(args, settings))
    except ConfigError as exc:
        if args.command == "check":  # the same one-line-per-check form as every other failure
            from .devtools.check import failed, format_report

            print(format_report([failed("settings", str(exc), "correct the named variable(s)")]))
            return 1
        print(f"watistream {args.command}: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
