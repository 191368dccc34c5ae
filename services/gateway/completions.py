"""POST /v1/chat/completions: one Lyra turn as an OpenAI chat completion, whole or as SSE chunks.

The voice's streamed text is the answer; the route, scores, stage timings and any image travel in the
extra `lyra` field, which the official clients keep as an extra attribute. `usage` holds the voice
model's token counts as its worker reports them (see `Turn.usage`).
"""

from __future__ import annotations

import base64
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from services.gateway.errors import GatewayError, from_lyra
from services.gateway.openai_schema import (
    ChatCompletionRequest,
    generation_options,
    parse,
    resolve_model,
    to_turns,
)
from services.gateway.state import ClientLeft, Gateway, read_json, unless_client_leaves
from services.gateway.upstream import KEEPALIVE
from shared.client import LyraError
from shared.wire.messages import (
    AcceptedEvent,
    DoneEvent,
    ImageEvent,
    Message,
    RouteEvent,
    StageRestartedEvent,
    TokenEvent,
)

log = logging.getLogger(__name__)

KEEPALIVE_COMMENT = b": keep-alive\n\n"


class Turn:
    """What one request has seen so far, and its OpenAI shapes."""

    def __init__(self, gw: Gateway, model: str, max_tokens: int | None, started: float) -> None:
        self.gw = gw
        self.model = model
        self.max_tokens = max_tokens
        self.started = started
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.specialist = ""
        self.pieces = 0
        self.last_piece_at: float | None = None
        self.done: DoneEvent | None = None
        self.image_b64: str | None = None

    def see(self, event: Message) -> str | None:
        """Record one event; the voice text it adds, if any."""
        if isinstance(event, TokenEvent):
            if event.stage != "voice":
                return None
            now = time.perf_counter()
            if self.last_piece_at is None:
                self.gw.metrics.ttft.labels(self.specialist).observe(now - self.started)
            else:
                self.gw.metrics.itl.observe(now - self.last_piece_at)
            self.last_piece_at = now
            self.pieces += 1
            return event.text
        if isinstance(event, RouteEvent):
            self.specialist = event.specialist
            self.model = f"lyra/{event.specialist}"
        elif isinstance(event, ImageEvent):
            self.image_b64 = base64.b64encode(event.image.data).decode()
        elif isinstance(event, DoneEvent):
            self.done = event
            self.specialist = event.specialist
            self.model = f"lyra/{event.specialist}"
            if self.image_b64 is None and event.image is not None:
                self.image_b64 = base64.b64encode(event.image.data).decode()
            self.gw.metrics.observe_done(event.specialist, event.timings)
            self.gw.metrics.pieces.inc(self.pieces)
        return None

    def finish_reason(self) -> str:
        """The voice's own reason when it reports one; else whether the pieces reached the limit."""
        counted = self.done.usage if self.done is not None else None
        if counted is not None:
            return counted.finish_reason
        # Pieces never outnumber tokens, so reaching the limit in pieces proves the limit cut the reply.
        return "length" if self.max_tokens is not None and self.pieces >= self.max_tokens else "stop"

    def usage(self) -> dict[str, Any]:
        """The voice's token counts (prompt: its whole composed prompt); pieces streamed where none are reported."""
        counted = self.done.usage if self.done is not None else None
        if counted is None:
            return {"prompt_tokens": 0, "completion_tokens": self.pieces, "total_tokens": self.pieces}
        return {"prompt_tokens": counted.prompt_tokens, "completion_tokens": counted.completion_tokens,
                "total_tokens": counted.prompt_tokens + counted.completion_tokens}

    def lyra(self) -> dict[str, Any]:
        """The extra field: route, scores, stage timings, the image (when the artist ran), usage's meaning."""
        done = self.done
        counted = done is not None and done.usage is not None
        extra: dict[str, Any] = {"usage_counts": "the voice model's tokens" if counted else
                                 "voice text pieces streamed; this voice backend reports no token counts"}
        if done is not None:
            extra.update(request_id=done.parent_id, specialist=done.specialist, forced=done.forced,
                         scores=done.scores, timings=done.timings)
        if self.image_b64 is not None:
            mime = done.image.mime if done is not None and done.image is not None else "image/png"
            extra["image"] = {"b64_json": self.image_b64, "mime": mime}
        return extra

    def completion(self, answer: str) -> dict[str, Any]:
        """The whole `chat.completion` object."""
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer, "refusal": None},
                             "logprobs": None, "finish_reason": self.finish_reason()}],
                "usage": self.usage(), "lyra": self.lyra()}

    def chunk(self, delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        """One SSE `chat.completion.chunk` event."""
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}
        return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"

    def content_prefix(self) -> bytes:
        """Everything of a content chunk before the text, built once per request (the per-token hot path)."""
        return (b'data: {"id":"' + self.id.encode() + b'","object":"chat.completion.chunk","created":'
                + str(self.created).encode() + b',"model":' + json.dumps(self.model).encode()
                + b',"choices":[{"index":0,"delta":{"content":')


