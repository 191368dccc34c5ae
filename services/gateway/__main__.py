"""`python -m services.gateway -c CONFIG`: the OpenAI-compatible HTTP gateway of a Lyra stack."""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys

import uvicorn

from services.gateway.app import build_app
from services.gateway.state import Gateway, GatewayConfigError
from shared.config.schema import ConfigError, load_config
from shared.runtime.parent_watch import end_with_parent
from shared.runtime.process import EXIT_GRACE_S
from shared.wire.names import GATEWAY

log = logging.getLogger("services.gateway")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0 = a free one), made here so the real port is known before serving."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run(config_path: str) -> int:
    """Serve until SIGTERM/SIGINT; in-flight requests get runtime.drain_s to finish."""
    try:
        config = load_config(config_path)
        end_with_parent(GATEWAY, config.runtime.drain_s + EXIT_GRACE_S)  # never outlives its supervisord
        os.environ["LYRA_CONFIG"] = config.source  # its coordinator clients find this config's Curve keys
        gw = Gateway(config)
        sock = bind(config.gateway.host, config.gateway.port)
    except (ConfigError, GatewayConfigError, OSError) as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    record = config.run_dir() / "gateway.json"  # `lyra up` and tests read the real address here
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"url": url, "pid": os.getpid()}))
    log.info("serving the OpenAI-compatible API on %s/v1 (coordinator %s, key %s)", url,
             config.client_endpoint(), "required" if gw.key else "not required")
    server = uvicorn.Server(uvicorn.Config(
        build_app(gw), log_level="warning", access_log=False, timeout_graceful_shutdown=int(config.runtime.drain_s),
        timeout_keep_alive=30, loop="auto", http="auto", lifespan="off"))
    try:
        server.run(sockets=[sock])  # picks uvloop and httptools when installed
    finally:
        gw.upstream.close()
        record.unlink(missing_ok=True)
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m services.gateway", description=__doc__)
    parser.add_argument("-c", "--config", default=os.environ.get("LYRA_CONFIG"),
                        help="the stack's TOML config (default: $LYRA_CONFIG)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.config:
        parser.error("no config: pass -c CONFIG or set LYRA_CONFIG")
    sys.exit(run(args.config))


if __name__ == "__main__":
    main()
