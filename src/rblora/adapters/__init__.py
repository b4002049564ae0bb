"""The only code that touches PEFT: build a rank-r LoRA on a base model, read/write its factors,
export and load PEFT folders, merge deltas into the base weights.

Factors are ``{module name: (A: (r, d_in), B: (d_out, r))}``, raw PEFT weights (scale not folded).
"""

from rblora.adapters.lora import (
    attach_lora,
    detach_lora,
    lora_layers,
    merge_into_base,
    read_factors,
)
from rblora.adapters.peft_io import load_peft_adapter, save_peft_adapter
from rblora.adapters.spec import Factors, LoraSpec, factor_bytes, resolve_targets

__all__ = [
    "Factors",
    "LoraSpec",
    "attach_lora",
    "detach_lora",
    "factor_bytes",
    "load_peft_adapter",
    "lora_layers",
    "merge_into_base",
    "read_factors",
    "resolve_targets",
    "save_peft_adapter",
]
