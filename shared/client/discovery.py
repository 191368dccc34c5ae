"""Finding a running stack and what reaching it takes: its endpoint, its secret, this client's Curve keys;
and, while a client waits, whether anyone still serves that endpoint (or refused the client's handshake).

Where stacks are recorded and how a stale record is told from a live one is `stack_record`'s business.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from shared.client.errors import LyraError, StackNotFoundError, UnauthorizedError
from shared.rundir import stack_record
from shared.wire import keys, transport
from shared.wire.messages import ErrorCode


def find_stack(run_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The live stack's record (endpoint, config, run dir): $LYRA_ENDPOINT, else see `stack_record.live_record`.

    A record whose stack is gone is removed and reported at once (StackNotFoundError), never waited on.
    """
    if os.environ.get("LYRA_ENDPOINT") and run_dir is None:
        return {"client_endpoint": os.environ["LYRA_ENDPOINT"]}
    try:
        return stack_record.live_record(Path(run_dir) if run_dir is not None else None)
    except stack_record.NoStack as exc:
        raise StackNotFoundError(str(exc), code="not_running") from None


def stack_secret(endpoint: str) -> str | None:
    """The secret a tcp endpoint requires: $LYRA_SECRET, else the file `lyra up` recorded."""
    if not endpoint.startswith("tcp://"):
        return None  # ipc endpoints sit in a private directory; the secret never leaves this machine's files
    if os.environ.get("LYRA_SECRET"):
        return os.environ["LYRA_SECRET"]
    try:
        return Path(find_stack()["secret_file"]).read_text().strip()
    except (LyraError, KeyError, OSError):
        return None


def curve_keys(endpoint: str) -> transport.CurveKeys | None:
    """This client's Curve identity for a tcp endpoint, when key files are found: in $LYRA_KEYS_DIR, else in the
    keys_dir of the config in $LYRA_CONFIG or of the stack `lyra up` recorded (when that config puts Curve on
    the endpoint), else in the default keys_dir. The pair is `$LYRA_CLIENT_KEY` (default "client") and the
    coordinator's public key beside it."""
    directory = _keys_dir_for(endpoint) if endpoint.startswith("tcp://") else None
    name = os.environ.get("LYRA_CLIENT_KEY", keys.DEFAULT_CLIENT)
    if directory is None or not (directory / f"{name}.key_secret").exists():
        return None  # no keys: a Curve coordinator refuses us, and `raise_if_refused` says so at once
    try:
        return keys.identity(directory, name)
    except keys.KeyFileError as exc:
        raise UnauthorizedError(f"cannot use this client's Curve keys: {exc}", code="unauthorized") from None


def _keys_dir_for(endpoint: str) -> Path | None:
    from shared.config.paths import default_keys_dir
    from shared.config.schema import ConfigError, load_config

    if os.environ.get("LYRA_KEYS_DIR"):
        return Path(os.environ["LYRA_KEYS_DIR"])
    try:
        source = os.environ.get("LYRA_CONFIG") or find_stack().get("config")
        config = load_config(source) if source else None
    except (LyraError, ConfigError):
        config = None
    if config is None:
        return default_keys_dir()
    return config.keys_dir() if config.curve_on(endpoint) else None


def raise_if_refused(sock: transport.Endpoint, endpoint: str) -> None:
    """UnauthorizedError when the coordinator refused our Curve handshake (a key it does not list, or none)."""
    refused = transport.handshake_failures(sock)
    if refused:
        raise UnauthorizedError(f"the coordinator at {endpoint} refused this client's connection: "
                                f"{refused[-1]}; a Curve stack admits the client keys in its keys_dir's "
                                "authorized/clients/ (`lyra keys`; $LYRA_KEYS_DIR points a client at its keys)",
                                code=ErrorCode.unauthorized.value)


def check_served(sock: transport.Endpoint, endpoint: str) -> None:
    """Raise when waiting is pointless: the handshake was refused (UnauthorizedError), or nothing serves the
    endpoint and no live stack will (StackNotFoundError: a stale record). A restarting coordinator passes."""
    raise_if_refused(sock, endpoint)
    reason = stack_record.endpoint_gone(endpoint)
    if reason is not None:
        raise StackNotFoundError(reason, code="not_running")
