"""A client that speaks the documented wire with pyzmq and msgpack alone (no shared.client, no shared.wire)
notices a coordinator SIGKILL, with or without a restart, within the bound docs/client-protocol.md gives."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

import msgpack
import pytest
import zmq

from tests.stackproc import slow_router

KEEPALIVE_S = 1.0  # runtime.heartbeat_interval_s: the keepalive the accepted event announces


@dataclass
class RawClient:
    """docs/client-protocol.md, "Noticing a coordinator restart", followed to the letter."""

    endpoint: str
    ctx: zmq.Context = field(default_factory=zmq.Context)
    sock: zmq.Socket = field(init=False)
    events: list[dict] = field(default_factory=list)  # every message heard for the request or its probe
    request: str = ""  # the chat request's id
    instance: str | None = None  # the coordinator that accepted it
    keepalive_s: float | None = None
    heard: float = 0.0  # when a message for the request (or the probe) last arrived
    probe: str | None = None  # the outstanding status probe's id
    probe_sent: float = 0.0

    def __post_init__(self) -> None:
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RECONNECT_IVL, 100)
        self.sock.connect(self.endpoint)

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()

    def send(self, kind: str, **fields: object) -> str:
        msg = {"type": kind, "id": uuid.uuid4().hex, "v": "1.4", **fields}
        self.sock.send(msgpack.packb(msg, use_bin_type=True))
        return msg["id"]

    def chat(self, text: str, until: str, timeout_s: float = 30.0) -> str:
        """Send a chat request and read its events until one of type `until` arrives; the request's id."""
        self.request, self.heard = self.send("chat_request", text=text), time.monotonic()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.sock.poll(50):
                msg = self._hear(msgpack.unpackb(self.sock.recv(), raw=False))
                if msg is not None and msg["type"] == until:
                    return self.request
        raise AssertionError(f"no {until} within {timeout_s} s: {self.events}")

    def _hear(self, msg: dict) -> dict | None:
        if msg.get("parent_id") not in (self.request, self.probe):
            return None
        self.events.append(msg)
        if self.instance and msg.get("coordinator") not in (None, self.instance):
            raise Restarted(f"instance {self.instance} -> {msg['coordinator']}")  # rule 1 (and 3)
        self.heard, self.probe = time.monotonic(), None
        if msg["type"] == "accepted_event":
            self.instance, self.keepalive_s = msg["coordinator"], msg["keepalive_s"]
        return msg

    def wait_for_end(self, timeout_s: float = 60.0) -> dict:
        """The request's terminal event; raises Restarted or Gone as the rules say."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.sock.poll(50):
                msg = self._hear(msgpack.unpackb(self.sock.recv(), raw=False))
                if msg is not None and msg["type"] in ("done_event", "error_event"):
                    return msg
                continue
            now = time.monotonic()
            if self.probe is None and now - self.heard > 3 * self.keepalive_s:  # rule 2
                self.probe, self.probe_sent = self.send("status_request"), now
            elif self.probe is not None and now - self.probe_sent > 1.5 * self.keepalive_s:  # rule 4
                raise Gone(f"no answer to a status probe for {now - self.probe_sent:.1f} s")
        raise AssertionError("the request neither ended nor was found lost")


class Restarted(Exception):
    """Another coordinator instance answered: the request is lost."""


class Gone(Exception):
    """The coordinator did not answer a probe: the request is lost."""


@pytest.mark.parametrize("restart", [True, False], ids=["restarted", "gone"])
def test_a_raw_client_following_the_doc_notices_a_coordinator_sigkill(make_stack, restart: bool) -> None:
    stack = make_stack(runtime__heartbeat_interval_s=KEEPALIVE_S, runtime__heartbeat_timeout_s=3.0,
                       **slow_router(20.0))
    client = RawClient(stack.endpoint)
    try:
        client.chat("math code", until="stage_started_event")  # running: the router holds it for 20 s
        assert client.keepalive_s == KEEPALIVE_S and client.instance
        killed = time.monotonic()
        stack.kill("coordinator")
        if restart:
            stack.start("coordinator")  # as supervisord would, about half a second later
        with pytest.raises(Restarted if restart else Gone):
            client.wait_for_end()
        assert time.monotonic() - killed < 4.5 * KEEPALIVE_S + 0.5  # the bound the page states
    finally:
        client.close()


def test_a_raw_client_reads_a_whole_answer_and_keepalives_keep_a_slow_request_alive(make_stack) -> None:
    stack = make_stack(runtime__heartbeat_interval_s=0.2, **slow_router(1.5))  # 7 keepalive intervals of routing
    client = RawClient(stack.endpoint)
    try:
        client.chat("math code", until="accepted_event")
        end = client.wait_for_end()
        assert end["type"] == "done_event" and end["answer"].startswith("[voice]"), end
        kinds = [e["type"] for e in client.events]
        assert "progress_event" in kinds and kinds.count("done_event") == 1
        assert {e["coordinator"] for e in client.events} == {client.instance}
    finally:
        client.close()
