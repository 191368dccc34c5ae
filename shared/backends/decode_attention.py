"""Attention of one decode token over the part of a static KV cache in use, read from the device.

A static cache is as long as the context allows (4096 positions by default) and a CUDA graph replays the
same kernels every step, so the plain step attends over every position and masks the unused tail: at the
70B shape that is 2.5 of 23 ms per token spent on empty cache (bench/results, the fused tensor profile).
This kernel reads the number of positions in use from a device tensor when it runs, so one captured graph
serves every step and reads only what has been written.

It is split-K ("flash decoding"): the cache is cut into fixed chunks; one program per (KV head, chunk)
computes an online softmax over its chunk for all the query heads that share that KV head (grouped-query
attention without copying KV heads), and a second kernel merges the chunks' partial results by their
log-sum-exp. Chunks beyond the length do nothing. Written in Triton. `prepare()` compiles and tries it
once per device, head size and dtype, outside any graph capture, and remembers whether it gave the plain
attention's answer; `usable()` then says so (False for anything not prepared). It runs on CUDA with
Triton installed, or under Triton's CPU interpreter (TRITON_INTERPRET=1), which the tests use.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

CHUNK = 256  # cache positions per program: at short lengths one program per KV head does all the work
BLOCK = 64  # positions per inner step
MIN_DOT = 16  # Triton's matrix products need every side of at least 16

logger = logging.getLogger(__name__)
_kernels_made: tuple | None = None  # Triton kernels, made on first use (importing Triton takes a second)
_tried: dict[tuple[torch.device, int, torch.dtype], bool] = {}  # prepare()'s verdicts


def _where(device: torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def usable(device: torch.device, head_dim: int, dtype: torch.dtype) -> bool:
    """True when `prepare()` found the kernel working for this device, head size and dtype."""
    return _tried.get((_where(device), head_dim, dtype), False)


def prepare(device: torch.device, head_dim: int, dtype: torch.dtype) -> bool:
    """Compile the kernel for (device, head size, dtype) and check it against plain attention, once.

    Call it before any CUDA graph capture. False, with the reason logged, where it cannot run: no Triton,
    a head size that is not a power of two of at least 16, the CPU without the interpreter, or a kernel
    that does not compile or answers wrongly (the caller then keeps the masked matmuls).
    """
    device = _where(device)
    key = (device, head_dim, dtype)
    if key in _tried:
        return _tried[key]
    reason = ""
    if importlib.util.find_spec("triton") is None:
        reason = "Triton is not installed"
    elif head_dim & (head_dim - 1) or head_dim < MIN_DOT:
        reason = f"head size {head_dim} is not a power of two of at least {MIN_DOT}"
    elif device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        reason = f"{device.type} is not a CUDA device"
    else:
        reason = _trial(device, head_dim, dtype)
    _tried[key] = not reason
    if reason and device.type == "cuda":
        logger.warning("decode attention kernel not used on %s (head size %d, %s): %s; attention runs over the "
                       "whole cache instead", device, head_dim, dtype, reason)
    return not reason


def _trial(device: torch.device, head_dim: int, dtype: torch.dtype) -> str:
    """"" if the kernel equals plain attention on a small cache with positions past the length poisoned."""
    generator = torch.Generator(device=device).manual_seed(0)
    query = torch.randn(2, 4, head_dim, device=device, generator=generator).to(dtype)
    keys, values = (torch.randn(2, 2 * CHUNK + 8, head_dim, device=device, generator=generator).to(dtype)
                    for _ in range(2))
    at = CHUNK + 3
    keys[:, at + 1:] = float("nan")
    values[:, at + 1:] = float("nan")
    position = torch.tensor([at], device=device)
    try:
        out = decode_attention(query, keys, values, position, head_dim ** -0.5)
    except Exception as exc:  # a Triton that cannot compile it here (version, shared memory): say why, keep going
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    expected = reference(query, keys.nan_to_num(), values.nan_to_num(), position, head_dim ** -0.5)
    error = (out.float() - expected.float()).abs().max().item()
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    return "" if error <= tolerance else f"differs from plain attention by {error:.3g}"


def decode_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, position: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """query [KV, group, D], keys/values [KV, max_len, D], position: a 1-element tensor (the newest position).

    Returns [KV, group, D] in the query's dtype: softmax(q k^T * scale) v over positions 0..position.
    A custom op, so torch.compile keeps it whole and a CUDA graph captures its two kernels.
    """
    return _attend(query, keys, values, position, scale)


def reference(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, position: torch.Tensor,
              scale: float) -> torch.Tensor:
    """The same attention in plain torch over the whole cache, masked (what the kernel must equal)."""
    visible = torch.arange(keys.shape[1], device=keys.device) <= position.view(-1)
    scores = torch.matmul(query.float(), keys.float().transpose(1, 2)) * scale
    scores = scores.masked_fill(~visible.view(1, 1, -1), float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), values.float()).to(query.dtype)


@torch.library.custom_op("lyra::decode_attention", mutates_args=())
def _attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, position: torch.Tensor,
            scale: float) -> torch.Tensor:
    global _kernels_made
    if _kernels_made is None:
        _kernels_made = _kernels()
    return _launch(_kernels_made, query, keys, values, position, scale)


@_attend.register_fake
def _(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, position: torch.Tensor,
      scale: float) -> torch.Tensor:
    return torch.empty_like(query, memory_format=torch.contiguous_format)


def _launch(kernels: tuple, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
            position: torch.Tensor, scale: float) -> torch.Tensor:
    kv_heads, _, dim = query.shape
    if keys.stride(-1) != 1 or values.stride(-1) != 1 or keys.shape[0] != kv_heads:
        raise ValueError(f"decode attention: keys {tuple(keys.shape)} with strides {keys.stride()} do not fit "
                         f"query {tuple(query.shape)}")
    if dim & (dim - 1) or dim < MIN_DOT:
        raise ValueError(f"decode attention: head dim {dim} is not a power of two of at least {MIN_DOT}")
    if len({query.device, keys.device, values.device, position.device}) != 1:
        raise ValueError("decode attention: query, keys, values and position must be on one device")
    if query.device.type == "cuda":  # Triton launches on the current device: a model split over GPUs
        with torch.cuda.device(query.device):
            return _run(kernels, query.contiguous(), keys, values, position, scale)
    return _run(kernels, query.contiguous(), keys, values, position, scale)


def _run(kernels: tuple, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
         position: torch.Tensor, scale: float) -> torch.Tensor:
    partial_kernel, merge_kernel = kernels
    kv_heads, group, dim = query.shape
    chunks = -(-keys.shape[1] // CHUNK)
    padded = max(MIN_DOT, 1 << (group - 1).bit_length())
    partial = torch.empty((kv_heads, chunks, group, dim), dtype=torch.float32, device=query.device)
    lse = torch.empty((kv_heads, chunks, group), dtype=torch.float32, device=query.device)
    partial_kernel[(kv_heads, chunks)](
        query, keys, values, position, partial, lse, scale,
        keys.stride(0), keys.stride(1), values.stride(0), values.stride(1), keys.shape[1], chunks,
        GROUP=group, PADDED=padded, DIM=dim, CHUNK=CHUNK, BLOCK=BLOCK,
        PRECISION="ieee" if keys.dtype == torch.float32 else "tf32")
    out = torch.empty_like(query)
    merge_kernel[(kv_heads * group,)](partial, lse, out, chunks, GROUP=group, DIM=dim,
                                      CHUNKS_PADDED=1 << max(chunks - 1, 0).bit_length())
    return out


def _kernels() -> tuple:
    import triton
    import triton.language as tl

    @triton.jit
    def partial_kernel(query, keys, values, position, partial, lse, scale, key_head, key_row, value_head, value_row,
                       cache_length, chunk_count, GROUP: tl.constexpr, PADDED: tl.constexpr, DIM: tl.constexpr,
                       CHUNK: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr):
        head = tl.program_id(0)
        chunk = tl.program_id(1)
        length = tl.minimum(tl.load(position).to(tl.int32) + 1, cache_length)  # never past the cache
        rows = tl.arange(0, PADDED)
        dims = tl.arange(0, DIM)
        real = rows < GROUP
        # Products in float32 (the CPU interpreter's bf16 products are wrong). For 16-bit caches they run in
        # TF32, which holds q, k and v exactly and rounds the softmax weights to about 5e-4 (bf16: 4e-3).
        # The bytes read are the cache's own dtype either way.
        q = tl.load(query + (head * GROUP + rows)[:, None] * DIM + dims[None, :], mask=real[:, None],
                    other=0.0).to(tl.float32)
        best = tl.full((PADDED,), float("-inf"), tl.float32)
        total = tl.zeros((PADDED,), tl.float32)
        acc = tl.zeros((PADDED, DIM), tl.float32)
        start = chunk * CHUNK
        end = tl.minimum(start + CHUNK, length)
        for first in range(0, CHUNK, BLOCK):  # fixed bounds (the interpreter needs them)
            if start + first < end:  # blocks past the length cost a comparison, no reads
                cols = start + first + tl.arange(0, BLOCK)
                inside = cols < end
                k = tl.load(keys + head * key_head + cols[:, None] * key_row + dims[None, :],
                            mask=inside[:, None], other=0.0).to(tl.float32)
                scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [PADDED, BLOCK], float32
                scores = tl.where(inside[None, :], scores, float("-inf"))
                newest = tl.maximum(best, tl.max(scores, 1))
                anchor = tl.where(newest == float("-inf"), 0.0, newest)  # nothing seen yet: no -inf minus -inf
                shrink = tl.exp(best - anchor)
                weights = tl.exp(scores - anchor[:, None])
                total = total * shrink + tl.sum(weights, 1)
                v = tl.load(values + head * value_head + cols[:, None] * value_row + dims[None, :],
                            mask=inside[:, None], other=0.0).to(tl.float32)
                acc = acc * shrink[:, None] + tl.dot(weights, v, input_precision=PRECISION)
                best = newest
        used = total > 0
        acc = acc / tl.where(used, total, 1.0)[:, None]
        at = (head * chunk_count + chunk) * GROUP + rows
        tl.store(partial + at[:, None] * DIM + dims[None, :], acc, mask=real[:, None])
        tl.store(lse + at, tl.where(used, best + tl.log(tl.where(used, total, 1.0)), float("-inf")), mask=real)

    @triton.jit
    def merge_kernel(partial, lse, out, chunk_count, GROUP: tl.constexpr, DIM: tl.constexpr,
                     CHUNKS_PADDED: tl.constexpr):
        row = tl.program_id(0)  # one query head: KV head row // GROUP, member row % GROUP of its group
        head = row // GROUP
        member = row % GROUP
        chunks = tl.arange(0, CHUNKS_PADDED)
        dims = tl.arange(0, DIM)
        at = (head * chunk_count + chunks) * GROUP + member
        present = chunks < chunk_count
        logs = tl.load(lse + at, mask=present, other=float("-inf"))
        weights = tl.exp(logs - tl.max(logs, 0))  # chunk 0 always holds position 0: the max is finite
        parts = tl.load(partial + at[:, None] * DIM + dims[None, :], mask=present[:, None], other=0.0)
        merged = tl.sum(parts * weights[:, None], 0) / tl.sum(weights, 0)
        tl.store(out + row * DIM + dims, merged.to(out.dtype.element_ty))

    return partial_kernel, merge_kernel
