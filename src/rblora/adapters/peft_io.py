"""PEFT adapter folders: ``adapter_model.safetensors`` + ``adapter_config.json``.

Keys follow PEFT's canonical saved form ``base_model.model.<module>.lora_A.weight`` (no adapter
name), so ``PeftModel.from_pretrained(base, path)`` loads them with nothing missing or unexpected.

Modules may have different ranks: the config's ``r`` is one of them and every other module is
listed in PEFT's ``rank_pattern``, with the ``alpha_pattern`` entry that keeps one scale for
all. PEFT reads a pattern key as a regular expression matched against the end of a module's name
after any dot, first match wins: ``layers.1.self_attn.q_proj`` also sets
``vision.layers.1.self_attn.q_proj`` of another tower, ``self_attn.q_proj`` every layer, and the
dots of a name match any character. (It never matches ``layers.11`` for ``layers.1``: the key
must reach the end of the name.) The keys written here are whole names, escaped and anchored
(``^model\\.layers\\.1\\.self_attn\\.q_proj``): each matches its own module and no other.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save_file

from rblora.adapters.spec import Factors, in_modules, matches
from rblora.aggregation.types import lora_scale
from rblora.utils.atomic import atomic_dir
from rblora.utils.files import read_safetensors
from rblora.utils.records import read_json

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
_PREFIX = "base_model.model."
_SUFFIXES = {".lora_A.weight": 0, ".lora_B.weight": 1}


def save_peft_adapter(
    path: str | os.PathLike,
    factors: Factors,
    *,
    rank: int,
    lora_alpha: float,
    target_modules: list[str],
    use_rslora: bool,
    base_model_name_or_path: str | None,
    lora_dropout: float = 0.0,
    task_type: str | None = "CAUSAL_LM",
    dense: dict[str, torch.Tensor] | None = None,
    modules_to_save: list[str] | None = None,
) -> Path:
    """Write ``factors`` (raw PEFT weights ``A: (r_m, d_in)``, ``B: (d_out, r_m)``) as a PEFT
    folder at ``path``, atomically: written to a temporary sibling folder, then renamed into place
    (an existing folder at ``path`` is replaced). Returns the path.

    Each module keeps the rank ``r_m`` of its factors. ``rank`` is the config's ``r`` and must
    be the rank of at least one module (a client adapter: all of them); modules of another rank
    are listed in ``rank_pattern``, and in ``alpha_pattern`` with the alpha that gives them the
    same scale ``lora_alpha / rank`` (``/ sqrt(rank)`` with rsLoRA) as every other module.

    ``dense``: full weights of ``modules_to_save`` (parameter name -> tensor, e.g.
    ``classifier.weight``), stored as PEFT stores modules_to_save (``base_model.model.<name>``),
    so ``PeftModel.from_pretrained`` loads them into its trainable copy of those modules.
    """
    if not factors:
        raise ValueError("save_peft_adapter: no factors to save")
    dense = dense or {}
    modules_to_save = list(modules_to_save or [])
    if dense and not modules_to_save:
        raise ValueError("save_peft_adapter: dense weights need their modules_to_save")
    outside = sorted(n for n in dense if not in_modules(n, modules_to_save))
    if outside:
        raise ValueError(
            f"save_peft_adapter: dense weights {outside} are not in modules_to_save "
            f"{modules_to_save}"
        )
    tensors: dict[str, torch.Tensor] = {
        f"{_PREFIX}{name}": t.detach().to("cpu").contiguous() for name, t in sorted(dense.items())
    }
    for name, (a, b) in sorted(factors.items()):
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or a.shape[0] < 1:
            raise ValueError(
                f"save_peft_adapter: {name}: A {tuple(a.shape)} / B {tuple(b.shape)} are not "
                "LoRA factors of one rank (expected A (r, d_in), B (d_out, r), r >= 1)"
            )
        if not matches(name, list(target_modules)):
            raise ValueError(
                f"save_peft_adapter: module {name!r} is not matched by target_modules "
                f"{list(target_modules)}"
            )
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = a.detach().to("cpu").contiguous()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = b.detach().to("cpu").contiguous()
    ranks = {name: int(a.shape[0]) for name, (a, _) in factors.items()}
    if rank not in ranks.values():
        raise ValueError(
            f"save_peft_adapter: no module has rank {rank} (the config's r must be the rank of "
            f"at least one module; the factors have ranks {sorted(set(ranks.values()))})"
        )
    other = {name: r for name, r in sorted(ranks.items()) if r != rank}
    config = LoraConfig(
        r=rank,
        lora_alpha=lora_alpha,
        rank_pattern={pattern_key(name): r for name, r in other.items()},
        alpha_pattern={
            pattern_key(name): _alpha_for(lora_alpha, rank, r, use_rslora)
            for name, r in other.items()
        },
        target_modules=list(target_modules),
        lora_dropout=lora_dropout,
        use_rslora=use_rslora,
        bias="none",
        task_type=task_type,
        base_model_name_or_path=base_model_name_or_path,
        inference_mode=True,
        modules_to_save=modules_to_save or None,
    )
    dest = Path(path)
    with atomic_dir(dest) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        config.save_pretrained(str(tmp))
    return dest


def pattern_key(module: str) -> str:
    """The ``rank_pattern`` / ``alpha_pattern`` key that matches the module ``module`` and no
    other under PEFT's rule (see the module doc)."""
    return "^" + re.escape(module)


