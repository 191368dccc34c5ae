"""How much GPU memory a model will need, computed before anything is loaded.

All sizes are bytes; reports use GB = 10**9 bytes (shared.config.units; accelerate's "47GB" in max_memory).

    total = weights + max(kv_cache + recurrent_state + activations, load_transient) + overhead

weights (from a `ParameterInventory`, see shared.planning.inventory):
    quantization "none":  elements x dtype bytes (float32 4, float16/bfloat16 2; "auto" = as stored,
                          bfloat16 for an architecture or a parameter count, float32 for GGUF, which
                          transformers dequantizes)
    "int8" (Lyra's):      the nn.Linear weights inside the decoder layers 1 byte each + one scale per output
                          row in the compute dtype; everything else (embeddings, lm_head, norms, biases) in
                          the compute dtype
    "int4" (Lyra's):      the same weights 0.5 byte each + one scale and one zero point per 128 weights of a
                          row in the compute dtype (0.53125 byte a weight in 16 bits); the rest as for int8
    "bnb-int8" (bitsandbytes LLM.int8): Linear weights 1 byte each + one fp32 scale per output row;
                          everything else (embeddings, lm_head, norms, biases, convs) in the compute dtype
    "bnb-nf4" (bitsandbytes NF4, blocksize 64, no double quantization, the transformers defaults):
                          Linear weights 0.5 byte + one fp32 absmax per 64 = 0.5625 byte each; the rest
                          in the compute dtype.
    Only plain nn.Linear is quantized: transformers 5 keeps fused 3-D MoE expert tensors (Jamba's
    experts) unquantized (bitsandbytes-foundation/bitsandbytes#1849), so they stay 16-bit here too.
load_transient (Lyra's int8/int4 only): the loader quantizes one decoder layer at a time on its GPU, so while
    it loads a GPU holds, beside its quantized weights, one layer's Linear weights in the compute dtype and
    the rounding's scratch (QUANTIZE_SCRATCH_BYTES). The KV cache and the decode engine's buffers are made
    after the load, so the peak is the larger of the two.
kv_cache  = 2 (K and V) x sum over attention layers of kv_heads x head_dim x min(context, window) x
            bytes, at batch 1, in the compute dtype (2 bytes; 4 for float32).
recurrent_state = Mamba layers x d_inner x (d_state + d_conv) x bytes (fixed, independent of context).
activations (a rule, replaced by measured numbers once a worker reports them):
    causal / vision-language LM: one prefill of max_context tokens at batch 1 keeps about
        context x (4 x hidden + 3 x intermediate) elements live (residual, attention output, norms, and
        the MLP's gate/up/act), plus heads x context^2 scores with eager attention, plus for Mamba layers
        the reference scan's fp32 discretised A and B*u (2 x context x d_inner x d_state x 4 bytes; ~0
        with mamba-ssm kernels), plus one row of fp32 logits; plus, for the decode engine's captured step
        (engine "graphs" or "compiled"), its graph pool: 96 MiB of cuBLAS workspaces for the capture
        streams and about eight fp32 score rows over the cache per attention layer and head
        (8 x layers x heads x context x 4 bytes). Llama-3-8B shape at 4096 tokens: 0.235 GB rule, 0.235 GB
        measured on an H200 beside the 0.537 GB static cache. The static cache itself is kv_cache below.
    image generation: 3 GB at 1024x1024 (FLUX; the VAE decode dominates), scaled by the pixels of the
        largest image a request may ask for (image.max_side squared); with vae_tiling the decode stays at
        its 1024x1024 cost and only a third of the growth remains.
overhead  = 5% of (weights + kv_cache): caching-allocator fragmentation.
The decode engine preallocates the whole kv_cache at load (a static cache of max_context tokens).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

from shared.config.schema import LyraConfig, ModelEntry
from shared.config.units import GB, MiB, format_gb, parse_size
from shared.planning.architectures import get_architecture
from shared.planning.device_split import LYRA_FORMS, QUANTIZE_SCRATCH_BYTES, lyra_bytes
from shared.planning.inventory import ModelShape, ParameterInventory, architecture_shape, inventory_for
from shared.wire.names import WORKER_SERVICES

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
INT8_BYTES_PER_WEIGHT = 1.0
INT8_SCALE_BYTES_PER_ROW = 4  # fp32 SCB per output row
NF4_BLOCKSIZE = 64
NF4_BYTES_PER_WEIGHT = 0.5 + 4 / NF4_BLOCKSIZE  # packed 4-bit + fp32 absmax per block = 0.5625
IMAGE_WORKSPACE_BYTES = 3 * GB
GRAPH_WORKSPACE_BYTES = 96 * MiB  # cuBLAS workspaces of the streams a decode step is captured on
FRAGMENTATION = 0.05
UNITS_WITHOUT_LAYERS = 100  # split granularity when the layer count is unknown


@dataclass(frozen=True)
class MemoryEstimate:
    """One model's expected footprint, by component, in bytes."""

    model: str
    source: str  # "safetensors headers" | "gguf" | "meta-device architecture" | "parameter count" | "declared"
    parameters: int
    weights: int
    kv_cache: int
    recurrent_state: int
    activations: int  # working set of one forward pass; needed on every GPU that holds layers
    overhead: int
    dtype: str
    quantization: str
    context: int
    layers: int  # split granularity for multi-GPU placement
    notes: tuple[str, ...] = ()
    attention_indices: tuple[int, ...] = ()  # decoder layers that keep a KV cache (placement puts it with them)
    load_transient: int = 0  # beside the weights while a quantizing load runs, on every GPU holding layers

    @property
    def load_excess(self) -> int:
        """What the load's peak needs beyond the KV cache, state and activations made after it (0 = nothing)."""
        return load_excess(self, self.kv_cache, self.recurrent_state)

    @property
    def total(self) -> int:
        """Everything the model needs on its GPUs together, at the larger of its load's and its serving's peak."""
        return self.weights + self.kv_cache + self.recurrent_state + self.activations + self.load_excess + \
            self.overhead


