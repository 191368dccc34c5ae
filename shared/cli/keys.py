"""`lyra keys`: write the CurveZMQ key files and say which file goes to which host."""

from __future__ import annotations

import sys
from pathlib import Path

from shared.config.paths import default_keys_dir
from shared.config.schema import load_config
from shared.wire.keys import DEFAULT_CLIENT, KeyFileError, make_keys
from shared.wire.names import WORKER_SERVICES


def keys_command(config_path: str | None, directory: str | None, clients: tuple[str, ...], force: bool) -> int:
    """`lyra keys`: write the key files and say which file goes to which host."""
    target = Path(directory) if directory else load_config(config_path).keys_dir() if config_path else \
        default_keys_dir()
    try:
        make_keys(target, clients or (DEFAULT_CLIENT,), force)
    except KeyFileError as exc:
        print(f"lyra: {exc}", file=sys.stderr)
        return 2
    print(f"wrote Curve keys to {target} (directory 0700, every file 0600):")
    print("  coordinator host: the whole directory (it reads coordinator.key_secret and authorized/)")
    for name in (*WORKER_SERVICES, *(clients or (DEFAULT_CLIENT,))):
        print(f"  {name} host: {name}.key_secret and coordinator.key, into its own keys_dir")
    print("then set runtime.curve = true in the config every host reads")
    return 0
