"""A one-token decode step written for Llama-family models, for the `fused` engine.

transformers' forward is general: for one decode token it rebuilds the attention mask and the rotary
angles, runs q, k and v (and gate and up) as separate matrix products, and spends a dozen small kernels
per norm and per rotary. On a GPU a decode step is bound by how many kernels run, not by the bytes they
read, once the weights are shared by two ranks (bench/voice_tp.py). This step reads the same weights
with fewer, larger kernels:
- q/k/v and gate/up are each one matrix product: the projections' weights are laid side by side in one
  tensor, in place (the modules keep views of it, so prefill and the host weight cache still see them);
- the rotary angles are a table made once for every position of the static cache;
- grouped-query attention reads only the cache positions in use, with the length read on the device, and
  applies the rotary to q and the new k and writes the cache on the way (`decode_attention.attend_step`,
  two Triton kernels; where Triton cannot run, two small matmuls over the whole cache, masked by
  position); KV heads are never copied;
- it is compiled, so inductor fuses each norm, rotary and residual into one kernel, and then replayed
  from a CUDA graph like every static step.

The step reads and writes transformers' own static cache, so prefill stays the model's own forward.
Tensor-parallel ranks sum their partial outputs with the model's all-reduce after o_proj and down_proj,
and gather the logits of a head split by vocabulary rows.
Architectures it does not know (extra norms, other MLPs) keep the general step: `problems()` says why.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from shared.engine.quantized_linear import QuantizedLinear
from shared.kernels import decode_attention, gemv

logger = logging.getLogger(__name__)

FLOAT_WEIGHTS = (torch.float16, torch.bfloat16, torch.float32)  # what the step's products read as they are
FAMILIES = ("llama", "mistral", "qwen2")  # pre-norm decoders with RMSNorm, rotary q/k and a gated SiLU MLP
REDUCE_ATTRIBUTE = "tensor_parallel_reduce"  # set on a rank's model: sums row-parallel outputs over ranks
GATHER_ATTRIBUTE = "tensor_parallel_gather"  # set on a rank's model whose LM head is split: the whole logits


def problems(model: Any) -> list[str]:
    """Why the fused step cannot run `model` ([] = it can)."""
    config = model.config
    found = []
    if getattr(config, "model_type", "") not in FAMILIES:
        found.append(f"model type {getattr(config, 'model_type', '?')!r} is not one of {', '.join(FAMILIES)}")
        return found
    if getattr(config, "hidden_act", "silu") != "silu":
        found.append(f"activation {config.hidden_act!r} (the step knows silu)")
    if getattr(config, "mlp_bias", False):
        found.append("MLP biases (the step's gate/up/down have none)")
    layer = model.model.layers[0]
    needed = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
              "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")
    names = {name for name, _ in layer.named_modules()}
    missing = [name for name in needed if name not in names]
    if missing:
        found.append(f"decoder layers lack {', '.join(missing)}")
        return found
    modules = dict(layer.named_modules())
    projections = [modules[name] for name in needed[:7]]
    lyra = {f"Lyra {module.form}" for module in projections if isinstance(module, QuantizedLinear)}
    weights = [getattr(module, "weight", None) for module in projections if not isinstance(module, QuantizedLinear)]
    packed = sorted(lyra | {"no weight tensor" if weight is None else str(weight.dtype) for weight in weights
                            if weight is None or weight.dtype not in FLOAT_WEIGHTS})
    if packed:  # Lyra and bitsandbytes pack int4 and int8 weights; float8 and GPTQ/AWQ keep scales beside them
        found.append(f"quantized projections ({', '.join(packed)}); the step multiplies float16, bfloat16 or "
                     "float32 weights")
    return found


def side_by_side(linears: Sequence[nn.Linear], attribute: str = "weight", copy: bool = True) -> torch.Tensor | None:
    """One tensor holding the linears' `attribute`s stacked by rows; the modules keep views of it.

    Already stacked (a previous build, or the host weight cache's buffer laid them out in a row): that
    tensor, no copy. Else, with `copy`, the rows are copied once into a new tensor and each module's
    parameter becomes a view of its block; without, None (the step then multiplies them one by one).
    """
    parts = [getattr(linear, attribute) for linear in linears]
    if any(part is None for part in parts):
        return None
    first = parts[0]
    shape = (sum(part.shape[0] for part in parts), *first.shape[1:])
    # Outside inference mode: parameters made in it could never again be viewed or moved by the host cache.
    with torch.inference_mode(False), torch.no_grad():
        if _consecutive(parts):
            return first.as_strided(shape, first.stride(), first.storage_offset())
        if not copy:
            return None
        stacked = torch.cat([part.detach() for part in parts])
        start = 0
        for linear, part in zip(linears, parts, strict=True):
            setattr(linear, attribute, nn.Parameter(stacked[start:start + part.shape[0]], requires_grad=False))
            start += part.shape[0]
        return stacked


def _consecutive(parts: Sequence[torch.Tensor]) -> bool:
    storage = parts[0].untyped_storage().data_ptr()
    offset = parts[0].storage_offset()
    for part in parts:
        if not part.is_contiguous() or part.untyped_storage().data_ptr() != storage or part.storage_offset() != offset:
            return False
        offset += part.numel()
    return True


def tiling_name(tile: gemv.Tiling | None) -> str:
    return "cuBLAS" if tile is None else f"{tile.rows}x{tile.columns}/{tile.warps}w/{tile.stages}s"


class FusedLayer:
    """One decoder layer's tensors, as the step reads them.

    Stacking copies only on the first build (`copy`): after a swap the weights live in the host weight
    cache's buffer, and a copy there would hold the layer twice; unstacked projections run one by one.
    """

    def __init__(self, layer: Any, copy: bool) -> None:
        attention, mlp = layer.self_attn, layer.mlp
        projections = [attention.q_proj, attention.k_proj, attention.v_proj]
        self.input_norm = layer.input_layernorm.weight
        self.post_norm = layer.post_attention_layernorm.weight
        self.qkv = side_by_side(projections, copy=copy)
        self.qkv_bias = side_by_side(projections, "bias", copy=copy)
        if attention.q_proj.bias is not None and self.qkv_bias is None:
            self.qkv = None  # weights side by side but biases apart: multiply q, k and v one by one
        self.qkv_parts = [(linear.weight, linear.bias) for linear in projections]
        self.output = attention.o_proj.weight
        self.output_bias = attention.o_proj.bias
        self.gate_up = side_by_side([mlp.gate_proj, mlp.up_proj], copy=copy)
        self.gate, self.up = mlp.gate_proj.weight, mlp.up_proj.weight
        self.down = mlp.down_proj.weight
        self.q_rows = attention.q_proj.weight.shape[0]
        self.kv_rows = attention.k_proj.weight.shape[0]
        self.intermediate = mlp.gate_proj.weight.shape[0]


class FusedStep:
    """The decode step of a Llama-family model over transformers' static cache; call it like `decode_step`."""

    def __init__(self, model: Any, max_len: int) -> None:
        found = problems(model)
        if found:
            raise ValueError("; ".join(found))
        self.max_len = max_len
        self.tiles: dict[str, gemv.Tiling | None] = {}  # each product's tiling (None: cuBLAS), tuned at first bind
        self.bind(model, copy=True)

    def bind(self, model: Any, copy: bool = False) -> None:
        """Read the model's tensors where they are now (again after the weights moved: a swap)."""
        config = model.config
        inner = model.model
        max_len = self.max_len
        self.layers = [FusedLayer(layer, copy) for layer in inner.layers]
        self.embed = inner.embed_tokens.weight
        self.final_norm = inner.norm.weight
        self.head = model.get_output_embeddings().weight
        self.eps = float(config.rms_norm_eps)
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.scaling = float(inner.layers[0].self_attn.scaling)
        self.reduce: Callable[[torch.Tensor], torch.Tensor] | None = getattr(model, REDUCE_ATTRIBUTE, None)
        self.gather: Callable[[torch.Tensor], torch.Tensor] | None = getattr(model, GATHER_ATTRIBUTE, None)
        self.cos, self.sin = self._rotary_table(inner, max_len)
        self.positions = torch.arange(max_len, device=self.embed.device)
        self.kernel = decode_attention.prepare(self.embed.device, self.head_dim, self.embed.dtype, step=True)
        stacked = all(layer.qkv is not None and layer.gate_up is not None for layer in self.layers)
        # Triton products and norms (gemv), with the attention kernel: 7 kernels a layer. One GPU only: on
        # tensor ranks inductor's products were as fast or faster (2 x H200, fused, peer: 70B 18.75 ms a token
        # against 19.33 on the kernels; 8B 3.02 and 2.96), so ranks keep them.
        self.products = self.kernel and stacked and self.reduce is None and \
            gemv.prepare(self.embed.device, self.embed.dtype)
        if self.products and not self.tiles:  # once: a swap moves the weights, not their shapes
            self.tiles = self._tune()

    def _tune(self) -> dict[str, gemv.Tiling | None]:
        """Each product's fastest tiling (or cuBLAS), timed on this model's own weights on this GPU."""
        import time

        started = time.perf_counter()
        with torch.no_grad():
            tiles = {"qkv": gemv.tune([layer.qkv for layer in self.layers]),
                     "output": gemv.tune([layer.output for layer in self.layers]),
                     "gate_up": gemv.tune([layer.gate_up for layer in self.layers], gated=True),
                     "down": gemv.tune([layer.down for layer in self.layers]),
                     "head": gemv.tune([self.head])}
        if self.embed.device.type == "cuda":
            logger.info("fused step: products tuned in %.1fs: %s", time.perf_counter() - started,
                        ", ".join(f"{name} {tiling_name(tile)}" for name, tile in tiles.items()))
        return tiles

    def unbind(self) -> None:
        """Drop every reference to the model's tensors (they are leaving the device)."""
        self.layers, self.embed, self.final_norm, self.head = [], None, None, None
        self.cos = self.sin = self.positions = None

    def _rotary_table(self, inner: Any, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for every cache position, [max_len, head_dim], exactly as the model's rotary makes them."""
        positions = torch.arange(max_len, device=self.embed.device).view(1, -1)
        probe = torch.zeros((), dtype=self.embed.dtype, device=self.embed.device)
        cos, sin = inner.rotary_emb(probe, positions)
        return cos[0].contiguous(), sin[0].contiguous()

    def __call__(self, model: Any, token: torch.Tensor, mask: torch.Tensor, cache: Any, keyword: str) -> torch.Tensor:
        """Logits [1, vocab] for `token` at the cache's position; writes its K/V and advances the cache."""
        position = cache.layers[0].cumulative_length
        if self.products:
            return self._kernel_step(token, cache, position)
        cos = self.cos.index_select(0, position.view(1))  # [1, head_dim]
        sin = self.sin.index_select(0, position.view(1))
        visible = (self.positions <= position).view(1, 1, -1)  # [1, 1, max_len]
        hidden = self.embed.index_select(0, token.view(1))  # [1, hidden]
        for layer, cached in zip(self.layers, cache.layers, strict=True):
            hidden = hidden + self._attend(layer, self._norm(hidden, layer.input_norm), cached, position, cos, sin,
                                           visible)
            hidden = hidden + self._mlp(layer, self._norm(hidden, layer.post_norm))
        torch._foreach_add_([cached.cumulative_length for cached in cache.layers], 1)
        logits = torch.matmul(self._norm(hidden, self.final_norm), self.head.t())
        return self.gather(logits) if self.gather is not None else logits

    def _kernel_step(self, token: torch.Tensor, cache: Any, position: torch.Tensor) -> torch.Tensor:
        """The step in Lyra's kernels: per layer two norms (each with its residual sum), three products, attention.

        The residual sum is added where the next norm reads it, so it never costs a kernel of its own.
        """
        hidden = self.embed.index_select(0, token.view(1))  # [1, hidden]
        partial: torch.Tensor | None = None  # the previous block's output, not yet added
        for layer, cached in zip(self.layers, cache.layers, strict=True):
            hidden, normed = gemv.add_norm(hidden, layer.input_norm, self.eps, partial)
            qkv = gemv.product(normed, layer.qkv, layer.qkv_bias, tile=self.tiles["qkv"])
            attended = decode_attention.attend_step(qkv, self.cos, self.sin, cached.keys, cached.values,
                                                    position.view(1), self.scaling, layer.kv_rows // self.head_dim)
            partial = gemv.product(attended.reshape(1, -1), layer.output, layer.output_bias, tile=self.tiles["output"])
            hidden, normed = gemv.add_norm(hidden, layer.post_norm, self.eps, partial)
            active = gemv.product(normed, layer.gate_up, gated=True, tile=self.tiles["gate_up"])
            partial = gemv.product(active, layer.down, tile=self.tiles["down"])
        torch._foreach_add_([cached.cumulative_length for cached in cache.layers], 1)
        _, normed = gemv.add_norm(hidden, self.final_norm, self.eps, partial)
        logits = gemv.product(normed, self.head, tile=self.tiles["head"])
        return self.gather(logits) if self.gather is not None else logits

    def _norm(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMSNorm in float32, as the model's own norm (the same function the kernels are checked against)."""
        return gemv.rms_norm(hidden, weight, self.eps)

    def _attend(self, layer: FusedLayer, hidden: torch.Tensor, cached: Any, position: torch.Tensor,
                cos: torch.Tensor, sin: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        if layer.qkv is not None:
            qkv = nn.functional.linear(hidden, layer.qkv, layer.qkv_bias)
        else:
            qkv = torch.cat([nn.functional.linear(hidden, weight, bias) for weight, bias in layer.qkv_parts], dim=-1)
        dim = self.head_dim
        if self.kernel:  # rotary, the cache write and attention: two kernels
            attended = decode_attention.attend_step(qkv, self.cos, self.sin, cached.keys, cached.values,
                                                    position.view(1), self.scaling, layer.kv_rows // dim)
        else:
            query, key, value = qkv.split((layer.q_rows, layer.kv_rows, layer.kv_rows), dim=-1)
            query = decode_attention.rotate(query.view(-1, dim), cos, sin)  # [heads, dim]
            key = decode_attention.rotate(key.view(-1, dim), cos, sin)  # [kv heads, dim]
            cached.keys.index_copy_(2, position.view(1), key.view(1, -1, 1, dim))
            cached.values.index_copy_(2, position.view(1), value.view(1, -1, 1, dim))
            keys, values = cached.keys[0], cached.values[0]  # [kv heads, max_len, dim]
            grouped = query.view(keys.shape[0], -1, dim)  # head h reads KV head h // (heads / kv heads)
            attended = self._attend_masked(grouped, keys, values, visible)
        out = nn.functional.linear(attended.reshape(1, -1), layer.output, layer.output_bias)  # bias: rank 0's only
        return self.reduce(out) if self.reduce is not None else out

    def _attend_masked(self, grouped: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                       visible: torch.Tensor) -> torch.Tensor:
        """[kv, group, dim] attention over the whole cache, the unused tail masked (where the kernel cannot run)."""
        scores = torch.matmul(grouped, keys.transpose(1, 2)).float() * self.scaling  # [kv, group, max_len]
        scores = scores.masked_fill(~visible, float("-inf"))
        return torch.matmul(torch.softmax(scores, dim=-1).to(values.dtype), values)  # [kv, group, dim]

    def _mlp(self, layer: FusedLayer, hidden: torch.Tensor) -> torch.Tensor:
        if layer.gate_up is not None:
            gate, up = torch.matmul(hidden, layer.gate_up.t()).split(layer.intermediate, dim=-1)
        else:
            gate, up = torch.matmul(hidden, layer.gate.t()), torch.matmul(hidden, layer.up.t())
        out = torch.matmul(nn.functional.silu(gate) * up, layer.down.t())
        return self.reduce(out) if self.reduce is not None else out

