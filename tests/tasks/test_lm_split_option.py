"""--split_by_length reaches the language-model task's local training; image runs refuse it."""

from __future__ import annotations

import json

import pytest
from tiny_models import build_tiny_llama, build_tiny_tokenizer

from rblora.data.prepare import main as prepare_main
from rblora.federation.options import parse_args
from rblora.tasks import build_task


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("split")
    tok = build_tiny_tokenizer()
    build_tiny_llama(vocab_size=len(tok)).save_pretrained(root / "llama")
    tok.save_pretrained(root / "llama")
    records = [{"instruction": f"Say {i}", "context": "", "response": "ok " * (1 + i % 9),
                "category": "ab"[i % 2]} for i in range(24)]  # fmt: skip
    (root / "dolly.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    argv = ["2", "--source", "files", "--dolly", str(root / "dolly.jsonl"), "--partition", "iid"]
    assert prepare_main([*argv, "--test_per_category", "2", "--output_dir", str(root)]) == 0
    return root


def _task(root, *extra):
    args, given = parse_args([
        "--global_model", str(root / "llama"), "--data_path", str(root), "--num_clients", "2",
        "--client_ranks", "2,4", "--eval_mmlu_size", "0", "--bf16", "false",
        "--output_dir", str(root / "out"), *extra,
    ])  # fmt: skip
    return build_task(args, given, log=lambda _: None, evaluation=False)


def test_split_by_length_reaches_train_config(lm_run):
    assert _task(lm_run).train_config.split_by_length is False
    assert _task(lm_run, "--split_by_length").train_config.split_by_length is True


def test_an_image_run_refuses_split_by_length(lm_run):
    args, given = parse_args(["--task", "image", "--split_by_length", "--num_clients", "2"])
    with pytest.raises(ValueError, match="split_by_length"):
        args.check_task_options("image", given)
