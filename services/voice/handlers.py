"""Voice: rewrite the specialist's output as Lyra's first-person answer, streaming tokens."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import replace

from services.voice import ranks
from services.voice.notes import unreadable
from shared.engine.echoes import EchoFilter
from shared.models.base import LoadContext, truncation
from shared.runtime.worker_loop import Handler, ResidentModelWorker
from shared.wire.messages import (
    ChatTurn,
    MemoryReading,
    Message,
    SynthesizeReply,
    SynthesizeRequest,
    TokenEvent,
    TokenUsage,
)
from shared.wire.names import VOICE

logger = logging.getLogger(__name__)

HANDOFF = (
    "{persona}\n\nYour {specialist} specialist prepared these notes for your answer:\n{output}\n\n"
    "Answer the user's last message yourself, in first person, using the notes."
)
# Unreadable output is never shown to the voice: a small voice "explains" gibberish with invented content.
# The notes say instead what is known, as a plain statement: SmolLM2-135M restates a statement in its notes
# but ignores an instruction not to guess, and echoes counts ("24 of 24 characters") oddly, so the reason
# goes to the log only.
UNREADABLE_NOTES = "The {specialist} specialist's answer could not be read. Nothing is known about what it found."


def compose_voice_prompt(system_prompt: str, msg: SynthesizeRequest) -> list[ChatTurn]:
    """Persona and the specialist's notes as the system turn, then the conversation as it was.

    The notes go into the system turn rather than the user's: small models then answer the user's
    question instead of replying to the notes. Output that is not readable text (`notes.unreadable`) is
    replaced by a sentence saying so.
    """
    notes = msg.specialist_output.strip() or "(none)"
    reason = unreadable(notes)
    if reason is not None:
        logger.info("%s: the %s specialist's output is not readable (%s); the voice is told only that",
                    msg.id, msg.specialist, reason)
        notes = UNREADABLE_NOTES.format(specialist=msg.specialist)
    system = HANDOFF.format(persona=system_prompt, specialist=msg.specialist, output=notes).strip()
    return [ChatTurn(role="system", content=system), *(t for t in msg.messages if t.role != "system")]


class VoiceWorker(ResidentModelWorker):
    """Holds the always-resident voice model and answers SynthesizeRequests."""

    service = VOICE

    def __init__(self, context: LoadContext) -> None:
        # Rank 0 of a tensor voice sees only its GPU; its context (estimates, ranks) names all of the voice's.
        context = replace(context, physical_gpus=ranks.voice_gpus(context.physical_gpus))
        super().__init__(context, context.config.voice)
        self.followers: ranks.Followers | None = None

    def startup(self) -> None:
        """Load the voice: in this process, or as tensor-parallel ranks led by this process (rank 0)."""
        if self.entry.parallel != "tensor":
            return super().startup()
        from shared.distributed.rank_runner import join
        from shared.distributed.tensor_parallel import TensorParallelError, load_voice_rank, rank_problems

        gpus = self.context.physical_gpus
        world = ranks.world_size(self.entry, gpus)
        if world < 2:
            raise TensorParallelError("; ".join(rank_problems(self.entry, world, bool(gpus))))
        self.followers = ranks.Followers(self.context.config.source, gpus, world)
        group = join(0, world, ranks.rank_device(gpus), self.followers.start())
        self.model = load_voice_rank(self.entry, gpus[0] if gpus else None, group)

    def memory(self) -> list[MemoryReading]:
        """Every rank's measured memory (each follower's as it last published it)."""
        own = super().memory()
        return ranks.merged(own + self.followers.readings()) if self.followers else own

    def placement(self) -> dict[str, str]:
        """Where the voice is; for tensor ranks, each rank's device and pid."""
        where = super().placement()
        if self.followers is None or self.model is None:
            return where
        gpus = self.context.physical_gpus
        device = [f"gpu:{gpu}" for gpu in gpus] if gpus else ["cpu"] * self.followers.world
        pids = [os.getpid(), *self.followers.pids()]
        extra = {key: where[key] for key in ("all_reduce", "weights") if key in where}
        return {"parallel": f"tensor x{self.followers.world}", "engine": where.get("engine", ""), **extra,
                **{f"rank{rank}": f"{device[rank]} pid {pid}" for rank, pid in enumerate(pids)}}

    def handlers(self) -> dict[type[Message], Handler]:
        return {SynthesizeRequest: self.synthesize}

    def synthesize(self, msg: SynthesizeRequest, cancel: threading.Event) -> Iterator[Message]:
        """Stream the answer token by token, then the whole text."""
        assert self.model is not None
        pieces = []
        echoes = EchoFilter()  # a small voice restates its instructions and tacks on pleasantries
        for made in self.model.generate(compose_voice_prompt(self.entry.system_prompt, msg), msg.options, cancel):
            piece = echoes.feed(made)
            if piece:
                pieces.append(piece)
                yield TokenEvent(parent_id=msg.id, text=piece, stage="voice")
        piece = echoes.finish()
        if piece:
            pieces.append(piece)
            yield TokenEvent(parent_id=msg.id, text=piece, stage="voice")
        if echoes.dropped:
            logger.info("%s: left out of the answer (instructions echoed, filler): %s", msg.id, echoes.dropped)
        counted = self.model.last_usage()
        usage = TokenUsage(prompt_tokens=counted[0], completion_tokens=counted[1], finish_reason=counted[2]) \
            if counted else None
        yield SynthesizeReply(parent_id=msg.id, text="".join(pieces), usage=usage,
                              truncated=truncation(self.model, "voice"))
