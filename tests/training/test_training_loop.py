"""train_local on the tiny Llama: accumulation, determinism, learning, what changes."""

from __future__ import annotations

import math
import random

import pytest
import torch
from tiny_models import build_tiny_llama
from transformers import get_linear_schedule_with_warmup

from rblora.adapters import LoraSpec, attach_lora, detach_lora, read_factors
from rblora.data.templates import Prompter
from rblora.training import TrainConfig, tokenize_records, train_local
from rblora.training.batching import collate, epoch_order
from rblora.training.loop import _lr_factor
from rblora.training.loss import causal_lm_loss_sum, causal_lm_objective

WORDS = ["the", "cat", "sat", "on", "a", "mat", "while", "dogs", "ran", "far", "big", "red"]


def records(n, seed=0):
    rnd = random.Random(seed)
    return [
        {
            "instruction": " ".join(rnd.choices(WORDS, k=rnd.randint(1, 6))),
            "context": "",
            "response": " ".join(rnd.choices(WORDS, k=rnd.randint(1, 12))),
        }
        for _ in range(n)
    ]


def examples(tok, n, seed=0, train_on_inputs=False):
    return tokenize_records(records(n, seed), tok, Prompter("alpaca_short"), 256, train_on_inputs)


def fp32(**kw):
    return TrainConfig(bf16=False, **kw)


def test_config_validation():
    with pytest.raises(ValueError, match=r"batch_size \(10\).*micro_batch_size \(4\)"):
        TrainConfig(batch_size=10, micro_batch_size=4)
    with pytest.raises(ValueError, match="bf16"):
        TrainConfig(bf16="yes")
    assert TrainConfig(warmup=0.25).warmup_steps(8) == 2
    assert TrainConfig(warmup=3).warmup_steps(8) == 3


def test_lr_schedule_matches_transformers_linear_schedule():
    total, warmup = 7, 2
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = get_linear_schedule_with_warmup(opt, warmup, total)
    expected = []
    for _ in range(total):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert [_lr_factor(i, total, warmup) for i in range(total)] == pytest.approx(expected)


def test_loss_sum_matches_transformers_loss(tiny_llama, tiny_tokenizer):
    ex = examples(tiny_tokenizer, 3)
    ids, mask, labels = collate(ex, tiny_tokenizer.pad_token_id)
    n = int((labels[:, 1:] != -100).sum())
    with torch.no_grad():
        ours = causal_lm_loss_sum(tiny_llama, ids, mask, labels)
        ref = tiny_llama(input_ids=ids, attention_mask=mask, labels=labels).loss * n
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert mask is not None  # the batch really is padded
    # what train_local does: no mask with right padding (causal attention never sees the pads)
    with torch.no_grad():
        unmasked = causal_lm_loss_sum(tiny_llama, ids, None, labels)
    torch.testing.assert_close(unmasked, ref, rtol=1e-5, atol=1e-5)


def test_group_by_length_pads_less_than_random():
    rnd = random.Random(0)
    lengths = [rnd.randint(5, 300) for _ in range(400)]

    def padding(group):
        mbs = epoch_order(lengths, 400, 8, group, torch.Generator().manual_seed(0))
        assert sorted(i for mb in mbs for i in mb) == list(range(400))
        return sum(
            max(lengths[i] for i in mb) * len(mb) - sum(lengths[i] for i in mb) for mb in mbs
        )

    assert padding(True) < 0.2 * padding(False)


def test_group_by_length_small_client_batches_depend_on_the_seed():
    # 24 examples, micro-batch 8: a fixed mega-batch of 50 micro-batches sorted all 24 by length,
    # so every seed gave the same three batches; transformers' rule uses mega-batches of one
    rnd = random.Random(1)
    lengths = [rnd.randint(5, 300) for _ in range(24)]

    def batches(seed):
        order = epoch_order(lengths, 24, 8, True, torch.Generator().manual_seed(seed))
        assert sorted(i for mb in order for i in mb) == list(range(24))
        return [sorted(mb) for mb in order]

    assert batches(0) != batches(1)
    assert batches(0) == batches(0)
    for seed in range(5):  # the micro-batch holding the longest example comes first
        assert max(lengths) in [lengths[i] for i in batches(seed)[0]]


