"""How the router decides: label scores, similarity to example prompts, a threshold and a fallback.

Pure arithmetic over what the model produced (label probabilities, unit embedding vectors), so it is
tested without a model. `RouteDecider` in `shared.routing.decider` feeds it from the router model.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from shared.wire.messages import NearestExample

NEAREST_SHOWN = 3  # examples reported per decision


@dataclass(frozen=True)
class ExampleIndex:
    """Every configured example prompt with its embedding, embedded once at startup.

    Vectors are compared after subtracting the examples' mean: a causal LM's pooled hidden states share a
    large common direction (the chat template, the model's own bias), which otherwise makes every prompt
    look alike to every other (cosine similarities all near 1).
    """

    specialists: tuple[str, ...]  # per example: whose it is
    texts: tuple[str, ...]
    vectors: tuple[tuple[float, ...], ...]  # centred, unit length, one per example
    center: tuple[float, ...]  # the mean of the examples' raw vectors

    @classmethod
    def build(cls, specialists: Sequence[str], texts: Sequence[str],
              vectors: Sequence[Sequence[float]]) -> ExampleIndex:
        """Centre the raw vectors on their mean and scale them to unit length."""
        center = tuple(sum(column) / len(vectors) for column in zip(*vectors, strict=True))
        rows = tuple(_centred(vector, center) for vector in vectors)
        return cls(tuple(specialists), tuple(texts), rows, center)

    def owners(self) -> set[str]:
        """Specialists that have at least one example."""
        return set(self.specialists)

    def similarities(self, vector: Sequence[float]) -> list[float]:
        """Cosine similarity of a raw `vector`, centred like the examples, to every example."""
        query = _centred(vector, self.center)
        return [sum(a * b for a, b in zip(row, query, strict=True)) for row in self.vectors]


def _centred(vector: Sequence[float], center: Sequence[float]) -> tuple[float, ...]:
    shifted = [v - c for v, c in zip(vector, center, strict=True)]
    norm = math.sqrt(sum(v * v for v in shifted)) or 1.0
    return tuple(v / norm for v in shifted)


def example_scores(index: ExampleIndex, vector: Sequence[float], candidates: Sequence[str], k: int,
                   temperature: float) -> tuple[dict[str, float], list[NearestExample]]:
    """Per candidate with examples: the mean similarity of its k nearest, softmaxed; and the nearest examples."""
    sims = index.similarities(vector)
    per: dict[str, list[float]] = {}
    for owner, sim in zip(index.specialists, sims, strict=True):
        if owner in candidates:
            per.setdefault(owner, []).append(sim)
    if not per:
        return {}, []
    closeness = {name: sum(top := sorted(values, reverse=True)[:k]) / len(top) for name, values in per.items()}
    order = sorted(range(len(sims)), key=lambda i: -sims[i])
    nearest = [NearestExample(specialist=index.specialists[i], text=index.texts[i], similarity=round(sims[i], 4))
               for i in order if index.specialists[i] in per][:NEAREST_SHOWN]
    return softmax(closeness, temperature), nearest


def softmax(values: dict[str, float], temperature: float) -> dict[str, float]:
    """exp(v / temperature), normalised to sum to 1."""
    top = max(values.values())
    weights = {name: math.exp((v - top) / temperature) for name, v in values.items()}
    total = sum(weights.values())
    return {name: w / total for name, w in weights.items()}


def combine(label_scores: dict[str, float], examples: dict[str, float], weight: float) -> dict[str, float]:
    """weight x example score + (1 - weight) x label score, renormalised.

    A specialist without examples uses its label score in place of an example score; with no examples at
    all, the label scores stand as they are.
    """
    if not examples:
        return dict(label_scores)
    mixed = {name: weight * examples.get(name, p) + (1.0 - weight) * p for name, p in label_scores.items()}
    total = sum(mixed.values())
    return {name: v / total for name, v in mixed.items()}


def decide(scores: dict[str, float], min_confidence: float, fallback: str) -> tuple[str, bool]:
    """The best-scoring specialist, or (fallback, True) when the best score is below min_confidence."""
    best = max(scores, key=scores.__getitem__)
    if fallback and scores[best] < min_confidence:
        return fallback, True
    return best, False


def unless_unasked_picture(scores: dict[str, float], chosen: str, text: str, draws: set[str],
                           picture_request: str) -> str:
    """`chosen`, unless it draws pictures and `text` asks for none: then the best-scoring other specialist."""
    if chosen not in draws or not picture_request or re.search(picture_request, text, re.IGNORECASE):
        return chosen
    others = {name: score for name, score in scores.items() if name not in draws}
    return max(others, key=others.__getitem__) if others else chosen
