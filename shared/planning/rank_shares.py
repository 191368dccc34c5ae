"""Each rank's share of a tensor-parallel voice (`parallel = "tensor"`), for the plan and the ledger.

Per rank, over `world` ranks (one per GPU):
    weights     = replicated + sharded / world
                  replicated: input embeddings and norms (every rank holds them whole), and the LM head
                  where it is tied to the embeddings;
                  sharded: q/k/v/o and gate/up/down of every decoder layer, split by heads and columns,
                  and an untied LM head, split by vocabulary rows
    kv_cache    = kv_cache / world              (each rank keeps the KV heads its query heads read)
    activations = one prefill's working set with the MLP's intermediate and the attention heads split:
                  context x (4 x hidden + 3 x intermediate / world) elements, the fp32 logits row, and the
                  captured step's graph pool (its score rows split by heads; cuBLAS workspaces whole)
    exchange    = the all-reduce's own buffers: peer memory for "peer" (and "auto", which tries it first);
                  NCCL's buffers are part of its communicator
    overhead    = the fragmentation share of this rank's weights and KV cache
The CUDA context of each rank is the voice service's context reserve on that GPU, counted by the plan
as for any process pinned there. Nothing here imports torch.
"""

from __future__ import annotations

from shared.config.schema import ModelEntry
from shared.config.units import format_gb
from shared.planning.estimate import (
    FRAGMENTATION,
    GRAPH_WORKSPACE_BYTES,
    GpuSplit,
    MemoryEstimate,
    decode_graph_bytes,
    split_across_gpus,
)
from shared.planning.inventory import ModelShape, inventory_for

# The peer all-reduce's buffers (shared/distributed/peer_reduce.py allocates them from these; the plan counts them).
PEER_CAPACITY = 256 * 1024  # elements per rank region: a step's vectors and a split head's logits; larger: NCCL
PEER_BLOCK = 512  # elements per program: one epoch counter each
PEER_WORD_BYTES = 8  # each element travels as one word: its bits and the call's epoch
EPOCH_BYTES = 8
FAILURE_COUNT_BYTES = 4


def peer_words(world: int, capacity: int = PEER_CAPACITY) -> int:
    """Words in one rank's peer buffer: two slots (alternate epochs), each a region of `capacity` per rank."""
    return 2 * world * capacity


def peer_epochs(capacity: int = PEER_CAPACITY) -> int:
    """Epoch counters of one rank: one per program of PEER_BLOCK elements."""
    return -(-capacity // PEER_BLOCK)


def sharded_fraction(shape: ModelShape) -> float:
    """The share of all parameters that are split: the attention and MLP projections, and an untied LM head."""
    kv_width = sum(kv * dim for kv, dim, _ in shape.attention_layers) / max(len(shape.attention_layers), 1)
    q_width = shape.num_heads * (shape.attention_layers[0][1] if shape.attention_layers else 0)
    per_layer = shape.hidden_size * (2 * q_width + 2 * kv_width) + 3 * shape.hidden_size * shape.intermediate_size
    embeddings = shape.vocab_size * shape.hidden_size
    head = 0 if shape.tied_embeddings else embeddings
    total = shape.num_layers * per_layer + embeddings + head + (2 * shape.num_layers + 1) * shape.hidden_size
    return (shape.num_layers * per_layer + head) / total


def exchange_bytes(all_reduce: str, world: int) -> int:
    """The buffers a rank's all-reduce allocates besides the process group's: two slots per rank of 8-byte words
    and the epoch counters (peer)."""
    if all_reduce in ("auto", "peer"):
        return peer_words(world) * PEER_WORD_BYTES + peer_epochs() * EPOCH_BYTES + FAILURE_COUNT_BYTES
    return 0


def rank_bytes(estimate: MemoryEstimate, entry: ModelEntry, shape: ModelShape | None, world: int) -> int:
    """Bytes one rank needs on its GPU (see the module docstring)."""
    if shape is None or world < 2:
        return estimate.total
    sharded = estimate.weights * sharded_fraction(shape)
    weights = estimate.weights - sharded + sharded / world
    kv = estimate.kv_cache / world
    element = 4 if estimate.kv_cache and estimate.dtype == "float32" else 2
    mlp_split = entry.max_context * 3 * shape.intermediate_size * element * (1 - 1 / world)
    graph = decode_graph_bytes(entry, shape)
    graph_split = max(graph - GRAPH_WORKSPACE_BYTES, 0) * (1 - 1 / world)
    activations = estimate.activations - mlp_split - graph_split
    exchange = exchange_bytes(entry.all_reduce, world)
    return round(weights + kv + activations + exchange + FRAGMENTATION * (weights + kv))


def voice_split(estimate: MemoryEstimate, entry: ModelEntry, gpus: list[int], device_map: str | dict[str, int | str],
                max_memory: dict[str, str], default_caps: dict[int, int] | None = None) -> GpuSplit:
    """Where a model's bytes land: one equal rank share per GPU for tensor ranks, else `split_across_gpus`."""
    if entry.parallel != "tensor" or len(gpus) < 2:
        return split_across_gpus(estimate, gpus, device_map, max_memory, default_caps)
    if estimate.source == "declared":  # memory_gb: the whole voice, shared equally by its ranks
        return GpuSplit(dict.fromkeys(gpus, estimate.total // len(gpus)))
    share = rank_bytes(estimate, entry, inventory_for(entry).shape, len(gpus))
    note = f"tensor parallel: {len(gpus)} ranks of {format_gb(share)} (weights split by heads and columns)"
    return GpuSplit(dict.fromkeys(gpus, share), 0, (note,))
