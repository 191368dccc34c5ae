"""The decode step's matrix products and norms as Triton kernels: one row times each weight, few launches.

A decode step multiplies one row by every weight matrix of the model. Inductor writes each product as a
reduction kernel, precedes it with another for the norm's sum of squares, and adds small kernels for the
residual sums and the cache's bookkeeping: a decoder layer of the 8B shape split over two ranks ran about
13 kernels, and its q/k/v, o and down products read their weights at 2.2-3.1 TB/s of the H200's 4.8
(bench/results/h200x2_profile_8b_tensor_fused_peer.txt). At that size a kernel's start and its tail cost
as much as its work, so the step wants fewer kernels that each read faster:
- `gemv()`: each program reads a block of whole weight rows (contiguous in memory) against the input
  vector, one float32 sum per row, tiled by `bench/decode_gemv.py` (3.0-3.6 TB/s at a rank's 8B shapes
  where cuBLAS reaches 2.3-3.6). `gated` reads gate and up rows together and writes silu(gate) * up,
  so the MLP's activation costs no kernel and the down product reads a ready input.
- `add_norm()`: the residual sum and the RMSNorm of the result, in one program (the vector is a few KB).
Every value is rounded where the model's own forward rounds it (the sums, the norm, silu, the product).
A decoder layer is then two norms, three products, the attention's two kernels and, between tensor-
parallel ranks, two exchanges.

`prepare()` compiles and checks both once per device and dtype against the same operations in torch,
outside any graph capture; `usable()` then says so. They run on CUDA with Triton, or under Triton's
interpreter (TRITON_INTERPRET=1), which the tests use.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shared.kernels import overlap
from shared.kernels.devices import resolve, runs_here

logger = logging.getLogger(__name__)
_kernels: tuple[Any, Any] | None = None  # made on first use (importing Triton takes a second)
_tried: dict[tuple[torch.device, torch.dtype], bool] = {}  # prepare()'s verdicts


@dataclass(frozen=True)
class Tiling:
    """How one product is cut: weight rows per program, input columns per inner step, warps, pipeline stages."""

    rows: int
    columns: int
    warps: int
    stages: int


TILING = Tiling(rows=2, columns=1024, warps=4, stages=1)  # where nothing was tuned (the CPU interpreter)
# The best five for each Llama 8B/70B weight shape, whole or halved, on an H200 (bench/decode_gemv.py) fall
# among these; which is best moves with the shape and from machine to machine by up to 20%, so `tune()`
# times them on the model's own weights at load.
CANDIDATES = (Tiling(2, 1024, 4, 1), Tiling(4, 512, 4, 2), Tiling(16, 256, 4, 3), Tiling(16, 1024, 8, 3),
              Tiling(8, 512, 4, 1), Tiling(1, 1024, 4, 1), Tiling(8, 256, 2, 3), Tiling(2, 512, 2, 1))
TUNING_REPLAYS = 3
# Weights a thread reads before its product's input is ready (registers: 32 of them in bf16). Measured on
# 1 x H200, 8B fused: 4.18-4.19 ms a token, against 4.46 reading one block before the wait
# (bench/results/h200_voice_tp_preload.json).
PRELOAD_PER_THREAD = 64
READ_AHEAD_TRIAL = Tiling(rows=8, columns=128, warps=1, stages=1)  # prepare(): blocks read ahead, then the loop


def usable(device: torch.device, dtype: torch.dtype) -> bool:
    """True when `prepare()` found the kernels working for this device and dtype."""
    return runs_here(device) and _tried.get((resolve(device), dtype), False)


def prepare(device: torch.device, dtype: torch.dtype) -> bool:
    """Compile the kernels for (device, dtype) and check them against torch, once.

    Call it before any CUDA graph capture. False, with the reason logged, where they cannot run: no Triton,
    the CPU without the interpreter, or a kernel that does not compile or answers wrongly (the caller then
    keeps torch's operations).
    """
    device = resolve(device)
    if not runs_here(device):
        return False
    key = (device, dtype)
    if key in _tried:
        return _tried[key]
    reason = "Triton is not installed" if importlib.util.find_spec("triton") is None else trial(device, dtype)
    _tried[key] = not reason
    if reason and device.type == "cuda":
        logger.warning("decode product kernels not used on %s (%s): %s; the step keeps torch's operations",
                       device, dtype, reason)
    return not reason


def trial(device: torch.device, dtype: torch.dtype) -> str:
    """"" if each kernel equals its torch reference on small, ragged shapes."""
    generator = torch.Generator(device=device).manual_seed(0)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, generator=generator).to(dtype)

    columns, rows = 700, 37  # neither a multiple of the tiling
    weight, bias, gain = draw(2 * rows, columns) * 0.05, draw(rows), draw(columns)
    x, addend = draw(1, columns), draw(1, columns)
    cases = {
        "product": (lambda: gemv(x, weight[:rows]), lambda: gemv_reference(x, weight[:rows])),
        "product with bias": (lambda: gemv(x, weight[:rows], bias), lambda: gemv_reference(x, weight[:rows], bias)),
        "gated product": (lambda: gemv(x, weight, gated=True), lambda: gemv_reference(x, weight, gated=True)),
        # weights read ahead (2 of 6 blocks) and the rest in the loop after them
        "product read ahead": (lambda: gemv(x, weight, tile=READ_AHEAD_TRIAL), lambda: gemv_reference(x, weight)),
        "norm": (lambda: add_norm(x, gain, 1e-5)[1], lambda: add_norm_reference(x, gain, 1e-5)[1]),
        "residual sum": (lambda: add_norm(x, gain, 1e-5, addend)[0],
                         lambda: add_norm_reference(x, gain, 1e-5, addend)[0]),
        "norm of the sum": (lambda: add_norm(x, gain, 1e-5, addend)[1],
                            lambda: add_norm_reference(x, gain, 1e-5, addend)[1]),
    }
    wrong = []
    for name, (run, expected) in cases.items():
        try:
            got = run()
        except Exception as exc:  # a Triton that cannot compile it here: say why, keep going
            return f"{name}: {type(exc).__name__}: {str(exc)[:200]}"
        error = _error(got, expected())
        if not error <= (1e-4 if dtype == torch.float32 else 2e-2):
            wrong.append(f"{name} differs by {error:.3g}")
    return "; ".join(wrong)


def _error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """The largest difference, relative above 1 (a 16-bit value's rounding grows with its size)."""
    if got.shape != expected.shape:
        return float("inf")
    return ((got.float() - expected.float()).abs() / expected.float().abs().clamp(min=1.0)).max().item()


def tune(weights: list[torch.Tensor], gated: bool = False) -> Tiling | None:
    """The fastest way to multiply a row by each of `weights` in turn, as a decode step reads them.

    Each candidate tiling (and, for plain products, cuBLAS: None) is timed over all of `weights`, one
    product each, replayed from a CUDA graph: the weights come from HBM, not from L2, and launches cost
    what they cost in the step. A tiling this GPU cannot compile is skipped. Off CUDA: `TILING`.

    The pick is kept in ~/.cache/lyra/tuning under the GPU, the shapes, the dtype and the versions of
    torch, Triton and this file: later loads on this machine reuse it, so a restart multiplies in the
    same order and greedy replies repeat.
    """
    first = weights[0]
    if first.device.type != "cuda":
        return TILING
    from shared.planning.disk_cache import cached

    return cached(tuning_key(weights, gated), lambda: fastest_tiling(weights, gated),
                  encode=encode_tiling, decode=decode_tiling, folder="tuning")


def tuning_key(weights: list[torch.Tensor], gated: bool) -> str:
    """What a tuning result depends on: the device, the products' shapes and dtype, the software."""
    import hashlib

    import triton

    first = weights[0]
    device = torch.cuda.get_device_name(first.device) if first.device.type == "cuda" else str(first.device)
    code = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
    return (f"gemv|{device}|torch {torch.__version__}|triton {triton.__version__}|{code}|{first.dtype}|"
            f"{len(weights)} x {tuple(first.shape)} stride {first.stride(0)}|gated {gated}")


def encode_tiling(tile: Tiling | None) -> dict[str, int] | None:
    return None if tile is None else {"rows": tile.rows, "columns": tile.columns, "warps": tile.warps,
                                      "stages": tile.stages}


def decode_tiling(data: dict[str, int] | None) -> Tiling | None:
    return None if data is None else Tiling(**data)


def fastest_tiling(weights: list[torch.Tensor], gated: bool) -> Tiling | None:
    """`tune`'s measurement, uncached."""
    first = weights[0]
    x = torch.randn(1, first.shape[1], dtype=first.dtype, device=first.device)
    ways: list[Tiling | None] = list(CANDIDATES) + ([] if gated else [None])
    timed: list[tuple[float, int]] = []
    for index, tile in enumerate(ways):
        try:
            took = _replayed(lambda weight, tile=tile: product(x, weight, gated=gated, tile=tile), weights)
        except Exception as exc:  # registers or shared memory this GPU lacks: the others remain
            logger.info("tiling %s not usable on %s: %s", tile, first.device, type(exc).__name__)
            continue
        timed.append((took, index))
    if not timed:
        return TILING
    return ways[min(timed)[1]]


def _replayed(call: Any, weights: list[torch.Tensor]) -> float:
    """Seconds for `call` over every weight, the fastest of a few CUDA graph replays."""
    stream = torch.cuda.Stream(weights[0].device)
    stream.wait_stream(torch.cuda.current_stream(weights[0].device))
    with torch.cuda.stream(stream):
        call(weights[0])  # compiled outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for weight in weights:
                call(weight)
        best = float("inf")
        for _ in range(TUNING_REPLAYS):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            graph.replay()
            end.record(stream)
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1000)
    torch.cuda.current_stream(weights[0].device).wait_stream(stream)
    return best


def product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, gated: bool = False,
            tile: Tiling | None = TILING) -> torch.Tensor:
    """`gemv` with `tile`, or torch's linear where `tile` is None (what `tune` found fastest)."""
    if tile is None:
        return torch.nn.functional.linear(x, weight, bias)
    return gemv(x, weight, bias, gated=gated, tile=tile)


