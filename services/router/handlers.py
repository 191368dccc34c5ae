"""Router: classify a turn into one specialist with the router model."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator

from shared.backends.base import LoadContext
from shared.messages import ChatTurn, ClassifyReply, ClassifyRequest, Message, RouteLabel
from shared.service import Handler, ResidentModelWorker


class RouterWorker(ResidentModelWorker):
    """Holds the always-resident router model and answers ClassifyRequests."""

    service = "router"

    def __init__(self, context: LoadContext) -> None:
        super().__init__(context, context.config.router)
        self.priors: dict[tuple[tuple[str, str], ...], dict[str, float]] = {}

    def handlers(self) -> dict[type[Message], Handler]:
        return {ClassifyRequest: self.classify}

    def classify(self, msg: ClassifyRequest, cancel: threading.Event) -> Iterator[Message]:
        """Score every label (calibrated against content-free input when configured); the highest wins."""
        assert self.model is not None
        template = self.context.config.routing.prompt_template
        scores = self.model.classify(msg.messages, msg.labels, template, cancel)
        if self.context.config.routing.calibrate:
            scores = calibrated(scores, self._prior(msg.labels, template, cancel))
        best = max(scores, key=scores.__getitem__)
        yield ClassifyReply(parent_id=msg.id, specialist=best, scores=scores)

    def _prior(self, labels: list[RouteLabel], template: str, cancel: threading.Event) -> dict[str, float]:
        """Mean log-probability of each label for content-free messages, cached per label set."""
        key = tuple((label.name, label.description) for label in labels)
        if key not in self.priors:
            assert self.model is not None
            runs = [self.model.classify([ChatTurn(role="user", content=text)], labels, template, cancel)
                    for text in CONTENT_FREE]
            self.priors[key] = {name: sum(math.log(max(run[name], 1e-12)) for run in runs) / len(runs)
                                for name in runs[0]}
        return self.priors[key]


CONTENT_FREE = ("N/A", "", "[MASK]")


def calibrated(scores: dict[str, float], log_prior: dict[str, float]) -> dict[str, float]:
    """p(label | message) / p(label | nothing), renormalised to sum to 1."""
    logits = {name: math.log(max(p, 1e-12)) - log_prior.get(name, 0.0) for name, p in scores.items()}
    top = max(logits.values())
    weights = {name: math.exp(v - top) for name, v in logits.items()}
    total = sum(weights.values())
    return {name: w / total for name, w in weights.items()}
