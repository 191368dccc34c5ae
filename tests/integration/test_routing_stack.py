"""Route kinds, examples, the threshold and the fallback through the real coordinator and router processes."""

from __future__ import annotations

from shared.wire.messages import DoneEvent, RouteEvent


def png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 20, 20)).save(buf, format="PNG")
    return buf.getvalue()


def route_and_done(client, text: str, **kwargs) -> tuple[RouteEvent, DoneEvent]:
    events = list(client.stream(text, **kwargs))
    route = next(e for e in events if isinstance(e, RouteEvent))
    done = events[-1]
    assert isinstance(done, DoneEvent)
    return route, done


def test_routed_forced_and_image_rule_are_told_apart(make_stack) -> None:
    stack = make_stack(specialists__perception={"backend": "fake", "memory_gb": 1.0, "kind": "vision_language",
                                                "routable": False}, routing__image_specialist="perception")
    with stack.client() as client:
        routed, routed_done = route_and_done(client, "meaning of life")
        forced, forced_done = route_and_done(client, "meaning of life", specialist="pragmatist")
        by_image, image_done = route_and_done(client, "what is this", image=png())
    assert (routed.kind, routed.forced, routed.specialist) == ("routed", False, "philosopher")
    assert routed.evidence is not None and routed.evidence.label_scores and routed.evidence.best == "philosopher"
    assert (forced.kind, forced.forced, forced.evidence) == ("forced", True, None)
    assert (by_image.kind, by_image.forced, by_image.specialist) == ("image_rule", False, "perception")
    assert [d.route_kind for d in (routed_done, forced_done, image_done)] == ["routed", "forced", "image_rule"]
    assert [d.forced for d in (routed_done, forced_done, image_done)] == [False, True, False]


def test_examples_decide_and_an_uncertain_turn_goes_to_the_fallback(make_stack) -> None:
    stack = make_stack(specialists__pragmatist__examples=["what does this error mean", "fix my bike chain"],
                       specialists__philosopher__examples=["why do we exist at all"],
                       routing__min_confidence=0.8, routing__fallback="pragmatist")
    with stack.client() as client:
        sure, sure_done = route_and_done(client, "why do we exist")
        unsure, unsure_done = route_and_done(client, "tell me something")
        status = client.status(timeout_s=5)
    assert (sure.specialist, sure.fallback) == ("philosopher", False)
    assert sure.evidence.nearest[0].text == "why do we exist at all"
    assert sure.evidence.example_scores["philosopher"] > 0.9 and not sure_done.fallback
    assert (unsure.specialist, unsure.fallback, unsure.kind) == ("pragmatist", True, "routed")
    assert max(unsure.scores.values()) < 0.8 and unsure.evidence.min_confidence == 0.8
    assert unsure_done.fallback and unsure_done.specialist == "pragmatist"
    router = next(s for s in status.services if s.service == "router")
    assert router.placement["routing"] == "labels + 3 examples (weight 0.7); below 0.8 -> pragmatist"
