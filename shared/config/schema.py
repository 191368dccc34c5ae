"""One TOML file -> a validated Lyra Runtime configuration.

Every process reads the same file (supervisord passes its path in ``LYRA_CONFIG``). A bad file fails with
one `ConfigError` that names the file and the offending field.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shared.config.paths import default_keys_dir, default_run_dir
from shared.config.problems import describe
from shared.config.units import MB
from shared.wire.names import ROUTER, SPECIALIST_HOST, VOICE, WORKER_SERVICES

NETWORK_HEARTBEAT_TIMEOUT_S = 10.0  # heartbeat_timeout_s's default when workers connect over a network


class ConfigError(Exception):
    """The configuration file is missing, unreadable or invalid; the message says where and why."""


class Section(BaseModel):
    """Base for config sections: unknown keys are errors (they are usually typos)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class RuntimeSettings(Section):
    """Where the stack lives and how its processes talk."""

    run_dir: str = ""  # default: $XDG_RUNTIME_DIR/lyra or /tmp/lyra-<uid>
    client_endpoint: str = ""  # default: ipc://<run_dir>/client.sock
    worker_endpoint: str = ""  # default: ipc://<run_dir>/workers.sock
    allow_remote: bool = False  # tcp endpoints must be loopback unless this is true
    # "secret": every worker registration (and every client request on a tcp client endpoint) carries the
    # stack secret; "none" only with ipc endpoints, whose 0700 run directory is the only protection then.
    auth: Literal["secret", "none"] = "secret"
    secret_file: str = ""  # default: <run_dir>/stack.secret, written (0600) by `lyra up`
    stage_retries: int = Field(default=1, ge=0, le=5)  # re-runs of a stage whose worker died or restarted
    queue_size: int = Field(default=16, ge=1, le=100_000)
    # Sizes in MB are decimal (10^6 bytes), like every unit in Lyra Runtime (shared.config.units).
    max_message_mb: float = Field(default=32.0, gt=0, le=1024)
    max_image_mb: float = Field(default=16.0, gt=0, le=1024)  # an attached image's file size
    max_image_side: int = Field(default=8192, ge=16)  # pixels on the longer side
    max_image_megapixels: float = Field(default=40.0, gt=0)
    # Each client's pace: frames and megabytes per second (a burst of one second's worth); the excess is
    # answered `busy` before it is decoded.
    client_max_msgs_per_s: float = Field(default=2000.0, gt=0)
    client_max_mb_per_s: float = Field(default=256.0, gt=0)
    # Input the coordinator's socket may hold for one client connection before that client's sends block: the
    # byte bound over max_message_mb gives the frames buffered (at least 2; 2 with the defaults).
    client_queue_mb: float = Field(default=64.0, gt=0, le=4096)
    # Log user text (prompts, answers) at DEBUG, for development; off, logs carry ids, sizes and timings only.
    debug_content: bool = False
    heartbeat_interval_s: float = Field(default=1.0, gt=0, le=60)
    heartbeat_timeout_s: float = Field(default=5.0, gt=0, le=600)
    cancel_grace_s: float = Field(default=10.0, gt=0, le=3600)  # a worker that ignores a cancel this long exits
    drain_s: float = Field(default=8.0, gt=0, le=600)  # SIGTERM drain; below supervisord's stopwaitsecs
    # CurveZMQ on every tcp endpoint: traffic encrypted, and the coordinator accepts only the workers and clients
    # whose public keys sit in <keys_dir>/authorized/ (`lyra keys` makes them). Required for a non-loopback tcp
    # endpoint; with Curve the keys replace the stack secret on that socket (a remote host never sees the file).
    curve: bool = False
    keys_dir: str = ""  # default: $XDG_CONFIG_HOME/lyra/keys (~/.config/lyra/keys); mode 0700, files 0600
    # Threads torch uses in each model process (router, specialist host, voice) for work on the CPU; 0 = torch's
    # default, one per core. The embedded default sets 1: its processes share the cores, and two-thread ops wait
    # at a barrier for a core another process holds (docs/benchmarks.md, "The embedded default on the CPU").
    cpu_threads: int = Field(default=0, ge=0, le=1024)

    @model_validator(mode="after")
    def _heartbeat_order(self) -> RuntimeSettings:
        if self.heartbeat_timeout_s <= 2 * self.heartbeat_interval_s:
            raise ValueError("heartbeat_timeout_s must exceed twice heartbeat_interval_s")
        return self


