"""Image classification metrics: top-1 accuracy (overall, macro, per class), loss, confusion.

``evaluate_classifier`` runs the model over a held-out set in batches (no gradients, eval mode,
on the model's device) and returns a JSON-serialisable dict shaped like the language-model
evaluation (``suites.test.accuracy``, ``loss``), so reports and tables treat both alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from rblora.evaluation.forward import eval_mode
from rblora.evaluation.outcomes import suite_outcomes


def evaluate_classifier(
    model: torch.nn.Module,
    inputs: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    classes: list[str],
    *,
    batch_size: int = 64,
    autocast_bf16: bool = False,
    suite: str = "test",
    ids: list[str] | None = None,
) -> dict:
    """Metrics of ``model`` on ``len(labels)`` examples.

    ``inputs(indices) -> pixel_values`` builds the model's input for a batch of example indices
    (on any device; moved to the model's). Returns::

        {"suites": {suite: {"count", "accuracy", "macro_accuracy",
                            "per_class": {name: {"count", "accuracy"}}, "seconds"}},
         "loss": mean cross-entropy, "confusion_matrix": [[true x predicted counts]],
         "classes": [...], "seconds": ...}

    Macro accuracy is the mean over the classes present in ``labels``. ``ids``: one per example
    (`rblora.evaluation.outcomes.image_item_ids`); the dict then also holds ``"items":
    {suite: {"ids", "accuracy"}}``, whether each example's top-1 prediction was right.
    """
    start = time.perf_counter()
    device = next(model.parameters()).device
    n, c = len(labels), len(classes)
    confusion = torch.zeros((c, c), dtype=torch.int64)
    total_loss = 0.0
    hits = torch.zeros(n, dtype=torch.bool)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_bf16)
    with eval_mode(model), torch.inference_mode(), autocast:
        for s in range(0, n, batch_size):
            idx = torch.arange(s, min(s + batch_size, n))
            logits = model(pixel_values=inputs(idx).to(device)).logits.float()
            y = labels[idx].to(device)
            total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
            pred = logits.argmax(dim=-1).cpu()
            hits[idx] = pred == labels[idx]
            confusion.index_put_((labels[idx], pred), torch.ones_like(pred), accumulate=True)
    counts = confusion.sum(dim=1)
    correct = confusion.diag()
    present = [k for k in range(c) if counts[k] > 0]
    per_class = {
        classes[k]: {"count": int(counts[k]), "accuracy": float(correct[k] / counts[k])}
        for k in present
    }
    seconds = time.perf_counter() - start
    result = {
        "count": n,
        "accuracy": float(correct.sum()) / n,
        "macro_accuracy": sum(v["accuracy"] for v in per_class.values()) / len(per_class),
        "per_class": per_class,
        "seconds": seconds,
    }
    out = {
        "suites": {suite: result},
        "loss": total_loss / n,
        "confusion_matrix": confusion.tolist(),
        "classes": list(classes),
        "seconds": seconds,
    }
    if ids is not None:
        out["items"] = {suite: suite_outcomes(ids, accuracy=hits.tolist())}
    return out
