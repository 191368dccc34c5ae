"""How tensor-parallel ranks decode together: rank 0 leads, the other ranks replay what it does.

Every rank runs the same decode engine (static cache and CUDA-graph step, or the dynamic runner on the
CPU) over its share of the model. Rank 0 serves the coordinator; before each prefill and each step it
sends the followers a command on a gloo control group (host memory, so no rank waits on its GPU to read
it), and at each step it broadcasts its chosen token on the data group (NCCL on GPUs), which the followers
feed to the same step. Only rank 0 samples, so no random state has to agree; stop strings, EOS and
cancels are rank 0's business: it simply sends no more steps.

The data group's collectives (the layers' all-reduces and the token broadcast) are the only GPU
synchronisation, and the command for step n+1 can be sent while the GPUs still work on step n.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

logger = logging.getLogger(__name__)

PREFILL, STEP, STOP = 1, 2, 3
IDLE_TIMEOUT = timedelta(days=365)  # followers wait for commands between requests for as long as it takes
DATA_TIMEOUT = timedelta(minutes=5)  # a collective this late means a rank is gone


@dataclass
class RankGroup:
    """This process's place among the ranks, and the two groups they talk over."""

    rank: int
    world: int
    device: torch.device
    control: Any  # gloo group for commands (host tensors)
    data: Any = None  # the default group: all-reduces and the token broadcast (None = WORLD)

    @property
    def leads(self) -> bool:
        return self.rank == 0

    def command(self, op: int, length: int = 0) -> tuple[int, int]:
        """Rank 0 sends (op, length); followers receive it."""
        import torch.distributed as dist

        header = torch.tensor([op, length], dtype=torch.long)
        dist.broadcast(header, src=0, group=self.control)
        return int(header[0]), int(header[1])

    def prompt(self, ids: torch.Tensor | None, length: int) -> torch.Tensor:
        """Rank 0 sends the prompt's ids (host); followers receive them, on their device."""
        import torch.distributed as dist

        host = ids.detach().to("cpu", torch.long).reshape(1, length) if ids is not None else \
            torch.empty((1, length), dtype=torch.long)
        dist.broadcast(host, src=0, group=self.control)
        return host.to(self.device)

    def token(self, token: torch.Tensor) -> None:
        """Rank 0's chosen token into every rank's `token` (on the device, no host sync)."""
        import torch.distributed as dist

        dist.broadcast(token, src=0, group=self.data)


def join(rank: int, world: int, device: torch.device, store: Any) -> RankGroup:
    """Initialise the process group (NCCL on CUDA, else gloo) and the gloo control group."""
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=DATA_TIMEOUT,
                            **({"device_id": device} if device.type == "cuda" else {}))
    control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    logger.info("rank %d/%d joined (%s on %s)", rank, world, backend, device)
    return RankGroup(rank, world, device, control)


class LeadRunner:
    """Rank 0's runner: the engine's own runner, with every prefill and step announced to the followers."""

    def __init__(self, inner: Any, ranks: RankGroup) -> None:
        self.inner = inner
        self.ranks = ranks

    @property
    def kind(self) -> str:
        return f"{self.inner.kind}, tensor x{self.ranks.world}"

    def prefill(self, inputs: dict[str, Any]) -> torch.Tensor:
        ids = inputs["input_ids"]
        extra = sorted(set(inputs) - {"input_ids", "attention_mask"})
        if extra:
            raise ValueError(f"tensor-parallel ranks take token ids only, not {extra}")
        self.ranks.command(PREFILL, int(ids.shape[1]))
        self.ranks.prompt(ids, int(ids.shape[1]))
        return self.inner.prefill(inputs)

    def step(self, token: torch.Tensor) -> torch.Tensor:
        self.ranks.command(STEP)
        self.ranks.token(token)
        return self.inner.step(token)

    def release(self) -> None:
        self.inner.release()


def follow(runner: Any, ranks: RankGroup) -> None:
    """A follower's life after load: do what rank 0 commands until it says stop (or dies)."""
    token = torch.zeros(1, dtype=torch.long, device=ranks.device)
    with torch.inference_mode():
        while True:
            op, length = ranks.command(0)
            if op == PREFILL:
                runner.prefill({"input_ids": ranks.prompt(None, length)})
            elif op == STEP:
                ranks.token(token)
                runner.step(token)
            elif op == STOP:
                logger.info("rank %d: rank 0 said stop", ranks.rank)
                return
            else:
                raise RuntimeError(f"rank {ranks.rank}: unknown command {op} from rank 0")
