"""The OpenAI wire as the remote backend reads it: typed errors for every way a server can fail, the SSE lines
of a streamed chat completion, and the back-off between retries. No sockets here (the backend sends)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import httpx

from shared.config.schema import RemoteSettings
from shared.models.base import BackendError
from shared.wire.messages import ErrorCode

RETRIED_STATUSES = (429, 502, 503, 504)


class RemoteError(BackendError):
    """The OpenAI-compatible server failed the call; the message names the URL and what to do."""


class RemoteUnreachable(RemoteError):
    """No connection to the server (refused, DNS, TLS, connect timeout)."""

    code = ErrorCode.worker_missing


class RemoteKeyRefused(RemoteError):
    """The server answered 401 or 403 to our key."""


class RemoteModelMissing(RemoteError):
    """The server does not serve the configured model (404, or absent from GET /v1/models)."""


class RemoteBusy(RemoteError):
    """The server kept answering 429 after every retry."""

    code = ErrorCode.busy


class RemoteServerError(RemoteError):
    """A 5xx (after retries for 502/503/504), or another status we cannot use."""


class RemoteTimeout(RemoteError):
    """The server went silent for longer than `read_timeout_s`."""

    code = ErrorCode.deadline


class RemoteStreamCut(RemoteError):
    """The stream ended (connection closed or reset) before the server finished the reply."""


# ---------------------------------------------------------------- errors


def _detail(response: httpx.Response) -> str:
    """The server's own sentence from an error body (OpenAI's shape, FastAPI's, or plain text), kept short."""
    try:
        body = response.json()
    except ValueError:
        text = response.text.strip()
    else:
        text = str(body)
        if isinstance(body, dict):
            error = body.get("error")
            text = str(error.get("message", error)) if isinstance(error, dict) else str(error or body.get("detail")
                                                                                            or body)
    return text if len(text) <= 200 else text[:200] + "..."


def status_error(settings: RemoteSettings, response: httpx.Response, what: str) -> RemoteError:
    """The typed error for an HTTP error status of the server."""
    url, status, detail = settings.base_url, response.status_code, _detail(response)
    if status in (401, 403):
        key = f"the key in ${settings.api_key_env}" if settings.api_key_env else "no key (remote.api_key_env is unset)"
        return RemoteKeyRefused(f"{url} refused {what} with {status}: we sent {key}; check remote.api_key_env and "
                                f"the server's key ({detail})")
    if status == 404:
        return RemoteModelMissing(f"{url} answered 404 to {what} for model {settings.model!r}: check "
                                  f"remote.base_url (ends in /v1?) and remote.model ({detail})")
    if status == 429:
        return RemoteBusy(f"{url} is rate limiting (429) {what} after {settings.retries} retries; try again "
                          f"later or raise the server's limits ({detail})")
    if status >= 500:
        return RemoteServerError(f"{url} failed {what} with {status} ({detail})")
    return RemoteServerError(f"{url} refused {what} with {status} ({detail})")


def transport_error(settings: RemoteSettings, exc: httpx.HTTPError, what: str, started: bool) -> RemoteError:
    """The typed error for a failure below HTTP: no connection, silence, or a connection lost mid-reply."""
    url = settings.base_url
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
        return RemoteUnreachable(f"the OpenAI-compatible server at {url} is unreachable ({type(exc).__name__}: "
                                 f"{exc or 'no detail'}); is it running, and is remote.base_url right?")
    if isinstance(exc, httpx.TimeoutException):
        return RemoteTimeout(f"{url} sent nothing for {settings.read_timeout_s:g} s during {what} "
                             "(remote.read_timeout_s)")
    if started or isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError)):
        return RemoteStreamCut(f"the stream from {url} was cut during {what}: {type(exc).__name__}: "
                               f"{exc or 'connection closed'}")
    return RemoteServerError(f"{url}: {what} failed: {type(exc).__name__}: {exc}")


# ---------------------------------------------------------------- one streamed reply


@dataclass
class ReplyState:
    """What the stream told us besides the text: how it ended and the server's token counts."""

    finish_reason: str | None = None
    done: bool = False  # `data: [DONE]` seen
    prompt_tokens: int | None = None
    completion_tokens: int = 0


def parse_sse_line(line: str, state: ReplyState, url: str) -> str | None:
    """The text piece carried by one SSE line (None when it carries none); updates `state`."""
    if not line.startswith("data:"):
        return None  # comments (": keep-alive"), event names, blank separators
    payload = line[len("data:"):].strip()
    if payload == "[DONE]":
        state.done = True
        return None
    try:
        chunk = json.loads(payload)
    except ValueError:
        raise RemoteStreamCut(f"{url} sent a stream chunk that is not JSON ({payload[:80]!r})") from None
    if not isinstance(chunk, dict):
        raise RemoteStreamCut(f"{url} sent a stream chunk that is not a JSON object")
    if chunk.get("error"):
        error = chunk["error"]
        said = error.get("message", error) if isinstance(error, dict) else error
        raise RemoteServerError(f"{url} failed mid-stream: {str(said)[:200]}")
    usage = chunk.get("usage") or {}
    if usage:
        state.prompt_tokens = usage.get("prompt_tokens")
        state.completion_tokens = usage.get("completion_tokens") or state.completion_tokens
    choice = (chunk.get("choices") or [{}])[0]
    state.finish_reason = choice.get("finish_reason") or state.finish_reason
    return (choice.get("delta") or {}).get("content") or None


def backoff_s(settings: RemoteSettings, attempt: int, retry_after: str | None) -> float:
    """Seconds before retry `attempt + 1`: the server's Retry-After (seconds) when sent, else doubling."""
    try:
        wanted = float(retry_after) if retry_after else settings.backoff_s * 2 ** attempt
    except ValueError:  # an HTTP date: not worth parsing for a bounded pause
        wanted = settings.backoff_s * 2 ** attempt
    return max(0.0, min(wanted, settings.max_backoff_s))
