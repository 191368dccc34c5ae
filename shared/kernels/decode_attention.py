"""Attention of one decode token over the part of a static KV cache in use, read from the device.

A static cache is as long as the context allows (4096 positions by default) and a CUDA graph replays the
same kernels every step, so the plain step attends over every position and masks the unused tail: at the
70B shape that is 2.5 of 23 ms per token spent on empty cache (bench/results, the fused tensor profile).
This kernel reads the number of positions in use from a device tensor when it runs, so one captured graph
serves every step and reads only what has been written.

It is split-K ("flash decoding"): the cache is cut into fixed chunks; one program per (KV head, chunk)
computes an online softmax over its chunk for all the query heads that share that KV head (grouped-query
attention without copying KV heads), and a second kernel merges the chunks' partial results by their
log-sum-exp. Chunks beyond the length do nothing. The merge stays a kernel of its own: done by the last
chunk of each KV head to finish, in the first kernel, it made a 70B rank's token 0.58 ms slower (17.60
against 17.02 ms, 1 x H200, bench/results/h200_voice_tp_rank_alone.json): that program merges its query
heads one after another. Written in Triton. `prepare()` compiles and tries it
once per device, head size and dtype, outside any graph capture, and remembers whether it gave the plain
attention's answer; `usable()` then says so (False for anything not prepared). It runs on CUDA with
Triton installed, or under Triton's CPU interpreter (TRITON_INTERPRET=1), which the tests use.

`attend_step()` is the same attention for the fused decode step, given the token's q, k and v side by
side as the projection made them: its first kernel also applies the rotary embedding to q and the new k
and writes the new k and v into the cache. The step then runs two kernels where it ran five (rotate and
store k, store v, rotate q, partial, merge); each kernel costs 2-3 us on a GPU however little it does, and
a decoder layer of the 8B shape split over two ranks reads its weights in about 45 us.
"""

from __future__ import annotations

import importlib.util
import logging

import torch

from shared.kernels import overlap
from shared.kernels.devices import resolve, runs_here

CHUNK = 256  # cache positions per program: at short lengths one program per KV head does all the work
BLOCK = 64  # positions per inner step
MIN_DOT = 16  # Triton's matrix products need every side of at least 16

logger = logging.getLogger(__name__)
_kernels_made: tuple | None = None  # Triton kernels, made on first use (importing Triton takes a second)
_tried: dict[tuple[torch.device, int, torch.dtype, bool], bool] = {}  # prepare()'s verdicts (the last: step)


def usable(device: torch.device, head_dim: int, dtype: torch.dtype, step: bool = False) -> bool:
    """True when `prepare()` found the kernel (with `step`: `attend_step`'s) working for this device, size, dtype."""
    return runs_here(device) and _tried.get((resolve(device), head_dim, dtype, step), False)


def prepare(device: torch.device, head_dim: int, dtype: torch.dtype, step: bool = False) -> bool:
    """Compile the kernel for (device, head size, dtype) and check it against plain attention, once.

    With `step`, `attend_step()`'s kernels instead (rotary and cache writes included). Call it before any
    CUDA graph capture. False, with the reason logged, where it cannot run: no Triton, a head size that is
    not a power of two of at least 16, the CPU without the interpreter, or a kernel that does not compile
    or answers wrongly (the caller then keeps the masked matmuls).
    """
    device = resolve(device)
    if not runs_here(device):
        return False
    key = (device, head_dim, dtype, step)
    if key in _tried:
        return _tried[key]
    reason = ""
    if importlib.util.find_spec("triton") is None:
        reason = "Triton is not installed"
    elif head_dim & (head_dim - 1) or head_dim < MIN_DOT:
        reason = f"head size {head_dim} is not a power of two of at least {MIN_DOT}"
    else:
        reason = _trial_step(device, head_dim, dtype) if step else _trial(device, head_dim, dtype)
    _tried[key] = not reason
    if reason and device.type == "cuda":
        logger.warning("decode attention kernel%s not used on %s (head size %d, %s): %s; attention runs over the "
                       "whole cache instead", " (fused step)" if step else "", device, head_dim, dtype, reason)
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


