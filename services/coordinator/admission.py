"""What a chat request may ask for, decided before it is queued: no stage runs for a request that cannot.

The wire schema bounds every option by its own range (`GenerationOptions`: a temperature of 1e9 or NaN, a
top_p of 5, a height of 0 or a negative seed do not even decode, and the transport answers them
`invalid_request`). Here each option is bounded by the models the request can reach, so an absurd value
is refused at once with `invalid_request` and a sentence saying what to ask for instead, rather than after
a route and a swap, or by holding the pipeline until a stage's deadline:

- `max_new_tokens`: at most the `max_context` of every text model that may write the reply's tokens (the
  voice always; the specialist the request is forced to, or each one the router may choose);
- `width` and `height`: at most the `image.max_side` of every artist the request may reach; `steps` at
  most their `image.max_steps`;
- the envelope's `sent_at` must be a finite number (the only float the schema leaves unbounded).
"""

from __future__ import annotations

import math

from shared.config.schema import LyraConfig, ModelEntry
from shared.wire.messages import ChatRequest

TEXT_KINDS = ("causal_lm", "vision_language")


def reachable(config: LyraConfig, msg: ChatRequest) -> list[str]:
    """The specialists that may run this request: the forced one, the image rule's, or any the router may pick."""
    if msg.specialist:
        return [msg.specialist]
    if msg.image is not None and config.routing.image_specialist:
        return [config.routing.image_specialist]
    names = [name for name, entry in config.specialists.items() if entry.routable]
    if config.routing.fallback and config.routing.fallback not in names:
        names.append(config.routing.fallback)
    return names


def _may(name: str, forced: bool) -> str:
    """How a sentence names the specialist a limit comes from."""
    return name if forced else f"{name} (which the router may choose)"


def option_problem(config: LyraConfig, msg: ChatRequest) -> str | None:
    """Why the request's options (or envelope) cannot be served by the models it may reach, or None."""
    if not math.isfinite(msg.sent_at):
        return f"sent_at must be a finite number of seconds since the epoch, not {msg.sent_at}"
    options, forced = msg.options, bool(msg.specialist)
    specialists: dict[str, ModelEntry] = {name: config.specialists[name] for name in reachable(config, msg)}
    if options.max_new_tokens is not None:
        writers = [(f"the voice ({config.voice.name})", config.voice)] + [
            (f"the specialist {_may(name, forced)}", entry) for name, entry in specialists.items()
            if entry.kind in TEXT_KINDS]
        who, entry = min(writers, key=lambda pair: pair[1].max_context)
        if options.max_new_tokens > entry.max_context:
            return (f"options.max_new_tokens is {options.max_new_tokens}, more than {who} can write: its max_context "
                    f"is {entry.max_context} tokens; ask for at most {entry.max_context}")
    artists = {name: entry for name, entry in specialists.items() if entry.kind == "image_generation"}
    if not artists:
        return None  # no model the request may reach draws: the image options are unused
    for field in ("width", "height"):
        value = getattr(options, field)
        name, entry = min(artists.items(), key=lambda pair: pair[1].image.max_side)
        if value is not None and value > entry.image.max_side:
            return (f"options.{field} is {value} px; the artist {_may(name, forced)} draws at most "
                    f"{entry.image.max_side} px a side (image.max_side)")
    name, entry = min(artists.items(), key=lambda pair: pair[1].image.max_steps)
    if options.steps is not None and options.steps > entry.image.max_steps:
        return (f"options.steps is {options.steps}; the artist {_may(name, forced)} allows at most "
                f"{entry.image.max_steps} (image.max_steps)")
    return None
