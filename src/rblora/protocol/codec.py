"""The one encoding of what travels or is stored: flat ``{key: tensor}`` dicts plus JSON metadata.

Used for the server's checkpoint (``checkpoint/server.safetensors``) and for Flower messages
(``ArrayRecord`` + ``ConfigRecord``), so a start adapter or a client update has one layout::

    <prefix>/lora/<module>/A, <prefix>/lora/<module>/B     LoRA factors (raw PEFT weights)
    <prefix>/dense/<parameter>                             dense extras (e.g. the head)
    <prefix>/delta/<module>/A|B  or  <prefix>/delta/<module>/dense   an update B @ A or dense

A :class:`~rblora.aggregation.starts.StartBasis` (the factors every client's start is cut from)
is its factors under ``<prefix>/lora`` plus metadata ``{"width": W, "dtype": "float32"}``.

Tensors are float32 and contiguous on the CPU (bfloat16 cannot travel in an ArrayRecord).
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch

from rblora.aggregation import ClientUpdate
from rblora.aggregation.running import ModuleDelta, is_dense
from rblora.aggregation.starts import StartBasis
from rblora.aggregation.types import Factors
from rblora.protocol.types import ClientSpec, ClientStart, UpdateLayout


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


_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float16, torch.bfloat16,
           torch.float32, torch.float64)}  # fmt: skip


def encode_basis(prefix: str, basis: StartBasis) -> tuple[dict[str, torch.Tensor], dict]:
    """A start basis as (tensors, JSON-able metadata): its factors (float32, exact for the usual
    float32 working dtype) and its width and start dtype."""
    meta = {"width": basis.width, "dtype": str(basis.dtype).removeprefix("torch.")}
    return encode(prefix, factors=basis.factors), meta


def decode_basis(tensors: dict[str, torch.Tensor], prefix: str, meta: dict) -> StartBasis:
    """Inverse of :func:`encode_basis`; ValueError if the metadata or a shape is wrong."""
    if not isinstance(meta, dict) or meta.get("dtype") not in _DTYPES:
        raise ValueError(f"{prefix}: metadata {meta!r} lacks a known dtype ({sorted(_DTYPES)})")
    width = meta.get("width")
    return StartBasis(width, decode_factors(tensors, prefix), _DTYPES[meta["dtype"]])


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


_UPDATE_META = {"num-examples", "lora-alpha", "use-rslora", "metrics"}


def decode_update(
    tensors: dict[str, torch.Tensor], meta: dict[str, Any], spec: ClientSpec, layout: UpdateLayout
) -> tuple[ClientUpdate, dict[str, Any]]:
    """A client's reply checked against what the server knows (DESIGN.md section 6): returns its
    :class:`ClientUpdate`, built from the server's own ``spec`` (rank, scaling, examples), and
    the metrics it claims (raw: see :func:`rblora.protocol.types.clean_metrics`).

    ValueError naming what is wrong: metadata that is missing, unknown, of the wrong type or
    that disagrees with ``spec`` (a node cannot claim another scale or weight); arrays that are
    missing or unexpected (a LoRA reply without factors, a head-only reply with them); factors
    whose shape is not ``spec.rank`` on the module's ``(d_out, d_in)`` (a reply shaped for
    another client); dense parameters of another shape; any dtype but float32; NaN or inf.
    """
    unknown = sorted(set(meta) - _UPDATE_META)
    if unknown:
        raise ValueError(f"unexpected metadata {unknown}")
    claims = {
        "num-examples": (spec.num_examples, _int),
        "lora-alpha": (spec.lora_alpha, _float),
        "use-rslora": (spec.use_rslora, _bool),
    }
    for key, (known, read) in claims.items():
        if key not in meta:
            raise ValueError(f"the metadata lacks {key!r}")
        value = read(key, meta[key])
        if known is not None and value != known:
            raise ValueError(f"{key} {meta[key]!r} differs from the server's {known!r}")
    if spec.num_examples is None:
        raise ValueError("the server does not know this client's example count")
    expected = {f"update/lora/{m}/{w}" for m in layout.modules for w in "AB"}
    expected |= {f"update/dense/{n}" for n in layout.dense}
    missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or extra:
        wrong = [f"{what} arrays {_few(keys)}" for what, keys in (("missing", missing),
                 ("unexpected", extra)) if keys]  # fmt: skip
        raise ValueError(", ".join(wrong))
    for key, value in sorted(tensors.items()):
        if not isinstance(value, torch.Tensor) or value.dtype != torch.float32:
            raise ValueError(f"{key}: dtype {getattr(value, 'dtype', type(value))}, not float32")
    factors = decode_factors(tensors, "update")
    for module, (d_out, d_in) in layout.modules.items():
        a, b = factors[module]
        if tuple(a.shape) != (spec.rank, d_in) or tuple(b.shape) != (d_out, spec.rank):
            raise ValueError(
                f"{module}: A {tuple(a.shape)}, B {tuple(b.shape)}; rank {spec.rank} on "
                f"({d_out}, {d_in}) needs A {(spec.rank, d_in)}, B {(d_out, spec.rank)}"
            )
    dense = decode_dense(tensors, "update")
    for name, want in layout.dense.items():
        if tuple(dense[name].shape) != tuple(want):
            raise ValueError(f"{name}: shape {tuple(dense[name].shape)}, expected {tuple(want)}")
    for key, value in sorted(tensors.items()):
        if not torch.isfinite(value).all():
            raise ValueError(f"{key} holds NaN or inf")
    try:
        metrics = json.loads(meta.get("metrics", "{}"))
    except (TypeError, ValueError):
        raise ValueError("metrics are not JSON") from None
    update = ClientUpdate(
        num_examples=spec.num_examples,
        lora_alpha=spec.lora_alpha,
        factors=factors,
        use_rslora=spec.use_rslora,
        client_id=spec.client_id,
        dense=dense,
    )
    return update, metrics


def _int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} {value!r} is not an integer")
    return value


def _float(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{key} {value!r} is not a finite number")
    return float(value)


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{key} {value!r} is not a boolean")
    return value


def _few(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")
    return f"[{shown}]"


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
