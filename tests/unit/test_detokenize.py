"""Incremental detokenizing: the streamed text equals a full decode, and each batch costs the same however long
the reply (tokenizers' DecodeStream), with the stop-string holdback on top."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from shared.engine.detokenize import IncrementalText, WholeReplyDecoder

CORPUS = ["The quick brown fox jumps over the lazy dog.", "What is 17 times 23? It is 391.", "Hello world."] * 4
# Trained on ASCII only, so every other character is two to four byte tokens: the stream sees halves of them.
REPLY = "Grüße, wörld ☃ — 日本語 and 😀 too; the quick fox is 391. " * 6


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer wrapped as transformers wraps a checkpoint's: the engine's kind."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|im_end|>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                         show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>")


def streamed(tokenizer: PreTrainedTokenizerFast, ids: list[int], batch: int | None, stop: tuple[str, ...] = ()) \
        -> tuple[list[str], IncrementalText]:
    text = IncrementalText(tokenizer, stop)
    rng = random.Random(0)
    pieces, at = [], 0
    while at < len(ids) and not text.stopped:
        size = batch or rng.randint(1, 9)
        pieces.append(text.push(ids[at:at + size]))
        at += size
    pieces.append(text.finish())
    return pieces, text


@pytest.mark.parametrize("batch", [1, 4, None])
def test_the_streamed_text_equals_a_full_decode_with_characters_split_across_tokens(
        tokenizer: PreTrainedTokenizerFast, batch: int | None) -> None:
    ids = tokenizer(REPLY).input_ids
    assert len(ids) > 2 * len(REPLY.encode()) / 3  # the characters outside ASCII really are split
    pieces, _ = streamed(tokenizer, ids, batch)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True) == REPLY
    assert not any("\ufffd" in piece for piece in pieces)  # never half a character


def test_a_reply_cut_off_mid_character_ends_as_a_full_decode_does(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = tokenizer("fox ☃").input_ids
    cut = ids[:-1]  # max_new_tokens stopped the snowman after part of its bytes
    assert "".join(streamed(tokenizer, cut, 1)[0]) == tokenizer.decode(cut, skip_special_tokens=True)


def test_special_tokens_are_left_out_as_in_a_full_decode(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = [*tokenizer("quick ").input_ids, tokenizer.eos_token_id, *tokenizer("fox").input_ids]
    assert "".join(streamed(tokenizer, ids, 1)[0]) == "quick fox"


def test_a_stop_string_split_across_batches_ends_the_reply_before_it(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = tokenizer(REPLY).input_ids
    pieces, text = streamed(tokenizer, ids, 1, stop=("日本",))
    assert "".join(pieces) == REPLY[:REPLY.find("日本")] and text.stopped


def test_each_batch_decodes_a_few_tokens_however_long_the_reply(tokenizer: PreTrainedTokenizerFast) -> None:
    """The work per push is bounded: re-decoding the whole reply would decode 100x more tokens at its end."""
    counter = CountingDecoder()
    tokenizer.backend_tokenizer.decoder = decoders.Decoder.custom(counter)
    try:
        ids = tokenizer(REPLY * 4).input_ids
        text, per_push = IncrementalText(tokenizer), []
        for token in ids:
            before = counter.tokens
            text.push([token])
            per_push.append(counter.tokens - before)
        assert len(ids) > 1000
        assert max(per_push[-100:]) <= 16, f"the last pushes decoded up to {max(per_push[-100:])} tokens each"
        assert sum(per_push) < 8 * len(ids)
    finally:
        tokenizer.backend_tokenizer.decoder = decoders.ByteLevel()


def test_a_tokenizer_without_a_tokenizers_backend_still_streams_whole_characters() -> None:
    """A slow (pure-Python) tokenizer has only its own decode: each batch re-decodes the reply."""

    class Bytes:
        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            return bytes(ids).decode("utf-8", errors="replace")

    text = IncrementalText(Bytes())
    assert isinstance(text.decoder, WholeReplyDecoder)
    snowman = list("☃".encode())
    assert [text.push([ord("a"), snowman[0]]), text.push(snowman[1:2]), text.push(snowman[2:]), text.finish()] == \
        ["a", "", "☃", ""]


def test_a_stream_that_fails_mid_reply_hands_over_to_whole_reply_decoding(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = tokenizer(REPLY).input_ids
    text = IncrementalText(tokenizer)
    stream, steps = text.decoder.stream, []

    def step(backend: Tokenizer, token: int) -> str | None:
        steps.append(token)
        if len(steps) == 30:
            raise Exception("Invalid prefix encountered")  # what tokenizers raises for a decoder it cannot stream
        return stream.step(backend, token)

    text.decoder.stream = type("FailingStream", (), {"step": staticmethod(step)})()
    pieces = [text.push(ids[at:at + 4]) for at in range(0, len(ids), 4)] + [text.finish()]
    assert isinstance(text.decoder, WholeReplyDecoder)
    assert "".join(pieces) == REPLY


class CountingDecoder:
    """The byte-level decoder, counting the tokens it is given (tokenizers calls it for every decode)."""

    def __init__(self) -> None:
        self.inner = decoders.ByteLevel()
        self.tokens = 0

    def decode_chain(self, tokens: list[str]) -> list[str]:
        self.tokens += len(tokens)
        return [self.inner.decode(tokens)]
