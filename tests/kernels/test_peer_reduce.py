"""The peer all-reduce kernel sums every rank's tensor, the same bits on every rank, call after call.

Run by Triton's CPU interpreter (tests/kernels/conftest.py). Ranks are simulated in one process: each
has its own buffer, epoch counters and failure count, and the table holds every buffer's address as a
real group's would. The interpreter runs one program at a time, so a rank that waited for a peer's words
would wait forever: every rank pushes first, then every rank gathers (on a GPU one launch does both).
"""

from __future__ import annotations

import pytest
import torch

from shared.distributed.peer_reduce import exchange_words
from shared.planning.rank_shares import PEER_BLOCK as BLOCK
from shared.planning.rank_shares import peer_epochs, peer_words

pytest.importorskip("triton", reason="Triton is not installed (the dev extra installs it on Linux x86-64)")
pytestmark = pytest.mark.models
CAPACITY = 3 * BLOCK  # three programs' worth: sizes below cross program edges


class Group:
    """`world` simulated ranks with their own buffers, counters and failure counts."""

    def __init__(self, world: int, capacity: int = CAPACITY, device: str = "cpu") -> None:
        self.world, self.capacity = world, capacity
        self.buffers = [torch.zeros(peer_words(world, capacity), dtype=torch.int64, device=device)
                        for _ in range(world)]
        self.table = torch.tensor([buffer.data_ptr() for buffer in self.buffers], dtype=torch.int64, device=device)
        self.epochs = [torch.zeros(peer_epochs(capacity), dtype=torch.int64, device=device) for _ in range(world)]
        self.failed = [torch.zeros(1, dtype=torch.int32, device=device) for _ in range(world)]

    def all_reduce(self, parts: list[torch.Tensor], skip_push: int = -1, spins: int = 100) -> list[torch.Tensor]:
        outs = [torch.full_like(part, float("nan")) for part in parts]
        for rank, part in enumerate(parts):
            if rank != skip_push:
                exchange_words(part, outs[rank], self.table, self.epochs[rank], self.failed[rank], self.capacity, rank,
                               self.world, push=True, gather=False)
        for rank, part in enumerate(parts):
            exchange_words(part, outs[rank], self.table, self.epochs[rank], self.failed[rank], self.capacity, rank,
                           self.world, push=False, gather=True, spins=spins)
        return outs


def expected_sum(parts: list[torch.Tensor]) -> torch.Tensor:
    total = torch.zeros(parts[0].shape, dtype=torch.float32, device=parts[0].device)
    for part in parts:
        total += part.float()
    return total.to(parts[0].dtype)


def assert_rounded_sum(out: torch.Tensor, wanted: torch.Tensor) -> None:
    """Equal, except that the interpreter rounds float32 to bfloat16 toward zero (a GPU rounds to nearest)."""
    if out.dtype != torch.bfloat16:
        assert torch.equal(out, wanted), (out.float() - wanted.float()).abs().max()
        return
    ulp = torch.finfo(torch.bfloat16).eps * wanted.float().abs()
    assert ((out.float() - wanted.float()).abs() <= ulp).all(), (out.float() - wanted.float()).abs().max()


@pytest.mark.parametrize(("world", "dtype", "count"), [
    (2, torch.bfloat16, 1000),  # two programs, the second partly masked
    (2, torch.float16, BLOCK),  # exactly one program
    (3, torch.float32, 3 * BLOCK - 1),  # three ranks, float32 words, the last element of the last program
])
def test_every_rank_gets_the_sum_call_after_call(world: int, dtype: torch.dtype, count: int) -> None:
    group = Group(world)
    generator = torch.Generator().manual_seed(world * count)
    for call in range(5):  # epochs advance and the two slots alternate
        parts = [torch.randn(count, generator=generator).to(dtype) * (call + 1) for _ in range(world)]
        outs = group.all_reduce(parts)
        wanted = expected_sum(parts)
        for out in outs:
            assert torch.equal(out, outs[0])  # every rank holds the same bits
            assert_rounded_sum(out, wanted)
    assert [int(failed) for failed in group.failed] == [0] * world
    assert all(int(epochs[0]) == 5 for epochs in group.epochs)


def test_sizes_that_change_between_calls_keep_the_ranks_in_step() -> None:
    group = Group(2)
    for count in (BLOCK * 3, 7, BLOCK + 1, BLOCK * 3, 1):  # programs past the size skip some calls
        parts = [torch.full((count,), float(rank + 1), dtype=torch.bfloat16) for rank in range(2)]
        for out in group.all_reduce(parts):
            assert torch.equal(out, torch.full((count,), 3.0, dtype=torch.bfloat16)), count
    assert [int(failed) for failed in group.failed] == [0, 0]


def test_a_peer_that_never_pushes_is_counted_not_waited_for_forever() -> None:
    group = Group(2)
    parts = [torch.ones(BLOCK, dtype=torch.bfloat16) for _ in range(2)]
    group.all_reduce(parts)
    group.all_reduce(parts)  # both slots now hold old epochs: stale words must not pass for new ones
    outs = group.all_reduce([part * 5 for part in parts], skip_push=1, spins=3)
    assert int(group.failed[0]) == 1  # rank 0 waited for rank 1 and gave up
    assert int(group.failed[1]) == 0  # rank 1 got rank 0's words
    assert torch.equal(outs[1], torch.full((BLOCK,), 10.0, dtype=torch.bfloat16))
