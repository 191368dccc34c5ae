"""Accuracy of a router on a labelled prompt set: the confusion matrix, for the accuracy test and the bench."""

from __future__ import annotations

import threading
import tomllib
from dataclasses import dataclass
from pathlib import Path

from shared.routing.decider import RouteDecider, config_labels


def load_labelled(path: Path) -> dict[str, list[str]]:
    """A TOML file of `specialist = ["prompt", ...]` lists."""
    return {name: list(prompts) for name, prompts in tomllib.loads(path.read_text(encoding="utf-8")).items()}


@dataclass(frozen=True)
class Evaluation:
    """How each labelled prompt was routed."""

    confusion: dict[str, dict[str, int]]  # true specialist -> routed specialist -> count
    wrong: list[tuple[str, str, str]]  # (prompt, true specialist, routed specialist)
    fallbacks: int  # turns the threshold sent to the fallback

    @property
    def accuracy(self) -> float:
        total = sum(sum(row.values()) for row in self.confusion.values())
        right = sum(row.get(name, 0) for name, row in self.confusion.items())
        return right / total if total else 0.0

    def render(self) -> str:
        """The confusion matrix (rows: the label, columns: where the router sent it) and the misses."""
        columns = sorted({c for row in self.confusion.values() for c in row} | set(self.confusion))
        lines = [f"{'true/routed':<14}" + "".join(f"{c:>13}" for c in columns)]
        lines += [f"{name:<14}" + "".join(f"{row.get(c, 0):>13}" for c in columns)
                  for name, row in self.confusion.items()]
        lines.append(f"accuracy {self.accuracy:.3f} ({self.fallbacks} by fallback)")
        lines += [f"  miss: {truth} -> {routed}: {text}" for text, truth, routed in self.wrong]
        return "\n".join(lines)


def evaluate(decider: RouteDecider, labelled: dict[str, list[str]]) -> Evaluation:
    """Route every prompt as the router service would (the config's labels) and count where each went."""
    texts = [text for prompts in labelled.values() for text in prompts]
    truths = [name for name, prompts in labelled.items() for _ in prompts]
    decisions = decider.decide_texts(texts, config_labels(decider.config), threading.Event())
    confusion: dict[str, dict[str, int]] = {name: {} for name in labelled}
    wrong, fallbacks = [], 0
    for text, truth, (chosen, _, fell_back, _) in zip(texts, truths, decisions, strict=True):
        confusion[truth][chosen] = confusion[truth].get(chosen, 0) + 1
        fallbacks += fell_back
        if chosen != truth:
            wrong.append((text, truth, chosen))
    return Evaluation(confusion, wrong, fallbacks)
