"""The OpenAI request bodies the gateway accepts, validated, and their translation into a Lyra request.

Every field OpenAI defines that we cannot honour is refused with a 400 that names it (a request that asks
for a tool call or a logit bias must not quietly get something else). A field left at its neutral value
(null, or e.g. `presence_penalty: 0`) asks for nothing, so it passes: many clients send those by habit.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.gateway.errors import GatewayError, invalid

# Fields a request may carry at these values (or null) although we implement nothing for them.
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logprobs": (False,), "parallel_tool_calls": (),
    "store": (False,), "metadata": ({},), "tool_choice": ("none",), "tools": ([],), "stream_options": (),
    "quality": ("auto", "standard"), "style": (), "background": ("auto",), "moderation": ("auto",),
}


class Strict(BaseModel):
    """Unknown fields are refused (by `check_fields` first, with a friendlier message)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ImageUrl(Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ContentPart(Strict):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageUrl | None = None


class ChatMessageIn(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]


class StreamOptions(Strict):
    include_usage: bool = False


class ChatCompletionRequest(Strict):
    """POST /v1/chat/completions, as far as Lyra implements it."""

    model: str
    messages: list[ChatMessageIn] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=32768)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=32768)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    n: int | None = None
    user: str | None = Field(default=None, max_length=512)  # logged with the request id, nothing else


class ImageGenerationRequest(Strict):
    """POST /v1/images/generations through the artist."""

    prompt: str = Field(min_length=1, max_length=32000)
    model: str | None = None
    n: int | None = None
    size: str | None = None  # "WIDTHxHEIGHT" or "auto"
    response_format: Literal["b64_json"] | None = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    user: str | None = Field(default=None, max_length=512)


def parse(model: type[Strict], body: Any) -> Any:
    """Validate a JSON body against `model`; a 400 naming the first bad or unsupported field."""
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    fields = model.model_fields
    for key, value in body.items():
        if key not in fields and not (value is None or value in NEUTRAL.get(key, ())):
            raise invalid(f"field {key!r} is not supported by Lyra's gateway; remove it (supported: "
                          f"{', '.join(fields)})", param=key, code="unsupported_field")
    try:
        return model.model_validate({k: v for k, v in body.items() if k in fields})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise invalid(f"{where}: {first['msg']}", param=where) from None


def decode_data_url(url: str, param: str) -> bytes:
    """The bytes of a `data:<mime>;base64,...` URL; other URLs are refused (the gateway fetches nothing)."""
    if not url.startswith("data:"):
        raise invalid("image_url must be a data: URL (data:image/png;base64,...); the gateway does not fetch "
                      "remote images", param=param)
    header, _, payload = url.partition(",")
    if not header.endswith(";base64"):
        raise invalid("image_url data: URLs must be base64-encoded", param=param)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise invalid("image_url carries invalid base64", param=param) from None


def to_turns(messages: list[ChatMessageIn]) -> tuple[list[dict[str, str]], bytes | None]:
    """Lyra turns (role, text) and the one attached image."""
    turns: list[dict[str, str]] = []
    image: bytes | None = None
    for i, msg in enumerate(messages):
        role = "system" if msg.role == "developer" else msg.role
        if isinstance(msg.content, str):
            turns.append({"role": role, "content": msg.content})
            continue
        texts = []
        for j, part in enumerate(msg.content):
            where = f"messages.{i}.content.{j}"
            if part.type == "text":
                if part.text is None:
                    raise invalid("a text content part needs `text`", param=where)
                texts.append(part.text)
            elif part.image_url is None:
                raise invalid("an image_url content part needs `image_url`", param=where)
            elif image is not None:
                raise invalid("Lyra takes one image per request; this one carries more", param=where)
            elif role != "user":
                raise invalid("only user messages may carry an image", param=where)
            else:
                image = decode_data_url(part.image_url.url, where + ".image_url.url")
        turns.append({"role": role, "content": "\n".join(texts)})
    return turns, image


def generation_options(req: ChatCompletionRequest) -> dict[str, Any]:
    """GenerationOptions fields for a chat request."""
    if req.n not in (None, 1):
        raise invalid("n must be 1: Lyra answers each request once", param="n")
    if req.max_tokens is not None and req.max_completion_tokens is not None \
            and req.max_tokens != req.max_completion_tokens:
        raise invalid("max_tokens and max_completion_tokens disagree; send one", param="max_completion_tokens")
    stop = [req.stop] if isinstance(req.stop, str) else req.stop
    if stop is not None and (len(stop) > 4 or any(not s or len(s) > 256 for s in stop)):
        raise invalid("stop takes up to 4 non-empty strings of at most 256 characters", param="stop")
    options = {"max_new_tokens": req.max_completion_tokens or req.max_tokens, "temperature": req.temperature,
               "top_p": req.top_p, "seed": req.seed, "stop": stop or None}
    return {k: v for k, v in options.items() if v is not None}


def image_size(size: str | None) -> dict[str, int]:
    """width/height options from OpenAI's "WxH" (or "auto"/None: the artist's defaults)."""
    if size in (None, "auto"):
        return {}
    width, sep, height = size.partition("x")
    if not (sep and width.isdigit() and height.isdigit()) or not (16 <= int(width) <= 16384) \
            or not (16 <= int(height) <= 16384):
        raise invalid("size must be WIDTHxHEIGHT in pixels (16 to 16384 each) or \"auto\"", param="size")
    return {"width": int(width), "height": int(height)}


def resolve_model(name: str, specialists: list[str]) -> str | None:
    """The forced specialist for a model name ("lyra" -> None: the router decides); 404 when unknown."""
    if name == "lyra":
        return None
    prefix, _, specialist = name.partition("/")
    if prefix == "lyra" and specialist in specialists:
        return specialist
    raise GatewayError(404, f"the model {name!r} does not exist; use \"lyra\" or one of "
                       f"{', '.join('lyra/' + s for s in specialists)} (GET /v1/models lists them)",
                       code="model_not_found", param="model")
