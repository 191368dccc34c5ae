"""Errors as OpenAI shapes them: an HTTP status and `{"error": {"message", "type", "param", "code"}}`.

Inside the gateway a refusal is a `GatewayError`; the stack's own `LyraError`s are translated here, in
one table, so every route answers the same failure with the same status.
"""

from __future__ import annotations

import math
from typing import Any

from shared.client import LyraError

# The stack's error code -> (HTTP status, OpenAI error type). Anything missing is a 500.
STATUS_OF_CODE: dict[str, tuple[int, str]] = {
    "invalid_request": (400, "invalid_request_error"),
    "bad_message": (400, "invalid_request_error"),
    "unknown_type": (400, "invalid_request_error"),
    "schema_version": (400, "invalid_request_error"),
    "too_large": (413, "invalid_request_error"),
    "image_unreadable": (400, "invalid_request_error"),
    "image_truncated": (400, "invalid_request_error"),
    "image_dimensions": (400, "invalid_request_error"),
    "image_too_large": (400, "invalid_request_error"),
    "busy": (429, "rate_limit_error"),
    "deadline": (504, "timeout_error"),
    "client_timeout": (504, "timeout_error"),
    "worker_dead": (503, "service_unavailable_error"),
    "coordinator_restarted": (503, "service_unavailable_error"),
    "unauthorized": (500, "server_error"),  # the gateway's own stack secret was refused: an operator's matter
    "worker_missing": (503, "service_unavailable_error"),
    "shutting_down": (503, "service_unavailable_error"),
    "not_running": (503, "service_unavailable_error"),
    "over_budget": (503, "service_unavailable_error"),
    "cancelled": (503, "service_unavailable_error"),  # cancelled by someone else: the caller is still here
    "worker_error": (500, "server_error"),
    "internal": (500, "server_error"),
}


class GatewayError(Exception):
    """A request the gateway answers with an OpenAI-shaped error; `message` says what to change."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        """The JSON body OpenAI's clients parse."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        """`Retry-After` (whole seconds, at least 1) on refusals that a later retry can pass."""
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}


def invalid(message: str, param: str | None = None, code: str = "invalid_request") -> GatewayError:
    """A 400 naming the offending field."""
    return GatewayError(400, message, param=param, code=code)


def from_lyra(exc: LyraError, retry_after_s: float = 1.0) -> GatewayError:
    """The gateway error for an error the stack (or the client library) raised."""
    status, kind = STATUS_OF_CODE.get(exc.code, (500, "server_error"))
    return GatewayError(status, exc.message, type=kind, code=exc.code,
                        retry_after_s=retry_after_s if status in (429, 503) else None)
