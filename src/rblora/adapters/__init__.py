"""The only code that touches PEFT: build a rank-r LoRA on a base model, read/write its factors,
export and load PEFT folders, apply global updates to the base (merged into its weights, or kept
beside them in float32: :mod:`rblora.adapters.deltas`).

Factors are ``{module name: (A: (r, d_in), B: (d_out, r))}``, raw PEFT weights (scale not folded);
dense extras (``modules_to_save``) are ``{parameter name: tensor}``.
"""

from rblora.adapters.deltas import BaseWeights, applied_delta, keep_beside, merge_into_base
from rblora.adapters.lora import (
    attach_lora,
    dense_only,
    detach_lora,
    lora_layers,
    read_dense,
    read_factors,
    set_dense,
)
from rblora.adapters.peft_io import load_peft_adapter, load_peft_dense, save_peft_adapter
from rblora.adapters.resident import LoraHost
from rblora.adapters.spec import (
    Factors,
    LoraSpec,
    dense_parameters,
    resolve_targets,
)

__all__ = [
    "BaseWeights",
    "Factors",
    "applied_delta",
    "dense_only",
    "dense_parameters",
    "keep_beside",
    "LoraHost",
    "LoraSpec",
    "attach_lora",
    "detach_lora",
    "load_peft_adapter",
    "load_peft_dense",
    "lora_layers",
    "merge_into_base",
    "read_dense",
    "read_factors",
    "set_dense",
    "resolve_targets",
    "save_peft_adapter",
]
