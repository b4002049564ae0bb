"""benchmarks/bench_many_clients.py on a tiny ViT and a tiny Llama at tiny sizes: both parts run
and print their tables, the same images (tokens) every size, ratios to the first size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import build_tiny_llama, build_tiny_tokenizer, build_tiny_vit

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_many_clients.py"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("many")
    build_tiny_vit(root / "vit")
    tok = build_tiny_tokenizer()
    build_tiny_llama(vocab_size=len(tok)).save_pretrained(root / "llama")
    tok.save_pretrained(root / "llama")
    records = [
        {"instruction": f"Count to {i}.", "context": "one two" if i % 2 else "",
         "response": "go " * (1 + i % 7), "category": "ab"[i % 2]}
        for i in range(40)
    ]  # fmt: skip
    (root / "dolly.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    return root


def _bench(tiny, *argv, check=True):
    cmd = [
        sys.executable, str(BENCH), "--source", "digits", "--model", str(tiny / "vit"),
        "--image_size", "16", "--ranks", "2,4", "--lm_model", str(tiny / "llama"),
        "--lm_dolly", str(tiny / "dolly.jsonl"), "--lm_ranks", "2,4", "--threads", "1", *argv,
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def _best_rows(text: str, part: str) -> list[list[str]]:
    """The rows of a part's last table (each size's best round)."""
    section = text.split(f"## {part}:")[1].split("## ")[0].split("best round of each size")[1]
    return [
        [c.strip() for c in line.strip("|").split("|")]
        for line in section.splitlines()
        if line.startswith("| ") and not line.startswith("| clients")
    ]


def test_quick_run_prints_both_tables(tiny, tmp_path):
    out = tmp_path / "figures.json"
    done = _bench(tiny, "--clients", "2,8", "--images", "32", "--lm_clients", "2,4",
                  "--lm_records", "16", "--repeat", "2", "--out", str(out))  # fmt: skip
    assert done.stdout.startswith("CPU: ") and "load average now" in done.stdout
    image, lm = _best_rows(done.stdout, "image"), _best_rows(done.stdout, "lm")
    assert [r[0] for r in image] == ["2", "8"] and [r[0] for r in lm] == ["2", "4"]
    assert image[0][5] == "1.000" and lm[0][5] == "1.000"  # the reference is the first size
    assert all(float(r[4]) > 0 and float(r[5]) > 0 for r in image + lm)
    figures = json.loads(out.read_text())
    assert {r["units"] for r in figures["image"]} == {32}  # the same images at every size
    assert len({r["units"] for r in figures["lm"]}) == 1  # the same records, so tokens
    assert sorted({(r["clients"], r["round"]) for r in figures["image"]}) == [
        (2, 1), (2, 2), (8, 1), (8, 2),
    ]  # fmt: skip


def test_more_clients_than_images_is_refused(tiny):
    done = _bench(tiny, "--part", "image", "--clients", "2,64", "--images", "32", check=False)
    assert done.returncode != 0
    assert "--clients 64 exceeds --images 32: a client needs one" in done.stderr
