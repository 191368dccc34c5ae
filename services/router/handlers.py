"""Router: classify a turn into one specialist with the router model."""

from __future__ import annotations

import threading
from collections.abc import Iterator

from shared.backends.base import LoadContext, LoadedModel, load_model
from shared.messages import ClassifyReply, ClassifyRequest, MemoryReading, Message
from shared.service import Handler, Worker


class RouterWorker(Worker):
    """Holds the always-resident router model and answers ClassifyRequests."""

    service = "router"

    def __init__(self, context: LoadContext) -> None:
        self.context = context
        self.entry = context.config.router
        self.backend = self.entry.backend
        self.model: LoadedModel | None = None

    def startup(self) -> None:
        self.model = load_model(self.entry, self.context)

    def handlers(self) -> dict[type[Message], Handler]:
        return {ClassifyRequest: self.classify}

    def capabilities(self) -> list[str]:
        return [self.entry.name]

    def resident(self) -> list[str]:
        return [self.entry.name] if self.model else []

    def memory(self) -> list[MemoryReading]:
        return self.model.memory() if self.model else []

    def placement(self) -> dict[str, str]:
        return self.model.placement() if self.model else {}

    def classify(self, msg: ClassifyRequest, cancel: threading.Event) -> Iterator[Message]:
        """Score every label; the highest probability wins."""
        assert self.model is not None
        template = self.context.config.routing.prompt_template
        scores = self.model.classify(msg.messages, msg.labels, template, cancel)
        best = max(scores, key=scores.__getitem__)
        yield ClassifyReply(parent_id=msg.id, specialist=best, scores=scores)