@dataclass(frozen=True)
class GpuSplit:
    """Where a model's bytes land: per physical GPU, and weights device_map would push off the GPUs."""

    per_gpu: dict[int, int]
    spilled: int = 0  # weight bytes beyond max_memory (accelerate would offload them to CPU/disk)
    notes: tuple[str, ...] = field(default=())
    weights: dict[int, int] = field(default_factory=dict)  # weight bytes alone per GPU, where placed exactly


# ----------------------------------------------------------------------------- arithmetic


def compute_element_bytes(entry: ModelEntry, inventory: ParameterInventory) -> float:
    """Bytes per unquantized element: the configured dtype, or as stored for "auto"."""
    return DTYPE_BYTES[entry.dtype] if entry.dtype in DTYPE_BYTES else inventory.auto_element_bytes


def weight_bytes(inventory: ParameterInventory, element_bytes: float, quantization: str, dtype: str) -> int:
    """Weights in memory after casting / quantizing (see the module docstring for the arithmetic)."""
    if quantization == "none":
        if dtype == "auto" and inventory.stored_bytes and inventory.source != "gguf":
            return inventory.stored_bytes
        return math.ceil(inventory.total_elements * element_bytes)
    if quantization in LYRA_FORMS:
        layers = inventory.layer_linear_elements
        packed = lyra_bytes(quantization, layers, inventory.layer_linear_rows, element_bytes)
        return math.ceil(packed + (inventory.total_elements - layers) * element_bytes)
    rest = inventory.other_elements * element_bytes
    if quantization == "bnb-int8":
        linear = inventory.linear_elements * INT8_BYTES_PER_WEIGHT + inventory.linear_rows * INT8_SCALE_BYTES_PER_ROW
    elif quantization == "bnb-nf4":
        linear = inventory.linear_elements * NF4_BYTES_PER_WEIGHT
    else:
        raise ValueError(f"unknown quantization {quantization!r}")
    return math.ceil(linear + rest)


def offloaded_weight_bytes(inventory: ParameterInventory, element_bytes: float, quantization: str,
                           dtype: str) -> int:
    """With image.cpu_offload the components live in host RAM and visit the GPU one at a time (accelerate's
    model offload): the GPU holds the largest component's weights, never two at once."""
    return max(weight_bytes(replace(inventory, linear_elements=linear, linear_rows=rows, other_elements=other,
                                    stored_bytes=0), element_bytes, quantization, dtype)
               for _, linear, rows, other in inventory.components)


def load_transient_bytes(inventory: ParameterInventory, element_bytes: float, quantization: str) -> int:
    """One decoder layer's Linear weights in the compute dtype and the rounding's scratch, for a Lyra form."""
    if quantization not in LYRA_FORMS:
        return 0
    largest = inventory.largest_layer_linear_elements
    if not largest and inventory.shape is not None:  # counted without layers: an equal share
        largest = inventory.layer_linear_elements // max(inventory.shape.num_layers, 1)
    return math.ceil(largest * element_bytes) + QUANTIZE_SCRATCH_BYTES


