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


def model_reference(name_or_path: str) -> str:
    """What a saved adapter records as its base (``base_model_name_or_path``): a reference that
    loads on this machine. An embedded name -> its cache folder; a local folder -> its absolute
    path; a hub id -> unchanged. (An embedded name itself is not a hub id, so
    ``AutoPeftModel*.from_pretrained(adapter)`` would look for it on the hub and fail.)"""
    path = resolve_model(name_or_path)
    return str(Path(path).resolve()) if Path(path).exists() else path


def hub_reachable(timeout: float = 3.0) -> bool:
    """True if the Hugging Face endpoint accepts a TCP connection within ``timeout`` seconds.

    huggingface_hub retries an unreachable host for about a minute before giving up; checking
    once first lets an offline machine fail (or use its local hub cache) at once.
    """
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def _in_hub_cache(repo_id: str) -> bool:
    """True if the local Hugging Face cache holds a config.json of ``repo_id``."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an id that is not a valid repo name is simply not cached
        return False


def load_causal_lm(
    name_or_path: str,
    dtype: torch.dtype | None = None,
    token: str | None = None,
    device: torch.device | str | None = None,
):
    """Load ``(model, tokenizer)`` with the transformers Auto classes, in eval mode.

    ``name_or_path`` goes through ``resolve_model``; ``device`` (default CPU) is where the model
    is put; ``dtype`` defaults to bf16 on a GPU that supports it, else float32;
    ``token`` is passed to the hub for gated models. If the tokenizer has no pad token, its eos
    token is used as the pad token (the embedded SmolLM2 already pads with its eos
    ``<|im_end|>``). A hub id that cannot be loaded raises AssetError suggesting a local folder
    or an embedded name; when the hub is unreachable only the local hub cache is tried.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rblora.utils.device import load_dtype

    path = resolve_model(name_or_path)
    is_local, offline = _check_local(path, name_or_path, CAUSAL_LM_ASSETS)
    kwargs = {"token": token, "local_files_only": offline}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        device = torch.device(device or "cpu")
        dtype = dtype or load_dtype(device)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).to(device)
    except OSError as exc:
        if is_local:
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


IMAGE_MODEL_ASSETS = ("dinov2-vits14",)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _check_local(path: str, name_or_path: str, embedded: tuple[str, ...]) -> tuple[bool, bool]:
    """(is a local folder, load from local files only). AssetError for a folder without
    config.json, or an id the hub cannot provide (checked at once, no minute of retries)."""
    is_local = Path(path).exists()
    if is_local and not (Path(path) / "config.json").is_file():
        raise AssetError(
            f"cannot load model {name_or_path!r}: the folder has no config.json, so it is not a "
            f"transformers model folder; pass one (saved with save_pretrained) or an embedded "
            f"name: {', '.join(embedded)}."
        )
    offline = is_local or not hub_reachable()
    if offline and not is_local and not _in_hub_cache(path):
        raise AssetError(
            f"cannot load model {name_or_path!r}: it is not an embedded name or a local folder, "
            "the Hugging Face hub is not reachable from this machine and the model is not in its "
            "local hub cache. Pass a local folder with a transformers model, or an embedded "
            f"name: {', '.join(embedded)}."
        )
    return is_local, offline


def _backbone_classifier(backbone, num_labels: int):
    """An ``nn.Module``: a transformers backbone plus a new linear ``classifier`` on its pooled
    output (``pooler_output``, else the first token of ``last_hidden_state``)."""
    from types import SimpleNamespace

    from torch import nn

    class _Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = backbone
            self.config = backbone.config
            self.classifier = nn.Linear(backbone.config.hidden_size, num_labels)

        def forward(self, pixel_values: torch.Tensor, **_):
            out = self.backbone(pixel_values=pixel_values)
            pooled = getattr(out, "pooler_output", None)
            if pooled is None:
                pooled = out.last_hidden_state[:, 0]
            return SimpleNamespace(logits=self.classifier(pooled))

    return _Classifier()


def _float_input(module, args):
    """Forward pre-hook of a float32 head on a lower-precision body: its input in float32."""
    import torch

    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def load_image_classifier(
    name_or_path: str,
    num_labels: int,
    *,
    seed: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    token: str | None = None,
):
    """``(model, preprocessing)`` for image classification with ``num_labels`` classes.

    A model type transformers knows as an image classifier (``AutoModelForImageClassification``:
    DINOv2, ViT, ...) is loaded as one, its backbone weights from ``name_or_path``; anything else
    is loaded with ``AutoModel`` and given a linear head. The head (``model.classifier``) is
    drawn anew from ``seed`` (normal, std 0.02; bias 0), so every client and run starts from the
    same head. ``preprocessing``: ``{"mean", "std", "size"}`` from the model's image processor
    (ImageNet's mean/std and 224 px when it has none). In eval mode, on ``device``, the body in
    ``dtype`` (default float32) and the head always in float32: it is trained in full and
    averaged, so it must not round (its input is cast to float32 by a forward pre-hook).
    """
    import torch
    from transformers import AutoConfig, AutoImageProcessor, AutoModel
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES
    from transformers.utils import logging as hf_logging

    path = resolve_model(name_or_path)
    _, offline = _check_local(path, name_or_path, IMAGE_MODEL_ASSETS)
    kwargs = {"token": token, "local_files_only": offline}
    dtype = dtype or torch.float32
    # the new head is "missing" from the checkpoint by design: keep that report out of the log
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        config = AutoConfig.from_pretrained(path, **kwargs)
        if config.model_type in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES:
            from transformers import AutoModelForImageClassification

            config.num_labels = num_labels
            model = AutoModelForImageClassification.from_pretrained(
                path, config=config, ignore_mismatched_sizes=True, dtype=dtype, **kwargs
            )
        else:
            backbone = AutoModel.from_pretrained(path, dtype=dtype, **kwargs)
            model = _backbone_classifier(backbone, num_labels)
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AssetError(f"cannot load image model {name_or_path!r}: {first}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    head = getattr(model, "classifier", None)
    if not isinstance(head, torch.nn.Linear):
        raise AssetError(
            f"{name_or_path!r}: the classifier ({type(head).__name__}) is not one linear layer"
        )
    if head.weight.dtype != torch.float32:
        head.float()
        head.register_forward_pre_hook(_float_input)
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.02)
        if head.bias is not None:
            head.bias.zero_()
    preprocessing = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "size": 224}
    try:
        processor = AutoImageProcessor.from_pretrained(path, **kwargs)
        size = None
        for spec in (getattr(processor, "crop_size", None), getattr(processor, "size", None)):
            # a dict or transformers' SizeDict: the crop's height, else the shortest edge
            get = spec.get if isinstance(spec, dict) else lambda k, s=spec: getattr(s, k, None)
            size = size or (spec is not None and (get("height") or get("shortest_edge")))
        preprocessing = {
            "mean": tuple(processor.image_mean or IMAGENET_MEAN),
            "std": tuple(processor.image_std or IMAGENET_STD),
            "size": int(size or 224),
        }
    except (OSError, ValueError, AttributeError, TypeError):
        pass  # no image processor saved with the model: ImageNet defaults
    model.to(device or "cpu").eval()
    return model, preprocessing
