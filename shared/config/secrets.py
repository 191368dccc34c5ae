"""The API keys Lyra Runtime checks or sends, one owner: each read from the environment variable a setting names.

A config file holds only the variable's NAME (`gateway.api_key_env`, `remote.api_key_env`), never a key, so the
file can be shared and committed; the key lives in the environment of the process that needs it.
"""

from __future__ import annotations

import os


class MissingApiKey(Exception):
    """A setting names an environment variable that is unset or empty here; the message names both."""


def api_key_from_env(variable: str, setting: str) -> str | None:
    """The key in the environment variable `variable`, which the config's `setting` names; None when it names none.

    `setting` is the setting's dotted name for the message (e.g. "gateway.api_key_env"). An empty value counts as
    unset: a Bearer header with no key would only be refused later, further from the cause.
    """
    if not variable:
        return None
    key = os.environ.get(variable, "")
    if not key:
        raise MissingApiKey(f"{setting} names ${variable}, which is unset or empty")
    return key


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def gateway_key(host: str, variable: str, source: str) -> str | None:
    """The HTTP gateway's Bearer key, from the variable `gateway.api_key_env` names; None when it names none.

    MissingApiKey (its message starts with `source`, the config file) when the variable is unset, or when
    `host` is not loopback and no key is set: the gateway refuses to start then, and `lyra up` says so first.
    """
    try:
        key = api_key_from_env(variable, "gateway.api_key_env")
    except MissingApiKey as exc:
        raise MissingApiKey(f"{source}: {exc}; export the key in that variable before `lyra up`") from None
    if key is None and host not in LOOPBACK_HOSTS:
        raise MissingApiKey(f"{source}: gateway.host = {host!r} is not loopback and no API key is set; set "
                            "gateway.api_key_env to the name of a variable holding a key, or bind 127.0.0.1")
    return key
