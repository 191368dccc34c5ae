"""Voice: rewrite the specialist's output as Lyra's first-person answer, streaming tokens."""

from __future__ import annotations

import threading
from collections.abc import Iterator

from shared.backends.base import LoadContext, LoadedModel, load_model
from shared.messages import ChatTurn, MemoryReading, Message, SynthesizeReply, SynthesizeRequest, TokenEvent
from shared.service import Handler, Worker

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


class VoiceWorker(Worker):
    """Holds the always-resident voice model and answers SynthesizeRequests."""

    service = "voice"

    def __init__(self, context: LoadContext) -> None:
        self.context = context
        self.entry = context.config.voice
        self.backend = self.entry.backend
        self.model: LoadedModel | None = None

    def startup(self) -> None:
        self.model = load_model(self.entry, self.context)

    def handlers(self) -> dict[type[Message], Handler]:
        return {SynthesizeRequest: self.synthesize}

    def capabilities(self) -> list[str]:
        return [self.entry.name]

    def resident(self) -> list[str]:
        return [self.entry.name] if self.model else []

    def memory(self) -> list[MemoryReading]:
        return self.model.memory() if self.model else []

    def placement(self) -> dict[str, str]:
        return self.model.placement() if self.model else {}

    def synthesize(self, msg: SynthesizeRequest, cancel: threading.Event) -> Iterator[Message]:
        """Stream the answer token by token, then the whole text."""
        assert self.model is not None
        pieces = []
        for piece in self.model.generate(compose_voice_prompt(self.entry.system_prompt, msg), msg.options, cancel):
            pieces.append(piece)
            yield TokenEvent(parent_id=msg.id, text=piece, stage="voice")
        yield SynthesizeReply(parent_id=msg.id, text="".join(pieces))