# ----------------------------------------------------------------------------- what the kernels compute


def rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in float32, rounded as Llama's own norm rounds it."""
    wide = hidden.float()
    wide = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)
    return weight * wide.to(hidden.dtype)


def gemv_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   gated: bool = False) -> torch.Tensor:
    """What `gemv` computes, in torch."""
    out = torch.nn.functional.linear(x, weight, bias)
    if gated:
        gate, up = out.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up
    return out


def add_norm_reference(hidden: torch.Tensor, gain: torch.Tensor, eps: float,
                       addend: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """What `add_norm` computes, in torch."""
    residual = hidden + addend if addend is not None else hidden.clone()
    return residual, rms_norm(residual, gain, eps)


# ----------------------------------------------------------------------------- the operations


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, gated: bool = False,
         tile: Tiling | None = None) -> torch.Tensor:
    """x [1, K] times weight [N, K]^T (+ bias): [1, N].

    `gated`: the weight is gate and up stacked by rows ([2I, K]); the result is silu(gate) * up, [1, I].
    A custom op, so torch.compile keeps it whole and a CUDA graph captures its one kernel. `tile`
    overrides the tiling (benchmarks).
    """
    if gated and (weight.shape[0] % 2 or bias is not None):
        raise ValueError("gemv: a gated product takes gate and up rows of equal count, without bias")
    tile = tile or TILING
    return torch.ops.lyra.gemv(x, weight, bias, gated, tile.rows, tile.columns, tile.warps, tile.stages)


