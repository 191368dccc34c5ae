"""The whole Lyra Runtime wire schema: every message any two processes exchange.

Every message is a msgpack map validated by one of the frozen pydantic models below. The ``type`` field
picks the model; ``id``/``parent_id``/``sent_at``/``v`` form the envelope. New fields must be optional;
removing or retyping a field bumps ``SCHEMA_MAJOR``. Only ``shared.wire.transport`` turns these into bytes.
"""

from __future__ import annotations

import time
import typing
import uuid
from enum import Enum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from shared.wire.names import WorkerName

SCHEMA_MAJOR = 1
SCHEMA_MINOR = 5  # 1.1: image error codes, estimates in registration, tickets
# 1.2: stage_restarted and progress events, the coordinator's instance id on client events, keepalive_s on
#      accepted, the stack secret on registration and client requests, coordinator_restarted/unauthorized,
#      stop strings in generation options, token usage on the voice's reply and the done event, swap records
#      (where each load came from, how long it took) in status
# 1.3: `truncated` on the specialist's and voice's replies and on the done event (a prompt cut to max_context),
#      `events` ("all" | "answer") on chat requests, the route's kind, fallback and evidence
# 1.4: the fields naming a service are typed as the worker names (shared/wire/names.py) they always carried
# 1.5: `prompt` on an image payload: the text an artist drew it from
SCHEMA_VERSION = f"{SCHEMA_MAJOR}.{SCHEMA_MINOR}"

Stage = Literal["route", "load", "specialist", "voice"]  # a request's stages, in order
STAGES: tuple[Stage, ...] = ("route", "load", "specialist", "voice")


def new_id() -> str:
    """A fresh message id (random, 32 hex characters)."""
    return uuid.uuid4().hex


class ErrorCode(str, Enum):  # noqa: UP042 (StrEnum would change what str() and f-strings of a code print)
    """Every error a process can put on the wire; each comes with a sentence a person can act on."""

    bad_message = "bad_message"  # not msgpack, not a map, or fields fail validation
    unknown_type = "unknown_type"  # a `type` this schema does not define
    schema_version = "schema_version"  # the peer speaks another major schema version
    too_large = "too_large"  # a frame over the socket's size limit
    invalid_request = "invalid_request"  # well formed but not acceptable (unknown specialist, bad options)
    busy = "busy"  # the request queue is full
    deadline = "deadline"  # a stage took longer than its deadline
    worker_dead = "worker_dead"  # a worker stopped heartbeating or restarted mid-request
    worker_missing = "worker_missing"  # a service the request needs has never registered
    worker_error = "worker_error"  # the worker raised while running the stage
    over_budget = "over_budget"  # the VRAM ledger refused a load
    image_unreadable = "image_unreadable"  # attached bytes are not an image
    image_truncated = "image_truncated"  # an image whose data ends early or is corrupt
    image_dimensions = "image_dimensions"  # zero, absurd or over-limit width/height
    image_too_large = "image_too_large"  # over the byte limit
    cancelled = "cancelled"  # the client cancelled or went away
    shutting_down = "shutting_down"  # the coordinator is draining
    coordinator_restarted = "coordinator_restarted"  # raised by the client: the coordinator restarted or went silent
    unauthorized = "unauthorized"  # a registration (or tcp client request) without the stack's secret
    internal = "internal"  # a bug: the log has the traceback


class Message(BaseModel):
    """Envelope shared by every message."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(default_factory=new_id)  # unique per message
    parent_id: str | None = None  # the request (or call) this message belongs to
    sent_at: float = Field(default_factory=time.time)  # sender's wall clock, seconds since the epoch
    v: str = SCHEMA_VERSION  # schema version "major.minor"; a different major is refused


# ---------------------------------------------------------------- shared value types


class Frozen(BaseModel):
    """Base for nested values: frozen, no unknown fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class ChatTurn(Frozen):
    """One turn of a conversation."""

    role: Literal["system", "user", "assistant"]
    content: str


