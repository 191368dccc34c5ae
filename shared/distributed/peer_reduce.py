"""A one-shot all-reduce for decode steps: each rank writes its partial sum straight into its peers' memory.

A decode step of a tensor-parallel voice sums two small vectors per layer over the ranks (16 KB at the 70B
shape). NCCL's ring takes about 10 µs for one of those even inside a CUDA graph: 160 of them are 1.6 ms of
a 20 ms token (bench/results/h200x2_profile_70b_tensor_fused_kernel.txt). PyTorch's symmetric-memory
one-shot all-reduce is no faster: it synchronises the ranks with a barrier before it reads.

This kernel needs no barrier. Every element travels as one 8-byte word, its bits in the low half and the
call's epoch in the high half (NCCL's "LL" protocol); a GPU writes an aligned 8-byte word whole, so a
receiver that sees the epoch also sees the value. A rank stores its words into a region of each peer's
buffer (CUDA peer memory over NVLink, mapped by PyTorch's symmetric memory), then polls its own buffer
until every peer's words carry this call's epoch, and sums all ranks in rank order in float32, so every
rank gets the same bits. Two slots, used by alternate epochs, make reuse safe: a rank can reach epoch e+2,
which writes slot e's region again, only after every peer has sent e+1, that is after each finished e.

Epochs live on the device, one counter per program, so a captured CUDA graph replays it with fresh epochs
every time. A wait is bounded: a rank whose peer never arrives stops after `spins` polls, counts a failure
(`failures()`), and goes on with the wrong sum instead of hanging the GPU. Tensors larger than the buffer
(prefill) and other dtypes go through the process group (NCCL).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch

from shared.kernels import overlap
from shared.planning.rank_shares import PEER_BLOCK, PEER_CAPACITY, peer_epochs, peer_words

SPINS = 1 << 24  # polls before a wait gives up (several seconds: far past any healthy step)
WORD_BITS = {torch.bfloat16: 16, torch.float16: 16, torch.float32: 32}

logger = logging.getLogger(__name__)
_kernel: Any = None  # made on first use (importing Triton takes a second)
_exchanges: dict[int, PeerReduce] = {}  # what the custom op finds by its integer handle


class PeerReduce:
    """The all-reduce of one rank over peer memory; call it on a tensor, as the process group's."""

    name = "peer"

    def __init__(self, device: torch.device, group: Any = None, capacity: int = PEER_CAPACITY) -> None:
        import torch.distributed as dist

        group = group or dist.group.WORLD
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.capacity, self.group = capacity, group
        with torch.cuda.device(device):
            self.buffer, handle = symmetric_buffer(peer_words(self.world, capacity), torch.int64, device, group)
            self.buffer.zero_()
            self.table = torch.tensor(list(handle.buffer_ptrs), dtype=torch.int64, device=device)
            self.epochs = torch.zeros(peer_epochs(capacity), dtype=torch.int64, device=device)
            self.failed = torch.zeros(1, dtype=torch.int32, device=device)
            torch.cuda.synchronize(device)
        dist.barrier(group=group)  # no peer writes into a buffer before its owner has zeroed it
        self.handle = id(self)
        _exchanges[self.handle] = self

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.fits(tensor.numel(), tensor.dtype, tensor.device):
            import torch.distributed as dist

            dist.all_reduce(tensor, group=self.group)
            return tensor
        return torch.ops.lyra.peer_all_reduce(tensor, self.handle)

    def fits(self, count: int, dtype: torch.dtype, device: torch.device) -> bool:
        """True when `count` values of `dtype` on `device` travel through the peer buffer (else NCCL)."""
        return count <= self.capacity and dtype in WORD_BITS and torch.device(device) == self.buffer.device

    def failures(self) -> int:
        """How many waits gave up on a peer since start (0 on a healthy group)."""
        return int(self.failed.item())

    def close(self) -> None:
        _exchanges.pop(self.handle, None)


def symmetric_buffer(elements: int, dtype: torch.dtype, device: torch.device, group: Any) -> tuple[torch.Tensor, Any]:
    """A buffer every rank of `group` can address on every GPU (PyTorch symmetric memory), and its handle.

    Collective: every rank of the group must call it with the same sizes.
    """
    import torch.distributed._symmetric_memory as symmetric

    enable = getattr(symmetric, "enable_symm_mem_for_group", None)  # older PyTorch needs it; newer ones dropped it
    if enable is not None:
        with warnings.catch_warnings():  # 2.11 keeps it as a no-op that warns in every rank's log
            warnings.simplefilter("ignore", FutureWarning)
            enable(group.group_name)
    buffer = symmetric.empty(elements, dtype=dtype, device=device)
    return buffer, symmetric.rendezvous(buffer, group.group_name)