class Deadlines(Section):
    """Longest each stage may take, in seconds."""

    route: float = Field(default=60.0, gt=0)
    load: float = Field(default=900.0, gt=0)
    specialist: float = Field(default=600.0, gt=0)
    voice: float = Field(default=600.0, gt=0)


class Scheduling(Section):
    """Swap policy: preloading the next request's specialist and grouping requests by specialist."""

    preload: bool = False  # route the next request early and load its specialist while voice runs
    max_overtakes: int = Field(default=0, ge=0, le=1000)  # 0 = strict FIFO; N = group by specialist, fairly
    lookahead: int = Field(default=4, ge=1, le=64)  # how many waiting requests are routed early


class WeightCacheSettings(Section):
    """The specialist host's host-RAM copy of specialist weights (swap = one host -> GPU copy)."""

    size_gb: float = Field(default=0.0, ge=0)  # 0 = off: every swap reloads from the checkpoint
    pin: bool = True  # page-locked memory (about 3x faster copies); ignored without CUDA


class GpuEntry(Section):
    """One physical GPU and the memory the runtime may use on it."""

    index: int = Field(ge=0)
    name: str = ""
    budget_gb: float = Field(gt=0)
    context_reserve_gb: float = Field(default=0.5, ge=0)  # CUDA context per process on this GPU


class ServicePlacement(Section):
    """Which physical GPUs a worker process is pinned to (empty = CPU only)."""

    gpus: list[int] = []
    external: bool = False  # started on another host (over tcp + Curve); `lyra up` starts it not here, waits for it


class GenerationDefaults(Section):
    """Sampling defaults of a model; a request may override them."""

    max_new_tokens: int = Field(default=128, ge=1, le=32768)
    temperature: float = Field(default=0.0, ge=0.0, le=5.0)  # 0 = greedy
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: list[str] = Field(default=[], max_length=8)  # the reply ends before the first of these strings
    # Divide the logit of every token the reply already holds by this (1 = off); 1.1-1.3 stops small models'
    # loops ("a kettle, a kettle, and a kettle"). The prompt's tokens are not penalised: the voice must restate.
    # Tokens without a letter (punctuation, digits, whitespace) never are: a penalised "." ends replies mid-sentence.
    repetition_penalty: float = Field(default=1.0, ge=1.0, le=3.0)
    # When max_new_tokens runs out mid-sentence, decode up to this many more tokens to reach the sentence's end
    # (0 = cut exactly at max_new_tokens).
    finish_sentence_tokens: int = Field(default=0, ge=0, le=1024)


class ImageDefaults(Section):
    """Image-generation settings of an artist entry (diffusers backend)."""

    steps: int = Field(default=4, ge=1)  # denoising steps when the request sets none (FLUX.1-schnell: 4)
    guidance: float = Field(default=0.0, ge=0)  # guidance scale (schnell ignores it; dev wants about 3.5)
    width: int = Field(default=1024, ge=16)  # pixels when the request sets none
    height: int = Field(default=1024, ge=16)
    max_side: int = Field(default=2048, ge=16)  # largest width or height a request may ask for
    max_steps: int = Field(default=50, ge=1)  # most steps a request may ask for
    max_sequence_length: int = Field(default=256, ge=1, le=512)  # T5 prompt tokens (schnell 256, dev 512)
    vae_tiling: bool = False  # decode in tiles: large images in less memory, slightly slower, rare seams
    vae_slicing: bool = False  # decode a batch one image at a time: less peak memory for batches
    cpu_offload: bool = False  # components live in host RAM and visit the GPU in turn: far less VRAM, slower

    @model_validator(mode="after")
    def _within_limits(self) -> ImageDefaults:
        if max(self.width, self.height) > self.max_side or self.steps > self.max_steps:
            raise ValueError("image defaults exceed their own limits (width/height > max_side or steps > max_steps)")
        return self