def _trial_step(device: torch.device, head_dim: int, dtype: torch.dtype) -> str:
    """"" if `attend_step` equals its reference, new k and v in the cache included, on a small poisoned cache."""
    generator = torch.Generator(device=device).manual_seed(0)
    kv_heads, group, length = 2, 4, 2 * CHUNK + 8
    qkv = torch.randn(1, (kv_heads * group + 2 * kv_heads) * head_dim, device=device, generator=generator).to(dtype)
    angles = torch.randn(length, head_dim, device=device, generator=generator)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    keys, values = (torch.randn(1, kv_heads, length, head_dim, device=device, generator=generator).to(dtype)
                    for _ in range(2))
    at = CHUNK + 3
    keys[:, :, at:] = float("nan")
    values[:, :, at:] = float("nan")
    position = torch.tensor([at], device=device)
    expected_keys, expected_values = keys.nan_to_num(), values.nan_to_num()
    try:
        out = attend_step(qkv, cos, sin, keys, values, position, head_dim ** -0.5, kv_heads)
    except Exception as exc:  # a Triton that cannot compile it here (version, shared memory): say why, keep going
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    expected = step_reference(qkv, cos, sin, expected_keys, expected_values, position, head_dim ** -0.5, kv_heads)
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    errors = [_error(out, expected), _error(keys[:, :, :at + 1], expected_keys[:, :, :at + 1]),
              _error(values[:, :, :at + 1], expected_values[:, :, :at + 1])]
    wrong = [f"{name} differs by {error:.3g}" for name, error in zip(("output", "keys", "values"), errors, strict=True)
             if not error <= tolerance]
    return "; ".join(wrong)


def _error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """The largest difference, relative above 1 (a 16-bit value's rounding grows with its size)."""
    return ((got.float() - expected.float()).abs() / expected.float().abs().clamp(min=1.0)).max().item()


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


def attend_step(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                position: torch.Tensor, scale: float, kv_heads: int) -> torch.Tensor:
    """One decode token's attention from its projection: rotary, cache write and attention in two kernels.

    qkv [1, (heads + 2 * kv_heads) * D]: q, k and v side by side, unrotated; cos and sin [table length, D],
    every position's rotary angles (transformers' half-split layout); keys/values [1, kv_heads, max_len, D],
    the static cache, which gets the new k (rotated) and v at `position`. Returns [kv_heads, group, D]:
    softmax(q k^T * scale) v over positions 0..position, q rotated, as `decode_attention` would.
    """
    return _attend_step(qkv, cos, sin, keys, values, position, scale, kv_heads)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of rows [..., D] in float32, rounded once to x's dtype (as the fused step computes it)."""
    first, second = x.float().chunk(2, dim=-1)
    return (x.float() * cos.float() + torch.cat((-second, first), dim=-1) * sin.float()).to(x.dtype)


def step_reference(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                   position: torch.Tensor, scale: float, kv_heads: int) -> torch.Tensor:
    """`attend_step` in plain torch (what the kernels must equal); writes the cache the same way."""
    dim = keys.shape[-1]
    rows = qkv.view(-1, dim)
    heads = rows.shape[0] - 2 * kv_heads
    at = int(position.view(-1)[0])
    angle = min(at, cos.shape[0] - 1)
    query = rotate(rows[:heads], cos[angle], sin[angle])
    if at < keys.shape[2]:
        keys[0, :, at] = rotate(rows[heads:heads + kv_heads], cos[angle], sin[angle]).to(keys.dtype)
        values[0, :, at] = rows[heads + kv_heads:].to(values.dtype)
    return reference(query.view(kv_heads, -1, dim), keys[0], values[0], position.view(1), scale)


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


@torch.library.custom_op("lyra::attend_step", mutates_args=("keys", "values"))
def _attend_step(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 position: torch.Tensor, scale: float, kv_heads: int) -> torch.Tensor:
    global _kernels_made
    if _kernels_made is None:
        _kernels_made = _kernels()
    dim = keys.shape[-1]
    rows = qkv.numel() // dim
    if rows * dim != qkv.numel() or rows <= 2 * kv_heads or (rows - 2 * kv_heads) % kv_heads:
        raise ValueError(f"attend step: qkv of {qkv.numel()} values is not q, k and v of head dim {dim} for "
                         f"{kv_heads} KV heads")
    if keys.shape != values.shape or keys.shape[0] != 1 or keys.shape[1] != kv_heads or keys.stride(-1) != 1 \
            or values.stride(-1) != 1:
        raise ValueError(f"attend step: cache {tuple(keys.shape)} with strides {keys.stride()} does not fit "
                         f"{kv_heads} KV heads")
    if cos.shape != sin.shape or cos.shape[-1] != dim:
        raise ValueError(f"attend step: rotary tables {tuple(cos.shape)} do not fit head dim {dim}")
    if dim & (dim - 1) or dim < MIN_DOT:
        raise ValueError(f"attend step: head dim {dim} is not a power of two of at least {MIN_DOT}")
    if len({qkv.device, cos.device, sin.device, keys.device, values.device, position.device}) != 1:
        raise ValueError("attend step: every tensor must be on one device")
    group = (rows - 2 * kv_heads) // kv_heads
    arguments = (qkv.contiguous(), cos.contiguous(), sin.contiguous(), keys, values, position, scale, group)
    if qkv.device.type == "cuda":
        with torch.cuda.device(qkv.device):
            return _run_step(_kernels_made, *arguments)
    return _run_step(_kernels_made, *arguments)


