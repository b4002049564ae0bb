"""Aggregation of LoRA adapters whose ranks differ from client to client (pure torch).

    from rblora.aggregation import ClientUpdate, aggregate
    u = ClientUpdate(num_examples=500, lora_alpha=16.0, factors={"...q_proj": (A, B)})
    g = aggregate("RB-LoRA", [u1, u2])     # reduction=None | "svd" | "truncate" | "merge" ...
    g.delta("...q_proj")                   # (d_out, d_in) global update, scaling included
    g.for_client(rank=8, lora_alpha=16.0)  # {module: (A: (8, d_in), B: (d_out, 8))}

The mathematics is in DESIGN.md section 2; each method's file names its source.
"""

from .api import aggregate
from .global_update import GlobalUpdate
from .registry import available_methods, default_reduction, get_method, supported_reductions
from .types import REDUCTIONS, ClientProtocol, ClientUpdate, Method, ProtocolCycle, lora_scale

__all__ = [
    "REDUCTIONS",
    "ClientProtocol",
    "ProtocolCycle",
    "ClientUpdate",
    "GlobalUpdate",
    "Method",
    "aggregate",
    "available_methods",
    "default_reduction",
    "get_method",
    "lora_scale",
    "supported_reductions",
]