def add_norm(hidden: torch.Tensor, gain: torch.Tensor, eps: float,
             addend: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden + addend, RMSNorm of it) for one row [1, H]; without `addend`, (a copy of hidden, its norm)."""
    return torch.ops.lyra.add_norm(hidden, addend, gain, eps)


def _launch(device: torch.device) -> Any:
    """The device context a launch needs (the interpreter needs none)."""
    import contextlib

    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _made() -> tuple[Any, Any]:
    global _kernels
    if _kernels is None:
        _kernels = _make_kernels()
    return _kernels


@torch.library.custom_op("lyra::gemv", mutates_args=())
def _gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gated: bool, rows: int, columns: int,
          warps: int, stages: int) -> torch.Tensor:
    product, _ = _made()
    launch = overlap.options(x.device)
    if weight.stride(1) != 1:  # a copy made now: the kernel must not read it before the wait
        weight, launch = weight.contiguous(), {}
    count = weight.shape[0] // 2 if gated else weight.shape[0]
    out = x.new_empty(1, count)
    tile = Tiling(rows, columns, warps, stages)
    with _launch(x.device):
        product[(-(-count // tile.rows),)](
            x.contiguous(), weight, out, bias if bias is not None else out, count, weight.shape[1], weight.stride(0),
            GATED=gated, BIAS=bias is not None, ROWS=tile.rows, COLUMNS=tile.columns, PDL=bool(launch),
            PRELOAD=preload(tile, weight.shape[1], gated), num_warps=tile.warps, num_stages=tile.stages, **launch)
    return out


def preload(tile: Tiling, width: int, gated: bool) -> int:
    """Blocks of weight columns a program reads before it waits for its input (a power of two, at least 1).

    As many as hold the program's rows (or PRELOAD_PER_THREAD weights a thread, gate and up counted apart),
    so the weights stream while the kernel before ends (with dependent launch, overlap.py).
    """
    blocks = 1 << max(-(-width // tile.columns) - 1, 0).bit_length()
    room = PRELOAD_PER_THREAD * 32 * tile.warps // (tile.rows * tile.columns * (2 if gated else 1))
    while blocks > 1 and blocks > room:
        blocks //= 2
    return blocks


@_gemv.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gated: bool, rows: int, columns: int,
      warps: int, stages: int) -> torch.Tensor:
    return x.new_empty(1, weight.shape[0] // 2 if gated else weight.shape[0])


@torch.library.custom_op("lyra::add_norm", mutates_args=())
def _add_norm(hidden: torch.Tensor, addend: torch.Tensor | None, gain: torch.Tensor,
              eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    _, norm = _made()
    width = hidden.shape[-1]
    residual, normed = hidden.new_empty(1, width), hidden.new_empty(1, width)
    block = 1 << max(width - 1, 1).bit_length()
    launch = overlap.options(hidden.device)
    with _launch(hidden.device):
        norm[(1,)](hidden.contiguous(), addend.contiguous() if addend is not None else hidden, gain, residual, normed,
                   width, eps, ADD=addend is not None, BLOCK=block, PDL=bool(launch),
                   num_warps=min(16, max(1, block // 256)), **launch)
    return residual, normed


@_add_norm.register_fake
def _(hidden: torch.Tensor, addend: torch.Tensor | None, gain: torch.Tensor,
      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return hidden.new_empty(1, hidden.shape[-1]), hidden.new_empty(1, hidden.shape[-1])


def _make_kernels() -> tuple[Any, Any]:
    import triton
    import triton.language as tl

    @triton.jit
    def product(x, weight, out, bias, count, width, stride, GATED: tl.constexpr, BIAS: tl.constexpr,
                ROWS: tl.constexpr, COLUMNS: tl.constexpr, PDL: tl.constexpr, PRELOAD: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        inside = rows < count
        steps = tl.arange(0, COLUMNS)
        dtype = out.dtype.element_ty
        # The first PRELOAD blocks of weights do not depend on the kernel before: read them while it ends.
        early = tl.arange(0, PRELOAD)[:, None] * COLUMNS + steps[None, :]  # [PRELOAD, COLUMNS] columns
        early_in = early < width
        early_at = rows[None, :, None] * stride + early[:, None, :]  # [PRELOAD, ROWS, COLUMNS]
        early_mask = inside[None, :, None] & early_in[:, None, :]
        first = tl.load(weight + early_at, mask=early_mask, other=0.0)
        first_up = tl.zeros((PRELOAD, ROWS, COLUMNS), first.dtype)
        if GATED:  # the matching up rows sit `count` rows below the gate rows
            first_up = tl.load(weight + count * stride + early_at, mask=early_mask, other=0.0)
        if PDL:  # overlap.py: the input comes from the kernel before
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        early_x = tl.load(x + early, mask=early_in, other=0.0).to(tl.float32)[:, None, :]
        sums = tl.sum(first.to(tl.float32) * early_x, 0)  # [ROWS, COLUMNS]
        ups = tl.sum(first_up.to(tl.float32) * early_x, 0)
        for start in range(PRELOAD * COLUMNS, width, COLUMNS):
            columns = start + steps
            present = columns < width
            value = tl.load(x + columns, mask=present, other=0.0).to(tl.float32)[None, :]
            where = rows[:, None] * stride + columns[None, :]
            both = inside[:, None] & present[None, :]
            sums += tl.load(weight + where, mask=both, other=0.0).to(tl.float32) * value
            if GATED:  # the matching up rows sit `count` rows below the gate rows
                ups += tl.load(weight + count * stride + where, mask=both, other=0.0).to(tl.float32) * value
        total = tl.sum(sums, 1)
        if BIAS:
            total += tl.load(bias + rows, mask=inside, other=0.0).to(tl.float32)
        if GATED:  # silu(gate) * up, each rounded as torch rounds it
            gate = total.to(dtype).to(tl.float32)
            up = tl.sum(ups, 1).to(dtype).to(tl.float32)
            total = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32) * up
        tl.store(out + rows, total.to(dtype), mask=inside)

    @triton.jit
    def norm(hidden, addend, gain, residual, normed, width, eps, ADD: tl.constexpr, BLOCK: tl.constexpr,
             PDL: tl.constexpr):
        columns = tl.arange(0, BLOCK)
        present = columns < width
        dtype = normed.dtype.element_ty
        weight = tl.load(gain + columns, mask=present, other=0.0).to(tl.float32)  # a weight: before the wait
        if PDL:  # overlap.py
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        value = tl.load(hidden + columns, mask=present, other=0.0)
        if ADD:
            value = (value.to(tl.float32) + tl.load(addend + columns, mask=present, other=0.0).to(tl.float32)).to(dtype)
        tl.store(residual + columns, value, mask=present)
        wide = value.to(tl.float32)
        scale = tl.rsqrt(tl.sum(wide * wide, 0) / width + eps)
        tl.store(normed + columns, (weight * (wide * scale).to(dtype).to(tl.float32)).to(dtype), mask=present)

    return product, norm
