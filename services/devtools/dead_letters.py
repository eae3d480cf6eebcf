"""`watistream dead-letters list|show|replay`: the shell front end of services/common/deadletters.py.

    watistream dead-letters list [--reason R] [--customer KEY] [--service S] [--since 24h] [--until T]
                                 [--replayed yes|no]
    watistream dead-letters show ID
    watistream dead-letters replay ID [ID ...]
    watistream dead-letters replay --all [the list filters]     # every match not yet replayed

Times: a duration back from now (`30m`, `24h`, `7d`) or an ISO time (`2026-12-06T10:00:00Z`).
Exit 1 when an id is unknown or a replay was refused (the line says why), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
from datetime import datetime
from typing import TYPE_CHECKING

from services.common.config import Settings
from services.common.timeparse import parse_time, utcnow

if TYPE_CHECKING:  # the CLI builds its parser from this module: Kafka clients load only when run
    from services.common.deadletters import Filters


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    for name, text in (("list", "the dead letters that match the filters"),
                       ("replay", "put dead letters back on their source topic, once each")):
        p = sub.add_parser(name, help=text)
        if name == "replay":
            p.add_argument("ids", nargs="*", help="dead-letter ids (<partition>:<offset>, as `list` shows)")
            p.add_argument("--all", action="store_true", help="every dead letter the filters match")
            p.add_argument("--by", default=None, help="recorded as who replayed (default: your user name)")
        p.add_argument("--reason", help="e.g. openai_failed, send_failed")
        p.add_argument("--customer", help="customer key, e.g. wati:50370000000")
        p.add_argument("--service", help="ingest, context, responder or vision")
        p.add_argument("--since", help="from this time (duration back from now, or ISO time)")
        p.add_argument("--until", help="before this time (duration back from now, or ISO time)")
        if name == "list":
            p.add_argument("--replayed", choices=("yes", "no"), help="only replayed / not replayed ones")
    p = sub.add_parser("show", help="everything about one dead letter, its payload decoded")
    p.add_argument("id", help="dead-letter id (<partition>:<offset>)")


def parse_when(text: str | None, now: datetime) -> datetime | None:
    """A duration back from `now` or an absolute time; ValueError naming the expected forms."""
    if text is None:
        return None
    from services.context.report import parse_since

    try:
        return now - parse_since(text)
    except ValueError:
        at = parse_time(text)
        if at is None:
            raise ValueError(f"{text!r} is neither a duration (30m, 24h, 7d) nor an ISO time") from None
        return at


def filters_of(args: argparse.Namespace, now: datetime) -> Filters:
    from services.common.deadletters import Filters

    replayed = getattr(args, "replayed", None)
    return Filters(
        reason=args.reason, customer=args.customer, service=args.service,
        since=parse_when(args.since, now), until=parse_when(args.until, now),
        replayed=None if replayed is None else replayed == "yes",
    )


async def run(args: argparse.Namespace, settings: Settings) -> int:
    from services.common.deadletters import (
        Filters,
        format_entry,
        format_list,
        parse_id,
        read_entries,
        read_replays,
        replay,
        select,
    )

    entries = await read_entries(settings)
    replays = await read_replays(settings)
    if args.action == "show":
        parse_id(args.id)
        found = [e for e in entries if e.id == args.id.strip()]
        if not found:
            print(f"no dead letter {args.id}", file=sys.stderr)
            return 1
        print(format_entry(found[0], replays.get(found[0].id)))
        return 0
    filters = filters_of(args, utcnow())
    if args.action == "list":
        print(format_list(select(entries, filters, replays), replays))
        return 0
    # replay
    if args.ids and args.all:
        raise ValueError("give ids or --all, not both")
    if args.ids:
        wanted = [f"{p}:{o}" for p, o in map(parse_id, args.ids)]
        by_id = {e.id: e for e in entries}
        unknown = [i for i in wanted if i not in by_id]
        if unknown:
            print("no dead letter " + ", ".join(unknown), file=sys.stderr)
            return 1
        chosen = [by_id[i] for i in wanted]
    elif args.all:
        chosen = select(entries, Filters(**{**filters.__dict__, "replayed": False}), replays)
    else:
        raise ValueError("name the dead letters to replay (ids), or --all with filters")
    outcomes = await replay(settings, chosen, by=args.by or getpass.getuser(), replays=replays)
    for outcome in outcomes:
        if outcome.replayed is not None:
            r = outcome.replayed
            at = f"{r['replayed_partition']}:{r['replayed_offset']}"
            print(f"replayed {outcome.id} -> {r['source_topic']} {at}")
        else:
            print(f"refused  {outcome.id}: {outcome.refused}")
    refused = sum(1 for o in outcomes if o.replayed is None)
    print(f"{len(outcomes) - refused} replayed, {refused} refused")
    return 1 if refused else 0


def main(args: argparse.Namespace, settings: Settings) -> int:
    from services.common.deadletters import DeadLetterError

    settings.require("KAFKA_BOOTSTRAP_SERVERS")
    try:
        return asyncio.run(run(args, settings))
    except ValueError as exc:
        print(f"watistream dead-letters: {exc}", file=sys.stderr)
        return 2
    except DeadLetterError as exc:
        print(f"watistream dead-letters: {exc}", file=sys.stderr)
        return 1
