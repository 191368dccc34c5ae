"""A test double of a REMOTE OpenAI-compatible server (Starlette on uvicorn, on a thread of the test process).

It exists for the failures a real server will not produce on demand; the model a request names picks
its behaviour:

    echo        streams the last user message back word by word (logprobs when asked: "phil" wins)
    ratelimit   429 with Retry-After: 0 for the first `failures` requests, then echo
    overloaded  503 for the first `failures` requests, then echo
    cut         two chunks, then the connection is dropped mid-body
    silent      one chunk, then nothing for a minute
    broken      500

Every request needs `Authorization: Bearer <key>`; anything else is a 401, as vLLM does with --api-key.
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

MODELS = ("echo", "ratelimit", "overloaded", "cut", "silent", "broken")


class Dropped(Exception):
    """Raised inside a streaming body: uvicorn then closes the connection without ending the chunked body."""


def _chunk(content: str | None, finish: str | None = None) -> str:
    delta = {"content": content} if content is not None else {}
    body = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return f"data: {json.dumps(body)}\n\n"


class RemoteDouble:
    """The app, its counters, and the server thread."""

    def __init__(self, key: str, failures: int = 2) -> None:
        self.key = key
        self.failures = failures
        self.seen: dict[str, int] = {}
        self.bodies: list[dict[str, Any]] = []
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
        if request.headers.get("authorization") != f"Bearer {self.key}":
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
            return JSONResponse({"error": {"message": "slow down"}}, status_code=429, headers={"Retry-After": "0"})
        if model == "overloaded" and self.seen[model] <= self.failures:
            return JSONResponse({"error": {"message": "overloaded"}}, status_code=503)
        if model == "broken":
            return JSONResponse({"error": {"message": "CUDA error: device-side assert"}}, status_code=500)
        words = next((m["content"] for m in reversed(body["messages"]) if m["role"] == "user"), "").split()
        if not body.get("stream"):
            return JSONResponse(self._completion(body, words))
        return StreamingResponse(self._stream(model, words), media_type="text/event-stream")

    @staticmethod
    def _completion(body: dict[str, Any], words: list[str]) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": " ".join(words)}}
        if body.get("logprobs"):
            top = [{"token": "phil", "logprob": -0.1}, {"token": "pr", "logprob": -2.5}, {"token": "x", "logprob": -4}]
            choice["logprobs"] = {"content": [{"token": "phil", "logprob": -0.1, "top_logprobs": top}]}
        return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"], "choices": [choice],
                "usage": {"prompt_tokens": 7, "completion_tokens": len(words), "total_tokens": 7 + len(words)}}

    async def _stream(self, model: str, words: list[str]) -> AsyncIterator[str]:
        for i, word in enumerate(words):
            if model == "cut" and i == 2:
                raise Dropped("the server went away")
            if model == "silent" and i == 1:
                await asyncio.sleep(60)
            yield _chunk(word if i == 0 else " " + word)
        yield _chunk(None, "stop")
        usage = {"prompt_tokens": 7, "completion_tokens": len(words), "total_tokens": 7 + len(words)}
        yield f"data: {json.dumps({'id': 'x', 'object': 'chat.completion.chunk', 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
