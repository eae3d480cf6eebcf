"""`watistream` — the one console script (DESIGN.md, "Outer contract").

Each sub-command imports only what it runs, so `watistream broker` starts without faust.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from .common.config import ConfigError, Settings


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
    sub.add_parser("ingest", help="the webhook HTTP service").set_defaults(run=_service("ingest.main"))
    sub.add_parser("context", help="the context faust worker").set_defaults(
        run=_service("context.main"))
    sub.add_parser("responder", help="the responder worker").set_defaults(
        run=_service("responder.main"))
    sub.add_parser("vision", help="the vision worker").set_defaults(run=_service("vision.main"))
    p = sub.add_parser("console", help="the operator console (web pages over the topics)")
    p.add_argument("--hash-password", action="store_true",
                   help="read a password on stdin, print its hash for CONSOLE_USERS and exit")
    p.set_defaults(run=_service("console.main"))
    p = sub.add_parser("standins", help="local stand-ins for WATI, ManyChat and OpenAI")
    p.add_argument("--port", type=int, default=0)
    p.set_defaults(run=_service("standins.main"))
    p = sub.add_parser("dev", help="broker + every service in one supervised process tree")
    p.set_defaults(run=_service("devtools.dev"))
    p = sub.add_parser("demo", help="dev + stand-ins + a scripted conversation")
    p.add_argument("--once", action="store_true", help="exit after the scripted conversation")
    p.set_defaults(run=_service("devtools.demo"))
    p = sub.add_parser("report", help="what the bot missed, injected, held and recovered")
    p.add_argument("--since", default="24h", help="window, e.g. 30m, 24h, 7d")
    p.add_argument("--format", choices=("markdown", "json"), default="markdown")
    p.set_defaults(run=_service("context.report"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        return int(args.run(args, settings))
    except ConfigError as exc:
        print(f"watistream {args.command}: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