def kv_cache_bytes(shape: ModelShape | None, context: int, element_bytes: int) -> int:
    """K and V for `context` tokens at batch 1 (sliding-window layers keep only their window)."""
    if shape is None:
        return 0
    per_token = sum(kv * dim * (min(context, window) if window else context)
                    for kv, dim, window in shape.attention_layers)
    return 2 * per_token * element_bytes


def recurrent_state_bytes(shape: ModelShape | None, element_bytes: int) -> int:
    """Mamba conv + SSM state of every recurrent layer (fixed size)."""
    return 0 if shape is None else shape.recurrent_layers * shape.recurrent_state_elements * element_bytes


def activation_bytes(entry: ModelEntry, shape: ModelShape | None, element_bytes: int) -> int:
    """The documented activation rule: one max_context prefill at batch 1 (or a fixed image workspace)."""
    if entry.kind == "image_generation":
        return image_workspace_bytes(entry)
    if shape is None:
        return 0
    context = entry.max_context
    live = context * (4 * shape.hidden_size + 3 * shape.intermediate_size) * element_bytes
    if entry.attn_implementation == "eager":
        live += shape.num_heads * context * context * element_bytes
    if shape.recurrent_layers:
        live += 2 * context * shape.recurrent_scan_elements * 4
    return live + shape.vocab_size * 4 + decode_graph_bytes(entry, shape)


def image_workspace_bytes(entry: ModelEntry) -> int:
    """The artist's working set for the largest image a request may ask for (max_side x max_side).

    3 GB at 1024 x 1024 (FLUX.1-schnell measured 2.6 GB above its weights on an H200), growing with the
    pixel count: the VAE decode and the transformer's image tokens both scale with it. VAE tiling decodes
    in tiles, so the decode stays at its 1024 x 1024 cost and only the transformer's share (about a third)
    keeps growing.
    """
    scale = max(entry.image.max_side ** 2, entry.image.width * entry.image.height) / 1024 ** 2
    if entry.image.vae_tiling and scale > 1:
        scale = 1 + (scale - 1) / 3
    return int(IMAGE_WORKSPACE_BYTES * scale)


def decode_graph_bytes(entry: ModelEntry, shape: ModelShape) -> int:
    """What a captured decode step keeps allocated beside the static KV cache (engine graphs or compiled)."""
    split = (isinstance(entry.device_map, str) and entry.device_map not in ("", "cuda")) or \
        (isinstance(entry.device_map, dict) and len(set(entry.device_map.values())) > 1)
    if entry.engine == "eager" or entry.backend != "transformers" or shape.recurrent_layers or split:
        return 0  # eager, hybrid Mamba (dynamic cache) and split models capture no graph
    scores = 8 * len(shape.attention_layers) * shape.num_heads * entry.max_context * 4
    return GRAPH_WORKSPACE_BYTES + scores


# ----------------------------------------------------------------------------- one model


REMOTE_SOURCE = "remote (openai backend)"


def estimate_model(entry: ModelEntry) -> MemoryEstimate:
    """Estimate one configured model without loading it; a declared `memory_gb` overrides everything."""
    if entry.backend == "openai":  # served elsewhere: nothing of it is resident here
        return MemoryEstimate(entry.name, REMOTE_SOURCE, 0, 0, 0, 0, 0, 0, entry.dtype, entry.quantization,
                              entry.max_context, UNITS_WITHOUT_LAYERS,
                              (f"runs at {entry.remote.base_url} as {entry.remote.model}: no local VRAM",))
    if entry.memory_gb or (entry.backend == "fake" and not (entry.architecture or entry.parameters_b)):
        note = f"memory_gb = {entry.memory_gb} declared in the config" if entry.memory_gb else "fake backend"
        return MemoryEstimate(entry.name, "declared", 0, int(entry.memory_gb * GB), 0, 0, 0, 0, entry.dtype,
                              entry.quantization, entry.max_context, _declared_layers(entry), (note,))
    inventory = inventory_for(entry)
    element = compute_element_bytes(entry, inventory)
    compute = 4 if element >= 4 else 2  # KV and activations: fp32 stays fp32, everything else runs 16-bit
    shape = inventory.shape
    weights = weight_bytes(inventory, element, entry.quantization, entry.dtype)
    text_model = entry.kind != "image_generation"
    if not text_model and entry.image.cpu_offload and inventory.components:
        weights = offloaded_weight_bytes(inventory, element, entry.quantization, entry.dtype)
    kv = kv_cache_bytes(shape, entry.max_context, compute) if text_model else 0
    return MemoryEstimate(
        model=entry.name, source=inventory.source, parameters=inventory.total_elements, weights=weights,
        kv_cache=kv, recurrent_state=recurrent_state_bytes(shape, compute) if text_model else 0,
        activations=activation_bytes(entry, shape, compute), overhead=int(FRAGMENTATION * (weights + kv)),
        dtype=_dtype_label(entry, inventory, element), quantization=entry.quantization,
        context=entry.max_context, layers=shape.num_layers if shape and text_model else UNITS_WITHOUT_LAYERS,
        notes=_notes(entry, inventory, text_model),
        attention_indices=shape.attention_indices if shape and text_model else (),
        load_transient=load_transient_bytes(inventory, element, entry.quantization),
    )


