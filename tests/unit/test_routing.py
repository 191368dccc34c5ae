"""Routing by examples: the arithmetic, the threshold and fallback, the config, the decision (fake model)."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.cli.render import route_note
from shared.config.schema import ConfigError, RouterSettings, load_config, parse_config
from shared.models.base import BackendError, LoadContext, load_model
from shared.routing import scoring
from shared.routing.decider import RouteDecider, config_labels
from shared.wire.messages import ChatTurn, DoneEvent
from tests.stackproc import ROOT, fake_config, to_toml


def unit(*values: float) -> tuple[float, ...]:
    norm = math.sqrt(sum(v * v for v in values))
    return tuple(v / norm for v in values)


INDEX = scoring.ExampleIndex(("a", "a", "b"), ("a one", "a two", "b one"), (unit(1, 0), unit(1, 0.2), unit(0, 1)),
                             (0.0, 0.0))


def test_example_scores_favour_the_nearest_examples_and_name_them() -> None:
    scores, nearest = scoring.example_scores(INDEX, unit(1, 0.1), ["a", "b"], k=2, temperature=0.05)
    assert scores["a"] > 0.99 and sum(scores.values()) == pytest.approx(1.0)
    assert [n.text for n in nearest] == ["a two", "a one", "b one"]
    assert nearest[0].similarity > nearest[2].similarity


def test_the_index_compares_vectors_around_the_examples_mean() -> None:
    index = scoring.ExampleIndex.build(["a", "b"], ["x", "y"], [(10.0, 1.0), (10.0, -1.0)])
    assert index.center == (10.0, 0.0)
    assert index.similarities((10.0, 0.5)) == pytest.approx([1.0, -1.0])  # raw cosines would both be ~1


def test_example_scores_ignore_specialists_not_offered() -> None:
    scores, nearest = scoring.example_scores(INDEX, unit(1, 0), ["b"], k=3, temperature=0.05)
    assert scores == {"b": 1.0} and [n.specialist for n in nearest] == ["b"]
    assert scoring.example_scores(INDEX, unit(1, 0), ["c"], k=3, temperature=0.05) == ({}, [])


@given(st.dictionaries(st.sampled_from("xyz"), st.floats(0.01, 1.0), min_size=1),
       st.dictionaries(st.sampled_from("xyz"), st.floats(0.01, 1.0)), st.floats(0.0, 1.0))
def test_combined_scores_are_a_distribution(labels: dict, examples: dict, weight: float) -> None:
    total = sum(labels.values())
    labels = {k: v / total for k, v in labels.items()}
    combined = scoring.combine(labels, examples, weight)
    assert set(combined) == set(labels)
    assert sum(combined.values()) == pytest.approx(1.0)


def test_combine_weights_examples_over_labels() -> None:
    labels = {"artist": 0.7, "pragmatist": 0.3}
    assert scoring.combine(labels, {}, 0.7) == labels
    combined = scoring.combine(labels, {"artist": 0.1, "pragmatist": 0.9}, 0.7)
    assert combined["pragmatist"] == pytest.approx(0.7 * 0.9 + 0.3 * 0.3)


def test_below_the_threshold_the_fallback_takes_the_turn() -> None:
    assert scoring.decide({"a": 0.55, "b": 0.45}, 0.5, "b") == ("a", False)
    assert scoring.decide({"a": 0.45, "b": 0.3, "c": 0.25}, 0.5, "b") == ("b", True)
    assert scoring.decide({"a": 0.45, "b": 0.55}, 0.0, "") == ("b", False)


def test_the_shipped_default_routes_by_examples_and_falls_back_to_the_pragmatist() -> None:
    config = load_config(ROOT / "configs" / "default.toml")
    assert config.routing.fallback == "pragmatist" and config.routing.min_confidence > 0
    for name in ("pragmatist", "philosopher", "artist"):
        assert len(config.specialists[name].examples) >= 12, name
    assert not config.specialists["perception"].examples
    held_out = (ROOT / "tests" / "data" / "routing_heldout.toml").read_text()
    shown = [text for entry in config.specialists.values() for text in entry.examples]
    assert not [text for text in shown if f'"{text}"' in held_out]  # the config never sees the test part


def test_examples_file_is_read_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "p.txt").write_text("# a comment\nHow do I cook rice?\n\n  What is 2 + 2?  \n")
    raw = fake_config(tmp_path, specialists__pragmatist__examples=["Fix my bike"],
                      specialists__pragmatist__examples_file="lists/p.txt")
    (tmp_path / "c.toml").write_text(to_toml(raw))
    config = load_config(tmp_path / "c.toml")
    assert config.specialists["pragmatist"].examples == ["Fix my bike", "How do I cook rice?", "What is 2 + 2?"]


@pytest.mark.parametrize("change,message", [
    ({"routing__min_confidence": 0.5}, "needs routing.fallback"),
    ({"routing__fallback": "poet"}, "'poet' is not a specialist"),
    ({"routing__fallback": "philosopher", "specialists__philosopher__routable": False}, "routable = false"),
    ({"specialists__pragmatist__examples_file": "absent.txt"}, "cannot read"),
])
def test_bad_routing_settings_are_refused(tmp_path: Path, change: dict, message: str) -> None:
    (tmp_path / "c.toml").write_text(to_toml(fake_config(tmp_path, **change)))
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path / "c.toml")


def fake_decider(tmp_path: Path, **overrides) -> RouteDecider:
    config = parse_config(fake_config(tmp_path, **overrides))
    model = load_model(config.router, LoadContext(service="router", physical_gpus=[], config=config))
    decider = RouteDecider(model, config)
    decider.prepare(threading.Event())
    return decider


def turn(text: str) -> list[ChatTurn]:
    return [ChatTurn(role="user", content=text)]


def test_a_router_without_examples_decides_by_labels(tmp_path: Path) -> None:
    decider = fake_decider(tmp_path)
    chosen, scores, fell_back, evidence = decider.decide(turn("meaning of life"), config_labels(decider.config),
                                                         threading.Event())
    assert chosen == "philosopher" and not fell_back
    assert evidence.example_scores == {} and evidence.nearest == [] and scores == evidence.label_scores
    assert decider.describe() == "labels"


def test_examples_outvote_the_labels_and_are_reported(tmp_path: Path) -> None:
    decider = fake_decider(tmp_path, specialists__pragmatist__examples=["what is the meaning of this error"],
                           specialists__philosopher__examples=["why are we here"])
    chosen, _, _, evidence = decider.decide(turn("meaning of this error message"),
                                            config_labels(decider.config), threading.Event())
    assert evidence.label_scores["philosopher"] > evidence.label_scores["pragmatist"]  # "meaning" matches its label
    assert chosen == "pragmatist" and evidence.example_scores["pragmatist"] > 0.9
    assert evidence.nearest[0].text == "what is the meaning of this error"
    assert decider.describe().startswith("labels + 2 examples")


def test_an_uncertain_turn_goes_to_the_fallback(tmp_path: Path) -> None:
    decider = fake_decider(tmp_path, routing__min_confidence=0.9, routing__fallback="pragmatist")
    chosen, scores, fell_back, evidence = decider.decide(turn("the meaning"), config_labels(decider.config),
                                                         threading.Event())
    assert (chosen, fell_back, evidence.best) == ("pragmatist", True, "philosopher")
    assert scores["philosopher"] < 0.9 and "below 0.9 -> pragmatist" in decider.describe()


@pytest.mark.parametrize("fields,note", [
    ({"route_kind": "forced", "forced": True}, " (forced)"),
    ({"route_kind": "image_rule"}, " (image rule)"),
    ({"route_kind": "routed"}, ""),
    ({"route_kind": "routed", "fallback": True}, " (fallback: the router was unsure)"),
    ({"forced": True}, " (forced)"),  # an older coordinator sends no kind
])
def test_the_cli_names_how_a_specialist_was_chosen(fields: dict, note: str) -> None:
    done = DoneEvent(answer="", specialist="x", scores={}, timings={}, **fields)
    assert route_note(done) == note


def test_the_label_prior_is_ready_before_the_first_turn(tmp_path: Path) -> None:
    decider = fake_decider(tmp_path)
    key = tuple((label.name, label.description) for label in config_labels(decider.config))
    assert set(decider.priors) == {key}
    calls = []
    original = decider.model.classify
    decider.model.classify = lambda *args: calls.append(1) or original(*args)
    decider.decide(turn("meaning of life"), config_labels(decider.config), threading.Event())
    assert len(calls) == 1  # the turn itself; the content-free runs were done at startup
    assert fake_decider(tmp_path, routing__calibrate=False).priors == {}


def test_a_router_that_cannot_score_at_startup_computes_the_prior_on_the_first_turn(tmp_path: Path) -> None:
    config = parse_config(fake_config(tmp_path))
    model = load_model(config.router, LoadContext(service="router", physical_gpus=[], config=config))
    decider = RouteDecider(model, config)
    original = model.classify

    def unreachable(*args: object) -> dict:
        raise BackendError("the remote router is not up yet")

    model.classify = unreachable
    decider.prepare(threading.Event())
    assert decider.priors == {}
    model.classify = original
    chosen, _, _, _ = decider.decide(turn("meaning of life"), config_labels(config), threading.Event())
    assert chosen == "philosopher" and len(decider.priors) == 1


def test_the_artist_is_passed_over_when_the_turn_asks_for_no_picture() -> None:
    unless_unasked_picture = scoring.unless_unasked_picture
    pattern = RouterSettings().picture_request
    scores = {"artist": 0.83, "pragmatist": 0.1, "philosopher": 0.07}
    for text in ("Summarise this in one sentence: the meeting moved.", "What's a good name for my cat?",
                 "Rewrite this to sound friendlier."):
        assert unless_unasked_picture(scores, "artist", text, {"artist"}, pattern) == "pragmatist"
    for text in ("Draw a picture of my cat.", "Paint me a rainy street.", "Make an image of a fox.",
                 "Illustrate a knight fighting a dragon.", "I want a sketch of an owl."):
        assert unless_unasked_picture(scores, "artist", text, {"artist"}, pattern) == "artist"
    assert unless_unasked_picture(scores, "artist", "Summarise this.", {"artist"}, "") == "artist"  # rule off
