"""The Starlette app: routes, the API key check, and every failure turned into an OpenAI-shaped error."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from services.gateway.completions import chat_completions
from services.gateway.errors import GatewayError, from_lyra
from services.gateway.images import generate_image
from services.gateway.metrics import CONTENT_TYPE
from services.gateway.state import Gateway
from shared.client import LyraError
from shared.wire.names import SPECIALIST_HOST

log = logging.getLogger(__name__)

Handler = Callable[[Gateway, Request], Awaitable[Response]]


def _error_response(error: GatewayError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers())


def _endpoint(gw: Gateway, name: str, handler: Handler,
              authorized: bool = True) -> Callable[[Request], Awaitable[Response]]:
    """Wrap a handler: check the key, translate errors, count refusals by outcome."""

    async def endpoint(request: Request) -> Response:
        try:
            if authorized:
                gw.authorize(request)
            return await handler(gw, request)
        except LyraError as exc:
            depth = exc.event.queue_depth if exc.event is not None else None
            error = from_lyra(exc, retry_after_s=gw.retry_after_s(depth))
        except GatewayError as exc:
            error = exc
        log.info("%s %s -> %d %s: %s", request.method, request.url.path, error.status, error.code, error.message)
        gw.count(name, error.code or str(error.status))
        return _error_response(error)

    return endpoint


async def list_models(gw: Gateway, request: Request) -> Response:
    """`lyra` (the router decides) and `lyra/<specialist>` for each specialist, with residency."""
    try:
        status = await gw.upstream.status()
        resident = {m for s in status.services if s.service == SPECIALIST_HOST for m in s.resident}
    except LyraError:
        resident = set()  # the list still says what the config offers; residency is unknown
    created = int(time.time())
    data = [{"id": "lyra", "object": "model", "created": created, "owned_by": "lyra",
             "lyra": {"specialist": None, "resident": None}}]
    for name, entry in gw.config.specialists.items():
        data.append({"id": f"lyra/{name}", "object": "model", "created": created, "owned_by": "lyra",
                     "lyra": {"specialist": name, "kind": entry.kind, "resident": name in resident,
                              "description": entry.description}})
    return JSONResponse({"object": "list", "data": data})


async def metrics(gw: Gateway, request: Request) -> Response:
    """Prometheus text: the gateway's own series plus gauges from the coordinator's status."""
    try:
        status = await gw.upstream.status()
    except LyraError:
        status = None
    return Response(gw.metrics.render(status), media_type=CONTENT_TYPE)


async def health(gw: Gateway, request: Request) -> Response:
    """200 while the gateway runs; says whether the coordinator answers (no key needed)."""
    try:
        await gw.upstream.status(timeout_s=1.0)
        coordinator = "up"
    except LyraError:
        coordinator = "unreachable"
    return JSONResponse({"status": "ok", "coordinator": coordinator})


async def _not_found(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    message = f"no route {request.method} {request.url.path}; see docs/gateway.md for the endpoints"
    return _error_response(GatewayError(status, message, code="not_found" if status == 404 else "bad_method"))


def build_app(gw: Gateway) -> Starlette:
    """The ASGI app for one gateway."""
    routes = [
        Route("/v1/chat/completions", _endpoint(gw, "chat", chat_completions), methods=["POST"]),
        Route("/v1/images/generations", _endpoint(gw, "images", generate_image), methods=["POST"]),
        Route("/v1/models", _endpoint(gw, "models", list_models), methods=["GET"]),
        Route("/metrics", _endpoint(gw, "metrics", metrics), methods=["GET"]),
        Route("/health", _endpoint(gw, "health", health, authorized=False), methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: _not_found})
    app.state.gateway = gw
    return app