class FakeBehaviour(Section):
    """Test-double switches for the `fake` backend (never used by a real model)."""

    load_s: float = Field(default=0.0, ge=0)  # time a load takes
    delay_s: float = Field(default=0.0, ge=0)  # time before the first output
    token_delay_s: float = Field(default=0.0, ge=0)  # time between streamed tokens
    misbehave: Literal["none", "hang", "crash", "garbage", "error"] = "none"
    misbehave_on: Literal["classify", "load", "run", "synthesize", "any"] = "any"
    triggers: bool = False  # honour "[[fake:<action>:<service>]]" markers in the user's text (tests)


class RemoteSettings(Section):
    """Where a `backend = "openai"` model runs: any OpenAI-compatible server (vLLM, SGLang, TGI, Ollama, ...)."""

    base_url: str = ""  # e.g. "http://10.0.0.7:8000/v1"
    model: str = ""  # the model id the server serves (its GET /v1/models lists it)
    api_key_env: str = ""  # the NAME of the environment variable holding the Bearer key; never the key itself
    connect_timeout_s: float = Field(default=5.0, gt=0, le=600)
    read_timeout_s: float = Field(default=120.0, gt=0, le=3600)  # longest silence between two bytes of a reply
    retries: int = Field(default=3, ge=0, le=20)  # re-sends after a 429, 502, 503 or 504, with back-off
    backoff_s: float = Field(default=0.5, ge=0, le=60)  # first back-off (doubled each time; Retry-After wins)
    max_backoff_s: float = Field(default=8.0, ge=0, le=600)
    # Router only: score labels from the server's token logprobs ("auto": when the server returns them, else
    # ask for the label name and read it from the reply), or always ("on") or never ("off").
    logprobs: Literal["auto", "on", "off"] = "auto"

    @field_validator("base_url")
    @classmethod
    def _http(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError(f"{value!r} must start with http:// or https://")
        return value.rstrip("/")


LYRA_FORMS = ("int8", "int4")  # quantized on load by Lyra, decoded by its kernels (shared.engine.quantized_linear)
BNB_FORMS = ("bnb-int8", "bnb-nf4")  # quantized on load by bitsandbytes


class ModelEntry(Section):
    """One model: where its weights are, how to load it, how to prompt it."""

    name: str = ""  # filled from the table key
    kind: Literal["causal_lm", "image_generation", "vision_language"] = "causal_lm"
    backend: Literal["fake", "transformers", "diffusers", "openai"] = "fake"
    path: str = ""  # Hugging Face id or local directory (or a GGUF file's directory)
    gguf_file: str = ""  # file name inside `path` for GGUF checkpoints
    embedded: Literal["", "smollm2", "tiny-flux", "tiny-llava"] = ""  # a checkpoint shipped or generated locally
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    # Lyra's own forms, for transformers text models and a vision-language model's language model, decoded by Lyra's
    # kernels (in a CUDA graph on one GPU): "int8" (a scale per row) or "int4" (a scale and a zero point per 128
    # weights of a row). bitsandbytes' forms, which need a CUDA GPU and are the only ones for image models:
    # "bnb-int8" (LLM.int8) or "bnb-nf4" (NF4). "4bit" is refused with the name to write instead.
    quantization: Literal["none", "int8", "int4", "bnb-int8", "bnb-nf4"] = "none"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "auto"] = "auto"
    max_context: int = Field(default=4096, ge=16)
    device_map: str | dict[str, int | str] = ""  # "" = whole model on the service's first device
    max_memory: dict[str, str] = {}  # per relative GPU index, e.g. {"0" = "47GB"}
    # How replies are decoded (causal LMs and perception's language model): "auto" runs the fused step where it
    # runs on Lyra's kernels (a Llama-family model in float weights on one GPU), else "graphs"; "graphs" replays
    # each step from a CUDA graph over a static KV cache; "fused" also where only torch.compile can run it (a
    # slower first load); "compiled" compiles transformers' step; "eager" runs it eagerly. Without CUDA, or
    # for a model split over devices, all run eagerly; `lyra status` shows what runs and why.
    engine: Literal["auto", "graphs", "compiled", "fused", "eager"] = "auto"
    # Voice over several GPUs: "pipeline" places layers with device_map (the GPUs take turns); "tensor" runs
    # one process per GPU, each holding its share of every layer (see shared.distributed.tensor_parallel).
    parallel: Literal["pipeline", "tensor"] = "pipeline"
    ranks: int = Field(default=0, ge=0, le=16)  # tensor ranks; 0 = one per GPU of the service (CPU: set it)
    # Tensor ranks' all-reduce: "nccl" (the process group); on CUDA GPUs with peer access also "peer" (Lyra's
    # one-shot kernel over peer memory, shared.distributed.peer_reduce).
    # "auto": "peer" where every rank can set it up, else "nccl" (gloo on the CPU).
    all_reduce: Literal["auto", "nccl", "peer"] = "auto"
    # Benchmarks only: tensor ranks fill every weight with seeded random values of the shape that `path`'s
    # config.json describes (the folder holds config.json and a tokenizer, no weight files), so shapes too
    # large for the disk (70B: 141 GB) run through the whole stack. Replies are noise; `lyra status` says so.
    random_weights: bool = False
    description: str = ""  # what this specialist is for; the router scores it
    # Example prompts this specialist should get; the router embeds them once and routes by similarity to them.
    examples: list[str] = Field(default=[], max_length=10_000)
    examples_file: str = ""  # more examples, one a line (`#` comments), relative to the config file
    routable: bool = True  # offered to the router; false = reached only by the image rule or by forcing it
    system_prompt: str = ""
    generation: GenerationDefaults = GenerationDefaults()
    image: ImageDefaults = ImageDefaults()
    memory_gb: float = Field(default=0.0, ge=0)  # declared footprint; overrides the estimator when set
    architecture: str = ""  # known architecture name for planning without files (see shared.planning)
    parameters_b: float = Field(default=0.0, ge=0)  # parameter count in billions, for planning without files
    fake: FakeBehaviour = FakeBehaviour()
    remote: RemoteSettings = RemoteSettings()  # backend = "openai": the server that runs this model

    @model_validator(mode="before")
    @classmethod
    def _removed_settings(cls, data: Any) -> Any:
        if isinstance(data, dict) and "compile" in data:
            raise ValueError("compile is no longer a setting: write engine = \"compiled\" for a compiled decode step")
        if isinstance(data, dict) and data.get("all_reduce") == "symmetric":
            raise ValueError("all_reduce = \"symmetric\" is no longer offered (the peer all-reduce was faster): write "
                             "all_reduce = \"peer\" or \"auto\"")
        return data

    @field_validator("quantization", mode="before")
    @classmethod
    def _renamed_forms(cls, value: Any) -> Any:
        if value == "4bit":
            raise ValueError("quantization = \"4bit\" is now spelled \"bnb-nf4\" (bitsandbytes NF4, as before) or "
                             "\"int4\" (Lyra's kernels, group 128)")
        return value

    @model_validator(mode="after")
    def _needs_weights(self) -> ModelEntry:
        if self.random_weights and (self.backend != "transformers" or self.parallel != "tensor"):
            raise ValueError(f"model {self.name!r}: random_weights = true is for tensor-parallel voices "
                             "(backend = \"transformers\", parallel = \"tensor\"): a benchmark of shapes too large "
                             "for the disk")
        if self.quantization in LYRA_FORMS and (self.backend == "diffusers" or self.kind == "image_generation"):
            raise ValueError(f"model {self.name!r}: quantization = {self.quantization!r} is Lyra's form for "
                             "transformers text models; an image model quantizes through bitsandbytes: write "
                             "\"bnb-int8\" or \"bnb-nf4\"")
        if self.backend == "openai":
            if not (self.remote.base_url and self.remote.model):
                raise ValueError(f"model {self.name!r} uses backend 'openai' but sets no remote.base_url or "
                                 "remote.model")
            if self.kind != "causal_lm":
                raise ValueError(f"model {self.name!r}: backend 'openai' serves text models (causal_lm) only")
            return self
        if self.backend != "fake" and not (self.path or self.embedded):
            raise ValueError(f"model {self.name!r} uses backend {self.backend!r} but sets neither path nor embedded")
        return self


