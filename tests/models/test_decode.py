"""The decode engine on the CPU: equal to `generate`, stop strings, cancel, context limits, seeds."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from shared.engine import decode
from shared.engine.cancel import Cancelled
from shared.engine.detokenize import IncrementalText
from shared.models import hf_causal
from shared.wire.messages import ChatTurn, GenerationOptions
from tests.models import tiny

pytestmark = pytest.mark.models

QUESTION = [ChatTurn(role="user", content="What is 17 times 23?")]


def reference_ids(model: hf_causal.HfCausalModel, ids: torch.Tensor, new: int, **extra: object) -> list[int]:
    out = model.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               max_new_tokens=new, min_new_tokens=new, eos_token_id=None,
                               pad_token_id=model.pad_id, **extra)
    return out[0, ids.shape[1]:].tolist()


def engine_ids(runner: decode.DynamicRunner | decode.StaticRunner, ids: torch.Tensor, new: int) -> list[int]:
    with torch.inference_mode():
        logits, out = runner.prefill({"input_ids": ids}), []
        for _ in range(new):
            token = decode.pick_token(logits, decode.Sampling(new))
            out.append(int(token))
            logits = runner.step(token)
    return out


def test_dynamic_runner_equals_generate_token_for_token(tiny_model: hf_causal.HfCausalModel) -> None:
    ids = torch.tensor([tiny_model.tokenizer("The quick brown fox jumps").input_ids])
    assert engine_ids(decode.DynamicRunner(tiny_model.model), ids, 40) == reference_ids(tiny_model, ids, 40)


def test_static_runner_equals_static_generate_on_llama(tiny_checkpoints: dict[str, Path]) -> None:
    """The graphs engine's step, run eagerly: static cache, fixed mask, position advanced on the device."""
    model = hf_causal.load(tiny.entry("t", tiny_checkpoints["llama"]), tiny.cpu_context())
    ids = torch.tensor([model.tokenizer("What is 17 times 23? The quick brown fox").input_ids])
    expected = reference_ids(model, ids, 60, cache_implementation="static", disable_compile=True)
    runner = decode.StaticRunner(model.model, 256, graphs=False)  # switches attention to grouped decode
    assert model.model.config._attn_implementation == "lyra_sdpa"
    assert engine_ids(runner, ids, 60) == expected
    assert engine_ids(runner, ids, 60) == expected  # a second reply reuses the cache after a reset
    assert expected == reference_ids(model, ids, 60)  # and the static cache changes nothing on the CPU


@pytest.mark.parametrize("architecture", ["gemma3", "jamba"])
def test_static_runner_refuses_sliding_and_hybrid_caches(architecture: str,
                                                         tiny_checkpoints: dict[str, Path]) -> None:
    model = hf_causal.load(tiny.entry("t", tiny_checkpoints[architecture]), tiny.cpu_context())
    with pytest.raises(decode.UnsupportedModel):
        decode.StaticRunner(model.model, 256, graphs=False)


def test_engine_reports_what_decodes(tiny_model: hf_causal.HfCausalModel) -> None:
    assert tiny_model.engine_kind() == "dynamic (CPU)"
    assert tiny_model.placement()["engine"] == "dynamic (CPU)"


def test_a_stop_string_ends_the_reply_before_it(tiny_checkpoints: dict[str, Path]) -> None:
    model = hf_causal.load(tiny.entry("t", tiny_checkpoints["llama"]), tiny.cpu_context())
    full = "".join(model.generate(QUESTION, GenerationOptions(temperature=0.0, max_new_tokens=48),
                                  threading.Event()))
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert len(stop) == 3
    cut = "".join(model.generate(QUESTION, GenerationOptions(temperature=0.0, max_new_tokens=48, stop=[stop]),
                                 threading.Event()))
    assert cut == full[:full.find(stop)]


def test_cancel_mid_decode_ends_within_a_step(tiny_checkpoints: dict[str, Path]) -> None:
    model = hf_causal.load(tiny.entry("t", tiny_checkpoints["llama"]), tiny.cpu_context())
    steps: list[int] = []
    cancel = threading.Event()
    hook = model.model.register_forward_hook(lambda *_: steps.append(1) or (cancel.set() if len(steps) == 10 else None))
    try:
        with pytest.raises(Cancelled):
            list(model.generate(QUESTION, GenerationOptions(temperature=0.0, max_new_tokens=200), cancel))
    finally:
        hook.remove()
    assert len(steps) == 10  # the step that saw the cancel was the last one run


def test_seeded_sampling_differs_by_seed_and_repeats(tiny_checkpoints: dict[str, Path]) -> None:
    model = hf_causal.load(tiny.entry("t", tiny_checkpoints["llama"]), tiny.cpu_context())

    def sample(seed: int) -> str:
        options = GenerationOptions(temperature=1.0, top_p=0.95, seed=seed, max_new_tokens=32)
        return "".join(model.generate(QUESTION, options, threading.Event()))

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_top_p_this_small_is_greedy() -> None:
    logits = torch.tensor([[0.1, 3.0, 0.5, 2.9]])
    picks = {int(decode.pick_token(logits, decode.Sampling(1, temperature=1.0, top_p=1e-6))) for _ in range(20)}
    assert picks == {1}


class Bytes:
    """A byte-level stand-in tokenizer: each id is one byte of UTF-8."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def test_text_waits_for_the_rest_of_a_multibyte_character() -> None:
    text = IncrementalText(Bytes())
    snowman = list("☃".encode())
    assert text.push([ord("a"), *snowman[:1]]) == "a"
    assert text.push(snowman[1:]) == "☃"
    assert text.finish() == ""


def test_text_never_hands_out_part_of_a_stop_string() -> None:
    text = IncrementalText(Bytes(), stop=("STOP",))
    pieces = [text.push(list(chunk.encode())) for chunk in ("hello S", "T", "OP and more")]
    assert "".join(pieces) == "hello " and text.stopped
    assert text.finish() == ""


def test_the_engine_counts_the_tokens_it_read_and_wrote(tiny_checkpoints: dict[str, Path]) -> None:
    model = hf_causal.load(tiny.entry("t", tiny_checkpoints["llama"]), tiny.cpu_context())
    text = "".join(model.generate(QUESTION, GenerationOptions(temperature=0.0, max_new_tokens=12), threading.Event()))
    prompt = len(model._prompt_ids([turn.model_dump() for turn in QUESTION]))
    assert model.last_usage() == (prompt, 12, "length")
    stop = text[len(text) // 2:len(text) // 2 + 2]
    model.engine.eos = set()
    "".join(model.generate(QUESTION, GenerationOptions(temperature=0.0, max_new_tokens=12, stop=[stop]),
                           threading.Event()))
    assert model.last_usage()[0] == prompt and model.last_usage()[1] < 12 and model.last_usage()[2] == "stop"


def test_a_compile_setting_is_refused_with_the_engine_to_write() -> None:
    from shared.config.schema import ConfigError, parse_config

    with pytest.raises(ConfigError, match='write engine = "compiled"') as refused:
        parse_config({"router": {}, "specialists": {"pragmatist": {}}, "voice": {"compile": True}})
    assert "\n" not in str(refused.value)