def _notes(entry: ModelEntry, inventory: ParameterInventory, text_model: bool) -> tuple[str, ...]:
    """What the operator should know about how this estimate was made."""
    notes = [inventory.detail] if inventory.detail else []
    if not text_model and entry.image.cpu_offload and inventory.components:
        notes.append("image.cpu_offload: components wait in host RAM and visit the GPU one at a time; the GPU "
                     "holds the largest one")
    if text_model and inventory.shape is None:
        notes.append("model shape unknown: KV cache and activations not estimated (set `architecture`)")
    lyra = entry.quantization in LYRA_FORMS
    kept = inventory.total_elements - inventory.layer_linear_elements if lyra else inventory.other_elements
    if entry.quantization != "none" and kept > 0.5 * inventory.total_elements:
        rule = ("Lyra's int8/int4 quantize the nn.Linear weights of the decoder layers only" if lyra else
                "bitsandbytes quantizes nn.Linear only (bitsandbytes-foundation/bitsandbytes#1849)")
        notes.append(f"{kept / 1e9:.1f}B of {inventory.total_elements / 1e9:.1f}B parameters are not nn.Linear "
                     f"weights (embeddings, norms, fused MoE experts) and stay 16-bit: {rule}")
    if lyra:
        element = compute_element_bytes(entry, inventory)
        transient = format_gb(load_transient_bytes(inventory, element, entry.quantization))
        notes.append(f"quantized on load one decoder layer at a time: {transient} (one layer's Linear weights "
                     "unquantized, and the rounding's scratch) beside the quantized weights, before the KV cache")
    if entry.architecture and get_architecture(entry.architecture).notes:
        notes.append(get_architecture(entry.architecture).notes)
    return tuple(notes)


def _declared_layers(entry: ModelEntry) -> int:
    if entry.architecture and entry.kind != "image_generation":
        shape = architecture_shape(entry.architecture)
        if shape is not None:
            return shape.num_layers
    return UNITS_WITHOUT_LAYERS


def _dtype_label(entry: ModelEntry, inventory: ParameterInventory, element: float) -> str:
    if entry.dtype != "auto":
        return entry.dtype
    names = {4.0: "float32", 2.0: "16-bit"}
    return f"auto ({names.get(element, f'{element:.2f} B/param')})"


# ----------------------------------------------------------------------------- placement


def load_excess(estimate: MemoryEstimate, kv: float, state: float) -> int:
    """What a quantizing load holds on a GPU beyond the KV cache, state and activations made there after it."""
    return max(0, round(estimate.load_transient - kv - state) - estimate.activations)


def cuda_context_bytes(config: LyraConfig) -> dict[int, int]:
    """CUDA context reserve per physical GPU: one per worker process pinned to it."""
    reserve = {gpu.index: int(gpu.context_reserve_gb * GB) for gpu in config.gpus}
    total = dict.fromkeys(reserve, 0)
    for service in WORKER_SERVICES:
        for gpu in config.gpus_of(service):
            total[gpu] += reserve.get(gpu, 0)
    return total


def split_across_gpus(estimate: MemoryEstimate, gpus: list[int], device_map: str | dict[str, int | str],
                      max_memory: dict[str, str], default_caps: dict[int, int] | None = None) -> GpuSplit:
    """Place a model on its service's GPUs, layer by layer, the way transformers/accelerate would.

    `gpus` are the physical GPUs of the process; device_map indices and max_memory keys are relative to
    them (CUDA_VISIBLE_DEVICES order). Weights are split in equal per-layer units (embeddings and head
    folded in proportionally); KV cache, state and overhead follow the layers; the activation working set
    is needed in full on every GPU holding layers (pipeline execution). As in transformers 5:
    max_memory caps weights only, and a GPU missing from a non-empty max_memory gets nothing (without
    max_memory each GPU offers `default_caps`, what is free when the model loads); bitsandbytes scales
    the caps by 0.9; the first GPU keeps one layer free; "auto"/"balanced" cap every GPU but the last at
    1/n of the weights plus 1.25 layers, "sequential" fills GPUs in order, "balanced_low_0" fills GPU 0
    last. Weights that fit nowhere are `spilled` (accelerate would offload them or fail to load).
    """
    if not gpus:
        return GpuSplit({}, 0, ("no GPU: runs on CPU",))
    units = max(estimate.layers, 1)
    if isinstance(device_map, dict):
        counts, spilled_units = _explicit_units(device_map, len(gpus), units)
    elif not device_map:
        counts, spilled_units = [units] + [0] * (len(gpus) - 1), 0
    else:
        caps = _caps(gpus, max_memory, default_caps, estimate.quantization.startswith("bnb-"))
        counts, spilled_units = _auto_units(device_map, estimate.weights / units, units, caps)
    return _materialise(estimate, gpus, counts, spilled_units, units)


