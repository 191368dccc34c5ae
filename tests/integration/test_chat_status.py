"""`lyra chat` as a user runs it: a live status on a terminal, plain text in a pipe."""

from __future__ import annotations

import os
import pty
import subprocess
import sys

from tests.integration.test_supervisord import lyra
from tests.stackproc import ROOT


def test_piped_chat_output_has_no_carriage_return_or_escape_code(shared_stack) -> None:
    stack = shared_stack()
    chat = lyra("chat", "how do I do math with code", "--endpoint", stack.endpoint, timeout=60)
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.strip()
    for stream in (chat.stdout, chat.stderr):
        assert "\r" not in stream and "\x1b" not in stream


def test_chat_on_a_terminal_shows_the_steps_then_clears_them_for_the_answer(shared_stack) -> None:
    stack = shared_stack()
    leader, follower = pty.openpty()  # stderr is a terminal, stdout a pipe (as `lyra chat ... > answer.txt`)
    try:
        chat = subprocess.run([sys.executable, "-m", "shared.cli", "chat", "how do I do math with code",
                               "--endpoint", stack.endpoint], stdout=subprocess.PIPE, stderr=follower, text=True,
                              timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        os.close(follower)
        follower = -1
        terminal = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal's other end is closed: everything was read
                break
            if not chunk:
                break
            terminal += chunk
    finally:
        if follower >= 0:
            os.close(follower)
        os.close(leader)
    assert chat.returncode == 0
    shown = terminal.decode(errors="replace")
    assert "routing" in shown and "pragmatist (" in shown and "answering" in shown, shown
    assert shown.endswith("\r\x1b[K"), shown  # cleared: nothing of the status is left on the line
    assert "\r" not in chat.stdout and "\x1b" not in chat.stdout and chat.stdout.strip()
