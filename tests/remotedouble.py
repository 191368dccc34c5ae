"""A test double of a REMOTE OpenAI-compatible server (Starlette on uvicorn, on a thread of the test process).

It exists for the failures a real server will not produce on demand; the model a request names picks
its behaviour:

    echo        streams the last user message back word by word, `max_tokens` words at most (finish_reason
                "length" when cut there), after an SSE comment; logprobs when asked: "phil" wins
    ratelimit   429 with `Retry-After: <retry_after>` for the first `failures` requests, then echo
    overloaded  503 for the first `failures` requests, then echo
    cut         two chunks, then the connection is dropped mid-body
    silent      one chunk, then nothing for a minute (a client that goes away is counted in `disconnected`)
    broken      500
    erring      one chunk, then an `error` object inside the stream, as vLLM sends when a step fails
    garbled     one chunk, then a `data:` line that is not JSON
    unfinished  every chunk, then the body ends without a finish_reason or [DONE]
    status-NNN  HTTP status NNN with an OpenAI error body

With a key, every request needs `Authorization: Bearer <key>`; anything else is a 401, as vLLM does with
--api-key. Without one, any request is served. `headers` keeps each request's headers.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

STATUSES = (400, 401, 403, 404, 422, 429, 500)
MODELS = ("echo", "ratelimit", "overloaded", "cut", "silent", "broken", "erring", "garbled", "unfinished",
          *(f"status-{status}" for status in STATUSES))


class Dropped(Exception):
    """Raised inside a streaming body: uvicorn then closes the connection without ending the chunked body."""


def _chunk(content: str | None, finish: str | None = None) -> str:
    delta = {"content": content} if content is not None else {}
    body = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return f"data: {json.dumps(body)}\n\n"


class RemoteDouble:
    """The app, its counters, and the server thread."""

    def __init__(self, key: str | None, failures: int = 2) -> None:
        self.key = key
        self.failures = failures
        self.retry_after = "0"
        self.seen: dict[str, int] = {}
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.disconnected: dict[str, int] = {}
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        app = Starlette(routes=[Route("/v1/models", self.models), Route("/v1/chat/completions", self.chat,
                                                                        methods=["POST"])])
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> RemoteDouble:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)

    def _refused(self, request: Request) -> Response | None:
        self.headers.append(dict(request.headers))
        if self.key is not None and request.headers.get("authorization") != f"Bearer {self.key}":
            return JSONResponse({"error": {"message": "Unauthorized", "type": "auth"}}, status_code=401)
        return None

    async def models(self, request: Request) -> Response:
        return self._refused(request) or JSONResponse({"object": "list", "data": [{"id": m} for m in MODELS]})

    async def chat(self, request: Request) -> Response:
        refused = self._refused(request)
        if refused:
            return refused
        body = await request.json()
        self.bodies.append(body)
        model = body["model"]
        self.seen[model] = self.seen.get(model, 0) + 1
        if model == "ratelimit" and self.seen[model] <= self.failures:
            return JSONResponse({"error": {"message": "slow down"}}, status_code=429,
                                headers={"Retry-After": self.retry_after})
        if model == "overloaded" and self.seen[model] <= self.failures:
            return JSONResponse({"error": {"message": "overloaded"}}, status_code=503)
        if model == "broken":
            return JSONResponse({"error": {"message": "CUDA error: device-side assert"}}, status_code=500)
        if model.startswith("status-"):
            return JSONResponse({"error": {"message": "the server's sentence", "type": "x"}},
                                status_code=int(model.removeprefix("status-")))
        words = next((m["content"] for m in reversed(body["messages"]) if m["role"] == "user"), "").split()
        limit = body.get("max_tokens") or len(words)
        finish = "length" if len(words) > limit else "stop"
        if not body.get("stream"):
            return JSONResponse(self._completion(body, words[:limit], finish))
        return StreamingResponse(self._stream(model, words[:limit], finish), media_type="text/event-stream")

    @staticmethod
    def _completion(body: dict[str, Any], words: list[str], finish: str) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish,
                                  "message": {"role": "assistant", "content": " ".join(words)}}
        if body.get("logprobs"):
            top = [{"token": "phil", "logprob": -0.1}, {"token": "pr", "logprob": -2.5}, {"token": "x", "logprob": -4}]
            choice["logprobs"] = {"content": [{"token": "phil", "logprob": -0.1, "top_logprobs": top}]}
        return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"], "choices": [choice],
                "usage": {"prompt_tokens": 7, "completion_tokens": len(words), "total_tokens": 7 + len(words)}}

    async def _stream(self, model: str, words: list[str], finish: str) -> AsyncIterator[str]:
        yield ": keep-alive\n\n"
        for i, word in enumerate(words):
            if model == "cut" and i == 2:
                raise Dropped("the server went away")
            if model == "silent" and i == 1:
                try:
                    await asyncio.sleep(60)
                except asyncio.CancelledError:  # the client closed the connection
                    self.disconnected[model] = self.disconnected.get(model, 0) + 1
                    raise
            if model == "erring" and i == 1:
                yield f"data: {json.dumps({'error': {'message': 'CUDA out of memory', 'code': 500}})}\n\n"
                return
            if model == "garbled" and i == 1:
                yield 'data: {"choices": [{"delta": {"content": "tw\n\n'
                return
            yield _chunk(word if i == 0 else " " + word)
        if model == "unfinished":
            return
        yield _chunk(None, finish)
        usage = {"prompt_tokens": 7, "completion_tokens": len(words), "total_tokens": 7 + len(words)}
        yield f"data: {json.dumps({'id': 'x', 'object': 'chat.completion.chunk', 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
