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
from rblora.protocol.factors import DEFAULT_PLAN, FactorPlan, Fill
from rblora.protocol.types import ClientSpec, ClientStart, UpdateLayout


def _t(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to("cpu", torch.float32).contiguous()


def encode(
    prefix: str,
    *,
    factors: Factors | None = None,
    dense: dict[str, torch.Tensor] | None = None,
    deltas: dict[str, ModuleDelta] | None = None,
    sends: tuple[str, ...] = ("A", "B"),
) -> dict[str, torch.Tensor]:
    """Flat tensors of factors, dense extras and deltas under ``prefix``; of the factors only
    those named in ``sends`` (the method's protocol: a frozen A does not travel)."""
    out: dict[str, torch.Tensor] = {}
    for module, pair in (factors or {}).items():
        for name, t in zip("AB", pair, strict=True):
            if name in sends:
                out[f"{prefix}/lora/{module}/{name}"] = _t(t)
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


def decode_factors(
    tensors: dict[str, torch.Tensor], prefix: str, fill: Fill | None = None
) -> Factors:
    """The LoRA factors under ``prefix``; ValueError if a module lacks A or B. ``fill``: the
    message does not carry the factors ``fill.absent`` (a frozen A, drawn by the receiver; a
    held factor in a reply; :meth:`rblora.protocol.factors.FactorPlan.filler`), which
    ``fill.make(module, name)`` gives."""
    out: Factors = {}
    absent = () if fill is None else fill.absent
    expected = {"A", "B"} - set(absent)
    for module, p in sorted(_parts(tensors, prefix, "lora").items()):
        if set(p) != expected:
            raise ValueError(
                f"{prefix}: module {module!r} has {sorted(p)}, expected {sorted(expected)}"
            )
        a = fill.make(module, "A") if "A" in absent else p["A"]
        b = fill.make(module, "B") if "B" in absent else p["B"]
        out[module] = (a, b)
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
def encode_update(
    update: ClientUpdate, sends: tuple[str, ...] = ("A", "B")
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A client update as (tensors, metadata): the factors its method's protocol sends."""
    tensors = encode("update", factors=dict(update.factors), dense=dict(update.dense), sends=sends)
    meta = {
        "num-examples": int(update.num_examples),
        "lora-alpha": float(update.lora_alpha),
        "use-rslora": bool(update.use_rslora),
    }
    return tensors, meta


_UPDATE_META = {"num-examples", "lora-alpha", "use-rslora", "metrics"}
METRICS_MAX_CHARS = 4096
"""A reply's metrics (JSON text) may be at most this long."""
METRICS_MAX_KEYS = 32
"""... and hold at most this many names, each a flat value (no nesting)."""


def update_shapes(
    spec: ClientSpec, layout: UpdateLayout, sends: tuple[str, ...] = ("A", "B")
) -> dict[str, tuple[int, ...]]:
    """The arrays a reply of client ``spec`` must hold, name -> shape: the factors its method
    sends (``sends``) at the server's rank for the client on every module of ``layout``, and
    the dense extras."""
    shapes: dict[str, tuple[int, ...]] = {}
    for module, (d_out, d_in) in layout.modules.items():
        if "A" in sends:
            shapes[f"update/lora/{module}/A"] = (spec.rank, d_in)
        if "B" in sends:
            shapes[f"update/lora/{module}/B"] = (d_out, spec.rank)
    for name, shape in layout.dense.items():
        shapes[f"update/dense/{name}"] = tuple(int(d) for d in shape)
    return shapes


def check_arrays(found: dict[str, tuple[str, tuple[int, ...]]], expected: dict) -> None:
    """Arrays described as ``name -> (dtype name, shape)`` against ``expected`` (name -> shape):
    ValueError naming missing or unexpected names, a dtype other than float32, or a shape other
    than expected. Works on descriptions, so a transport can check before converting anything."""
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or extra:
        wrong = [f"{what} arrays {_few(keys)}" for what, keys in (("missing", missing),
                 ("unexpected", extra)) if keys]  # fmt: skip
        raise ValueError(", ".join(wrong))
    for key in sorted(found):
        dtype, shape = found[key]
        if dtype != "float32":
            raise ValueError(f"{key}: dtype {dtype}, not float32")
        if tuple(shape) != tuple(expected[key]):
            raise ValueError(f"{key}: shape {tuple(shape)}, expected {tuple(expected[key])}")


def parse_metrics(text: Any) -> dict[str, Any]:
    """A reply's metrics from its JSON text, bounded: at most :data:`METRICS_MAX_CHARS`
    characters, one flat JSON object of at most :data:`METRICS_MAX_KEYS` names whose values are
    numbers, booleans, null or short strings; integers of more than 18 digits are refused before
    conversion. ValueError naming what is wrong (the values are judged by
    :func:`rblora.protocol.types.clean_metrics`)."""
    if not isinstance(text, str):
        raise ValueError(f"metrics are {type(text).__name__}, not JSON text")
    if len(text) > METRICS_MAX_CHARS:
        raise ValueError(f"metrics are {len(text)} characters, at most {METRICS_MAX_CHARS}")
    if _json_depth(text) > 1:
        raise ValueError("metrics are nested; a flat mapping of numbers is expected")
    try:
        metrics = json.loads(text, parse_int=_bounded_int)
    except (TypeError, ValueError, RecursionError) as err:
        raise ValueError(f"metrics are not JSON ({str(err)[:80]})") from None
    if not isinstance(metrics, dict):
        raise ValueError(f"metrics are a JSON {type(metrics).__name__}, not a mapping")
    if len(metrics) > METRICS_MAX_KEYS:
        raise ValueError(f"metrics hold {len(metrics)} names, at most {METRICS_MAX_KEYS}")
    for name, value in metrics.items():
        if len(name) > 64 or (isinstance(value, str) and len(value) > 64):
            raise ValueError(f"metric {name[:64]!r}: a name or text longer than 64 characters")
    return metrics


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > 18:
        raise ValueError(f"an integer of {len(text.lstrip('-'))} digits")
    return int(text)


def _json_depth(text: str) -> int:
    """The deepest nesting of ``[`` / ``{`` in JSON ``text`` (strings skipped), found without
    parsing, so deeply nested input cannot exhaust the parser's recursion."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def decode_update(
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
    spec: ClientSpec,
    layout: UpdateLayout,
    plan: FactorPlan = DEFAULT_PLAN,
) -> tuple[ClientUpdate, dict[str, Any]]:
    """A client's reply checked against what the server knows (DESIGN.md section 6): returns its
    :class:`ClientUpdate`, built from the server's own ``spec`` (rank, scaling, examples), and
    the metrics it claims (bounded by :func:`parse_metrics`; their values are judged by
    :func:`rblora.protocol.types.clean_metrics`).

    ValueError naming what is wrong: metadata that is missing, unknown, of the wrong type or
    that disagrees with ``spec`` (a node cannot claim another scale or weight); arrays that are
    missing or unexpected (a LoRA reply without factors, a head-only reply with them); factors
    whose shape is not ``spec.rank`` on the module's ``(d_out, d_in)`` (a reply shaped for
    another client); dense parameters of another shape; any dtype but float32; NaN or inf;
    metrics beyond their bounds. ``plan``: the method's client protocol of the round; a factor
    it does not send must be absent, and the server's own draw of it (a frozen A) takes its
    place (a held factor: zeros, until the server puts its own copy there).
    """
    unknown = sorted(str(k)[:64] for k in set(meta) - _UPDATE_META)
    if unknown:
        raise ValueError(f"unexpected metadata {_few(unknown)}")
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
    described = {
        key: (str(getattr(value, "dtype", type(value).__name__)).removeprefix("torch."),
              tuple(getattr(value, "shape", ())))
        for key, value in tensors.items()
    }  # fmt: skip
    check_arrays(described, update_shapes(spec, layout, plan.sends))
    for key, value in sorted(tensors.items()):
        if not torch.isfinite(value).all():
            raise ValueError(f"{key} holds NaN or inf")
    metrics = parse_metrics(meta.get("metrics", "{}"))
    update = ClientUpdate(
        num_examples=spec.num_examples,
        lora_alpha=spec.lora_alpha,
        factors=decode_factors(tensors, "update", plan.filler(spec.rank, layout.modules)),
        use_rslora=spec.use_rslora,
        client_id=spec.client_id,
        dense=decode_dense(tensors, "update"),
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


def encode_start(
    start: ClientStart, sends: tuple[str, ...] = ("A", "B")
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A :class:`ClientStart` as (tensors, metadata): of its factors those the method's
    protocol sends down this round (``sends``: ``FactorPlan.receives``)."""
    tensors = encode(
        "start", factors=start.factors or {}, dense=start.dense, deltas=start.base_delta,
        sends=sends,
    )  # fmt: skip
    return tensors, {"fresh": start.factors is None, "download-bytes": int(start.download_bytes)}


def decode_start(
    tensors: dict[str, torch.Tensor], meta: dict[str, Any], fill: Fill | None = None
) -> ClientStart:
    """Inverse of :func:`encode_start`; ``fill``: the factors that did not travel (a frozen A,
    :meth:`rblora.protocol.factors.FactorPlan.filler` with ``down=True``)."""
    factors = decode_factors(tensors, "start", None if meta.get("fresh") else fill)
    return ClientStart(
        factors=None if meta.get("fresh") else factors,
        dense=decode_dense(tensors, "start"),
        base_delta=decode_deltas(tensors, "start"),
        download_bytes=int(meta.get("download-bytes", 0)),
    )
