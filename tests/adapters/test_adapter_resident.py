"""LoraHost: clients attached in turn to one base model give bitwise what attach_lora gives."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build_tiny_llama

from rblora.adapters import (
    LoraHost,
    LoraSpec,
    attach_lora,
    detach_lora,
    read_dense,
    read_factors,
)
from rblora.training import TrainConfig, train_local

# (rank, lora_alpha, use_rslora): shapes repeat, so the host reuses wrappers from the third on
CLIENTS = [(2, 4.0, False), (4, 8.0, False), (2, 4.0, False), (4, 8.0, False), (2, 4.0, True)]
HEAD = ["lm_head"]


def _batch(seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in (7, 11, 5):
        ids = torch.randint(4, 100, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": ids})
    return out


def _rounds(model, attach, read, detach):
    """Every client of CLIENTS in order: attach (from the client before when the rank is the
    same, else fresh), train with dropout, read factors and the dense head, detach."""
    out, start = [], None
    config = TrainConfig(micro_batch_size=2, batch_size=2, learning_rate=1e-2, bf16=False)
    for i, (rank, alpha, rslora) in enumerate(CLIENTS):
        spec = LoraSpec(rank, alpha, dropout=0.1, use_rslora=rslora, modules_to_save=HEAD)
        same_rank = start is not None and next(iter(start.values()))[0].shape[0] == rank
        init = start if same_rank else None
        dense = {n: p.detach() + 0.01 * i for n, p in model.lm_head.named_parameters(HEAD[0])}
        peft = attach(model, spec, init, dense, seed=10 + i)
        train_local(peft, _batch(i), config)
        factors, head = read(peft)
        model = detach(peft)
        out.append((factors, head))
        start = factors
    return model, out


def _plain(model, spec, init, dense, seed):
    return attach_lora(model, spec, init=init, dense=dense, seed=seed)


def test_host_gives_bitwise_what_attach_lora_gives():
    plain_model, host_model = build_tiny_llama(), build_tiny_llama()
    host_model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    plain_model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in host_model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in host_model.named_parameters()}
    host = LoraHost.of(host_model)
    assert LoraHost.of(host_model) is host

    def host_read(peft):
        return host.read_factors(), host.read_dense()

    seen_trainable = []

    def host_attach(model, spec, init, dense, seed):
        peft = host.attach(spec, init=init, dense=dense, seed=seed)
        seen_trainable.append(sorted(n for n, p in peft.named_parameters() if p.requires_grad))
        return peft

    plain_base, plain = _rounds(
        plain_model, _plain, lambda p: (read_factors(p), read_dense(p, HEAD)), detach_lora
    )
    host_base, hosted = _rounds(host_model, host_attach, host_read, lambda _: host.detach())
    for (pf, ph), (hf, hh) in zip(plain, hosted, strict=True):
        assert list(pf) == list(hf)
        assert all(torch.equal(pf[m][0], hf[m][0]) and torch.equal(pf[m][1], hf[m][1]) for m in pf)
        assert all(torch.equal(ph[n], hh[n]) for n in ph) and list(ph) == list(hh)
    assert any(b.abs().sum() > 0 for f, _ in hosted for _, b in f.values())
    # the base comes back as it was: weights, head, flags, modules, no PEFT attribute
    assert host_base is host_model
    after = host_model.state_dict()
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert {n: p.requires_grad for n, p in host_model.named_parameters()} == flags
    assert not hasattr(host_model, "peft_config")
    assert type(host_model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    pairs = zip(plain_base.parameters(), host_model.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    # only the LoRA weights and the head train, whether the wrappers were built or reused
    assert all(names == seen_trainable[0] for names in seen_trainable)
    assert all(("lora_" in n) or ("lm_head" in n) for names in seen_trainable for n in names)
    assert len(host._built) == 3  # (2, 4), (4, 8) and the rsLoRA one: built once each


def test_host_refuses_two_lora_and_rebuilds_when_the_model_changed():
    model = build_tiny_llama()
    host = LoraHost.of(model)
    spec = LoraSpec(rank=2)
    host.attach(spec, seed=0)
    with pytest.raises(ValueError, match="detach it before attaching another"):
        host.attach(spec, seed=1)
    host.detach()
    with pytest.raises(ValueError, match="no LoRA is attached"):
        host.detach()
    # another module put in place of an adapted one: the kept wrapper no longer fits
    old = model.model.layers[1].self_attn.v_proj
    model.model.layers[1].self_attn.v_proj = torch.nn.Linear(old.in_features, old.out_features)
    peft = host.attach(spec, seed=0)
    wrapper = model.model.layers[1].self_attn.v_proj
    assert wrapper.base_layer is not old and len(host._built) == 1
    host.detach()
    with pytest.raises(ValueError, match="rank 17 is above min"):
        host.attach(LoraSpec(rank=17), seed=0)
    assert peft is not None


def test_host_keeps_at_most_max_bytes_of_idle_wrappers():
    model = build_tiny_llama()
    host = LoraHost(model, max_bytes=0)  # nothing idle is kept
    for rank in (1, 2, 1):
        host.attach(LoraSpec(rank=rank), seed=0)
        host.detach()
        assert len(host._built) == 1