async def chat_completions(gw: Gateway, request: Request) -> Response:
    """The route handler."""
    started = time.perf_counter()
    req: ChatCompletionRequest = parse(ChatCompletionRequest, await read_json(request, gw.max_body_bytes))
    specialist = resolve_model(req.model, gw.specialists)
    turns, image = to_turns(req.messages)
    options = generation_options(req)
    if req.user:
        log.info("chat request from user %r", req.user[:64])  # an id the caller chose; never logged long
    events = gw.upstream.stream(gw.settings.keepalive_s, messages=turns, image=image, specialist=specialist,
                                timeout_s=gw.settings.request_timeout_s, **options)
    turn = Turn(gw, req.model, options.get("max_new_tokens"), started)
    try:
        first = await _accepted(events)
    except BaseException:
        await events.aclose()
        raise
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_sse(gw, turn, first, events, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _whole(gw, turn, events, request)


async def _accepted(events: AsyncIterator[Any]) -> AcceptedEvent:
    """The first event; a refusal (busy, invalid, ...) is raised before any byte is sent."""
    async for event in events:
        if isinstance(event, AcceptedEvent):
            return event
    raise LyraError("the coordinator ended the request without accepting it", code="internal")


async def _whole(gw: Gateway, turn: Turn, events: AsyncIterator[Any], request: Request) -> Response:
    async def collect() -> str:
        parts = []
        async for event in events:
            if event is not KEEPALIVE and (text := turn.see(event)) is not None:
                parts.append(text)
        return turn.done.answer if turn.done is not None else "".join(parts)

    try:
        answer = await unless_client_leaves(collect(), request, events)
    except ClientLeft:
        gw.count("chat", "disconnected", turn.specialist)
        return Response(status_code=499)
    gw.metrics.e2e.labels("chat", turn.specialist).observe(time.perf_counter() - turn.started)
    gw.record_turn(time.perf_counter() - turn.started)
    gw.count("chat", "ok", turn.specialist)
    return JSONResponse(turn.completion(answer))


async def _sse(gw: Gateway, turn: Turn, first: AcceptedEvent, events: AsyncIterator[Any],
               include_usage: bool) -> AsyncIterator[bytes]:
    """The SSE body: role chunk once routed, a chunk per piece, the finish chunk, usage, [DONE]."""
    prefix: bytes | None = None
    outcome = "disconnected"
    try:
        async for event in events:
            if event is KEEPALIVE:
                yield KEEPALIVE_COMMENT
                continue
            text = turn.see(event)
            if isinstance(event, RouteEvent):
                yield turn.chunk({"role": "assistant", "content": ""})
                prefix = turn.content_prefix()
            elif text is not None and prefix is not None:
                yield prefix + json.dumps(text).encode() + b'},"logprobs":null,"finish_reason":null}]}\n\n'
            elif isinstance(event, StageRestartedEvent) and event.stage == "voice" and prefix is not None:
                # Sent text cannot be taken back: the answer starts over after this marker, which a client
                # that knows Lyra uses to drop what it showed (the official clients ignore the extra field).
                turn.pieces = 0
                yield turn.chunk({}, None, lyra={"stage_restarted": {"stage": event.stage, "reason": event.reason}})
        yield turn.chunk({}, turn.finish_reason(), lyra=turn.lyra())
        if include_usage:
            body = {"id": turn.id, "object": "chat.completion.chunk", "created": turn.created, "model": turn.model,
                    "choices": [], "usage": turn.usage()}
            yield b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"
        outcome = "ok"
        gw.metrics.e2e.labels("chat", turn.specialist).observe(time.perf_counter() - turn.started)
        gw.record_turn(time.perf_counter() - turn.started)
    except LyraError as exc:  # after the first byte the status is sent: the error travels as an SSE event
        error = from_lyra(exc)
        outcome = exc.code
        yield b"data: " + json.dumps(error.body()).encode() + b"\n\n"
    except GatewayError as exc:
        outcome = exc.code or "error"
        yield b"data: " + json.dumps(exc.body()).encode() + b"\n\n"
    finally:
        await events.aclose()
        gw.count("chat", outcome, turn.specialist)
