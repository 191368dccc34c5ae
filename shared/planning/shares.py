"""Each worker process's share of each GPU: what it may allocate without taking a neighbour's memory.

share(process, gpu) = budget(gpu) - CUDA contexts of every process on gpu - the planned bytes of every
other process on gpu (the specialist host counts with its largest specialist). A process can grow into
unplanned headroom but never into what the plan gives its neighbours.
"""

from __future__ import annotations

from shared.config.schema import LyraConfig
from shared.planning.plan import SERVICE_OF_ROLE, Plan, assess


def planned_bytes(plan: Plan) -> dict[str, dict[int, int]]:
    """Planned bytes per service per physical GPU (the specialist host at its largest specialist)."""
    out: dict[str, dict[int, int]] = {}
    for placement in plan.placements:
        per_service = out.setdefault(SERVICE_OF_ROLE[placement.role], {})
        for gpu, size in placement.split.per_gpu.items():
            if placement.role == "specialist":
                per_service[gpu] = max(per_service.get(gpu, 0), size)
            else:
                per_service[gpu] = per_service.get(gpu, 0) + size
    return out


def process_shares(config: LyraConfig, service: str, plan: Plan | None = None) -> dict[int, int]:
    """Bytes `service` may allocate on each of its GPUs."""
    plan = plan or assess(config)
    planned = planned_bytes(plan)
    budgets = {g.index: g for g in plan.gpus}
    shares = {}
    for gpu in config.gpus_of(service):
        if gpu not in budgets:
            continue
        others = sum(per.get(gpu, 0) for name, per in planned.items() if name != service)
        shares[gpu] = max(0, budgets[gpu].budget - budgets[gpu].contexts - others)
    return shares
