"""The `openai` backend: a text model served by any OpenAI-compatible server (vLLM, SGLang, TGI, Ollama, ...).

The worker process stays where it is (router, specialist host or voice) and forwards each call through the
`openai` package's async client: replies stream back piece by piece as the server sends them. Nothing is
loaded here, so the model takes no local memory. Every failure of the server becomes one typed `RemoteError`
naming the URL (`openai_wire`). A cancel closes the HTTP stream at once: each call runs as an asyncio task on
this model's own event loop thread, which the call's thread waits on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import queue
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import openai
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from shared.config.schema import ModelEntry
from shared.config.secrets import MissingApiKey, api_key_from_env
from shared.engine.cancel import Cancelled
from shared.models.base import BackendError, LoadContext, LoadedModel, generation_settings, render_template
from shared.models.openai_wire import (
    RETRIED_STATUSES,
    RemoteError,
    RemoteModelMissing,
    RemoteServerError,
    RemoteStreamCut,
    backoff_s,
    remote_error,
)
from shared.wire.messages import ChatTurn, GenerationOptions, MemoryReading, RouteLabel

log = logging.getLogger(__name__)

T = TypeVar("T")
WAIT_SLICE_S = 0.05  # how often a waiting call looks at its cancel flag
TOP_LOGPROBS = 20  # alternatives asked for when the router scores labels by the first token
ROUTE_REPLY_TOKENS = 16  # room for a label name when the router asks the server to name one
NO_KEY = "no-key"  # the client insists on a key; with none set, its Authorization header is left out instead


# ---------------------------------------------------------------- the event loop the HTTP calls run on


class LoopThread:
    """One asyncio loop on a daemon thread; sync callers run coroutines on it and can abort them."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=f"remote-{name}", daemon=True)
        self.thread.start()

    def submit(self, coro: Awaitable[T]) -> concurrent.futures.Future[T]:
        """Start `coro` on the loop."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]

    def wait(self, future: concurrent.futures.Future[T], cancel: threading.Event | None) -> T:
        """The coroutine's result; a cancel aborts it (its HTTP request is closed) and raises Cancelled."""
        while True:
            if cancel is not None and cancel.is_set():
                future.cancel()
                raise Cancelled()
            try:
                return future.result(timeout=WAIT_SLICE_S)
            except concurrent.futures.TimeoutError:
                continue

    def stop(self) -> None:
        """Stop the loop and let its thread end."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=2)


# ---------------------------------------------------------------- the model


class RemoteModel(LoadedModel):
    """A model served elsewhere: calls go to `remote.base_url` as OpenAI chat completions."""

    def __init__(self, entry: ModelEntry, context: LoadContext) -> None:
        self.entry = entry
        self.settings = entry.remote
        self.context = context
        self.api_key = _api_key(entry)
        self.loop = LoopThread(entry.name)
        self.client = self.loop.wait(self.loop.submit(self._connect()), None)
        self.usage: tuple[int, int, str] | None = None
        self.logprobs_offered: bool | None = {"on": True, "off": False}.get(self.settings.logprobs)

    async def _connect(self) -> openai.AsyncOpenAI:
        # Re-sends are ours (`_call`): the package's own back-off cannot take remote.backoff_s and max_backoff_s.
        # Proxy variables are ignored: the server is usually on the same network.
        return openai.AsyncOpenAI(api_key=self.api_key or NO_KEY, base_url=self.settings.base_url, max_retries=0,
                                  http_client=openai.DefaultAsyncHttpxClient(trust_env=False))

    # ------------------------------------------------------------ LoadedModel

    def memory(self) -> list[MemoryReading]:
        """Nothing here: the weights live on the server (the ledger counts zero local bytes)."""
        return []

    def placement(self) -> dict[str, str]:
        return {self.entry.name: f"remote {self.settings.base_url} ({self.settings.model})"}

    def engine_kind(self) -> str:
        return "remote"

    def unload(self) -> None:
        """Close the HTTP connections and the loop thread."""
        try:
            self.loop.wait(self.loop.submit(self.client.close()), None)
        finally:
            self.loop.stop()

    def last_usage(self) -> tuple[int, int, str] | None:
        """The server's own token counts of the last reply (when it sent them)."""
        return self.usage

    # ------------------------------------------------------------ health

    def check_health(self, cancel: threading.Event | None = None) -> list[str]:
        """GET /v1/models: the model ids the server offers; raises a RemoteError when it cannot answer."""
        page = self.loop.wait(self.loop.submit(self._call(
            lambda: self.client.models.list(**self._sent_with()), "GET /models")), cancel)
        ids = [str(model.id) for model in page.data]
        if self.settings.model not in ids:
            offered = ", ".join(ids[:10]) or "none"
            raise RemoteModelMissing(f"{self.settings.base_url} does not serve {self.settings.model!r} (it offers: "
                                     f"{offered}); set remote.model to one of them")
        return ids

    # ------------------------------------------------------------ requests

    def _sent_with(self) -> dict[str, Any]:
        """Each request's timeouts and headers, from the settings as they are now."""
        # The package fills the key, organisation and project from OPENAI_* variables meant for api.openai.com;
        # none of them may reach another server, so each of those headers is ours or left out.
        headers: dict[str, Any] = {"OpenAI-Organization": openai.Omit(), "OpenAI-Project": openai.Omit()}
        if not self.api_key:
            headers["Authorization"] = openai.Omit()
        timeout = openai.Timeout(self.settings.read_timeout_s, connect=self.settings.connect_timeout_s)
        return {"timeout": timeout, "extra_headers": headers}

    async def _call(self, send: Callable[[], Awaitable[T]], what: str) -> T:
        """`send()`, re-sent after a 429, 502, 503 or 504 with back-off (Retry-After wins); a RemoteError else."""
        settings = self.settings
        for attempt in range(settings.retries + 1):
            try:
                return await send()
            except openai.APIStatusError as exc:
                if exc.status_code not in RETRIED_STATUSES or attempt == settings.retries:
                    raise remote_error(settings, exc, what) from None
                pause = backoff_s(settings, attempt, exc.response.headers.get("retry-after"))
                log.warning("%s: %s answered %d to %s; retry %d of %d in %.2f s", self.entry.name,
                            settings.base_url, exc.status_code, what, attempt + 1, settings.retries, pause)
                await asyncio.sleep(pause)
            except openai.OpenAIError as exc:
                raise remote_error(settings, exc, what) from None
        raise AssertionError("unreachable")  # the loop returns or raises

    async def _stream(self, body: dict[str, Any], state: ReplyState) -> AsyncIterator[str]:
        """Text pieces of one streamed chat completion, as the server sends them."""
        what = f"the {self.entry.name} reply"
        stream = await self._call(
            lambda: self.client.chat.completions.create(**body, stream=True, **self._sent_with()), what)
        started = False
        try:
            async with stream:  # closes the HTTP response however the loop ends: a cancel included
                async for chunk in stream:
                    piece = _read_chunk(chunk, state)
                    if piece:
                        started = True
                        yield piece
        except openai.OpenAIError as exc:
            raise remote_error(self.settings, exc, what, started) from None
        except ValueError:  # a `data:` line that is not JSON
            raise RemoteStreamCut(f"{self.settings.base_url} sent a stream chunk that is not JSON during {what}") \
                from None
        if not state.finish_reason:
            raise RemoteStreamCut(f"the stream from {self.settings.base_url} ended before the server finished "
                                  f"{what} (no finish_reason)")

    async def _complete(self, body: dict[str, Any], what: str) -> ChatCompletion:
        """One chat completion, not streamed (the router's short replies)."""
        return await self._call(lambda: self.client.chat.completions.create(**body, **self._sent_with()), what)

    def _body(self, messages: list[ChatTurn], options: GenerationOptions, **extra: Any) -> dict[str, Any]:
        settings = generation_settings(self.entry.generation, options)
        body: dict[str, Any] = {
            "model": self.settings.model, "messages": [{"role": t.role, "content": t.content} for t in messages],
            "max_tokens": settings["max_new_tokens"], "temperature": settings["temperature"],
            "top_p": settings["top_p"], **extra,
        }
        if settings["seed"] is not None:
            body["seed"] = settings["seed"]
        if settings["stop"]:
            body["stop"] = list(settings["stop"])
        return body

    def generate(self, messages: list[ChatTurn], options: GenerationOptions,
                 cancel: threading.Event) -> Iterator[str]:
        """Stream the server's reply piece by piece; a cancel closes the HTTP stream."""
        state = ReplyState()
        body = self._body(messages, options, stream_options={"include_usage": True})
        yield from self._pieces(self._stream(body, state), cancel)
        self.usage = (state.prompt_tokens, state.completion_tokens,
                      "length" if state.finish_reason == "length" else "stop")

    def _pieces(self, stream: AsyncIterator[str], cancel: threading.Event) -> Iterator[str]:
        """Carry an async stream's items to this thread through a queue, aborting it on cancel or early exit."""
        handoff: queue.Queue[tuple[str, Any]] = queue.Queue()

        async def pump() -> None:
            try:
                async for piece in stream:
                    handoff.put(("piece", piece))
                handoff.put(("end", None))
            except BaseException as exc:  # CancelledError included: the consumer must always hear an ending
                handoff.put(("error", exc))
                raise

        future = self.loop.submit(pump())
        try:
            while True:
                if cancel.is_set():
                    raise Cancelled()
                try:
                    kind, value = handoff.get(timeout=WAIT_SLICE_S)
                except queue.Empty:
                    continue
                if kind == "end":
                    return
                if kind == "error":
                    raise value if isinstance(value, RemoteError) else RemoteStreamCut(
                        f"the stream from {self.settings.base_url} failed: {type(value).__name__}: {value}")
                yield value
        finally:
            future.cancel()

    # ------------------------------------------------------------ router

    def classify(self, messages: list[ChatTurn], labels: list[RouteLabel], template: str,
                 cancel: threading.Event) -> dict[str, float]:
        """Probability per label: from the first token's logprobs when the server offers them, else from the
        label the server names in a short greedy reply (all the probability on it)."""
        prompt = self._route_prompt(messages, labels, template)
        if self.logprobs_offered is not False:
            scores = self._logprob_scores(prompt, labels, cancel)
            if scores is not None:
                return scores
        return self._named_scores(prompt, labels, cancel)

    def _route_prompt(self, messages: list[ChatTurn], labels: list[RouteLabel], template: str) -> list[ChatTurn]:
        text = next((turn.content for turn in reversed(messages) if turn.role == "user"), "")
        listing = "\n".join(f"- {label.name}: {label.description}" for label in labels)
        system = [ChatTurn(role="system", content=self.entry.system_prompt)] if self.entry.system_prompt else []
        return [*system, ChatTurn(role="user", content=render_template(template, listing, text))]

    def _logprob_scores(self, prompt: list[ChatTurn], labels: list[RouteLabel],
                        cancel: threading.Event) -> dict[str, float] | None:
        body = self._body(prompt, GenerationOptions(max_new_tokens=1, temperature=0.0),
                          logprobs=True, top_logprobs=TOP_LOGPROBS)
        try:
            reply = self.loop.wait(self.loop.submit(self._complete(body, "routing")), cancel)
        except RemoteServerError as exc:
            if self.logprobs_offered:  # "on": the operator said the server has them
                raise
            log.info("%s: the server refused logprobs (%s); routing by the label it names", self.entry.name, exc)
            self.logprobs_offered = False
            return None
        top = _top_logprobs(reply)
        if top is None:
            if self.logprobs_offered:
                raise RemoteServerError(f"{self.settings.base_url} returned no logprobs (remote.logprobs = 'on')")
            log.info("%s: the server returns no logprobs; routing by the label it names", self.entry.name)
            self.logprobs_offered = False
            return None
        self.logprobs_offered = True
        return label_probabilities_from_logprobs(top, [label.name for label in labels])

    def _named_scores(self, prompt: list[ChatTurn], labels: list[RouteLabel],
                      cancel: threading.Event) -> dict[str, float]:
        body = self._body(prompt, GenerationOptions(max_new_tokens=ROUTE_REPLY_TOKENS, temperature=0.0))
        reply = self.loop.wait(self.loop.submit(self._complete(body, "routing")), cancel)
        text = str(_attribute(reply, "choices", 0, "message", "content") or "")
        scores = label_probabilities_from_text(text, [label.name for label in labels])
        if len(set(scores.values())) == 1:
            log.warning("%s: the routing reply names no specialist (%d characters); every label scores the same",
                        self.entry.name, len(text))
        return scores


