"""VRAM planning: estimate each model's memory from its checkpoint (never loading it) and check a config.

    from shared.planning import make_plan, render_table
    print(render_table(make_plan(load_config("configs/a6000x2.toml"))))
"""

from shared.planning.architectures import ARCHITECTURES, ArchitectureSpec, Component, get_architecture
from shared.planning.estimate import GpuSplit, MemoryEstimate, estimate_model, split_across_gpus
from shared.planning.plan import Plan, Verdict, make_plan, render_table
from shared.planning.search import Alternative, Change

__all__ = [
    "ARCHITECTURES", "Alternative", "ArchitectureSpec", "Change", "Component", "GpuSplit", "MemoryEstimate",
    "Plan", "Verdict", "estimate_model", "get_architecture", "make_plan", "render_table", "split_across_gpus",
]
