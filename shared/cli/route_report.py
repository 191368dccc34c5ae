"""`lyra route "text"`: how the router of a config scores turns, without a stack, a specialist or the voice.

Loads the config's router model in this process and decides exactly as the router service does
(`shared.routing.decider`), so a config can be tuned by editing it and running this again.
"""

from __future__ import annotations

import json
import threading
import time

from shared.config.schema import LyraConfig
from shared.wire.messages import ChatTurn, RouteEvidence
from shared.wire.names import ROUTER


def render_decision(text: str, chosen: str, scores: dict[str, float], fell_back: bool, evidence: RouteEvidence,
                    seconds: float) -> str:
    """The decision, each source of scores, and the nearest examples, as lines for a person."""
    def row(values: dict[str, float]) -> str:
        return "  ".join(f"{name} {values[name]:.2f}" for name in sorted(values, key=lambda n: -values[n]))

    why = f" (fallback: best was {evidence.best} {scores[evidence.best]:.2f} < {evidence.min_confidence:g})" \
        if fell_back else ""
    lines = [f"{text}", f"  route: {chosen}{why}   ({seconds:.2f} s)", f"  scores:   {row(scores)}",
             f"  labels:   {row(evidence.label_scores)}"]
    if evidence.example_scores:
        lines.append(f"  examples: {row(evidence.example_scores)}")
        lines += [f"    {near.similarity:.3f}  {near.specialist:<12} {near.text}" for near in evidence.nearest]
    else:
        lines.append("  examples: none configured (labels alone decide)")
    return "\n".join(lines)


def run_route(config: LyraConfig, texts: list[str], as_json: bool) -> int:
    """Load the router model, prepare it as the service does, and print one decision per text."""
    from shared.models.base import LoadContext, load_model
    from shared.routing.decider import RouteDecider, config_labels

    started = time.perf_counter()
    model = load_model(config.router, LoadContext(service=ROUTER, physical_gpus=config.gpus_of(ROUTER),
                                                  config=config))
    cancel = threading.Event()
    decider = RouteDecider(model, config)
    decider.prepare(cancel)
    labels = config_labels(config)
    if not as_json:
        print(f"router ready in {time.perf_counter() - started:.1f} s: {decider.describe()}\n")
    try:
        for text in texts:
            begun = time.perf_counter()
            chosen, scores, fell_back, evidence = decider.decide([ChatTurn(role="user", content=text)], labels, cancel)
            seconds = time.perf_counter() - begun
            if as_json:
                print(json.dumps({"text": text, "specialist": chosen, "scores": scores, "fallback": fell_back,
                                  "evidence": evidence.model_dump(mode="json"), "seconds": round(seconds, 4)}))
            else:
                print(render_decision(text, chosen, scores, fell_back, evidence, seconds))
    finally:
        model.unload()
    return 0
