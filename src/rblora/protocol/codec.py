"""The one encoding of what travels or is stored: flat ``{key: tensor}`` dicts plus JSON metadata.

Used for the server's checkpoint (``checkpoint/server.safetensors``) and for Flower messages
(``ArrayRecord`` + ``ConfigRecord``), so a start adapter or a client update has one layout::

    <prefix>/lora/<module>/A, <prefix>/lora/<module>/B     LoRA factors (raw PEFT weights)
    <prefix>/dense/<parameter>                             dense extras (e.g. the head)
    <prefix>/delta/<module>/A|B  or  <prefix>/delta/<module>/dense   an update B @ A or dense

Tensors are float32 and contiguous on the CPU (bfloat16 cannot travel in an ArrayRecord).
"""

from __future__ import annotations

from typing import Any

import torch

from rblora.aggregation import ClientUpdate
from rblora.aggregation.running import ModuleDelta, is_dense
from rblora.aggregation.types import Factors
from rblora.protocol.types import ClientStart


def _t(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to("cpu", torch.float32).contiguous()


def encode(
    prefix: str,
    *,
    factors: Factors | None = None,
    dense: dict[str, torch.Tensor] | None = None,
    deltas: dict[str, ModuleDelta] | None = None,
) -> dict[str, torch.Tensor]:
    """Flat tensors of factors, dense extras and deltas under ``prefix``."""
    out: dict[str, torch.Tensor] = {}
    for module, (a, b) in (factors or {}).items():
        out[f"{prefix}/lora/{module}/A"], out[f"{prefix}/lora/{module}/B"] = _t(a), _t(b)
    for name, t in (dense or {}).items():
        out[f"{prefix}/dense/{name}"] = _t(t)
    for module, delta in (deltas or {}).items():
        if is_dense(delta):
            out[f"{prefix}/delta/{module}/dense"] = _t(delta)
        else:
            out[f"{prefix}/delta/{module}/A"], out[f"{prefix}/delta/{module}/B"] = map(_t, delta)
    return out


def _parts(tensors: dict[str, torch.Tensor], prefix: str, kind: str) -> dict[str, dict]:
    """``{module: {"A": t, "B": t}}`` (or ``{name: {"": t}}`` for dense) under prefix/kind."""
    lead = f"{prefix}/{kind}/"
    parts: dict[str, dict] = {}
    for key, value in tensors.items():
        if not key.startswith(lead):
            continue
        rest = key[len(lead) :]
        if kind == "dense":
            parts[rest] = {"": value}
            continue
        module, _, which = rest.rpartition("/")
        parts.setdefault(module, {})[which] = value
    return parts


def decode_factors(tensors: dict[str, torch.Tensor], prefix: str) -> Factors:
    """The LoRA factors under ``prefix``; ValueError if a module lacks A or B."""
    out: Factors = {}
    for module, p in sorted(_parts(tensors, prefix, "lora").items()):
        if set(p) != {"A", "B"}:
            raise ValueError(f"{prefix}: module {module!r} has {sorted(p)}, expected A and B")
        out[module] = (p["A"], p["B"])
    return out


def decode_dense(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {name: p[""] for name, p in sorted(_parts(tensors, prefix, "dense").items())}


def decode_deltas(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, ModuleDelta]:
    out: dict[str, ModuleDelta] = {}
    for module, p in sorted(_parts(tensors, prefix, "delta").items()):
        if set(p) == {"dense"}:
            out[module] = p["dense"]
        elif set(p) == {"A", "B"}:
            out[module] = (p["A"], p["B"])
        else:
            raise ValueError(
                f"{prefix}: delta {module!r} has {sorted(p)}, expected A and B, or dense"
            )
    return out


# ---------------------------------------------------------------------- messages
def encode_update(update: ClientUpdate) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A client update as (tensors, metadata)."""
    tensors = encode("update", factors=dict(update.factors), dense=dict(update.dense))
    meta = {
        "num-examples": int(update.num_examples),
        "lora-alpha": float(update.lora_alpha),
        "use-rslora": bool(update.use_rslora),
    }
    return tensors, meta


def decode_update(
    tensors: dict[str, torch.Tensor], meta: dict[str, Any], client_id: int
) -> ClientUpdate:
    """Inverse of :func:`encode_update`; ValueError for missing metadata or broken factors."""
    try:
        return ClientUpdate(
            num_examples=int(meta["num-examples"]),
            lora_alpha=float(meta["lora-alpha"]),
            factors=decode_factors(tensors, "update"),
            use_rslora=bool(meta["use-rslora"]),
            client_id=client_id,
            dense=decode_dense(tensors, "update"),
        )
    except KeyError as err:
        raise ValueError(f"the update's metadata lacks {err}") from None


def encode_start(start: ClientStart) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A :class:`ClientStart` as (tensors, metadata)."""
    tensors = encode(
        "start", factors=start.factors or {}, dense=start.dense, deltas=start.base_delta
    )
    return tensors, {"fresh": start.factors is None, "download-bytes": int(start.download_bytes)}


def decode_start(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> ClientStart:
    """Inverse of :func:`encode_start`."""
    factors = decode_factors(tensors, "start")
    return ClientStart(
        factors=None if meta.get("fresh") else factors,
        dense=decode_dense(tensors, "start"),
        base_delta=decode_deltas(tensors, "start"),
        download_bytes=int(meta.get("download-bytes", 0)),
    )
