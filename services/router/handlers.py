"""Router: classify a turn into one specialist with the router model."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

from shared.models.base import LoadContext
from shared.routing.decider import RouteDecider, calibrated
from shared.runtime.worker_loop import Handler, ResidentModelWorker
from shared.wire.messages import ClassifyReply, ClassifyRequest, Message
from shared.wire.names import ROUTER

__all__ = ["RouterWorker", "calibrated"]

log = logging.getLogger(__name__)


class RouterWorker(ResidentModelWorker):
    """Holds the always-resident router model and answers ClassifyRequests."""

    service = ROUTER

    def __init__(self, context: LoadContext) -> None:
        super().__init__(context, context.config.router)
        self.decider: RouteDecider | None = None

    def startup(self) -> None:
        """Load the model, then embed the examples and compute the label prior, all before registering."""
        super().startup()
        assert self.model is not None
        self.decider = RouteDecider(self.model, self.context.config)
        self.decider.prepare(threading.Event())

    def placement(self) -> dict[str, str]:
        """The model's placement, and which evidence routes (shown by `lyra status`)."""
        routing = {"routing": self.decider.describe()} if self.decider is not None else {}
        return {**super().placement(), **routing}

    def handlers(self) -> dict[type[Message], Handler]:
        return {ClassifyRequest: self.classify}

    def classify(self, msg: ClassifyRequest, cancel: threading.Event) -> Iterator[Message]:
        """Label scores (calibrated), example similarity, threshold: see `RouteDecider.decide`."""
        assert self.decider is not None
        chosen, scores, fell_back, evidence = self.decider.decide(msg.messages, msg.labels, cancel)
        log.info("request %s: routed to %s%s (best %s %.2f)", msg.parent_id, chosen,
                 " (fallback)" if fell_back else "", evidence.best, scores[evidence.best])
        yield ClassifyReply(parent_id=msg.id, specialist=chosen, scores=scores, fallback=fell_back, evidence=evidence)