def pattern_value(pattern: dict, module: str, default):
    """The value PEFT takes for ``module`` from ``pattern`` (``rank_pattern`` or
    ``alpha_pattern``): that of the first key that, as a regular expression, matches the whole
    module name or its end after a dot; ``default`` if none does."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _alpha_for(lora_alpha: float, rank: int, module_rank: int, use_rslora: bool) -> float:
    """The alpha giving a rank-``module_rank`` module the scale of ``lora_alpha`` at ``rank``
    (exact for integer alphas without rsLoRA, e.g. ``lora_alpha == rank`` -> ``module_rank``)."""
    if use_rslora:
        return lora_alpha * math.sqrt(module_rank) / math.sqrt(rank)
    return lora_alpha * module_rank / rank


def common_rank(factors: Factors) -> int:
    """The rank most modules of ``factors`` have (the smallest of a tie): the ``r`` that leaves
    the fewest modules to ``rank_pattern``."""
    counts = Counter(int(a.shape[0]) for a, _ in factors.values())
    return min(counts, key=lambda r: (-counts[r], r))


def _read_config(folder: str | os.PathLike) -> dict:
    """``folder/adapter_config.json`` as a dict; ValueError naming the file when it is missing,
    not JSON, not an object, or lacks what scaling a delta needs (``r``, ``lora_alpha``)."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise ValueError(
            f"{path} does not exist (a PEFT folder holds {CONFIG_NAME} and {WEIGHTS_NAME})"
        )
    try:
        config = read_json(path)
    except OSError as err:
        raise ValueError(f"cannot read {path}: {err.strerror or err}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"{path}: 'r' must be a positive integer, got {rank!r}")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        raise ValueError(f"{path}: 'lora_alpha' must be a number, got {alpha!r}")
    return config


def load_peft_adapter(path: str | os.PathLike) -> tuple[Factors, dict]:
    """Read a PEFT LoRA folder: ``({name: (A, B)} as float32, adapter_config as a dict)``.

    The weights of ``modules_to_save`` (dense extras) are in :func:`load_peft_dense`. Raises
    ValueError naming the file on a missing, unreadable or truncated file or a config without a
    positive ``r`` and a numeric ``lora_alpha``, and naming the folder on a key that is neither a
    LoRA A/B weight nor a weight of a module to save, a module with only one factor, or ranks
    that disagree with the config's ``r``.
    """
    folder = Path(path)
    config = _read_config(folder)
    state = read_safetensors(folder / WEIGHTS_NAME)
    pairs: dict[str, list] = {}
    unexpected = []
    saved_modules = list(config.get("modules_to_save") or [])
    for key, tensor in state.items():
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if suffix is None and _is_dense_key(key, saved_modules):
            continue
        if suffix is None or not key.startswith(_PREFIX):
            unexpected.append(key)
            continue
        name = key[len(_PREFIX) : -len(suffix)]
        pairs.setdefault(name, [None, None])[_SUFFIXES[suffix]] = tensor.to(torch.float32)
    if unexpected:
        raise ValueError(f"load_peft_adapter: {folder}: unexpected keys {sorted(unexpected)}")
    half = sorted(n for n, p in pairs.items() if p[0] is None or p[1] is None)
    if half:
        raise ValueError(f"load_peft_adapter: {folder}: modules with only one factor: {half}")
    rank = config["r"]
    pattern = _pattern(config, "rank_pattern", folder)
    bad = sorted(
        n
        for n, (a, b) in pairs.items()
        if a.shape[0] != b.shape[1] or a.shape[0] != pattern_value(pattern, n, rank)
    )
    if bad:
        raise ValueError(
            f"load_peft_adapter: {folder}: ranks disagree with r={rank} and rank_pattern "
            f"{pattern} for {bad} (PEFT would build other shapes)"
        )
    return {n: (p[0], p[1]) for n, p in sorted(pairs.items())}, config


def _pattern(config: dict, name: str, folder: Path) -> dict:
    """``config[name]`` (a rank or alpha pattern), checked: an object of regular expressions."""
    pattern = config.get(name) or {}
    if not isinstance(pattern, dict):
        raise ValueError(f"{folder / CONFIG_NAME}: {name!r} must be an object, got {pattern!r}")
    for key in pattern:
        try:
            re.compile(key)
        except re.error as err:
            raise ValueError(
                f"{folder / CONFIG_NAME}: {name} key {key!r} is not a regular expression ({err})"
            ) from None
    return pattern


def load_peft_delta(path: str | os.PathLike) -> Factors:
    """The update a PEFT LoRA folder applies: ``{module: (A, s_m * B)}`` float32, each module's
    scale ``s_m`` from its own rank and alpha (``alpha_pattern``, else ``lora_alpha``), as PEFT
    computes it. Raises ValueError as :func:`load_peft_adapter` does."""
    folder = Path(path)
    factors, config = load_peft_adapter(folder)
    alphas = _pattern(config, "alpha_pattern", folder)
    rslora = bool(config.get("use_rslora"))
    out: Factors = {}
    for name, (a, b) in factors.items():
        alpha = float(pattern_value(alphas, name, config["lora_alpha"]))
        out[name] = (a, b * lora_scale(alpha, int(a.shape[0]), rslora))
    return out


def _is_dense_key(key: str, modules_to_save: list[str]) -> bool:
    if not key.startswith(_PREFIX) or not modules_to_save:
        return False
    return in_modules(key[len(_PREFIX) :], modules_to_save)


def load_peft_dense(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The ``modules_to_save`` weights of a PEFT folder: parameter name -> float32 tensor."""
    folder = Path(path)
    config = _read_config(folder)
    saved_modules = list(config.get("modules_to_save") or [])
    state = read_safetensors(folder / WEIGHTS_NAME)
    return {
        key[len(_PREFIX) :]: t.to(torch.float32)
        for key, t in sorted(state.items())
        if _is_dense_key(key, saved_modules)
    }
