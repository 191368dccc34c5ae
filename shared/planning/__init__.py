"""Memory planning: each model's bytes from its checkpoint (never loading it), per GPU, before anything loads.

`plan.make_plan(config)` is the whole plan `lyra plan` prints; `estimate`, `inventory` and `layout` size one
model; `shares` and `rank_shares` split each GPU between processes and tensor ranks.
"""
