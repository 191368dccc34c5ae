"""The demo's text turns through the embedded default's specialist and voice, as the stack composes them.

    python -m bench.demo_answers -c configs/default.toml [-c other.toml ...]

One SmolLM2 load serves every role (they are the same checkpoint); each config's system prompts and
generation settings are applied per role. Prints each answer, the demo's checks (cut off, repeated), token
counts and seconds, so two configs (e.g. the old and the new default) can be compared on the same turns.
"""

from __future__ import annotations

import argparse
import threading
import time

from services.voice.handlers import compose_voice_prompt
from shared.backends.base import LoadContext, load_model
from shared.backends.hf_causal import HfCausalModel
from shared.config import LyraConfig, ModelEntry, load_config
from shared.demo import SCRIPT, answer_problems
from shared.messages import ChatTurn, GenerationOptions, SynthesizeRequest

TURNS = {"How do I fix a flat tyre?": "pragmatist", "What is the meaning of life?": "philosopher",
         "Write a Python function that reverses a string.": "pragmatist", "Is free will an illusion?": "philosopher"}


def reply(base: HfCausalModel, entry: ModelEntry, turns: list[ChatTurn]) -> tuple[str, int, float]:
    """(text, new tokens, seconds) of one role's reply with that role's settings."""
    model = HfCausalModel(entry, base.model, base.tokenizer, [])
    model.engine = base.decode_engine(base.tokenizer)
    began = time.perf_counter()
    text = "".join(model.generate(turns, GenerationOptions(), threading.Event()))
    return text, (model.last_usage() or (0, 0, ""))[1], time.perf_counter() - began


def run_config(base: HfCausalModel, config: LyraConfig) -> None:
    print(f"== {config.source}")
    broken = 0
    for prompt, _ in SCRIPT:
        if prompt not in TURNS:
            continue
        entry = config.specialists[TURNS[prompt]]
        system = [ChatTurn(role="system", content=entry.system_prompt)] if entry.system_prompt else []
        notes, made, spent = reply(base, entry, [*system, ChatTurn(role="user", content=prompt)])
        request = SynthesizeRequest(messages=[ChatTurn(role="user", content=prompt)], specialist=TURNS[prompt],
                                    specialist_output=notes)
        answer, spoken, voiced = reply(base, config.voice, compose_voice_prompt(config.voice.system_prompt, request))
        problems = answer_problems(answer)
        broken += bool(problems)
        print(f"\nyou> {prompt}\n  {TURNS[prompt]} ({made} tokens, {spent:.1f} s): {notes.strip()}\n"
              f"  lyra ({spoken} tokens, {voiced:.1f} s): {answer.strip()}")
        print("\n".join(f"  check: {p}" for p in problems) or "  check: ok")
    print(f"\n{broken} of {len(TURNS)} answers cut off or repeating")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", action="append", required=True)
    args = parser.parse_args()
    configs = [load_config(path) for path in args.config]
    base = load_model(configs[0].voice, LoadContext(service="voice", physical_gpus=[], config=configs[0]))
    assert isinstance(base, HfCausalModel)
    for config in configs:
        run_config(base, config)


if __name__ == "__main__":
    main()
