"""Where a model runs and in which precision, decided by looking at the machine, not by flags.

``resolve_device("auto")`` is CUDA when available, else the CPU (MPS only when asked for).
``bf16_decision`` answers "is bf16 autocast worth it here?" by timing a matmul of the model's
width in both dtypes once per process and device: bf16 must be clearly faster (by
``BF16_MARGIN``). CPUs differ from machine to machine: an AVX2-only CPU emulates bf16 (about 40x
slower), and an AVX-512-BF16 CPU without AMX was measured 1.8x slower in bf16 than in fp32, so the
presence of a CPU flag says nothing about speed.
"""

from __future__ import annotations

import functools
import re
import time
from dataclasses import dataclass

import torch

DEVICE_CHOICES = "auto | cpu | cuda | cuda:N | mps"
BF16_MARGIN = 1.2
"""bf16 is chosen only if its matmul throughput is at least this many times fp32's."""

_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def check_device_name(name: str) -> None:
    """Raise ValueError unless ``name`` is a device this option accepts."""
    if not isinstance(name, str) or not _DEVICE_RE.match(name):
        raise ValueError(f"device {name!r}: valid are {DEVICE_CHOICES}")


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device for ``name``; ValueError if it is not available on this machine."""
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {name!r}: CUDA is not available on this machine (torch "
                f"{torch.__version__}); use --device cpu or auto"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r}: MPS is not available; use --device cpu or auto")
    return device


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def load_dtype(device: torch.device) -> torch.dtype:
    """dtype to load a base model in: bf16 on a GPU that supports it, float32 elsewhere."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


BASE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
"""``--base_dtype`` choices besides ``auto``."""


def resolve_base_dtype(setting: str, device: torch.device) -> torch.dtype:
    """The dtype the base model is stored in: ``auto`` (:func:`load_dtype`), ``float32`` or
    ``bfloat16``; ValueError for another name or a GPU without bf16."""
    if setting == "auto":
        return load_dtype(device)
    if setting not in BASE_DTYPES:
        raise ValueError(f"base_dtype {setting!r}: valid are auto, {', '.join(BASE_DTYPES)}")
    dtype = BASE_DTYPES[setting]
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(
            f"base_dtype bfloat16: the GPU {device} does not support bf16; use float32 or auto"
        )
    return dtype


def model_width(model: torch.nn.Module) -> int:
    """The model's hidden size (``config.hidden_size``, else the most common Linear input)."""
    config = getattr(model, "config", None)
    for key in ("hidden_size", "d_model", "n_embd"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    widths = [m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return max(set(widths), key=widths.count) if widths else 512


@dataclass(frozen=True)
class PrecisionChoice:
    """The outcome of timing a ``(tokens, width) @ (width, 3 * width)`` matmul in two dtypes."""

    use_bf16: bool
    device: str
    width: int
    fp32_gflops: float
    bf16_gflops: float

    def describe(self) -> str:
        verdict = "bf16 autocast" if self.use_bf16 else "float32"
        return (
            f"precision: {verdict} on {self.device} (matmul at width {self.width}: "
            f"fp32 {self.fp32_gflops:.0f} GFLOP/s, bf16 {self.bf16_gflops:.0f} GFLOP/s; bf16 "
            f"needs {BF16_MARGIN}x)"
        )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _gflops(device: torch.device, dtype: torch.dtype, m: int, k: int, n: int) -> float:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(k, n, generator=gen).to(device=device, dtype=dtype)
    a @ b  # warm-up (kernel selection, caches)
    _sync(device)
    best = float("inf")
    deadline = time.perf_counter() + 0.3
    for _ in range(20):
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
        if time.perf_counter() > deadline:
            break
    return 2 * m * k * n / best / 1e9


@functools.cache
def _measure(device_str: str, width: int) -> PrecisionChoice:
    device = torch.device(device_str)
    # the model's width, capped so the probe takes a fraction of a second even for 8B models
    k = min(width, 2048)
    m, n = 512, min(3 * width, 4096)
    fp32 = _gflops(device, torch.float32, m, k, n)
    try:
        bf16 = _gflops(device, torch.bfloat16, m, k, n)
    except RuntimeError:  # no bf16 matmul on this device
        bf16 = 0.0
    return PrecisionChoice(bf16 >= BF16_MARGIN * fp32, device_str, width, fp32, bf16)


def bf16_decision(setting: bool | str, model: torch.nn.Module) -> PrecisionChoice | None:
    """Resolve a ``bf16`` setting (True, False or "auto") for ``model``.

    Returns None for an explicit True/False (nothing measured), else the measured choice; the
    measurement runs once per process for each (device, width) and is reused after that.
    """
    if setting != "auto":
        return None
    return _measure(str(model_device(model)), model_width(model))


def use_bf16(setting: bool | str, model: torch.nn.Module) -> bool:
    """True if computations on ``model`` should run under bf16 autocast."""
    choice = bf16_decision(setting, model)
    return bool(setting) if choice is None else choice.use_bf16
