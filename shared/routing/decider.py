"""The router's decision for one turn, from its own model: label scores, example similarity, threshold.

Used by the router worker and by `lyra route` (which loads the router model in the CLI's process), so
both give the same scores for the same config.
"""

from __future__ import annotations

import logging
import math
import threading
import time

from shared.config.schema import LyraConfig
from shared.models.base import BackendError, LoadedModel
from shared.routing import scoring
from shared.wire.messages import ChatTurn, RouteEvidence, RouteLabel

log = logging.getLogger(__name__)

CONTENT_FREE = ("N/A", "", "[MASK]")


def config_labels(config: LyraConfig) -> list[RouteLabel]:
    """The labels the coordinator offers the router: every routable specialist with its description."""
    return [RouteLabel(name=name, description=entry.description)
            for name, entry in config.specialists.items() if entry.routable]


def calibrated(scores: dict[str, float], log_prior: dict[str, float]) -> dict[str, float]:
    """p(label | message) / p(label | nothing), renormalised to sum to 1."""
    logits = {name: math.log(max(p, 1e-12)) - log_prior.get(name, 0.0) for name, p in scores.items()}
    return scoring.softmax(logits, 1.0)


def last_user_text(messages: list[ChatTurn]) -> str:
    """The turn being routed: the last user message."""
    return next((turn.content for turn in reversed(messages) if turn.role == "user"), "")


class RouteDecider:
    """Scores a turn against the labels (and the examples, when the config has some) and picks one."""

    def __init__(self, model: LoadedModel, config: LyraConfig) -> None:
        self.model = model
        self.config = config
        self.priors: dict[tuple[tuple[str, str], ...], dict[str, float]] = {}
        self.index: scoring.ExampleIndex | None = None

    def prepare(self, cancel: threading.Event) -> None:
        """Embed every example once and compute the configured labels' prior, before the first turn."""
        started = time.perf_counter()
        owners, texts = [], []
        for name, entry in self.config.specialists.items():
            if entry.routable:
                owners += [name] * len(entry.examples)
                texts += entry.examples
        if texts:
            vectors = self.model.embed(texts, cancel)
            self.index = scoring.ExampleIndex.build(owners, texts, vectors)
        labels = config_labels(self.config)
        if self.config.routing.calibrate and labels:
            try:
                self._prior(labels, cancel)
            except BackendError as exc:  # a remote router not up yet: the first turn computes it
                log.warning("label prior not computed at startup (%s); the first turn will", exc)
        prior = "off" if not self.config.routing.calibrate else "ready" if self.priors else "deferred"
        log.info("router ready: %d example(s) of %d specialist(s) embedded, label prior %s, in %.2f s", len(texts),
                 len(set(owners)), prior, time.perf_counter() - started)

    def describe(self) -> str:
        """Which evidence routes, for `lyra status`: e.g. "labels + 48 examples (weight 0.7); below 0.5 -> x"."""
        routing = self.config.routing
        evidence = "labels" if self.index is None else \
            f"labels + {len(self.index.texts)} examples (weight {routing.example_weight:g})"
        below = f"; below {routing.min_confidence:g} -> {routing.fallback}" if routing.min_confidence > 0 else ""
        return evidence + below

    def decide(self, messages: list[ChatTurn], labels: list[RouteLabel],
               cancel: threading.Event) -> tuple[str, dict[str, float], bool, RouteEvidence]:
        """(specialist, combined scores, whether the fallback took it, the evidence) for the turn."""
        return self.decide_texts([last_user_text(messages)], labels, cancel)[0]

    def decide_texts(self, texts: list[str], labels: list[RouteLabel],
                     cancel: threading.Event) -> list[tuple[str, dict[str, float], bool, RouteEvidence]]:
        """`decide` for several turns at once: the turns are embedded in batches (tests, benchmarks)."""
        names = [label.name for label in labels]
        uses_examples = self.index is not None and bool(self.index.owners() & set(names))
        vectors = self.model.embed(texts, cancel) if uses_examples else [None] * len(texts)
        return [self._decide(text, labels, vector, cancel) for text, vector in zip(texts, vectors, strict=True)]

    def _decide(self, text: str, labels: list[RouteLabel], vector: list[float] | None,
                cancel: threading.Event) -> tuple[str, dict[str, float], bool, RouteEvidence]:
        routing = self.config.routing
        label_scores = self.model.classify([ChatTurn(role="user", content=text)], labels, routing.prompt_template,
                                           cancel)
        if routing.calibrate:
            label_scores = calibrated(label_scores, self._prior(labels, cancel))
        example_scores, nearest = ({}, []) if vector is None or self.index is None else scoring.example_scores(
            self.index, vector, [label.name for label in labels], routing.example_k, routing.example_temperature)
        scores = scoring.combine(label_scores, example_scores, routing.example_weight)
        fallback = routing.fallback if routing.fallback in scores else ""
        chosen, fell_back = scoring.decide(scores, routing.min_confidence, fallback)
        draws = {name for name, entry in self.config.specialists.items() if entry.kind == "image_generation"}
        asked = scoring.unless_unasked_picture(scores, chosen, text, draws, routing.picture_request)
        if asked != chosen:
            log.info("routed to %s, not %s: the turn asks for no picture (routing.picture_request)", asked, chosen)
            chosen = asked
        evidence = RouteEvidence(label_scores=label_scores, example_scores=example_scores, nearest=nearest,
                                 best=max(scores, key=scores.__getitem__), min_confidence=routing.min_confidence)
        return chosen, scores, fell_back, evidence

    def _prior(self, labels: list[RouteLabel], cancel: threading.Event) -> dict[str, float]:
        """Mean log-probability of each label for content-free messages, cached per label set."""
        key = tuple((label.name, label.description) for label in labels)
        if key not in self.priors:
            template = self.config.routing.prompt_template
            runs = [self.model.classify([ChatTurn(role="user", content=text)], labels, template, cancel)
                    for text in CONTENT_FREE]
            self.priors[key] = {name: sum(math.log(max(run[name], 1e-12)) for run in runs) / len(runs)
                                for name in runs[0]}
        return self.priors[key]
