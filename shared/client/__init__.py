"""The Python client of a running Lyra Runtime stack: `Client` (blocking) and `AsyncClient` (asyncio).

    from shared.client import Client
    with Client() as lyra:                      # finds the stack `lyra up` started
        result = lyra.chat("What is 17 * 23?")
        print(result.answer, result.specialist, result.timings)
        for event in lyra.stream("Tell me a story"):
            ...

Errors from the coordinator are raised as `LyraError` subclasses carrying its code and sentence. While a
chat request is outstanding the coordinator sends something at least every `keepalive_s`; a client that
hears a different coordinator instance, or nothing for a few intervals (then a status probe goes
unanswered), raises `CoordinatorRestartedError` within about 5 s instead of waiting for its timeout.

Both clients drive the same sans-I/O `RequestSession` (session.py), which decides how a request ends;
`Client` (sync.py) over a blocking socket, `AsyncClient` (aio.py) over one asyncio socket shared by every
outstanding request. errors.py holds the typed errors, discovery.py finds the stack and its credentials.
"""

from shared.client.aio import IDLE, AsyncClient
from shared.client.discovery import find_stack
from shared.client.errors import (
    ERRORS,
    BadImageError,
    BusyError,
    CancelledError,
    ClientTimeoutError,
    CoordinatorRestartedError,
    DeadlineError,
    InvalidRequestError,
    LyraError,
    OverBudgetError,
    StackNotFoundError,
    UnauthorizedError,
    WorkerDeadError,
    error_from_event,
)
from shared.client.request import build_request, pil_image
from shared.client.session import DEFAULT_TIMEOUT_S, RequestSession
from shared.client.sync import Client
from shared.rundir import stack_record

__all__ = [
    "DEFAULT_TIMEOUT_S", "ERRORS", "IDLE", "AsyncClient", "BadImageError", "BusyError", "CancelledError", "Client",
    "ClientTimeoutError", "CoordinatorRestartedError", "DeadlineError", "InvalidRequestError", "LyraError",
    "OverBudgetError", "RequestSession", "StackNotFoundError", "UnauthorizedError", "WorkerDeadError",
    "build_request", "error_from_event", "find_stack", "pil_image", "stack_record",
]
