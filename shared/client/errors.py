"""The client's typed errors: one `LyraError` subclass per kind of failure a caller may handle differently.

The coordinator reports an error as an `ErrorEvent` with a code (errors are values on the wire);
`error_from_event` turns it into the exception of its kind. The client's own failures (its timeout, a stack
that is gone, a restarted coordinator) use the same classes, so a caller catches one family.
"""

from __future__ import annotations

from shared.wire.messages import ErrorCode, ErrorEvent


class LyraError(Exception):
    """An error reported by the stack (or the client's own timeout); `code` is an ErrorCode value."""

    code = "error"

    def __init__(self, message: str, code: str | None = None, service: str | None = None,
                 event: ErrorEvent | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.code
        self.service = service
        self.event = event


class BusyError(LyraError):
    """The queue is full; retry later."""


class DeadlineError(LyraError):
    """A stage ran past its deadline."""


class WorkerDeadError(LyraError):
    """A worker died, restarted, or never came up while the request needed it."""


class OverBudgetError(LyraError):
    """The VRAM ledger refused a load; the message carries the arithmetic."""


class InvalidRequestError(LyraError):
    """The request (or a message) was refused as malformed or unacceptable."""


class CancelledError(LyraError):
    """The request was cancelled."""


class BadImageError(LyraError):
    """The attached image was refused (unreadable, truncated, absurd dimensions, too large)."""


class StackNotFoundError(LyraError):
    """No running stack could be found."""


class ClientTimeoutError(LyraError):
    """No terminal event arrived within the client's timeout."""


class CoordinatorRestartedError(LyraError):
    """The coordinator restarted (or went silent) while the request was outstanding: it is lost; send it again."""


class UnauthorizedError(LyraError):
    """The request lacked the stack secret a tcp client endpoint requires."""


ERRORS: dict[str, type[LyraError]] = {
    ErrorCode.busy.value: BusyError,
    ErrorCode.deadline.value: DeadlineError,
    ErrorCode.worker_dead.value: WorkerDeadError,
    ErrorCode.worker_missing.value: WorkerDeadError,
    ErrorCode.over_budget.value: OverBudgetError,
    ErrorCode.invalid_request.value: InvalidRequestError,
    ErrorCode.bad_message.value: InvalidRequestError,
    ErrorCode.unknown_type.value: InvalidRequestError,
    ErrorCode.schema_version.value: InvalidRequestError,
    ErrorCode.too_large.value: InvalidRequestError,
    ErrorCode.cancelled.value: CancelledError,
    ErrorCode.image_unreadable.value: BadImageError,
    ErrorCode.image_truncated.value: BadImageError,
    ErrorCode.image_dimensions.value: BadImageError,
    ErrorCode.image_too_large.value: BadImageError,
    ErrorCode.coordinator_restarted.value: CoordinatorRestartedError,
    ErrorCode.unauthorized.value: UnauthorizedError,
}


def error_from_event(event: ErrorEvent) -> LyraError:
    """The typed exception for a coordinator error event."""
    cls = ERRORS.get(event.code.value, LyraError)
    return cls(event.message, code=event.code.value, service=event.service, event=event)
