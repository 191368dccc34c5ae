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
