"""How the remote backend reads a failing OpenAI-compatible server: one typed error for every way it can fail,
made from the `openai` package's exceptions, and the back-off between re-sends. No sockets here."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable

import openai

from shared.config.schema import RemoteSettings
from shared.models.base import BackendError
from shared.wire.messages import ErrorCode

RETRIED_STATUSES = (429, 502, 503, 504)
# What httpx and httpx2 (the `openai` package's transport, by version) call a connection that never opened; the
# package wraps them all in APIConnectionError or APITimeoutError, so only the cause tells "down" from "silent".
NO_CONNECTION = frozenset({"ConnectError", "ConnectTimeout", "SSLError"})


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
    """A 5xx (after retries for 502/503/504), an error sent mid-stream, or another status we cannot use."""


class RemoteTimeout(RemoteError):
    """The server went silent for longer than `read_timeout_s`."""

    code = ErrorCode.deadline


class RemoteStreamCut(RemoteError):
    """The stream ended (connection closed or reset, or garbled) before the server finished the reply."""


# ---------------------------------------------------------------- openai's exceptions -> ours


def remote_error(settings: RemoteSettings, exc: openai.OpenAIError, what: str, started: bool = False) -> RemoteError:
    """The typed error for one of the `openai` package's exceptions; `started`: text had already arrived."""
    for kind in type(exc).__mro__:  # the most specific class the table knows
        if kind in ERRORS:
            return ERRORS[kind](settings, exc, what, started)
    raise AssertionError("unreachable: OpenAIError is in the table")


def _key_refused(settings: RemoteSettings, exc: openai.APIStatusError, what: str, started: bool) -> RemoteError:
    key = f"the key in ${settings.api_key_env}" if settings.api_key_env else "no key (remote.api_key_env is unset)"
    return RemoteKeyRefused(f"{settings.base_url} refused {what} with {exc.status_code}: we sent {key}; check "
                            f"remote.api_key_env and the server's key ({_detail(exc)})")


def _model_missing(settings: RemoteSettings, exc: openai.APIStatusError, what: str, started: bool) -> RemoteError:
    return RemoteModelMissing(f"{settings.base_url} answered 404 to {what} for model {settings.model!r}: check "
                              f"remote.base_url (ends in /v1?) and remote.model ({_detail(exc)})")


def _busy(settings: RemoteSettings, exc: openai.APIStatusError, what: str, started: bool) -> RemoteError:
    return RemoteBusy(f"{settings.base_url} is rate limiting (429) {what} after {settings.retries} retries; try "
                      f"again later, or raise the server's limits or remote.retries ({_detail(exc)})")


def _server_failed(settings: RemoteSettings, exc: openai.APIStatusError, what: str, started: bool) -> RemoteError:
    return RemoteServerError(f"{settings.base_url} failed {what} with {exc.status_code} ({_detail(exc)}); the "
                             "server's log says why")


def _refused(settings: RemoteSettings, exc: openai.APIStatusError, what: str, started: bool) -> RemoteError:
    return RemoteServerError(f"{settings.base_url} refused {what} with {exc.status_code} ({_detail(exc)}); check "
                             "remote.model and the [generation] settings against what the server accepts")


def _silent(settings: RemoteSettings, exc: openai.APITimeoutError, what: str, started: bool) -> RemoteError:
    if not started and _no_connection(exc):
        return _connection_lost(settings, exc, what, started)
    return RemoteTimeout(f"{settings.base_url} sent nothing for {settings.read_timeout_s:g} s during {what} "
                         "(remote.read_timeout_s)")


def _connection_lost(settings: RemoteSettings, exc: openai.APIConnectionError, what: str,
                     started: bool) -> RemoteError:
    cause = exc.__cause__
    said = f"{type(cause).__name__}: {cause or 'no detail'}" if cause else str(exc)
    if not started and _no_connection(exc):
        return RemoteUnreachable(f"the OpenAI-compatible server at {settings.base_url} is unreachable ({said}); is "
                                 "it running, and is remote.base_url right?")
    return RemoteStreamCut(f"the stream from {settings.base_url} was cut during {what}: {said}")


def _unreadable(settings: RemoteSettings, exc: openai.APIError, what: str, started: bool) -> RemoteError:
    return RemoteServerError(f"{settings.base_url} answered {what} with a body that is not an OpenAI reply "
                             f"({exc.message}); is remote.base_url an OpenAI-compatible /v1 address?")


def _failed_mid_stream(settings: RemoteSettings, exc: openai.APIError, what: str, started: bool) -> RemoteError:
    return RemoteServerError(f"{settings.base_url} failed mid-stream during {what}: {exc.message[:200]}")


def _other(settings: RemoteSettings, exc: openai.OpenAIError, what: str, started: bool) -> RemoteError:
    return RemoteServerError(f"{settings.base_url}: {what} failed: {type(exc).__name__}: {exc}")


ERRORS: dict[type[openai.OpenAIError], Callable[..., RemoteError]] = {
    openai.AuthenticationError: _key_refused,  # 401
    openai.PermissionDeniedError: _key_refused,  # 403
    openai.NotFoundError: _model_missing,  # 404
    openai.RateLimitError: _busy,  # 429, once the retries are spent
    openai.InternalServerError: _server_failed,  # 5xx, 502/503/504 once the retries are spent
    openai.APIStatusError: _refused,  # 400 (BadRequestError), 422 and any other status
    openai.APITimeoutError: _silent,  # no byte for read_timeout_s, or no connection within connect_timeout_s
    openai.APIConnectionError: _connection_lost,  # no connection, or one lost before the reply ended
    openai.APIResponseValidationError: _unreadable,
    openai.APIError: _failed_mid_stream,  # an `error` object the server sent inside the stream
    openai.OpenAIError: _other,
}


def _no_connection(exc: openai.APIConnectionError) -> bool:
    cause = exc.__cause__
    return cause is not None and any(kind.__name__ in NO_CONNECTION for kind in type(cause).__mro__)


def _detail(exc: openai.APIStatusError) -> str:
    """The server's own sentence from an error body (OpenAI's shape, FastAPI's, or plain text), kept short."""
    body = exc.body  # the package already took the `error` object out of OpenAI's shape
    if isinstance(body, dict):
        text = str(body.get("message") or body.get("detail") or body)
    else:
        text = str(body or exc.message).strip()
    return text if len(text) <= 200 else text[:200] + "..."


# ---------------------------------------------------------------- back-off


def backoff_s(settings: RemoteSettings, attempt: int, retry_after: str | None) -> float:
    """Seconds before re-send `attempt + 1`: the server's Retry-After (seconds or an HTTP date) when sent, else
    `backoff_s` doubled per attempt; never more than `max_backoff_s`."""
    wanted = _retry_after_s(retry_after)
    if wanted is None:
        wanted = settings.backoff_s * 2 ** attempt
    return max(0.0, min(wanted, settings.max_backoff_s))


def _retry_after_s(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    when = email.utils.parsedate_tz(value)
    return None if when is None else email.utils.mktime_tz(when) - time.time()
