"""The peer all-reduce kernel sums every rank's tensor, the same bits on every rank, call after call.

Run by Triton's CPU interpreter (see tests/models/test_decode_attention.py, which runs this file in a
process of its own). Ranks are simulated in one process: each has its own buffer, epoch counters and
failure count, and the table holds every buffer's address as a real group's would. The interpreter runs
one program at a time, so a rank that waited for a peer's words would wait forever: every rank pushes
first, then every rank gathers (on a GPU one launch does both).
"""

from __future__ import annotations

import pytest
import torch

from shared.distributed.peer_reduce import BLOCK, exchange_norm_words, exchange_words
from shared.kernels.gemv import Push, Tiling, add_norm_reference, gemv_reference, run_product

pytestmark = pytest.mark.models
CAPACITY = 3 * BLOCK  # three programs' worth: sizes below cross program edges


class Group:
    """`world` simulated ranks with their own buffers, counters and failure counts."""

    def __init__(self, world: int, capacity: int = CAPACITY, device: str = "cpu") -> None:
        self.world, self.capacity = world, capacity
        self.buffers = [torch.zeros(2 * world * capacity, dtype=torch.int64, device=device) for _ in range(world)]
        self.table = torch.tensor([buffer.data_ptr() for buffer in self.buffers], dtype=torch.int64, device=device)
        self.epochs = [torch.zeros(capacity // BLOCK, dtype=torch.int64, device=device) for _ in range(world)]
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

    def add_norm(self, parts: list[torch.Tensor], residual: torch.Tensor, gain: torch.Tensor,
                 eps: float = 1e-5) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every rank's (residual + sum of parts, its norm) from the fused kernel."""
        outs = [(torch.full_like(residual, float("nan")), torch.full_like(residual, float("nan"))) for _ in parts]
        for push, gather in ((True, False), (False, True)):
            for rank, part in enumerate(parts):
                exchange_norm_words(part, residual, gain, *outs[rank], eps, self.table, self.epochs[rank],
                                    self.failed[rank], self.capacity, rank, self.world, push=push, gather=gather)
        return outs


    def pushed_add_norm(self, inputs: list[torch.Tensor], weights: list[torch.Tensor], residual: torch.Tensor,
                        gain: torch.Tensor, tile: Tiling, eps: float = 1e-5) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every rank's product pushed from its kernel, then every rank's gather, residual sum and norm."""
        parts = [run_product(x, weight, None, False, tile, Push(self.table, self.epochs[rank], self.capacity, rank,
                                                                  self.world, BLOCK))
                 for rank, (x, weight) in enumerate(zip(inputs, weights, strict=True))]
        outs = [(torch.full_like(residual, float("nan")), torch.full_like(residual, float("nan"))) for _ in parts]
        for rank, part in enumerate(parts):
            exchange_norm_words(part, residual, gain, *outs[rank], eps, self.table, self.epochs[rank],
                                self.failed[rank], self.capacity, rank, self.world, push=False, gather=True, spins=100)
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


@pytest.mark.parametrize(("world", "dtype", "count"), [(2, torch.float16, 1000), (3, torch.float32, 3 * BLOCK - 1),
                                                       (2, torch.float32, 5)])
def test_the_fused_norm_equals_the_sum_then_the_norm(world: int, dtype: torch.dtype, count: int) -> None:
    group = Group(world)
    generator = torch.Generator().manual_seed(count)
    residual, gain = (torch.randn(1, count, generator=generator).to(dtype) for _ in range(2))
    for call in range(4):  # fused and plain calls alternate: the epochs and slots stay in step
        parts = [torch.randn(1, count, generator=generator).to(dtype) * (call + 1) for _ in range(world)]
        if call % 2:
            assert all(torch.equal(out, expected_sum(parts)) for out in group.all_reduce(parts))
            continue
        wanted_sum, wanted_norm = add_norm_reference(residual, gain, 1e-5, expected_sum(parts))
        for summed, normed in group.add_norm(parts, residual, gain):
            assert torch.equal(summed, wanted_sum)  # the same rounded sums as the plain call and the model
            torch.testing.assert_close(normed, wanted_norm, atol=1e-5 if dtype == torch.float32 else 2e-3, rtol=1e-3)
    assert [int(failed) for failed in group.failed] == [0] * world


@pytest.mark.parametrize(("world", "dtype", "count", "tile"), [
    (2, torch.float16, 1000, Tiling(16, 64, 4, 1)),  # rows in two epoch blocks, the second partly masked
    (3, torch.float32, 2 * BLOCK + 3, Tiling(1, 128, 2, 1)),
])
def test_products_that_push_their_rows_then_a_gathering_norm_equal_the_plain_exchange(
        world: int, dtype: torch.dtype, count: int, tile: Tiling) -> None:
    group = Group(world)
    generator = torch.Generator().manual_seed(count)
    width = 96  # each rank's share of the input columns
    residual, gain = (torch.randn(1, count, generator=generator).to(dtype) for _ in range(2))
    for call in range(4):  # pushed and plain calls alternate: the epochs and slots stay in step
        inputs = [torch.randn(1, width, generator=generator).to(dtype) for _ in range(world)]
        weights = [(torch.randn(count, width, generator=generator) * 0.1 * (call + 1)).to(dtype) for _ in range(world)]
        parts = [gemv_reference(x, weight) for x, weight in zip(inputs, weights, strict=True)]
        if call % 2:
            assert all(torch.equal(out, expected_sum(parts)) for out in group.all_reduce(parts))
            continue
        wanted_sum, wanted_norm = add_norm_reference(residual, gain, 1e-5, expected_sum(parts))
        outs = group.pushed_add_norm(inputs, weights, residual, gain, tile)
        for summed, normed in outs:
            assert torch.equal(summed, outs[0][0])  # every rank holds the same bits
            torch.testing.assert_close(summed, wanted_sum, atol=1e-5 if dtype == torch.float32 else 2e-3, rtol=1e-3)
            torch.testing.assert_close(normed, wanted_norm, atol=1e-5 if dtype == torch.float32 else 2e-3, rtol=1e-3)
    assert [int(failed) for failed in group.failed] == [0] * world
    assert all(int(epochs[0]) == 4 for epochs in group.epochs)
