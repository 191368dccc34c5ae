"""Routing accuracy on the held-out labelled prompts, with and without examples, and the route stage's time.

    python -m bench.routing [-c configs/default.toml] [--timed 12]

Loads the config's router model once, in this process, and decides exactly as the router service does.
Prints the confusion matrix of each variant, then seconds per routed turn (warm, one turn at a time, as
the service routes: label scoring plus, with examples, one embedding).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

from shared.cli.stack import ROOT
from shared.config.schema import LyraConfig, load_config
from shared.models.base import LoadContext, load_model
from shared.routing.decider import RouteDecider, config_labels
from shared.wire.messages import ChatTurn
from tests.routing_evaluation import evaluate, load_labelled

HELD_OUT = ROOT / "tests" / "data" / "routing_heldout.toml"


def without_examples(config: LyraConfig) -> LyraConfig:
    """The same config with every specialist's examples removed (labels alone decide)."""
    stripped = {name: entry.model_copy(update={"examples": []}) for name, entry in config.specialists.items()}
    return config.model_copy(update={"specialists": stripped})


def seconds_per_turn(decider: RouteDecider, texts: list[str]) -> list[float]:
    """Wall seconds of each turn's decision, one turn at a time (the first, warming up, not counted)."""
    labels, cancel = config_labels(decider.config), threading.Event()
    decider.decide([ChatTurn(role="user", content=texts[0])], labels, cancel)
    times = []
    for text in texts:
        began = time.perf_counter()
        decider.decide([ChatTurn(role="user", content=text)], labels, cancel)
        times.append(time.perf_counter() - began)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", default=str(ROOT / "configs" / "default.toml"))
    parser.add_argument("--timed", type=int, default=12, help="held-out turns to time one at a time")
    args = parser.parse_args()
    config = load_config(args.config)
    labelled = load_labelled(HELD_OUT)
    model = load_model(config.router, LoadContext(service="router", physical_gpus=[], config=config))
    sample = [text for prompts in labelled.values() for text in prompts[: max(1, args.timed // len(labelled))]]
    try:
        for name, variant in (("with examples", config), ("without examples (labels only)", without_examples(config))):
            decider = RouteDecider(model, variant)
            began = time.perf_counter()
            decider.prepare(threading.Event())
            prepared = time.perf_counter() - began
            print(f"\n== {name}: {decider.describe()} (prepared in {prepared:.2f} s)")
            print(evaluate(decider, labelled).render())
            times = seconds_per_turn(decider, sample)
            print(f"route time per turn, warm, {len(times)} turns: median {statistics.median(times):.3f} s, "
                  f"min {min(times):.3f} s, max {max(times):.3f} s")
    finally:
        model.unload()


if __name__ == "__main__":
    main()
