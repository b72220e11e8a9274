"""The admin HTTP API over the targets: read them, change a backend's mode or a path's state, scrape metrics.

- `GET /targets`, `GET /targets/{id}`: JSON (see `TargetInfo.to_json`).
- `POST /targets/{id}/backend` `{"mode": "unhealthy", "status": 503}`: other keys are the mode's parameters.
- `POST /targets/{id}/path` `{"state": "latency", "latency_s": 0.2, "cut_existing": false}`: likewise.
- `GET /metrics`: Prometheus text from the targets' registry, or the one given (never the global one).

Errors are JSON `{"error": "..."}`: 400 for a malformed body or a bad mode, state or value, 404 for an
unknown target or route. A rejected request changes nothing.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler

from backends._sockets import HOST
from backends.fleet import Targets, UnknownTarget

_TARGETS: web.AppKey[Targets] = web.AppKey("targets", Targets)


def make_admin_app(targets: Targets, registry: CollectorRegistry | None = None) -> web.Application:
    """The admin application; /metrics serves `registry`, by default `targets.registry`."""
    registry = registry if registry is not None else targets.registry
    app = web.Application(middlewares=[_json_errors])
    app[_TARGETS] = targets
    app.router.add_get("/targets", _list)
    app.router.add_get("/targets/{id}", _get)
    app.router.add_post("/targets/{id}/backend", _set_backend)
    app.router.add_post("/targets/{id}/path", _set_path)
    app.router.add_get("/metrics", make_aiohttp_handler(registry, disable_compression=True))
    return app


class AdminServer:
    """Serves `make_admin_app` on host:port (0: an ephemeral port)."""

    def __init__(
        self, targets: Targets, registry: CollectorRegistry | None = None, *, host: str = HOST, port: int = 0
    ) -> None:
        self._app = make_admin_app(targets, registry)
        self._host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    async def start(self) -> int:
        runner = web.AppRunner(self._app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, self._host, self.port)
        await site.start()
        self._runner = runner
        self.port = runner.addresses[0][1]
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except UnknownTarget as e:
        return _error(404, str(e.args[0]))
    except ValueError as e:  # json.JSONDecodeError included
        return _error(400, str(e))
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return _error(e.status, e.reason)


async def _body(request: web.Request, key: str) -> tuple[str, dict[str, Any]]:
    """The JSON object in the body and the value of its required string `key`, taken out of it."""
    try:
        body = json.loads(await request.text())
    except json.JSONDecodeError as e:
        raise ValueError(f"body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    value = body.pop(key, None)
    if not isinstance(value, str):
        raise ValueError(f"body needs {key!r} as a string")
    return value, body


def _info(request: web.Request) -> web.Response:
    return web.json_response(request.app[_TARGETS].info(request.match_info["id"]).to_json())


async def _list(request: web.Request) -> web.Response:
    return web.json_response([info.to_json() for info in request.app[_TARGETS].snapshot()])


async def _get(request: web.Request) -> web.Response:
    return _info(request)


async def _set_backend(request: web.Request) -> web.Response:
    targets = request.app[_TARGETS]
    target_id = request.match_info["id"]
    targets.info(target_id)  # an unknown target is a 404 even when the body is bad too
    mode, params = await _body(request, "mode")
    await targets.set_backend(target_id, mode, **params)
    return _info(request)


async def _set_path(request: web.Request) -> web.Response:
    targets = request.app[_TARGETS]
    target_id = request.match_info["id"]
    targets.info(target_id)
    state, params = await _body(request, "state")
    cut_existing = params.pop("cut_existing", False)
    if not isinstance(cut_existing, bool):
        raise ValueError(f"cut_existing must be true or false, got {cut_existing!r}")
    await targets.set_path(target_id, state, cut_existing=cut_existing, **params)
    return _info(request)