class GenerationOptions(Frozen):
    """Per-request sampling overrides; unset fields take the model's configured defaults."""

    max_new_tokens: int | None = Field(default=None, ge=1, le=32768)
    temperature: float | None = Field(default=None, ge=0.0, le=5.0)  # 0 = greedy
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: list[Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(default=None, max_length=8)
    width: int | None = Field(default=None, ge=16, le=16384)  # image width; the artist's max_side applies
    height: int | None = Field(default=None, ge=16, le=16384)  # image height
    steps: int | None = Field(default=None, ge=1, le=1000)  # denoising steps; the artist's max_steps applies


class MemoryReading(Frozen):
    """Measured memory of one process on one device."""

    device: str  # "gpu:<physical index>" or "cpu"
    allocated_bytes: int = 0  # torch allocated (GPU) or RSS (CPU)
    reserved_bytes: int = 0  # torch reserved (GPU); equals allocated on CPU
    nvml_used_bytes: int | None = None  # this process's usage as NVML sees it, where available


class GpuSnapshot(Frozen):
    """One physical GPU's ledger line as the coordinator sees it."""

    gpu: int
    budget_bytes: int
    estimated_bytes: int  # sum of the ledger's estimates for what is resident
    measured_bytes: int | None  # sum of workers' measured usage, once reported
    resident: list[str]  # "service:model" entries occupying this GPU
    by_service: dict[str, dict[str, int]] = {}  # service -> {"estimated": bytes, "measured": bytes (if any)}


class RouteLabel(Frozen):
    """A candidate specialist as the router sees it."""

    name: str
    description: str


RouteKind = Literal["routed", "forced", "image_rule"]  # the router chose / the client chose / the turn had an image


class NearestExample(Frozen):
    """A configured example prompt close to the turn."""

    specialist: str
    text: str
    similarity: float  # cosine similarity of the two embeddings, -1 to 1


class RouteEvidence(Frozen):
    """What the router's decision rests on: each source of scores, and the examples nearest the turn."""

    label_scores: dict[str, float] = {}  # scoring the label names and descriptions (calibrated), sums to 1
    example_scores: dict[str, float] = {}  # similarity to each specialist's examples as probabilities; {} = none
    nearest: list[NearestExample] = []  # the closest examples, most similar first
    best: str = ""  # the highest combined score, whether or not it cleared min_confidence
    min_confidence: float = 0.0


class ImagePayload(Frozen):
    """An image travelling as msgpack binary."""

    data: bytes
    mime: str = "image/png"
    width: int | None = None
    height: int | None = None
    prompt: str | None = None  # the text prompt it was drawn from, when an artist drew it


# ---------------------------------------------------------------- client <-> coordinator


class ClientBound(Message):
    """Base of what the coordinator sends clients: stamped with the instance of the coordinator that sent it."""

    # A new value within one request means the coordinator restarted and the request is lost.
    coordinator: str | None = None


class ChatRequest(Message):
    """A user turn: a conversation (or plain text), an optional image, an optional forced specialist."""

    type: Literal["chat_request"] = "chat_request"
    messages: list[ChatTurn] | None = None  # the conversation; the last user turn is the one answered
    text: str | None = None  # shorthand for messages=[{"role": "user", "content": text}]
    image: bytes | None = None  # raw image file bytes (PNG/JPEG), never base64
    specialist: str | None = None  # force a specialist; skips the router
    options: GenerationOptions = GenerationOptions()
    secret: str | None = None  # the stack secret; required only on a tcp client endpoint
    # "all": every event; "answer": no stage started/finished events and only the voice's tokens (what a
    # caller that shows just the answer reads, at a third of the messages)
    events: Literal["all", "answer"] = "all"


class CancelRequest(Message):
    """Cancel a queued or running request (parent_id = the chat request's id)."""

    type: Literal["cancel_request"] = "cancel_request"
    secret: str | None = None  # as on ChatRequest


class StatusRequest(Message):
    """Ask the coordinator for its view of the stack."""

    type: Literal["status_request"] = "status_request"
    secret: str | None = None  # as on ChatRequest


class AcceptedEvent(ClientBound):
    """The request is valid and queued."""

    type: Literal["accepted_event"] = "accepted_event"
    position: int  # 0 = runs next (or now)
    queue_depth: int
    ticket: int | None = None  # acceptance order, increasing; requests run in ticket order (FIFO)
    keepalive_s: float | None = None  # until the terminal event, the coordinator sends something at least this often


class ProgressEvent(ClientBound):
    """Sent while a request waits or runs and nothing else was sent for `keepalive_s`: silence means trouble."""

    type: Literal["progress_event"] = "progress_event"
    position: int | None = None  # requests ahead of this one while it waits; None once it runs
    stage: Stage | None = None  # the stage running now, once it runs


class StageStartedEvent(ClientBound):
    """A stage of the pipeline began."""

    type: Literal["stage_started_event"] = "stage_started_event"
    stage: Stage
    service: WorkerName
    model: str | None = None


class StageFinishedEvent(ClientBound):
    """A stage of the pipeline ended successfully."""

    type: Literal["stage_finished_event"] = "stage_finished_event"
    stage: Stage
    service: WorkerName
    seconds: float
    model: str | None = None


class StageRestartedEvent(ClientBound):
    """A stage's worker died or restarted; the stage runs again, so drop the text it streamed so far."""

    type: Literal["stage_restarted_event"] = "stage_restarted_event"
    stage: Stage
    service: WorkerName
    attempt: int  # 1 for the first re-run
    reason: str  # what happened to the worker


class RouteEvent(ClientBound):
    """Which specialist handles the turn, and the router's probability for each."""

    type: Literal["route_event"] = "route_event"
    specialist: str
    scores: dict[str, float]  # the combined score per specialist (what the decision compared)
    forced: bool = False  # the client chose the specialist
    kind: RouteKind = "routed"
    fallback: bool = False  # the best score was below routing.min_confidence: routing.fallback got the turn
    evidence: RouteEvidence | None = None  # for kind "routed"


class TokenEvent(ClientBound):
    """A piece of streamed text (voice -> coordinator -> client, or a specialist's progress)."""

    type: Literal["token_event"] = "token_event"
    text: str
    stage: Literal["specialist", "voice"] = "voice"  # whose text: a specialist's or the voice's


class ImageEvent(ClientBound):
    """An image produced by the turn."""

    type: Literal["image_event"] = "image_event"
    image: ImagePayload


class DoneEvent(ClientBound):
    """The terminal success event of a chat request."""

    type: Literal["done_event"] = "done_event"
    answer: str
    specialist: str
    scores: dict[str, float]
    forced: bool = False  # the client chose the specialist
    route_kind: RouteKind | None = None  # as on the RouteEvent
    fallback: bool = False  # as on the RouteEvent
    specialist_output: str = ""
    timings: dict[str, float]  # seconds per stage, plus "queue" and "total"
    vram: list[GpuSnapshot] = []
    image: ImagePayload | None = None
    ticket: int | None = None
    usage: TokenUsage | None = None  # the voice's token counts: what the answer cost
    truncated: list[Truncation] | None = None  # prompts cut to a model's max_context, per stage; None: nothing cut


class ErrorEvent(ClientBound):
    """The terminal failure of a request, or the refusal of a malformed message."""

    type: Literal["error_event"] = "error_event"
    code: ErrorCode
    message: str  # a sentence a person can act on
    service: WorkerName | None = None  # the service at fault, when there is one
    stage: Stage | None = None
    queue_depth: int | None = None  # set on `busy`


class ServiceStatus(Frozen):
    """One worker as the coordinator sees it."""

    service: WorkerName
    state: Literal["up", "missing", "dead", "busy"]
    pid: int | None = None
    backend: str | None = None
    resident: list[str] = []
    last_seen_s: float | None = None  # seconds since its last message
    registrations: int = 0  # how often it registered (restarts + 1)
    memory: list[MemoryReading] = []
    placement: dict[str, str] = {}  # model -> resolved device map summary
    cached: dict[str, int] = {}  # host weight cache: model -> bytes


class StatusReply(ClientBound):
    """The coordinator's view of the stack."""

    type: Literal["status_reply"] = "status_reply"
    services: list[ServiceStatus]
    gpus: list[GpuSnapshot]
    queue_depth: int
    running: str | None  # id of the request in flight
    client_endpoint: str
    counters: dict[str, int] = {}
    config_path: str = ""
    swaps: list[SwapRecord] = []  # the most recent swaps, oldest first


# ---------------------------------------------------------------- coordinator <-> worker


class RegisterRequest(Message):
    """A worker's first message: who it is, what it can run, what it holds."""

    type: Literal["register_request"] = "register_request"
    service: str  # a WorkerName; any string decodes, so the coordinator refuses a stranger's with its own error
    schema_version: str = SCHEMA_VERSION
    pid: int
    instance: str  # unique per process start; a new value means the worker restarted
    backend: str
    capabilities: list[str]  # model names this worker can run
    resident: list[str]  # model names currently loaded
    memory: list[MemoryReading] = []
    placement: dict[str, str] = {}
    estimates: dict[str, dict[str, int]] = {}  # model -> {physical GPU index: estimated bytes}, from the checkpoint
    secret: str | None = None  # the stack secret (the 0600 file in the run directory); required by the coordinator


class RegisterReply(Message):
    """The coordinator accepted a registration."""

    type: Literal["register_reply"] = "register_reply"
    heartbeat_interval_s: float


class HeartbeatEvent(Message):
    """A worker is alive; carries what it holds and whether it is working."""

    type: Literal["heartbeat_event"] = "heartbeat_event"
    instance: str
    resident: list[str]
    busy_with: str | None = None  # id of the call in progress
    memory: list[MemoryReading] = []
    cached: dict[str, int] = {}  # model -> bytes held in the host weight cache (specialist host)


class ClassifyRequest(Message):
    """Router: pick one of `labels` for the conversation."""

    type: Literal["classify_request"] = "classify_request"
    messages: list[ChatTurn]
    labels: list[RouteLabel]


class ClassifyReply(Message):
    """Router's choice and a probability per label (summing to 1)."""

    type: Literal["classify_reply"] = "classify_reply"
    specialist: str
    scores: dict[str, float]
    fallback: bool = False  # no score reached routing.min_confidence; `specialist` is routing.fallback
    evidence: RouteEvidence | None = None


class LoadRequest(Message):
    """Specialist host: make `model` resident."""

    type: Literal["load_request"] = "load_request"
    model: str


class UnloadRequest(Message):
    """Specialist host: free `model`."""

    type: Literal["unload_request"] = "unload_request"
    model: str


class LoadReply(Message):
    """What is resident after a load or unload, with measured memory."""

    type: Literal["load_reply"] = "load_reply"
    model: str
    resident: list[str]
    seconds: float
    memory: list[MemoryReading] = []
    placement: dict[str, str] = {}
    source: Literal["resident", "host_cache", "checkpoint"] | None = None  # where a load came from


class SwapRecord(Frozen):
    """One specialist swap the coordinator made: what left, what came, from where, and how long it took."""

    seq: int  # 1, 2, ... since the coordinator started: a reader takes the records past the last it saw
    unloaded: str | None  # the specialist that was resident before, if any
    loaded: str
    source: Literal["host_cache", "checkpoint", "unknown"]
    seconds: float  # the whole load stage: unload, load, and the decode engine getting ready


class RunSpecialistRequest(Message):
    """Specialist host: run the resident `model` on the turn."""

    type: Literal["run_specialist_request"] = "run_specialist_request"
    model: str
    messages: list[ChatTurn]
    image: bytes | None = None
    options: GenerationOptions = GenerationOptions()


class SpecialistReply(Message):
    """A specialist's output: text, and an image for the artist."""

    type: Literal["specialist_reply"] = "specialist_reply"
    model: str
    text: str
    image: ImagePayload | None = None
    truncated: Truncation | None = None  # set when the specialist's prompt was cut to fit its max_context


class SynthesizeRequest(Message):
    """Voice: answer as Lyra, given the conversation and the specialist's output."""

    type: Literal["synthesize_request"] = "synthesize_request"
    messages: list[ChatTurn]
    specialist: str
    specialist_output: str
    options: GenerationOptions = GenerationOptions()


class TokenUsage(Frozen):
    """Tokens a model read and wrote for one reply, and why the reply ended."""

    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    finish_reason: Literal["stop", "length"] = "stop"  # "length": max_new_tokens cut the reply


class Truncation(Frozen):
    """A prompt cut from the left to fit the model's max_context (the newest turns are kept)."""

    stage: Literal["specialist", "voice"]
    model: str
    prompt_tokens: int = Field(ge=0)  # the whole composed prompt
    kept_tokens: int = Field(ge=0)  # what the model read: its last tokens
    max_context: int = Field(ge=0)


class SynthesizeReply(Message):
    """Voice's whole answer (its tokens were streamed before it)."""

    type: Literal["synthesize_reply"] = "synthesize_reply"
    text: str
    usage: TokenUsage | None = None  # the voice model's token counts, where its backend counts tokens
    truncated: Truncation | None = None  # set when the voice's prompt was cut to fit its max_context


class CancelCallRequest(Message):
    """Coordinator -> worker: stop the call `parent_id` as soon as possible."""

    type: Literal["cancel_call_request"] = "cancel_call_request"


class WorkerError(Message):
    """A worker could not do what was asked (parent_id = the call)."""

    type: Literal["worker_error"] = "worker_error"
    code: ErrorCode
    message: str
    service: WorkerName


AnyMessage = Annotated[
    (
        ChatRequest | CancelRequest | StatusRequest | AcceptedEvent | ProgressEvent | StageStartedEvent
        | StageFinishedEvent | StageRestartedEvent | RouteEvent | TokenEvent | ImageEvent | DoneEvent | ErrorEvent
        | StatusReply | RegisterRequest | RegisterReply | HeartbeatEvent | ClassifyRequest | ClassifyReply
        | LoadRequest | UnloadRequest | LoadReply | RunSpecialistRequest | SpecialistReply | SynthesizeRequest
        | SynthesizeReply | CancelCallRequest | WorkerError
    ),
    Field(discriminator="type"),
]

MESSAGE_ADAPTER: TypeAdapter[Message] = TypeAdapter(AnyMessage)

MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.model_fields["type"].default: cls for cls in typing.get_args(typing.get_args(AnyMessage)[0])
}

TERMINAL_TYPES = (DoneEvent, ErrorEvent)


def _check_schema() -> None:
    """Every wire class derives from Message and names itself by a suffix the style guide allows."""
    for name, cls in MESSAGE_TYPES.items():
        assert issubclass(cls, Message), name
        assert cls.__name__.endswith(("Request", "Reply", "Event", "Error")), cls.__name__


_check_schema()