@dataclass
class ReplyState:
    """What a streamed reply told us besides the text: how it ended and the server's token counts."""

    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


def _read_chunk(chunk: ChatCompletionChunk, state: ReplyState) -> str | None:
    """The text piece of one streamed chunk (None when it carries none); notes its usage and finish reason."""
    state.prompt_tokens = _attribute(chunk, "usage", "prompt_tokens") or state.prompt_tokens
    state.completion_tokens = _attribute(chunk, "usage", "completion_tokens") or state.completion_tokens
    state.finish_reason = _attribute(chunk, "choices", 0, "finish_reason") or state.finish_reason
    return _attribute(chunk, "choices", 0, "delta", "content") or None


def _top_logprobs(reply: ChatCompletion) -> list[tuple[str, float]] | None:
    """The first generated token's alternatives (token, logprob), or None when the server sent none."""
    top = _attribute(reply, "choices", 0, "logprobs", "content", 0, "top_logprobs") or []
    return [(str(item.token), float(item.logprob)) for item in top] or None


def _attribute(value: Any, *path: str | int) -> Any:
    """`value.a[0].b...`, or None where a server left a part out (the package does not check replies)."""
    for step in path:
        try:
            value = value[step] if isinstance(step, int) else getattr(value, step)
        except (AttributeError, IndexError, TypeError):
            return None
    return value


