"""What crosses between the server and a client: the types of a round and their one encoding.

:mod:`rblora.protocol.types` (ClientSpec, ClientStart, ClientResult) and
:mod:`rblora.protocol.codec` (flat tensors + metadata, for messages and the checkpoint) sit
below the tasks, the round core and the engines, which all import them.
"""

from rblora.protocol.types import (
    ClientResult,
    ClientSpec,
    ClientStart,
    UpdateLayout,
    clean_metrics,
    tensor_bytes,
)

__all__ = [
    "ClientResult",
    "ClientSpec",
    "ClientStart",
    "UpdateLayout",
    "clean_metrics",
    "tensor_bytes",
]