@torch.library.custom_op("lyra::peer_all_reduce", mutates_args=())
def _peer_all_reduce(tensor: torch.Tensor, handle: int) -> torch.Tensor:
    exchange = _exchanges[handle]
    out = torch.empty_like(tensor, memory_format=torch.contiguous_format)
    with torch.cuda.device(tensor.device):
        exchange_words(tensor.contiguous(), out, exchange.table, exchange.epochs, exchange.failed,
                       exchange.capacity, exchange.rank, exchange.world)
    return out


@_peer_all_reduce.register_fake
def _(tensor: torch.Tensor, handle: int) -> torch.Tensor:
    return torch.empty_like(tensor, memory_format=torch.contiguous_format)


def exchange_words(source: torch.Tensor, out: torch.Tensor, table: torch.Tensor, epochs: torch.Tensor,
                   failed: torch.Tensor, capacity: int, rank: int, world: int, push: bool = True,
                   gather: bool = True, spins: int = SPINS) -> None:
    """Push `source` to every peer's buffer and/or sum what the peers pushed into `out` (both: one call).

    `table` holds each rank's buffer address; `epochs` one counter per program. The CPU tests run the two
    halves apart under Triton's interpreter (push on every rank, then gather on every rank), because its
    programs run one at a time and a rank waiting for its peer would wait forever.
    """
    global _kernel
    if _kernel is None:
        _kernel = _make_kernel()
    count = source.numel()
    launch = overlap.options(source.device)
    _kernel[(-(-count // PEER_BLOCK),)](source, out, table, epochs, failed, count, capacity, spins, RANK=rank,
                                        WORLD=world, BITS=WORD_BITS[source.dtype], BLOCK=PEER_BLOCK, PUSH=push,
                                        GATHER=gather, PDL=bool(launch), **launch)


def _make_kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def exchange(source, out, table, epochs, failed, count, capacity, spins, RANK: tl.constexpr,
                 WORLD: tl.constexpr, BITS: tl.constexpr, BLOCK: tl.constexpr, PUSH: tl.constexpr,
                 GATHER: tl.constexpr, PDL: tl.constexpr):
        program = tl.program_id(0)
        if PDL:  # overlap.py: the source and the epochs come from kernels before
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        offsets = program * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < count
        epoch = tl.load(epochs + program) + 1  # every rank counts the same calls, so the epochs agree
        stamp = (epoch & 0xFFFFFFFF).to(tl.uint64)
        slot = epoch & 1
        mine = tl.load(source + offsets, mask=inside, other=0.0)
        if BITS == 16:
            bits = mine.to(tl.uint16, bitcast=True).to(tl.uint64)
        else:
            bits = mine.to(tl.uint32, bitcast=True).to(tl.uint64)
        if PUSH:
            words = (stamp << 32) | bits
            for peer in tl.static_range(WORLD):
                if peer != RANK:
                    theirs = tl.load(table + peer).to(tl.pointer_type(tl.uint64))
                    tl.store(theirs + (slot * WORLD + RANK) * capacity + offsets, words, mask=inside)
        if GATHER:
            own = tl.load(table + RANK).to(tl.pointer_type(tl.uint64))
            total = tl.zeros((BLOCK,), tl.float32)
            for peer in tl.static_range(WORLD):  # rank order: every rank adds the same numbers the same way
                if peer == RANK:
                    total += mine.to(tl.float32)
                else:
                    where = own + (slot * WORLD + peer) * capacity + offsets
                    words = tl.load(where, mask=inside, other=0, volatile=True)
                    polls = 0
                    while (tl.max(tl.where(inside & ((words >> 32) != stamp), 1, 0), 0) > 0) & (polls < spins):
                        words = tl.load(where, mask=inside, other=0, volatile=True)
                        polls += 1
                    if polls >= spins:
                        tl.atomic_add(failed, 1)
                    if BITS == 16:
                        theirs = (words & 0xFFFF).to(tl.uint16).to(source.dtype.element_ty, bitcast=True)
                    else:
                        theirs = (words & 0xFFFFFFFF).to(tl.uint32).to(source.dtype.element_ty, bitcast=True)
                    total += theirs.to(tl.float32)
            tl.store(out + offsets, total.to(out.dtype.element_ty), mask=inside)
            tl.store(epochs + program, epoch)

    return exchange
