"""What every route shares: the config, the coordinator pool, the metrics, the key; body reading."""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from starlette.requests import Request

from services.gateway.errors import GatewayError, invalid
from services.gateway.metrics import GatewayMetrics
from services.gateway.upstream import Upstream
from shared.config.schema import GatewaySettings, LyraConfig
from shared.config.secrets import MissingApiKey, gateway_key
from shared.config.units import MB

T = TypeVar("T")


class GatewayConfigError(Exception):
    """The gateway cannot start with this config or environment; the message says what to change."""


def api_key(settings: GatewaySettings, source: str) -> str | None:
    """The Bearer key from the variable `api_key_env` names; refuses an open non-loopback bind."""
    try:
        return gateway_key(settings.host, settings.api_key_env, source)
    except MissingApiKey as exc:
        raise GatewayConfigError(str(exc)) from None


class Gateway:
    """The gateway's shared state; one per app."""

    def __init__(self, config: LyraConfig, upstream: Upstream | None = None) -> None:
        self.config = config
        self.settings = config.gateway
        self.key = api_key(self.settings, config.source)
        self.upstream = upstream or Upstream(config.client_endpoint(), self.settings.max_concurrency,
                                             self.settings.request_timeout_s, config.runtime.max_message_mb)
        self.metrics = GatewayMetrics()
        self.specialists = list(config.specialists)
        self.artists = [n for n, e in config.specialists.items() if e.kind == "image_generation"]
        # base64 grows bytes by 4/3; leave room for the rest of the JSON around an image
        self.turn_s = 1.0  # moving average of a turn's seconds
        self.max_body_bytes = int(config.runtime.max_image_mb * MB * 4 / 3) + MB

    def authorize(self, request: Request) -> None:
        """401 unless the request carries `Authorization: Bearer <key>` (when a key is configured)."""
        if self.key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.key.encode()):
            raise GatewayError(401, "invalid or missing API key: send `Authorization: Bearer <key>` with the key "
                               f"from ${self.settings.api_key_env}", type="authentication_error",
                               code="invalid_api_key")

    def count(self, endpoint: str, outcome: str, specialist: str = "") -> None:
        """One finished HTTP request."""
        self.metrics.requests.labels(endpoint, outcome, specialist).inc()

    def retry_after_s(self, queue_depth: int | None) -> float:
        """A guess at when a busy refusal is worth retrying: the queue's depth times a recent turn's length."""
        return min(60.0, max(1.0, (queue_depth or 1) * self.turn_s))

    def record_turn(self, seconds: float) -> None:
        """Feed a finished turn's length into the moving average `retry_after_s` uses."""
        self.turn_s = 0.8 * self.turn_s + 0.2 * seconds


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON; 413 past `limit` bytes, 400 when it is not JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise GatewayError(413, f"the request body is {int(declared)} bytes; the limit is {limit} "
                           "(runtime.max_image_mb sets it)", code="too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise GatewayError(413, f"the request body exceeds {limit} bytes (runtime.max_image_mb sets it)",
                               code="too_large")
    try:
        return json.loads(body)
    except ValueError:
        raise invalid("the request body is not valid JSON") from None


async def until_disconnect(request: Request) -> None:
    """Return when the HTTP client disconnects (the body must already be read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class ClientLeft(Exception):
    """The HTTP client disconnected before the answer was ready (its request was cancelled upstream)."""


async def unless_client_leaves(work: Awaitable[T], request: Request, events: AsyncIterator[Any]) -> T:
    """The result of `work` (which consumes `events`), or ClientLeft once the HTTP client disconnects.

    Either way `events` is closed at the end; closing it early is what cancels the request upstream.
    """
    collecting = asyncio.ensure_future(work)
    watching = asyncio.ensure_future(until_disconnect(request))
    try:
        await asyncio.wait({collecting, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
        if not collecting.done():
            collecting.cancel()
            await asyncio.gather(collecting, return_exceptions=True)
        await events.aclose()
    if collecting.cancelled():
        raise ClientLeft
    return collecting.result()  # raises the request's LyraError
