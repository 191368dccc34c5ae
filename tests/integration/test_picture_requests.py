"""The artist draws only when asked to: a turn that asks for no picture never reaches it by routing."""

from __future__ import annotations

from shared.client import Client

FAKE = {"triggers": True, "token_delay_s": 0.0}
# The fake router scores a specialist by the words a turn shares with its name and description: this artist's
# description pulls summaries and names its way, as SmolLM2-135M's examples pulled them in the shipped config.
ARTIST = {"backend": "fake", "kind": "image_generation", "memory_gb": 10.0, "fake": dict(FAKE),
          "description": "summarise text in one sentence, a good name for my cat, draw pictures"}


def test_summaries_and_names_go_to_the_others_and_a_drawing_to_the_artist(shared_stack) -> None:
    stack = shared_stack(specialists__artist=ARTIST)
    with Client(stack.endpoint, timeout_s=30) as client:
        summary = client.chat("Summarise this text in one sentence: the meeting moved to Tuesday.")
        name = client.chat("What's a good name for my cat?")
        drawing = client.chat("Draw a picture of my cat.")
    assert summary.scores["artist"] == max(summary.scores.values())  # the router's scores favoured the artist
    assert summary.specialist != "artist" and name.specialist != "artist"
    assert drawing.specialist == "artist" and drawing.image is not None