def label_probabilities_from_logprobs(top: list[tuple[str, float]], names: list[str]) -> dict[str, float]:
    """Softmax over labels of the probability mass of first tokens that begin each label's name.

    `top`: (token, logprob) of the first token's alternatives. A token counts for a label when, stripped and
    lower-cased, it is a non-empty prefix of the name ("phil" for "philosopher"). Labels no listed token begins
    get the smallest listed logprob minus 10.
    """
    floor = min((logprob for _, logprob in top), default=0.0) - 10.0
    masses: dict[str, float] = {}
    for name in names:
        found = [logprob for token, logprob in top if _begins(token, name)]
        masses[name] = _logsumexp(found) if found else floor
    return _softmax(masses)


def label_probabilities_from_text(text: str, names: list[str]) -> dict[str, float]:
    """All the probability on the label named earliest in `text` (case-insensitive); equal when none is."""
    lowered = text.lower()
    positions = {name: lowered.find(name.lower()) for name in names}
    named = [name for name, at in positions.items() if at >= 0]
    if not named:
        return {name: 1.0 / len(names) for name in names}
    first = min(named, key=positions.__getitem__)
    return {name: 1.0 if name == first else 0.0 for name in names}


def _begins(token: str, name: str) -> bool:
    piece = token.strip().lower()
    return bool(piece) and name.lower().startswith(piece)


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def _softmax(logits: dict[str, float]) -> dict[str, float]:
    top = max(logits.values())
    weights = {name: math.exp(v - top) for name, v in logits.items()}
    total = sum(weights.values())
    return {name: w / total for name, w in weights.items()}


def _api_key(entry: ModelEntry) -> str | None:
    """The Bearer key from the variable `remote.api_key_env` names (never from the config file)."""
    try:
        return api_key_from_env(entry.remote.api_key_env, "remote.api_key_env")
    except MissingApiKey as exc:
        raise BackendError(f"model {entry.name!r}: {exc} in this service's environment") from None


def load(entry: ModelEntry, context: LoadContext) -> RemoteModel:
    """Backend entry point: connect, check the server's health and that it serves the model."""
    model = RemoteModel(entry, context)
    try:
        offered = model.check_health()
    except BaseException:
        model.unload()
        raise
    log.info("%s runs remotely at %s as %r (the server offers %d model(s))", entry.name, entry.remote.base_url,
             entry.remote.model, len(offered))
    return model

