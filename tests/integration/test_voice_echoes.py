"""What a user reads from the voice: no restated instructions, however the voice model words its reply."""

from __future__ import annotations

from shared.client import Client
from shared.wire.messages import DoneEvent, TokenEvent

ECHO = "Answer the user's last message yourself, using the notes."


def test_a_voice_that_restates_its_instructions_is_not_heard_saying_them(shared_stack) -> None:
    stack = shared_stack()
    # The fake voice says back the user's words: here, its own handoff instruction between two sentences.
    with Client(stack.endpoint, timeout_s=30) as client:
        events = list(client.stream(f"how do I do math with code. {ECHO} Then check the result."))
    streamed = "".join(e.text for e in events if isinstance(e, TokenEvent) and e.stage == "voice")
    done = next(e for e in events if isinstance(e, DoneEvent))
    assert "using the notes" not in streamed and "using the notes" not in done.answer
    assert "how do I do math with code." in done.answer and "Then check the result." in done.answer
    assert streamed == done.answer
