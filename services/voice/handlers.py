"""Voice: rewrite the specialist's output as Lyra's first-person answer, streaming tokens."""

from __future__ import annotations

import threading
from collections.abc import Iterator

from shared.backends.base import LoadContext, truncation
from shared.messages import ChatTurn, Message, SynthesizeReply, SynthesizeRequest, TokenEvent, TokenUsage
from shared.service import Handler, ResidentModelWorker

HANDOFF = (
    "{persona}\n\nYour {specialist} specialist prepared these notes for your answer:\n{output}\n\n"
    "Answer the user's last message yourself, in first person, using the notes."
)


def compose_voice_prompt(system_prompt: str, msg: SynthesizeRequest) -> list[ChatTurn]:
    """Persona and the specialist's notes as the system turn, then the conversation as it was.

    The notes go into the system turn rather than the user's: small models then answer the user's
    question instead of replying to the notes.
    """
    notes = msg.specialist_output.strip() or "(none)"
    system = HANDOFF.format(persona=system_prompt, specialist=msg.specialist, output=notes).strip()
    return [ChatTurn(role="system", content=system), *(t for t in msg.messages if t.role != "system")]


class VoiceWorker(ResidentModelWorker):
    """Holds the always-resident voice model and answers SynthesizeRequests."""

    service = "voice"

    def __init__(self, context: LoadContext) -> None:
        super().__init__(context, context.config.voice)

    def handlers(self) -> dict[type[Message], Handler]:
        return {SynthesizeRequest: self.synthesize}

    def synthesize(self, msg: SynthesizeRequest, cancel: threading.Event) -> Iterator[Message]:
        """Stream the answer token by token, then the whole text."""
        assert self.model is not None
        pieces = []
        for piece in self.model.generate(compose_voice_prompt(self.entry.system_prompt, msg), msg.options, cancel):
            pieces.append(piece)
            yield TokenEvent(parent_id=msg.id, text=piece, stage="voice")
        counted = self.model.last_usage()
        usage = TokenUsage(prompt_tokens=counted[0], completion_tokens=counted[1], finish_reason=counted[2]) \
            if counted else None
        yield SynthesizeReply(parent_id=msg.id, text="".join(pieces), usage=usage,
                              truncated=truncation(self.model, "voice"))
