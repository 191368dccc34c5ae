"""The demo's turns through the embedded default's specialists and voice, as the stack composes them.

    python -m bench.demo_answers -c configs/default.toml [-c other.toml ...]

One SmolLM2 load serves every text role (they are the same checkpoint); each config's system prompts and
generation settings are applied per role. The artist and perception turns run the config's own image
models (the tiny random checkpoints on the embedded default) once, and the voice answers their output.
Prints each specialist's output, the answer, the demo's checks (cut off, repeated, unclosed fence), token
counts and seconds, so two configs (e.g. the old and the new default) can be compared on the same turns.
"""

from __future__ import annotations

import argparse
import threading
import time

from services.voice.handlers import compose_voice_prompt
from shared.cli.demo import SCRIPT, answer_problems, sample_picture
from shared.config.schema import LyraConfig, ModelEntry, load_config
from shared.models.base import LoadContext, LoadedModel, SpecialistOutput, load_model
from shared.models.hf_causal import HfCausalModel
from shared.wire.messages import ChatTurn, GenerationOptions, SynthesizeRequest

TURNS = {"How do I fix a flat tyre?": "pragmatist", "What is the meaning of life?": "philosopher",
         "Write a Python function that reverses a string.": "pragmatist", "Is free will an illusion?": "philosopher",
         "Draw a picture of a lighthouse at sunset.": "artist", "What is in this picture?": "perception"}


def reply(base: HfCausalModel, entry: ModelEntry, turns: list[ChatTurn]) -> tuple[str, int, float]:
    """(text, new tokens, seconds) of one role's reply with that role's settings."""
    model = HfCausalModel(entry, base.model, base.tokenizer, [])
    model.engine = base.decode_engine(base.tokenizer)
    began = time.perf_counter()
    text = "".join(model.generate(turns, GenerationOptions(), threading.Event()))
    return text, (model.last_usage() or (0, 0, ""))[1], time.perf_counter() - began


def image_turn(model: LoadedModel, turns: list[ChatTurn], attach: bool) -> tuple[str, int, float]:
    """(output text, new tokens, seconds) of an image specialist's run, as the specialist host runs it."""
    began = time.perf_counter()
    items = list(model.run_specialist(turns, sample_picture() if attach else None, GenerationOptions(),
                                      threading.Event()))
    output = items[-1]
    assert isinstance(output, SpecialistOutput)
    return output.text, (model.last_usage() or (0, 0, ""))[1], time.perf_counter() - began


class ImageModels:
    """The image specialists' models, loaded once for every config that names the same checkpoint."""

    def __init__(self) -> None:
        self.loaded: dict[tuple[str, str, str], LoadedModel] = {}

    def get(self, config: LyraConfig, entry: ModelEntry) -> LoadedModel:
        key = (entry.kind, entry.embedded or "", entry.path or "")
        if key not in self.loaded:
            self.loaded[key] = load_model(entry, LoadContext(service="specialist_host", physical_gpus=[],
                                                             config=config))
        return self.loaded[key]


def run_config(base: HfCausalModel, images: ImageModels, config: LyraConfig) -> None:
    print(f"== {config.source}")
    broken = 0
    for prompt, attach in SCRIPT:
        name = TURNS[prompt]
        entry = config.specialists[name]
        system = [ChatTurn(role="system", content=entry.system_prompt)] if entry.system_prompt else []
        turns = [*system, ChatTurn(role="user", content=prompt)]
        if entry.kind == "causal_lm":
            notes, made, spent = reply(base, entry, turns)
        else:
            notes, made, spent = image_turn(images.get(config, entry), turns, attach)
        request = SynthesizeRequest(messages=[ChatTurn(role="user", content=prompt)], specialist=name,
                                    specialist_output=notes)
        answer, spoken, voiced = reply(base, config.voice, compose_voice_prompt(config.voice.system_prompt, request))
        problems = answer_problems(answer)
        broken += bool(problems)
        print(f"\nyou> {prompt}\n  {name} ({made} tokens, {spent:.1f} s): {notes.strip()!r}\n"
              f"  lyra ({spoken} tokens, {voiced:.1f} s): {answer.strip()}")
        print("\n".join(f"  check: {p}" for p in problems) or "  check: ok")
    print(f"\n{broken} of {len(SCRIPT)} answers flagged")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", action="append", required=True)
    args = parser.parse_args()
    configs = [load_config(path) for path in args.config]
    base = load_model(configs[0].voice, LoadContext(service="voice", physical_gpus=[], config=configs[0]))
    assert isinstance(base, HfCausalModel)
    images = ImageModels()
    for config in configs:
        run_config(base, images, config)


if __name__ == "__main__":
    main()
