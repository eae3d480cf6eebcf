"""`watistream context`: creates the topics, then runs the context service's faust worker.

Topics are created BEFORE the worker starts: a faust worker silently ignores a source topic that
did not exist when it subscribed (docs/broker.md). The worker is started programmatically
(faust's own CLI would parse our argv); SIGTERM / SIGINT stop it cleanly (commit, flush, close).
"""

from __future__ import annotations

import argparse
import asyncio

from services.common import logs
from services.common.config import ConfigError, Settings
from services.common.kafka import ensure_topics
from services.common.tenants import load_tenants, require_served_channels


def check_settings(settings: Settings) -> None:
    """Refuses to start without what the worker needs (ConfigError names the variables)."""
    settings.require("KAFKA_BOOTSTRAP_SERVERS", "WEB_TOKEN")
    # WATI's settings only when WATI is enabled: its history API is the one this worker calls
    # with a tenants file, the tenants' entries decide the channels (the deployment's WATI settings
    # are then not needed)
    require_served_channels(settings, load_tenants(settings))
    if settings.reconcile_interval_seconds > 0 and settings.reconcile_rate_per_second <= 0:
        raise ConfigError("RECONCILE_RATE_PER_SECOND must be > 0 when the sweep is on")


def main(args: argparse.Namespace, settings: Settings) -> int:
    """Runs the worker until SIGTERM/SIGINT; returns the process exit code."""
    logs.setup("context", settings.log_level)
    logs.register_secret(settings.web_token, settings.wati_api_token, settings.webhook_token,
                         settings.openai_api_key, settings.manychat_api_token)
    check_settings(settings)

    import faust

    from services.context.app import create_app

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    loop.run_until_complete(ensure_topics(settings))
    app = create_app(settings)
    worker = faust.Worker(
        app,
        loop=loop,
        loglevel=settings.log_level,
        quiet=True,
        override_logging=False,  # keep our JSON log lines (logs.setup)
        redirect_stdouts=False,
    )
    worker.spinner = None  # a terminal progress spinner has no place in JSON log output
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    return 0
