"""Tensor-parallel Llama-family models: each rank holds its share of every attention and MLP weight.

Megatron's split, per decoder layer: q/k/v and gate/up are column-parallel (each rank keeps a contiguous
block of output rows: whole query heads, and the KV heads those query heads read), o_proj and down_proj
are row-parallel (the matching block of input columns), and one all-reduce after each of the two sums the
partial outputs. The LM head is split by vocabulary rows (unless tied to the embeddings): each rank
scores its block of the vocabulary and one more all-reduce, of the logits padded with zeros to the whole
vocabulary, gives every rank the same logits (adding zeros is exact). Embeddings and norms are
replicated. A token reads each sharded weight byte once, on one GPU, with every GPU working at once.

The model is built on the meta device, shrunk to the rank's share, materialised on the rank's device and
filled either from the checkpoint's safetensors slices (no rank ever reads another's share) or with
random weights of the real shape (benchmarks of checkpoints too large for the disk).
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shared.distributed.rank_runner import LeadRunner, RankGroup
from shared.engine.decode import DecodeEngine
from shared.engine.fused_step import GATHER_ATTRIBUTE, REDUCE_ATTRIBUTE
from shared.models.base import BackendError
from shared.models.hf_causal import HfCausalModel, attention_implementation
from shared.models.hf_checks import check_entry, checkpoint_source

logger = logging.getLogger(__name__)

COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # output rows split
ROW = ("o_proj", "down_proj")  # input columns split; their outputs are summed across ranks
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ALL_REDUCES = ("auto", "nccl", "peer")

Reduce = Callable[[torch.Tensor], torch.Tensor]


class TensorParallelError(BackendError):
    """A model cannot be split or loaded as tensor-parallel ranks; the message says why and what to do."""


@dataclass(frozen=True)
class Shard:
    """Which part of the model one rank holds."""

    rank: int
    world: int

    def span(self, size: int) -> slice:
        """This rank's contiguous block of `size` items."""
        part = size // self.world
        return slice(self.rank * part, (self.rank + 1) * part)

    def vocab_span(self, vocab: int) -> slice:
        """This rank's block of LM-head rows: ceil(vocab / world) each, the last rank's shorter."""
        part = -(-vocab // self.world)
        return slice(min(self.rank * part, vocab), min((self.rank + 1) * part, vocab))


# ----------------------------------------------------------------------------- what can be split


def split_problems(config: Any, world: int) -> list[str]:
    """Why `config` cannot be split over `world` ranks ([] = it can)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", 0)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    sizes = {"num_attention_heads": heads, "num_key_value_heads": kv_heads,
             "intermediate_size": getattr(text, "intermediate_size", 0)}
    problems = [f"{name} = {size} is not divisible by {world} ranks" for name, size in sizes.items()
                if not size or size % world]
    kinds = set(getattr(text, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        problems.append(f"layer types {sorted(kinds)}: only full-attention decoder layers are split")
    if getattr(text, "num_local_experts", 0) or getattr(text, "num_experts", 0):
        problems.append("mixture-of-experts layers are not split")
    return problems


def linear_layers(model: nn.Module, split_head: bool | None = None) -> list[tuple[str, nn.Linear, str]]:
    """(name, module, "column" | "row" | "vocab") for every Linear this split shards ("vocab": the LM head).

    `split_head`: whether the head is split (default: whether this rank's model gathers its logits).
    """
    split_head = hasattr(model, GATHER_ATTRIBUTE) if split_head is None else split_head
    head = model.get_output_embeddings() if split_head else None
    found = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear) and leaf in COLUMN + ROW:
            found.append((name, module, "column" if leaf in COLUMN else "row"))
        elif head is not None and module is head:
            found.append((name, module, "vocab"))
    return found


def splits_head(config: Any) -> bool:
    """True when the LM head is split by vocabulary rows: whenever it is not the input embeddings' matrix."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return not (getattr(config, "tie_word_embeddings", False) or getattr(text, "tie_word_embeddings", False))


def gather_logits(logits: torch.Tensor, span: slice, vocab: int, reduce: Reduce) -> torch.Tensor:
    """Every rank's logits block in its place: zeros around this rank's block, summed over the ranks."""
    return reduce(nn.functional.pad(logits, (span.start, vocab - span.stop)).contiguous())


# ----------------------------------------------------------------------------- building one rank


def build_rank_model(config: Any, dtype: torch.dtype, attn: str, shard: Shard, device: torch.device,
                     reduce: Reduce, split_head: bool = True) -> nn.Module:
    """This rank's model with uninitialised weights of its share, on `device`; rows summed with `reduce`."""
    from transformers import AutoModelForCausalLM

    problems = split_problems(config, shard.world)
    if problems:
        raise TensorParallelError("; ".join(problems))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    layers = linear_layers(model, split_head and splits_head(config))
    if not any(kind == "row" for _, _, kind in layers):
        raise TensorParallelError(f"{type(model).__name__}: no q/k/v/o and gate/up/down projections to split")
    for _, linear, kind in layers:
        vocab = linear.out_features
        _shrink(linear, kind, shard)
        if kind == "row":
            linear.register_forward_hook(lambda _module, _inputs, output: reduce(output))
        if kind == "vocab":
            span = shard.vocab_span(vocab)

            def gather(logits: torch.Tensor, span: slice = span, vocab: int = vocab) -> torch.Tensor:
                return gather_logits(logits, span, vocab, reduce)

            linear.register_forward_hook(lambda _module, _inputs, output: gather(output))
            setattr(model, GATHER_ATTRIBUTE, gather)  # the fused step gathers its own logits the same way
    model.to_empty(device=device)
    _restore_buffers(model, device)
    if shard.world > 1:  # the fused decode step sums the same outputs itself (one rank: nothing to sum)
        setattr(model, REDUCE_ATTRIBUTE, reduce)
    model.eval()
    return model


def _vocab(config: Any) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.vocab_size)


def _shrink(linear: nn.Linear, kind: str, shard: Shard) -> None:
    """Give a meta Linear the shape of this rank's share."""
    if kind == "vocab":
        span = shard.vocab_span(linear.out_features)
        linear.out_features = span.stop - span.start
        linear.weight = nn.Parameter(linear.weight[span], requires_grad=False)
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias[span], requires_grad=False)
    elif kind == "column":
        linear.out_features //= shard.world
        linear.weight = nn.Parameter(linear.weight[shard.span(linear.weight.shape[0])], requires_grad=False)
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias[shard.span(linear.bias.shape[0])], requires_grad=False)
    else:
        linear.in_features //= shard.world
        linear.weight = nn.Parameter(linear.weight[:, shard.span(linear.weight.shape[1])], requires_grad=False)