def test_mega_batch_follows_transformers_rule():
    from rblora.training.batching import mega_batch_mult

    assert mega_batch_mult(24, 8) == 1  # 24 // 32 = 0 -> at least 1
    assert mega_batch_mult(400, 8) == 12
    assert mega_batch_mult(100_000, 8) == 50


def _train(tok, config, spec, seed=0, n=16, init=None):
    model = build_tiny_llama(vocab_size=len(tok), seed=seed)
    pm = attach_lora(model, spec, init=init, seed=3)
    result = train_local(pm, examples(tok, n), config, pad_token_id=tok.pad_token_id)
    return read_factors(pm), result


def test_accumulation_equivalence(tiny_tokenizer):
    spec = LoraSpec(rank=4, dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = build_tiny_llama(vocab_size=len(tiny_tokenizer))
    g = torch.Generator().manual_seed(9)
    init = {n: (a, torch.randn(b.shape, generator=g) * 0.05)
            for n, (a, b) in read_factors(attach_lora(model, spec, seed=1)).items()}  # fmt: skip
    kw = dict(batch_size=8, learning_rate=1e-3, max_grad_norm=0.0)
    f1, r1 = _train(tiny_tokenizer, fp32(micro_batch_size=8, **kw), spec, init=init)
    f2, r2 = _train(tiny_tokenizer, fp32(micro_batch_size=2, **kw), spec, init=init)
    assert r1.steps == r2.steps == 2
    assert r1.losses == pytest.approx(r2.losses, rel=1e-6)
    for name in f1:
        torch.testing.assert_close(f1[name][1], f2[name][1], rtol=0, atol=1e-5)
        torch.testing.assert_close(f1[name][0], f2[name][0], rtol=0, atol=1e-5)
    assert any(not torch.equal(f1[n][1], init[n][1]) for n in f1)


def test_deterministic_per_seed(tiny_tokenizer):
    spec = LoraSpec(rank=4, dropout=0.1)
    cfg = dict(micro_batch_size=4, batch_size=8, learning_rate=1e-3, group_by_length=True)
    rng = torch.get_rng_state()
    fa, ra = _train(tiny_tokenizer, fp32(seed=1, **cfg), spec)
    assert torch.equal(torch.get_rng_state(), rng)  # caller's RNG untouched
    fb, rb = _train(tiny_tokenizer, fp32(seed=1, **cfg), spec)
    fc, _ = _train(tiny_tokenizer, fp32(seed=2, **cfg), spec)
    assert ra.losses == rb.losses
    assert all(torch.equal(fa[n][0], fb[n][0]) and torch.equal(fa[n][1], fb[n][1]) for n in fa)
    assert not all(torch.equal(fa[n][1], fc[n][1]) for n in fa)


def test_memorises_and_only_lora_changes(tiny_tokenizer):
    model = build_tiny_llama(vocab_size=len(tiny_tokenizer))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # the tiny model's frozen head is too weak to memorise alone: adapt it too (this also runs
    # the loss path for a LoRA-wrapped output head)
    spec = LoraSpec(rank=8, dropout=0.0, target_modules=["q_proj", "v_proj", "lm_head"])
    pm = attach_lora(model, spec, seed=0).eval()
    pairs = [("abc", "hello world"), ("xy", "the cat sat"), ("q", "blue sky"), ("zz", "red fox")]
    recs = [{"instruction": i, "response": r} for i, r in pairs]
    ex = tokenize_records(recs, tiny_tokenizer, Prompter("alpaca_short"), 64, True)
    cfg = fp32(micro_batch_size=2, batch_size=4, num_epochs=20, learning_rate=1e-2)
    seen = []
    res = train_local(pm, ex, cfg, progress=lambda s, t, loss: seen.append((s, t)))
    assert res.steps == 20 and seen[-1] == (20, 20) and res.examples == 4
    assert res.tokens == 20 * sum(len(e["input_ids"]) for e in ex)
    assert res.losses[-1] < 0.7 * res.losses[0]
    assert not any(m.training for m in pm.modules())  # eval mode restored
    base = detach_lora(pm)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_bf16_autocast_runs(tiny_tokenizer):
    spec = LoraSpec(rank=2)
    _, res = _train(
        tiny_tokenizer, TrainConfig(micro_batch_size=4, batch_size=4, bf16=True), spec, n=4
    )
    assert res.steps == 1 and 0 < res.loss < 20


def test_fused_linear_cross_entropy_matches_autograd(monkeypatch):
    from rblora.training import loss as loss_mod

    monkeypatch.setattr(loss_mod, "CHUNK_ELEMENTS", 3 * 50)  # 3 rows per chunk: several chunks
    g = torch.Generator().manual_seed(0)
    h = torch.randn(10, 16, generator=g, requires_grad=True)
    w, bias = torch.randn(50, 16, generator=g), torch.randn(50, generator=g)
    y = torch.randint(0, 50, (10,), generator=g)
    ours = loss_mod.linear_cross_entropy(h, w, bias, y)
    (grad_ours,) = torch.autograd.grad(2.0 * ours, h)
    ref = torch.nn.functional.cross_entropy(h @ w.T + bias, y, reduction="sum")
    (grad_ref,) = torch.autograd.grad(2.0 * ref, h)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="frozen"):
        loss_mod.linear_cross_entropy(h, w.requires_grad_(), None, y)