@_attend_step.register_fake
def _(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
      position: torch.Tensor, scale: float, kv_heads: int) -> torch.Tensor:
    dim = keys.shape[-1]
    return qkv.new_empty((kv_heads, (qkv.numel() // dim - 2 * kv_heads) // kv_heads, dim))


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
    group = query.shape[1]
    # The query stands in for the rotary tables, which the kernel reads only in the fused step.
    return _partial_then_merge(kernels, query, query, query, keys.unsqueeze(0), values.unsqueeze(0), position,
                               scale, group, step=False)


def _run_step(kernels: tuple, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
              values: torch.Tensor, position: torch.Tensor, scale: float, group: int) -> torch.Tensor:
    return _partial_then_merge(kernels, qkv, cos, sin, keys, values, position, scale, group, step=True)


def _partial_then_merge(kernels: tuple, queries: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        keys: torch.Tensor, values: torch.Tensor, position: torch.Tensor, scale: float, group: int,
                        step: bool) -> torch.Tensor:
    """queries: the query rows first ([KV, group, D], or the step's projection); keys/values [1, KV, len, D]."""
    partial_kernel, merge_kernel = kernels
    _, kv_heads, length, dim = keys.shape
    chunks = -(-length // CHUNK)
    partial = torch.empty((kv_heads, chunks, group, dim), dtype=torch.float32, device=queries.device)
    lse = torch.empty((kv_heads, chunks, group), dtype=torch.float32, device=queries.device)
    out = queries.new_empty((kv_heads, group, dim))
    launch = overlap.options(queries.device)
    padded_chunks = 1 << max(chunks - 1, 0).bit_length()
    partial_kernel[(kv_heads, chunks)](
        queries, cos, sin, keys, values, position, partial, lse, scale,
        keys.stride(1), keys.stride(2), values.stride(1), values.stride(2), length, chunks, cos.shape[0],
        KV_HEADS=kv_heads, GROUP=group, PADDED=max(MIN_DOT, 1 << (group - 1).bit_length()), DIM=dim, CHUNK=CHUNK,
        BLOCK=BLOCK, PRECISION="ieee" if keys.dtype == torch.float32 else "tf32", STEP=step, PDL=bool(launch),
        **launch)
    merge_kernel[(kv_heads * group,)](partial, lse, out, chunks, GROUP=group, DIM=dim, CHUNKS_PADDED=padded_chunks,
                                      PDL=bool(launch), **launch)
    return out


def _kernels() -> tuple:
    import triton
    import triton.language as tl

    @triton.jit
    def partial_kernel(queries, cos, sin, keys, values, position, partial, lse, scale, key_head, key_row, value_head,
                       value_row, cache_length, chunk_count, table_length, KV_HEADS: tl.constexpr,
                       GROUP: tl.constexpr, PADDED: tl.constexpr, DIM: tl.constexpr, CHUNK: tl.constexpr,
                       BLOCK: tl.constexpr, PRECISION: tl.constexpr, STEP: tl.constexpr, PDL: tl.constexpr):
        head = tl.program_id(0)
        chunk = tl.program_id(1)
        if PDL:  # overlap.py: the projection, the cache and the position come from kernels before
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        at = tl.load(position).to(tl.int32)
        length = tl.minimum(at + 1, cache_length)  # never past the cache
        start = chunk * CHUNK
        end = tl.minimum(start + CHUNK, length)
        rows = tl.arange(0, PADDED)
        dims = tl.arange(0, DIM)
        real = rows < GROUP
        # Products in float32 (the CPU interpreter's bf16 products are wrong). For 16-bit caches they run in
        # TF32, which holds q, k and v exactly and rounds the softmax weights to about 5e-4 (bf16: 4e-3).
        # The bytes read are the cache's own dtype either way.
        q_at = (head * GROUP + rows)[:, None] * DIM
        q = tl.load(queries + q_at + dims[None, :], mask=real[:, None], other=0.0).to(tl.float32)
        if STEP:  # queries is the projection [q | k | v]: rotate q and the new k; store the new k and v
            partner = (dims + DIM // 2) % DIM  # rotate_half(x) = [-x2, x1]
            sign = tl.where(dims < DIM // 2, -1.0, 1.0)
            angle = tl.minimum(at, table_length - 1)
            c = tl.load(cos + angle * DIM + dims).to(tl.float32)
            s = tl.load(sin + angle * DIM + dims).to(tl.float32)
            q_partner = tl.load(queries + q_at + partner[None, :], mask=real[:, None], other=0.0).to(tl.float32)
            q = (q * c[None, :] + sign[None, :] * q_partner * s[None, :]).to(queries.dtype.element_ty)
            q = q.to(tl.float32)
            k_at = (KV_HEADS * GROUP + head) * DIM
            v_at = (KV_HEADS * GROUP + KV_HEADS + head) * DIM
            k_new = tl.load(queries + k_at + dims).to(tl.float32) * c \
                + sign * tl.load(queries + k_at + partner).to(tl.float32) * s
            k_new = k_new.to(queries.dtype.element_ty).to(keys.dtype.element_ty)
            v_new = tl.load(queries + v_at + dims).to(values.dtype.element_ty)
            # The program whose chunk holds the position writes it, and reads its own copy from registers:
            # a store and a load of one program are not ordered between its threads.
            slot = at + dims * 0  # the position, as a vector: the mask of the stores
            mine = (slot >= start) & (slot < start + CHUNK) & (slot < cache_length)
            tl.store(keys + head * key_head + at * key_row + dims, k_new, mask=mine)
            tl.store(values + head * value_head + at * value_row + dims, v_new, mask=mine)
            k_new = k_new.to(tl.float32)
            v_new = v_new.to(tl.float32)
        best = tl.full((PADDED,), float("-inf"), tl.float32)
        total = tl.zeros((PADDED,), tl.float32)
        acc = tl.zeros((PADDED, DIM), tl.float32)
        for first in range(0, CHUNK, BLOCK):  # fixed bounds (the interpreter needs them)
            if start + first < end:  # blocks past the length cost a comparison, no reads
                cols = start + first + tl.arange(0, BLOCK)
                inside = cols < end
                if STEP:
                    inside_cache = inside & (cols != at)
                else:
                    inside_cache = inside
                k = tl.load(keys + head * key_head + cols[:, None] * key_row + dims[None, :],
                            mask=inside_cache[:, None], other=0.0).to(tl.float32)
                if STEP:
                    k = tl.where((cols == at)[:, None], k_new[None, :], k)
                scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [PADDED, BLOCK], float32
                scores = tl.where(inside[None, :], scores, float("-inf"))
                newest = tl.maximum(best, tl.max(scores, 1))
                anchor = tl.where(newest == float("-inf"), 0.0, newest)  # nothing seen yet: no -inf minus -inf
                shrink = tl.exp(best - anchor)
                weights = tl.exp(scores - anchor[:, None])
                total = total * shrink + tl.sum(weights, 1)
                v = tl.load(values + head * value_head + cols[:, None] * value_row + dims[None, :],
                            mask=inside_cache[:, None], other=0.0).to(tl.float32)
                if STEP:
                    v = tl.where((cols == at)[:, None], v_new[None, :], v)
                acc = acc * shrink[:, None] + tl.dot(weights, v, input_precision=PRECISION)
                best = newest
        used = total > 0
        acc = acc / tl.where(used, total, 1.0)[:, None]
        out_at = (head * chunk_count + chunk) * GROUP + rows
        tl.store(partial + out_at[:, None] * DIM + dims[None, :], acc, mask=real[:, None])
        tl.store(lse + out_at, tl.where(used, best + tl.log(tl.where(used, total, 1.0)), float("-inf")), mask=real)

    @triton.jit
    def merge_kernel(partial, lse, out, chunk_count, GROUP: tl.constexpr, DIM: tl.constexpr,
                     CHUNKS_PADDED: tl.constexpr, PDL: tl.constexpr):
        if PDL:  # overlap.py
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
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
