"""POST /v1/images/generations: one prompt through an artist specialist, the picture as `b64_json`."""

from __future__ import annotations

import base64
import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from services.gateway.errors import GatewayError, invalid
from services.gateway.openai_schema import ImageGenerationRequest, image_size, parse
from services.gateway.state import ClientLeft, Gateway, read_json, unless_client_leaves
from services.gateway.upstream import KEEPALIVE
from shared.wire.messages import DoneEvent


def _artist(gw: Gateway, model: str | None) -> str:
    """The artist specialist a model name picks; 404 when it is not an image model of this config."""
    if not gw.artists:
        raise GatewayError(404, "this stack has no image-generation specialist (a [specialists.*] entry with "
                           "kind = \"image_generation\")", code="model_not_found", param="model")
    if model in (None, "lyra"):
        return gw.artists[0]
    name = model.removeprefix("lyra/")
    if name not in gw.artists:
        raise GatewayError(404, f"the model {model!r} does not generate images; use one of "
                           f"{', '.join('lyra/' + a for a in gw.artists)}", code="model_not_found", param="model")
    return name


async def generate_image(gw: Gateway, request: Request) -> Response:
    """The route handler: the artist's picture and, as `revised_prompt`, the prompt the artist drew it from."""
    started = time.perf_counter()
    req: ImageGenerationRequest = parse(ImageGenerationRequest, await read_json(request, gw.max_body_bytes))
    if req.n not in (None, 1):
        raise invalid("n must be 1: Lyra makes one image per request", param="n")
    artist = _artist(gw, req.model)
    options = image_size(req.size)
    if req.seed is not None:
        options["seed"] = req.seed
    events = gw.upstream.stream(gw.settings.keepalive_s, text=req.prompt, specialist=artist,
                                timeout_s=gw.settings.request_timeout_s, **options)

    async def collect() -> DoneEvent | None:
        async for event in events:
            if event is not KEEPALIVE and isinstance(event, DoneEvent):
                return event
        return None

    try:
        done = await unless_client_leaves(collect(), request, events)
    except ClientLeft:
        gw.count("images", "disconnected", artist)
        return Response(status_code=499)
    if done is None or done.image is None:
        raise GatewayError(500, f"the artist {artist!r} finished without an image; see `lyra logs specialist_host`",
                           type="server_error", code="no_image")
    gw.metrics.observe_done(done.specialist, done.timings)
    gw.metrics.e2e.labels("images", artist).observe(time.perf_counter() - started)
    gw.count("images", "ok", artist)
    return JSONResponse({
        "created": int(time.time()),
        "data": [{"b64_json": base64.b64encode(done.image.data).decode(),
                  "revised_prompt": done.image.prompt or req.prompt}],
        "lyra": {"request_id": done.parent_id, "specialist": done.specialist, "timings": done.timings,
                 "mime": done.image.mime, "width": done.image.width, "height": done.image.height},
    })
