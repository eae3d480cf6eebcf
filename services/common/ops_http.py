"""The operations endpoints of the worker services (responder, vision): `/healthz`, `/readyz`, `/metrics`.

`/healthz` says the process serves HTTP; `/readyz` says whether it does its job (consumer running,
assigned, caught up) and why not, so an orchestrator and an operator see a stopped consumer.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from . import metrics

Ready = Callable[[], tuple[bool, str]]


def build_app(ready: Ready) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        ok, reason = ready()
        return web.json_response(
            {"ready": ok, "reason": reason}, status=200 if ok else 503
        )

    async def metrics_view(_: web.Request) -> web.Response:
        response = web.Response(body=metrics.render())
        response.headers["Content-Type"] = metrics.CONTENT_TYPE
        return response

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_view)
    return app


async def serve_ops(host: str, port: int, ready: Ready) -> web.AppRunner:
    """Starts the endpoints on host:port (0 = a free port); `bound_port(runner)` tells which."""
    runner = web.AppRunner(build_app(ready), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner


def bound_port(runner: web.AppRunner) -> int:
    """The port the runner's first site listens on (useful when started with port 0)."""
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    raise RuntimeError("ops server is not listening")
