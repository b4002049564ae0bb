"""Resolve a model argument (embedded name, local folder or hub id) and load causal LMs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rblora.assets.registry import fetch
from rblora.assets.sources import AssetError

if TYPE_CHECKING:
    import torch

MODEL_ASSETS = ("smollm2-135m-instruct", "dinov2-vits14")
CAUSAL_LM_ASSETS = ("smollm2-135m-instruct",)


def resolve_model(name_or_path: str) -> str:
    """Where transformers should load ``name_or_path`` from.

    An embedded model name (``smollm2-135m-instruct``, ``dinov2-vits14``) -> its fetched cache
    folder; an existing local folder -> unchanged; anything else -> unchanged (a hub id).
    """
    if name_or_path in MODEL_ASSETS:
        return str(fetch(name_or_path))
    return name_or_path


def load_causal_lm(name_or_path: str, dtype: torch.dtype | None = None):
    """Load ``(model, tokenizer)`` with the transformers Auto classes, in eval mode.

    ``name_or_path`` goes through ``resolve_model``; ``dtype`` defaults to ``torch.float32``.
    If the tokenizer has no pad token, its eos token is used as the pad token (the embedded
    SmolLM2 already pads with its eos ``<|im_end|>``). A hub id that cannot be loaded raises
    AssetError suggesting a local folder or an embedded name.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    except OSError as exc:
        if Path(path).exists():
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AssetError(
            f"cannot load model {name_or_path!r}: it is not an embedded name or a local folder, "
            f"and the Hugging Face hub could not provide it ({first}). Pass a local folder with a "
            f"transformers model, or an embedded name: {', '.join(CAUSAL_LM_ASSETS)}."
        ) from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer
