"""The names of the stack's processes, spelled once: config, wire schema, supervisord programs and logs use these.

It imports nothing of Lyra's, so `shared.wire.messages` (which must not import the config) can type its fields with
the Literals below.
"""

from __future__ import annotations

import typing
from typing import Final, Literal

ServiceName = Literal["coordinator", "router", "specialist_host", "voice"]
WorkerName = Literal["router", "specialist_host", "voice"]  # the services that run models and register

COORDINATOR: Final = "coordinator"
ROUTER: Final = "router"
SPECIALIST_HOST: Final = "specialist_host"
VOICE: Final = "voice"
GATEWAY: Final = "gateway"  # the optional HTTP gateway: a supervisord program, not a service the coordinator tracks

SERVICES: tuple[ServiceName, ...] = (COORDINATOR, ROUTER, SPECIALIST_HOST, VOICE)
WORKER_SERVICES: tuple[WorkerName, ...] = (ROUTER, SPECIALIST_HOST, VOICE)
PROGRAMS: tuple[str, ...] = (*SERVICES, GATEWAY)  # supervisord's programs: what `lyra logs` and `lyra ctl` name


def _check_names() -> None:
    """The tuples and the Literals list the same names in the same order (a new service goes into both)."""
    if SERVICES != typing.get_args(ServiceName) or WORKER_SERVICES != typing.get_args(WorkerName):
        raise RuntimeError("shared/wire/names.py: SERVICES / WORKER_SERVICES differ from ServiceName / WorkerName")


_check_names()