@pytest.mark.parametrize("lr", [1e9, 1e37])
def test_divergence_stops_training(tiny_tokenizer, lr):
    from rblora.training import TrainingDiverged

    spec = LoraSpec(rank=2, dropout=0.0)
    cfg = fp32(micro_batch_size=4, batch_size=4, learning_rate=lr, max_grad_norm=0.0)
    with pytest.raises(TrainingDiverged, match="diverged at step 1: a trainable weight reached"):
        _train(tiny_tokenizer, cfg, spec, n=8)


def test_learning_rate_that_overflows_adamw_is_refused():
    with pytest.raises(ValueError, match="learning_rate 3e.38 overflows float32"):
        fp32(learning_rate=3e38)


def test_nonfinite_loss_is_divergence(tiny_tokenizer):
    from rblora.training import TrainingDiverged

    model = build_tiny_llama(vocab_size=len(tiny_tokenizer))
    pm = attach_lora(model, LoraSpec(rank=2), seed=0)

    def nan_loss(m, batch):
        return next(p for p in m.parameters() if p.requires_grad).sum() * float("nan"), 1

    with pytest.raises(TrainingDiverged, match="the loss is nan"):
        train_local(pm, [0, 1, 2], fp32(micro_batch_size=1, batch_size=1), loss_fn=nan_loss)