class RouterSettings(Section):
    """How the router is prompted."""

    # Measured with SmolLM2-135M: this wording routed 11 of 12 practical/philosophical prompts right,
    # where a "Which specialist should handle..." wording managed 6 or 7 (tests/models/test_smollm2.py).
    prompt_template: str = (
        "You route messages to specialists.\n{labels}\n\nRoute this message: {text}\n\n"
        "Answer with the specialist's name only."
    )
    image_specialist: str = ""  # a turn that carries an image goes here unless the user forces another
    # Divide each label's probability by its probability for content-free input ("N/A", "", "[MASK]"),
    # computed once per label set: small routers favour some names whatever the message (SmolLM2-135M
    # put most practical prompts on the one-token "artist"; calibrated it routed 8 of 11 test prompts
    # right instead of 5).
    calibrate: bool = True
    # With examples: a turn's score per specialist is example_weight x (similarity to its examples, as a
    # probability) + (1 - example_weight) x (label score). Specialists without examples get their label score.
    # Measured on SmolLM2-135M (tests/data/routing_heldout.toml): the nearest example alone (k = 1) routed 96.8%
    # of the held-out prompts right, the calibrated labels alone about half.
    example_weight: float = Field(default=0.7, ge=0.0, le=1.0)
    example_k: int = Field(default=1, ge=1, le=100)  # nearest examples per specialist whose similarity counts
    example_temperature: float = Field(default=0.05, gt=0.0, le=10.0)  # softmax temperature over similarities
    # A turn whose best combined score is below min_confidence goes to `fallback` (0 = never).
    min_confidence: float = Field(default=0.0, ge=0.0, le=1.0)
    fallback: str = ""
    # The router gives a turn to an image-generation specialist only when its text matches this regular
    # expression (case-insensitive), else to the best of the others: SmolLM2-135M sent "Summarise this in one
    # sentence: ..." and "What's a good name for my cat?" to the artist. "" = no such rule (other languages).
    picture_request: str = (r"\b(draw|paint|sketch|illustrat|picture|image|photo|portrait|drawing|painting|render"
                            r"|poster|logo|cartoon|doodle|artwork|wallpaper|icon|depict|visuali[sz]e)")

    @field_validator("picture_request")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from None
        return pattern