def _restore_buffers(model: nn.Module, device: torch.device) -> None:
    """Recompute buffers (rotary frequencies) that were born on the meta device and are garbage now."""
    for module in model.modules():
        if not list(module.buffers(recurse=False)) or not hasattr(module, "config"):
            continue
        with torch.device("cpu"):
            fresh = type(module)(module.config)
        for name, buffer in fresh.named_buffers(recurse=False):
            module._buffers[name] = buffer.to(device)


def tie_embeddings(model: nn.Module) -> None:
    """Share the LM head with the input embeddings when the config ties them (to_empty unties them)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    head = model.get_output_embeddings()
    if getattr(config, "tie_word_embeddings", False) and head is not None:
        head.weight = model.get_input_embeddings().weight


# ----------------------------------------------------------------------------- weights


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder (sharded index or one file)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted({folder / name for name in json.loads(index.read_text())["weight_map"].values()})
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise TensorParallelError(f"{folder}: no safetensors files (tensor parallelism loads safetensors only)")
    return files


def load_rank_weights(model: nn.Module, folder: Path, shard: Shard) -> int:
    """Copy this rank's slice of every tensor from the checkpoint; returns bytes read."""
    from safetensors import safe_open

    kinds = {f"{name}.{part}": kind for name, _, kind in linear_layers(model) for part in ("weight", "bias")}
    wanted = dict(model.named_parameters())
    loaded, read = set(), 0
    for file in checkpoint_files(folder):
        with safe_open(str(file), framework="pt", device="cpu") as tensors:
            for name in tensors.keys():
                if name not in wanted:
                    continue
                part = _slice(tensors.get_slice(name), kinds.get(name), name.endswith(".bias"), shard)
                with torch.no_grad():
                    wanted[name].copy_(part.to(wanted[name].dtype))
                loaded.add(name)
                read += part.numel() * part.element_size()
    tie_embeddings(model)
    missing = sorted({name for name, _ in model.named_parameters()} - loaded)  # a tied head is not listed
    if missing:
        raise TensorParallelError(f"{folder}: the checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    return read


def _slice(view: Any, kind: str | None, bias: bool, shard: Shard) -> torch.Tensor:
    shape = view.get_shape()
    if kind == "vocab":
        return view[shard.vocab_span(shape[0])]
    if kind == "column":
        return view[shard.span(shape[0])]
    if kind == "row" and not bias:
        return view[:, shard.span(shape[1])]
    if kind == "row":  # the summed output gets the bias once
        full = view[:]
        return full if shard.rank == 0 else torch.zeros_like(full)
    return view[:]


def random_rank_weights(model: nn.Module, shard: Shard, seed: int = 0, std: float = 0.02) -> None:
    """Random weights of the real shape, made on the rank's device: norms at one, biases at zero.

    Each tensor is drawn whole from a generator seeded by its name and this rank keeps its slice, so every
    split of the same seed (one GPU, two ranks, ...) holds the same model, one matrix at a time in memory.
    """
    kinds = {f"{name}.{part}": kind for name, _, kind in linear_layers(model) for part in ("weight", "bias")}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
                continue
            if name.endswith(".bias"):
                param.zero_()
                continue
            kind = kinds.get(name)
            shape = list(param.shape)
            axis = {"column": 0, "row": 1, "vocab": 0}.get(kind or "")
            if kind == "vocab":
                shape[0] = _vocab(model.config)
                start = shard.vocab_span(shape[0]).start
            elif axis is not None:
                shape[axis] *= shard.world
                start = shard.span(shape[axis]).start
            generator = torch.Generator(device=param.device).manual_seed(seed + zlib.crc32(name.encode()))
            whole = torch.empty(shape, dtype=param.dtype, device=param.device).normal_(0.0, std, generator=generator)
            param.copy_(whole if axis is None else whole.narrow(axis, start, param.shape[axis]))
            del whole
    tie_embeddings(model)


# ----------------------------------------------------------------------------- all-reduce


def nccl_reduce(group: Any = None) -> Reduce:
    """In-place all-reduce through the process group (NCCL on GPUs, gloo on the CPU); capturable in graphs."""
    import torch.distributed as dist

    def reduce(tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, group=group)
        return tensor

    return reduce


def make_reduce(kind: str, device: torch.device) -> Reduce:
    """The all-reduce a rank's layers call: "nccl" (the process group) or "peer" (CUDA only).

    "peer" is Lyra's one-shot kernel over peer memory (shared.distributed.peer_reduce). "auto" is "peer" where
    every rank can set it up (CUDA, Triton, peer memory), else "nccl"; the ranks agree before choosing.
    """
    if kind not in ALL_REDUCES:
        raise TensorParallelError(f"all_reduce = {kind!r}: use one of {', '.join(ALL_REDUCES)}")
    if kind == "peer" and device.type != "cuda":
        raise TensorParallelError(f"all_reduce = {kind!r} needs CUDA GPUs with peer access; on {device.type} "
                                  "ranks use all_reduce = \"nccl\" (gloo on the CPU)")
    if kind == "peer":
        from shared.distributed.peer_reduce import PeerReduce

        return PeerReduce(device)
    if kind == "auto" and device.type == "cuda":
        return _peer_where_all_can(device)
    return nccl_reduce()


def _peer_where_all_can(device: torch.device) -> Reduce:
    """The peer all-reduce if every rank can make it, else NCCL on every rank (never a mix)."""
    import importlib.util

    import torch.distributed as dist

    def everyone(ok: bool) -> bool:
        flag = torch.tensor([1 if ok else 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    # PeerReduce() is collective: every rank must know that every other will make it before any starts
    if not everyone(importlib.util.find_spec("triton") is not None):
        logger.warning("all_reduce = \"auto\": NCCL, because Triton is not installed for some rank")
        return nccl_reduce()
    try:
        from shared.distributed.peer_reduce import PeerReduce

        made: Reduce | None = PeerReduce(device)
    except Exception as exc:  # no peer access, a PyTorch without symmetric memory: say why, use NCCL
        logger.warning("all_reduce = \"auto\": peer all-reduce unavailable (%s: %s); using NCCL",
                       type(exc).__name__, str(exc)[:200])
        made = None
    if not everyone(made is not None):
        if made is not None:
            made.close()
        return nccl_reduce()
    return made


def reduce_name(reduce: Reduce) -> str:
    """What `lyra status` shows for a rank's all-reduce."""
    return getattr(reduce, "name", "nccl")


# ----------------------------------------------------------------------------- one rank from a checkpoint


def load_rank(folder: Path, dtype: torch.dtype, attn: str, shard: Shard, device: torch.device,
              reduce: Reduce, random: bool = False) -> nn.Module:
    """Build this rank's share of the checkpoint in `folder` on `device` and fill it from the files.

    `random`: fill it with seeded random weights instead (only config.json is read): a benchmark.
    """
    from transformers import AutoConfig

    started = time.perf_counter()
    config = AutoConfig.from_pretrained(folder)
    model = build_rank_model(config, dtype, attn, shard, device, reduce)
    if random:
        random_rank_weights(model, shard)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the time below is the weights made, not the kernels queued
        logger.warning("rank %d/%d: random weights of %s's shape (random_weights = true: a benchmark, replies are "
                       "noise), made in %.1fs", shard.rank, shard.world, folder.name, time.perf_counter() - started)
        return model
    read = load_rank_weights(model, folder, shard)
    logger.info("rank %d/%d: %.2f GB of %s loaded in %.1fs", shard.rank, shard.world, read / 1e9, folder.name,
                time.perf_counter() - started)
    return model


# ----------------------------------------------------------------------------- a configured voice rank


def rank_problems(entry: Any, world: int, has_cuda: bool) -> list[str]:
    """What stops `entry` from running as `world` tensor-parallel ranks, found without loading it."""
    problems = []
    if world < 2:
        problems.append(f"parallel = \"tensor\" needs at least 2 ranks (the service has {world}); give the voice "
                        "two GPUs, or set ranks = 2 on the CPU")
    if entry.quantization != "none":
        problems.append(f"quantization = {entry.quantization!r} is not offered for tensor ranks (quantized ranks are "
                        "separate work); use parallel = \"pipeline\" for a quantized voice")
    if entry.gguf_file or entry.embedded:
        problems.append("tensor parallelism loads safetensors checkpoints only (not GGUF or embedded models)")
    if entry.device_map or entry.max_memory:
        problems.append("device_map / max_memory place layers for pipeline parallelism; remove them with "
                        "parallel = \"tensor\" (each rank holds a share of every layer on its own GPU)")
    if entry.kind != "causal_lm":
        problems.append(f"only causal_lm models are split, not {entry.kind}")
    return [f"model {entry.name!r}: {problem}" for problem in problems]


def load_voice_rank(entry: Any, physical_gpu: int | None, ranks: RankGroup) -> RankModel:
    """Load this rank's share of `entry` on its GPU (or the CPU); rank 0's engine leads the others."""
    from transformers import AutoTokenizer

    on_gpu = ranks.device.type == "cuda"
    problems = rank_problems(entry, ranks.world, on_gpu) + check_entry(entry, on_gpu)
    if problems:
        raise TensorParallelError("; ".join(problems))
    source, _ = checkpoint_source(entry)
    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise TensorParallelError(f"model {entry.name!r}: tensor parallelism needs a local checkpoint folder, "
                                  f"not {source!r} (download it first)")
    dtype = DTYPES.get(entry.dtype, torch.bfloat16 if on_gpu else torch.float32)
    try:
        reduce = make_reduce(entry.all_reduce, ranks.device)
        model = load_rank(folder, dtype, attention_implementation(entry, on_gpu, dtype), Shard(ranks.rank, ranks.world),
                          ranks.device, reduce, random=entry.random_weights)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, RuntimeError) as exc:
        raise TensorParallelError(f"model {entry.name!r}: rank {ranks.rank} could not load {folder}: {exc}") from exc
    loaded = RankModel(entry, model, tokenizer, [physical_gpu] if physical_gpu is not None else [], ranks)
    loaded.all_reduce = reduce_name(reduce) if on_gpu else "gloo"
    loaded.reduce = reduce
    loaded.prepare()
    return loaded


class RankModel(HfCausalModel):
    """One rank's share of a causal LM; rank 0's decode engine announces every step to the followers."""

    def __init__(self, entry: Any, model: Any, tokenizer: Any, physical_gpus: list[int], ranks: RankGroup) -> None:
        super().__init__(entry, model, tokenizer, physical_gpus)
        self.ranks = ranks
        self.all_reduce = "nccl"  # what the loader chose (shown by `lyra status`)
        self.reduce: Reduce | None = None
        self.given_up = 0  # the peer all-reduce's waits that gave up, as last checked

    def generate(self, messages: list[Any], options: Any, cancel: Any) -> Iterator[str]:
        """The reply, as one process's; then a check that no all-reduce gave up waiting for a rank."""
        yield from super().generate(messages, options, cancel)
        failures = getattr(self.reduce, "failures", None)
        given_up = failures() if failures is not None else 0
        if given_up > self.given_up:
            new, self.given_up = given_up - self.given_up, given_up
            raise TensorParallelError(f"model {self.entry.name!r}: {new} peer all-reduce wait(s) gave up on another "
                                      "rank during this reply, so its sums were wrong; restart the voice "
                                      "(supervisorctl restart voice) if the ranks do not recover")

    def decode_engine(self, tokenizer: Any) -> DecodeEngine:
        """The engine every rank runs; rank 0's runner leads the followers' runners."""
        if self.engine is None:
            wrap = (lambda runner: LeadRunner(runner, self.ranks)) if self.ranks.leads else None
            self.engine = DecodeEngine(self.model, tokenizer, self.entry.name, self.entry.engine,
                                       self.entry.max_context, wrap=wrap)
        return self.engine

    def placement(self) -> dict[str, str]:
        """This rank's device and the engine, e.g. {"model": "gpu:1 (rank 1 of 2)", "engine": "graphs"}."""
        where = f"gpu:{self.physical_gpus[0]}" if self.physical_gpus else "cpu"
        placed = {"model": f"{where} (rank {self.ranks.rank} of {self.ranks.world})", "engine": self.engine_kind(),
                  "all_reduce": self.all_reduce}
        return {**placed, "weights": "random (benchmark)"} if self.entry.random_weights else placed

    def torch_modules(self) -> dict[str, Any]:
        """Nothing for the host weight cache: a rank's shard is resident for good."""
        return {}