def test_task_loss_function(tiny_tokenizer):
    """Any task's loss: a two-layer MLP classifier trained through train_local."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 6, generator=g)
    y = (x[:, 0] > 0).long()
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))

    def loss_fn(m, batch):
        idx = torch.tensor(batch)
        return torch.nn.functional.cross_entropy(m(x[idx]), y[idx], reduction="sum"), len(batch)

    cfg = fp32(micro_batch_size=4, batch_size=8, num_epochs=30, learning_rate=1e-2)
    res = train_local(model, list(range(32)), cfg, loss_fn=loss_fn)
    assert res.tokens == 0 and res.steps == 120
    assert res.losses[-1] < 0.3 * res.losses[0]
    with pytest.raises(ValueError, match="length function"):
        train_local(model, list(range(32)), fp32(group_by_length=True), loss_fn=loss_fn)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_trains_on_cuda(tiny_tokenizer):
    model = build_tiny_llama(vocab_size=len(tiny_tokenizer)).to("cuda")
    pm = attach_lora(model, LoraSpec(rank=2), seed=0)
    res = train_local(pm, examples(tiny_tokenizer, 8), TrainConfig(micro_batch_size=4))
    assert res.steps == 1 and 0 < res.loss < 20
    assert all(a.device.type == "cpu" for a, _ in read_factors(pm).values())


def _no_targets(example):
    return {"input_ids": example["input_ids"], "labels": [-100] * len(example["labels"])}


def test_a_step_without_targets_reports_no_loss(tiny_tokenizer):
    """A step whose examples keep no target token (the prompt fills cutoff_len) updates nothing
    and logs no loss: a 0 would read as perfect training."""
    ex = examples(tiny_tokenizer, 8)
    mixed = ex[:4] + [_no_targets(e) for e in ex[4:]]
    cfg = fp32(micro_batch_size=1, batch_size=1)
    seen = []
    model = build_tiny_llama(vocab_size=len(tiny_tokenizer))
    pm = attach_lora(model, LoraSpec(rank=2, dropout=0.0), seed=0)
    res = train_local(pm, mixed, cfg, progress=lambda s, t, loss: seen.append(loss))
    assert res.steps == 4 and len(res.losses) == 4 and all(x > 0 for x in res.losses)
    assert res.loss == pytest.approx(sum(res.losses) / 4)
    assert len(seen) == 8 and seen.count(None) == 4

    before = {n: (a.clone(), b.clone()) for n, (a, b) in read_factors(pm).items()}
    res = train_local(pm, [_no_targets(e) for e in ex], cfg)
    assert res.loss is None and res.losses == [] and res.steps == 0
    after = read_factors(pm)
    assert all(torch.equal(before[n][0], after[n][0]) for n in before)


def test_examples_without_a_target_are_refused(tiny_tokenizer):
    from rblora.training import check_targets

    ex = examples(tiny_tokenizer, 3)
    check_targets(ex, "client 4", 56)
    check_targets([], "client 4", 56)
    with pytest.raises(ValueError, match=r"client 4: 2 of its 3 training records keep no token"):
        check_targets(ex[:1] + [_no_targets(e) for e in ex[1:]], "client 4", 56)
    with pytest.raises(ValueError, match=r"client 4: 3 of its 3 training records keep no token"):
        check_targets([_no_targets(e) for e in ex], "client 4", 56)


def _scripted(values):
    """A loss_fn whose step losses are ``values`` in turn (one example per step)."""
    it = iter(values)

    def loss_fn(m, batch):
        w = next(p for p in m.parameters() if p.requires_grad)
        return torch.tensor(next(it)) + 0.0 * w.sum(), 1

    return loss_fn


def test_a_loss_that_explodes_but_stays_finite_is_divergence():
    from rblora.training import TrainingDiverged

    model = torch.nn.Linear(2, 2)
    cfg = fp32(micro_batch_size=1, batch_size=1)
    # a recovering spike as measured on SmolLM2 at lr 1e-2 (round 2): not divergence
    spike = [0.0905, 2.3224, 1.0324, 0.346, 0.0794]
    assert train_local(model, list(range(5)), cfg, loss_fn=_scripted(spike)).steps == 5
    exploding = [2.0, 2.5, 1.0, 7.5, 9.0]
    with pytest.raises(
        TrainingDiverged,
        match=r"diverged at step 4: the loss rose from 2 at the first step to 7.5 \(limit: 5 above",
    ):
        train_local(model, list(range(5)), cfg, loss_fn=_scripted(exploding))
    res = train_local(
        model, list(range(5)), fp32(micro_batch_size=1, batch_size=1, max_loss_rise=math.inf),
        loss_fn=_scripted(exploding),
    )  # fmt: skip
    assert res.losses == pytest.approx(exploding)
    with pytest.raises(ValueError, match="max_loss_rise must be > 0"):
        fp32(max_loss_rise=0)


def test_tiny_llama_at_an_exploding_rate_stops(tiny_tokenizer):
    """LoRA on the output head at lr 1: the loss goes 4.6 -> 11 -> 178 with weights far below
    max_abs_weight; it used to finish as if nothing had happened."""
    from rblora.training import TrainingDiverged

    spec = LoraSpec(rank=4, dropout=0.0, target_modules=["q_proj", "v_proj", "lm_head"])
    cfg = fp32(micro_batch_size=4, batch_size=4, learning_rate=1.0, num_epochs=2)
    with pytest.raises(TrainingDiverged, match="diverged at step 2: the loss rose from 4.6"):
        _train(tiny_tokenizer, cfg, spec, n=32)


def test_divergence_leaves_no_gradient_behind():
    """The image task's head outlives the LoRA (it is put back, not discarded): a NaN gradient
    left on it by a diverged client made the next training diverge at its first step."""
    from rblora.training import TrainingDiverged

    model = torch.nn.Linear(2, 2)

    def nan_loss(m, batch):
        return m.weight.sum() * float("nan"), 1

    with pytest.raises(TrainingDiverged, match="the loss is nan"):
        train_local(model, [0, 1], fp32(micro_batch_size=1, batch_size=1), loss_fn=nan_loss)
    assert all(p.grad is None for p in model.parameters())


def test_split_by_length_cuts_where_padding_costs_more_than_a_pass():
    from rblora.training.batching import split_by_length

    lengths = [200, 30, 210, 25, 190, 40]
    # one pass pads all six to 210 (1,260 positions); two: 3 x 210 + 3 x 40 + a pass of 64
    assert split_by_length([0, 1, 2, 3, 4, 5], lengths, 64) == [[2, 0, 4], [5, 1, 3]]
    assert split_by_length([0, 1, 2, 3, 4, 5], lengths, 1000) == [[0, 1, 2, 3, 4, 5]]
    assert split_by_length([3, 1], lengths, 0) == [[1], [3]]  # free passes: one each
    assert split_by_length([4], lengths, 0) == [[4]]
    rnd = random.Random(0)
    for _ in range(50):  # a partition of the batch that never costs more than one pass
        n = rnd.randint(1, 8)
        lens = [rnd.randint(1, 256) for _ in range(n)]
        batch = rnd.sample(range(n), n)
        groups = split_by_length(batch, lens, 32)
        assert sorted(j for g in groups for j in g) == sorted(batch)
        cost = sum(len(g) * max(lens[j] for j in g) + 32 for g in groups)
        assert cost <= n * max(lens) + 32


def test_split_by_length_keeps_the_step(tiny_tokenizer):
    """Splitting a micro-batch into passes of similar lengths changes the rounding only (no
    dropout here): the same steps, losses and factors to float32 rounding."""
    spec = LoraSpec(rank=4, dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    kw = dict(batch_size=8, micro_batch_size=8, learning_rate=1e-3, max_grad_norm=0.0)
    f1, r1 = _train(tiny_tokenizer, fp32(**kw), spec, n=24)
    f2, r2 = _train(tiny_tokenizer, fp32(split_by_length=True, split_call_cost=0, **kw), spec, n=24)
    assert r1.steps == r2.steps == 3 and r1.tokens == r2.tokens
    assert r1.losses == pytest.approx(r2.losses, rel=1e-6)
    for name in f1:
        torch.testing.assert_close(f1[name][0], f2[name][0], rtol=0, atol=1e-5)
        torch.testing.assert_close(f1[name][1], f2[name][1], rtol=0, atol=1e-5)
    passes = []

    def counting(model, batch):
        passes.append(len(batch))
        return causal_lm_objective(tiny_tokenizer.pad_token_id)(model, batch)

    model = attach_lora(build_tiny_llama(vocab_size=len(tiny_tokenizer)), spec, seed=3)
    cfg = fp32(split_by_length=True, split_call_cost=0, **kw)
    train_local(model, examples(tiny_tokenizer, 24), cfg, loss_fn=counting, length=len_ids)
    assert len(passes) > 3 and sum(passes) == 24  # split: more passes than micro-batches
    with pytest.raises(ValueError, match="split_by_length needs a length function"):
        train_local(model, [0, 1], cfg, loss_fn=counting)
    with pytest.raises(ValueError, match="split_call_cost must be an integer >= 0, got -1"):
        fp32(split_by_length=True, split_call_cost=-1)


def len_ids(example):
    return len(example["input_ids"])