class GatewaySettings(Section):
    """The OpenAI-compatible HTTP gateway (services/gateway): where it listens and who may call it."""

    enabled: bool = False  # `lyra up` starts the gateway program only when true
    host: str = "127.0.0.1"  # any other address needs an API key
    port: int = Field(default=8000, ge=0, le=65535)  # 0 = a free port (tests)
    # The NAME of an environment variable that holds the Bearer key; the key itself never sits in this file.
    api_key_env: str = ""
    max_concurrency: int = Field(default=64, ge=1, le=10_000,  # coordinator connections held open at once
                                 description="Requests in flight through the gateway; one more is answered 429.")
    keepalive_s: float = Field(default=5.0, gt=0, le=300)  # SSE comment interval while a stream waits
    request_timeout_s: float = Field(default=900.0, gt=0)  # longest a request may wait for its terminal event


class LyraConfig(Section):
    """The whole configuration."""

    runtime: RuntimeSettings = RuntimeSettings()
    deadlines: Deadlines = Deadlines()
    scheduling: Scheduling = Scheduling()
    weight_cache: WeightCacheSettings = WeightCacheSettings()
    gpus: list[GpuEntry] = []
    services: dict[str, ServicePlacement] = {}
    router: ModelEntry
    routing: RouterSettings = RouterSettings()
    specialists: dict[str, ModelEntry]
    voice: ModelEntry
    gateway: GatewaySettings = GatewaySettings()
    source: str = ""  # the file this came from (filled by load_config)

    @field_validator("specialists")
    @classmethod
    def _at_least_one(cls, value: dict[str, ModelEntry]) -> dict[str, ModelEntry]:
        if not value:
            raise ValueError("declare at least one [specialists.<name>] table")
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> LyraConfig:
        known = {g.index for g in self.gpus}
        for service, placement in self.services.items():
            if service not in WORKER_SERVICES:
                raise ValueError(f"services.{service}: unknown service (expected one of {', '.join(WORKER_SERVICES)})")
            for gpu in placement.gpus:
                if gpu not in known:
                    raise ValueError(f"services.{service}.gpus: GPU {gpu} is not declared in [[gpus]]")
        if self.routing.image_specialist and self.routing.image_specialist not in self.specialists:
            raise ValueError(f"routing.image_specialist: {self.routing.image_specialist!r} is not a specialist")
        for service in WORKER_SERVICES:
            models = self.models_of(service).values()
            if self.gpus_of(service) and all(entry.backend == "openai" for entry in models):
                raise ValueError(f"services.{service}.gpus: every model of {service} runs remotely (backend "
                                 "'openai'); pin it to no GPU (it needs none here)")
        _check_fallback(self.routing, self.specialists)
        for entry in [self.router, *self.specialists.values()]:
            if entry.random_weights:
                raise ValueError(f"model {entry.name!r}: random_weights = true is for the voice only (its tensor "
                                 "ranks); routers and specialists load their checkpoints")
        return self

    # ------------------------------------------------------------ derived values

    def gpus_of(self, service: str) -> list[int]:
        """Physical GPU indices a worker service is pinned to."""
        placement = self.services.get(service)
        return list(placement.gpus) if placement else []

    def runs_elsewhere(self, service: str) -> bool:
        """Whether another host runs this worker service (`lyra up` does not start it here)."""
        placement = self.services.get(service)
        return bool(placement and placement.external)

    def run_dir(self) -> Path:
        """The private run directory (sockets, logs)."""
        if self.runtime.run_dir:
            return Path(os.path.expanduser(self.runtime.run_dir))
        return default_run_dir()

    def client_endpoint(self) -> str:
        """Where clients connect."""
        return self.runtime.client_endpoint or f"ipc://{self.run_dir() / 'client.sock'}"

    def worker_endpoint(self) -> str:
        """Where workers connect."""
        return self.runtime.worker_endpoint or f"ipc://{self.run_dir() / 'workers.sock'}"

    def secret_path(self) -> Path:
        """The per-stack secret file (see shared.wire.stack_secret)."""
        return Path(os.path.expanduser(self.runtime.secret_file)) if self.runtime.secret_file else (
            self.run_dir() / "stack.secret")

    def client_needs_secret(self) -> bool:
        """Whether client requests must carry the secret: on tcp any local user can reach the port (unless Curve
        keys already say who may connect)."""
        endpoint = self.client_endpoint()
        return self.runtime.auth == "secret" and endpoint.startswith("tcp://") and not self.curve_on(endpoint)

    def curve_on(self, endpoint: str) -> bool:
        """Whether `endpoint` is protected by CurveZMQ (runtime.curve applies to tcp endpoints)."""
        return self.runtime.curve and endpoint.startswith("tcp://")

    def keys_dir(self) -> Path:
        """Where `lyra keys` writes, and every process reads, the CurveZMQ key files."""
        return Path(os.path.expanduser(self.runtime.keys_dir)) if self.runtime.keys_dir else default_keys_dir()

    def client_queue_frames(self) -> int:
        """Frames zmq may hold per client connection: `client_queue_mb` over the largest frame, at least 2."""
        return max(2, int(self.runtime.client_queue_mb * MB) // self.max_message_bytes())

    def max_message_bytes(self) -> int:
        """Largest frame any socket accepts."""
        return int(self.runtime.max_message_mb * MB)

    def models_of(self, service: str) -> dict[str, ModelEntry]:
        """The models a worker service runs, by name."""
        if service == ROUTER:
            return {self.router.name: self.router}
        if service == VOICE:
            return {self.voice.name: self.voice}
        if service == SPECIALIST_HOST:
            return dict(self.specialists)
        raise KeyError(service)


def _check_fallback(routing: RouterSettings, specialists: dict[str, ModelEntry]) -> None:
    """The fallback is a specialist the router may pick, and a threshold needs one."""
    if routing.fallback and routing.fallback not in specialists:
        raise ValueError(f"routing.fallback: {routing.fallback!r} is not a specialist")
    if routing.fallback and not specialists[routing.fallback].routable:
        raise ValueError(f"routing.fallback: {routing.fallback!r} has routable = false")
    if routing.min_confidence > 0 and not routing.fallback:
        raise ValueError("routing.min_confidence needs routing.fallback: the specialist for uncertain turns")


def read_examples(path: Path) -> list[str]:
    """Example prompts from a file: one a line; blank lines and lines starting with `#` are skipped."""
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _with_example_files(config: LyraConfig) -> LyraConfig:
    """Each specialist's `examples_file` read (relative to the config file) and added to its `examples`."""
    base = Path(config.source).parent if config.source.startswith("/") else Path.cwd()
    changed = {}
    for name, entry in config.specialists.items():
        if not entry.examples_file:
            continue
        file = base / os.path.expanduser(entry.examples_file)
        try:
            more = read_examples(file)
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{config.source}: specialists.{name}.examples_file: cannot read {file}: {exc}") from None
        changed[name] = entry.model_copy(update={"examples": [*entry.examples, *more]})
    return config.model_copy(update={"specialists": {**config.specialists, **changed}}) if changed else config


def _named(raw: dict[str, Any]) -> dict[str, Any]:
    """Fill each model table's `name` from where it sits in the file."""
    raw = dict(raw)
    for key in ("router", "voice"):
        if isinstance(raw.get(key), dict):
            raw[key] = {"name": key, **raw[key]}
    if isinstance(raw.get("router"), dict):  # the router scores labels in one forward pass: it never decodes
        raw["router"]["engine"] = "eager"
        if raw["router"].get("backend") == "openai" and isinstance(raw.get("routing", {}), dict):
            # A remote router that answers by generation gives one-hot scores, which calibration would distort;
            # it stays on only when the operator asks for it (sensible with a server that returns logprobs).
            raw["routing"] = {"calibrate": False, **raw.get("routing", {})}
    runtime = raw.get("runtime")
    if isinstance(runtime, dict) and str(runtime.get("worker_endpoint", "")).startswith("tcp://") and \
            not _loopback(str(runtime["worker_endpoint"])):
        # Across a network a worker may go quiet for a few seconds (a congested link, a long GC pause on a big
        # host) without being dead: unless the operator chose, allow 10 s of silence instead of 5.
        raw["runtime"] = {"heartbeat_timeout_s": NETWORK_HEARTBEAT_TIMEOUT_S, **runtime}
    if isinstance(raw.get("specialists"), dict):
        raw["specialists"] = {
            name: ({**entry, "name": name} if isinstance(entry, dict) else entry)
            for name, entry in raw["specialists"].items()
        }
    return raw


def parse_config(raw: dict[str, Any], source: str = "<memory>") -> LyraConfig:
    """Validate an already-parsed TOML document."""
    try:
        config = LyraConfig.model_validate({**_named(raw), "source": source})
    except ValidationError as exc:
        raise ConfigError(describe(exc, source, LyraConfig)) from None
    _check_endpoints(config)
    return _with_example_files(config)


def _check_endpoints(config: LyraConfig) -> None:
    endpoints = (("client_endpoint", config.client_endpoint()), ("worker_endpoint", config.worker_endpoint()))
    if config.runtime.curve and not any(endpoint.startswith("tcp://") for _, endpoint in endpoints):
        raise ConfigError(f"{config.source}: runtime.curve: Curve protects tcp endpoints, and both endpoints are "
                          "ipc (their 0700 run directory protects them); remove `curve = true` or use tcp")
    for field, endpoint in endpoints:
        if endpoint.startswith("tcp://") and config.runtime.auth == "none":
            raise ConfigError(
                f"{config.source}: runtime.auth: \"none\" cannot protect runtime.{field} = {endpoint}: a tcp "
                "port, loopback included, is open to every local user; remove `auth = \"none\"` so workers and "
                f"clients must present the stack secret ({config.secret_path()})"
            )
        if endpoint.startswith("tcp://") and not config.runtime.allow_remote and not _loopback(endpoint):
            raise ConfigError(
                f"{config.source}: runtime.{field}: {endpoint} is not loopback; "
                "set runtime.allow_remote = true to expose it deliberately"
            )
        if endpoint.startswith("tcp://") and not _loopback(endpoint) and not config.runtime.curve:
            raise ConfigError(
                f"{config.source}: runtime.{field}: {endpoint} reaches beyond this machine, which needs CurveZMQ: "
                f"set runtime.curve = true and make keys with `lyra keys -c {config.source}`"
            )


def _loopback(endpoint: str) -> bool:
    """Whether a tcp endpoint binds or connects to this machine only."""
    return endpoint[len("tcp://"):].rsplit(":", 1)[0].strip("[]") in ("127.0.0.1", "localhost", "::1")


def load_config(path: str | os.PathLike[str]) -> LyraConfig:
    """Read and validate a TOML config file."""
    file = Path(path).expanduser()
    try:
        raw = tomllib.loads(file.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{file}: no such config file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: not valid TOML: {exc}") from None
    return parse_config(raw, source=str(file.resolve()))