def _caps(gpus: list[int], max_memory: dict[str, str], default_caps: dict[int, int] | None,
          quantized: bool) -> list[float]:
    """Weight bytes each relative GPU may take (bitsandbytes' quantizers keep 0.9 of each)."""
    if max_memory:
        caps = [float(parse_size(max_memory[str(i)])) if str(i) in max_memory else 0.0 for i in range(len(gpus))]
    else:
        caps = [float((default_caps or {}).get(gpu, math.inf)) for gpu in gpus]
    return [cap * 0.9 for cap in caps] if quantized else caps


def _auto_units(device_map: str, unit_bytes: float, units: int, caps: list[float]) -> tuple[list[int], int]:
    """Layer units per relative GPU for a string device_map; returns (counts, units left over)."""
    used = [i for i, cap in enumerate(caps) if cap > 0]
    if used:
        caps[used[0]] = max(caps[used[0]] - unit_bytes, 0.0)  # room for the largest layer on the main GPU
    if device_map in ("auto", "balanced") and len(used) > 1:
        per_gpu = units * unit_bytes / len(used) + 1.25 * unit_bytes
        for i in used[:-1]:
            caps[i] = min(caps[i], per_gpu)
    if device_map == "balanced_low_0" and len(used) > 1:
        order = used[1:] + used[:1] + [i for i in range(len(caps)) if i not in used]
        counts, left = _fill([caps[i] for i in order], unit_bytes, units)
        return [counts[order.index(i)] for i in range(len(caps))], left
    return _fill(caps, unit_bytes, units)


def _fill(caps: list[float], unit_bytes: float, units: int) -> tuple[list[int], int]:
    counts, left = [], units
    for cap in caps:
        take = left if unit_bytes == 0 or cap == math.inf else min(left, int(cap // unit_bytes))
        counts.append(take)
        left -= take
    return counts, left


def _explicit_units(device_map: dict[str, int | str], n_gpus: int, units: int) -> tuple[list[int], int]:
    """Units per relative GPU for an explicit {module: device} map; numbered layers count one each."""
    from shared.planning.placement import expand_layer_ranges  # the loader's own expansion: one rule for both

    counts, spilled = [0] * n_gpus, 0
    device_map = expand_layer_ranges(device_map)
    layered = {key: device for key, device in device_map.items() if re.search(r"\.\d+(\.|$)", key)}
    entries = layered or device_map
    for key, device in entries.items():
        weight = units if key == "" else (1 if layered else units / len(entries))
        relative = _relative_device(device)
        if relative is None or relative >= n_gpus:
            spilled += weight
        else:
            counts[relative] += weight
    total = sum(counts) + spilled or 1
    scaled = [round(units * c / total) for c in counts]
    return scaled, units - sum(scaled)


def _relative_device(device: int | str) -> int | None:
    if isinstance(device, int):
        return device
    text = str(device).removeprefix("cuda:")
    return int(text) if text.isdigit() else None  # "cpu" / "disk": off the GPUs


def _materialise(estimate: MemoryEstimate, gpus: list[int], counts: list[int], spilled_units: int,
                 units: int) -> GpuSplit:
    proportional = estimate.weights + estimate.kv_cache + estimate.recurrent_state + estimate.overhead
    per_gpu: dict[int, int] = {}
    for physical, count in zip(gpus, counts, strict=True):
        if count:
            kv, state = estimate.kv_cache * count / units, estimate.recurrent_state * count / units
            per_gpu[physical] = round(proportional * count / units) + estimate.activations + \
                load_excess(estimate, kv, state)
    spilled = round(estimate.weights * spilled_units / units)
    notes = (f"{format_gb(spilled)} of weights do not fit max_memory on GPUs {gpus}",) if spilled else ()
    return GpuSplit(per_gpu, spilled, notes)
