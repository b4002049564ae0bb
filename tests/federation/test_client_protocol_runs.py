"""A method's client protocol in a whole run (in-process engine): FFA-LoRA's clients keep A
frozen at the run's shared initialisation and send B alone; RoLoRA's alternate; FedEx-LoRA
folds its residual into the base."""

from __future__ import annotations

import json

import pytest
import torch
from run_helpers import adapter_tensors, killed_in_round_2, lm_argv, metrics

from rblora.aggregation.frozen import FrozenInit
from rblora.federation import cli

SEED = 3  # lm_argv's


def _factors(folder):
    """module -> (A, B) of a saved client adapter (PEFT's key names stripped)."""
    tensors = adapter_tensors(folder)
    out = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            out[module] = (a, tensors[key.replace("lora_A", "lora_B")])
    return out


def test_ffa_lora_keeps_a_frozen_and_sends_b_alone(workspace, tmp_path):
    assert cli.main(lm_argv(workspace, tmp_path, "--method", "FFA-LoRA")) == 0
    run = tmp_path / "3"
    init = FrozenInit(SEED)
    records = {(r["round"], r["client"]): r for r in metrics(run) if r["type"] == "client"}
    for k, rank in enumerate((2, 4, 8)):
        trained = [_factors(run / f"round_{t}" / f"client_{k}") for t in (1, 2)]
        assert trained[0].keys() == trained[1].keys() and len(trained[0]) > 0
        for module, (a, b) in trained[0].items():
            # A: the first `rank` rows of the run's frozen A, bitwise, in every round
            frozen = init.rows(module, rank, a.shape[1])
            assert torch.equal(a, frozen) and torch.equal(trained[1][module][0], frozen)
            assert float(b.abs().max()) > 0 and not torch.equal(b, trained[1][module][1])
        # what travels is B alone: its bytes, up in every round, down from round 2
        b_bytes = sum(b.numel() * 4 for _, b in trained[0].values())
        a_bytes = sum(a.numel() * 4 for a, _ in trained[0].values())
        assert records[1, k]["bytes_up"] == records[2, k]["bytes_up"] == b_bytes
        assert records[1, k]["bytes_down"] == 0 and records[2, k]["bytes_down"] == b_bytes
        assert a_bytes > 0


@pytest.mark.parametrize("method", ["FFA-LoRA", "RoLoRA", "FedSA-LoRA"])
def test_a_run_with_a_declared_protocol_resumed_in_round_2_ends_bitwise_as_an_uninterrupted_one(
    workspace, local_ws, tmp_path, monkeypatch, method
):
    """Nothing of the protocol is server state but the checkpoint: FFA-LoRA's frozen A is drawn
    again from the seed after a resume, what RoLoRA's round 2 holds (round 1's global factors)
    comes from the checkpointed start basis, and FedSA-LoRA's clients start round 2 again from
    their own round-1 B (their kept files: the newest before the round), so the resumed run is
    the uninterrupted one to the bit (FedSA-LoRA's personalised figures too)."""
    from rblora.aggregation import get_method

    full, cut = tmp_path / "full", tmp_path / "cut"
    ws, extra = workspace, ["--method", method]
    if not get_method(method).protocol.has_global_model:  # scored per client, on local tests
        ws, extra = local_ws, [*extra, "--eval_personalized"]
    assert cli.main(lm_argv(ws, full, *extra)) == 0
    assert killed_in_round_2(monkeypatch, lm_argv(ws, cut, *extra)) == 130
    assert cli.main(lm_argv(ws, cut, *extra, "--resume")) == 0
    if ws is local_ws:
        last = [{**metrics(run / "3")[-1]["eval"]["personalized"], "seconds": 0}
                for run in (full, cut)]  # fmt: skip
        assert last[0] == last[1]
    for sub in ("round_2/global", "round_2/client_0", "round_2/client_2"):
        x, y = adapter_tensors(full / "3" / sub), adapter_tensors(cut / "3" / sub)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), sub


def _alpha(folder) -> float:
    return float(json.loads((folder / "adapter_config.json").read_text())["lora_alpha"])


def _component_mean(factors, sizes, take):
    """Per module, the per-component mean over holders (RoLoRA's rule) of each client's
    ``take(a, b, k)`` (components as rows), weights the clients' example counts."""
    out = {}
    for module in factors[0]:
        rows = [take(*factors[k][module], k) for k in range(len(factors))]
        width = max(len(r) for r in rows)
        num = torch.zeros(width, rows[0].shape[1], dtype=torch.float64)
        den = torch.zeros(width, dtype=torch.float64)
        for k, r in enumerate(rows):
            num[: len(r)] += sizes[k] * r.double()
            den[: len(r)] += sizes[k]
        out[module] = num / den[:, None]
    return out


def _two_rounds(run, ranks):
    """A 2-round run's client lines by ``(round, client)``, the clients' sizes, their trained
    factors of each round and their LoRA scales."""
    records = {(r["round"], r["client"]): r for r in metrics(run) if r["type"] == "client"}
    sizes = [records[1, k]["num_examples"] for k in range(len(ranks))]
    folders = {t: [run / f"round_{t}" / f"client_{k}" for k in range(len(ranks))] for t in (1, 2)}
    trained = {t: [_factors(f) for f in folders[t]] for t in (1, 2)}
    scales = [_alpha(folders[1][k]) / r for k, r in enumerate(ranks)]
    return records, sizes, trained, scales


def test_rolora_trains_b_then_a_and_its_global_model_is_the_hand_rule(workspace, tmp_path):
    """Round 1 trains B with A at the seeded initialisation, round 2 A with B held at round 1's
    global B: each client's held factor is bitwise what it started from, what travels up is the
    trained factor alone, and the exported global updates are the per-component means of the
    clients' trained factors times the held one."""
    assert cli.main(lm_argv(workspace, tmp_path, "--method", "RoLoRA")) == 0
    run = tmp_path / "3"
    init = FrozenInit(SEED)
    ranks = (2, 4, 8)
    records, sizes, trained, scales = _two_rounds(run, ranks)
    # round 1: B averaged per component (Bh = s B, columns as rows), A the seeded one
    b_bar = _component_mean(trained[1], sizes, lambda a, b, k: (scales[k] * b.double()).T)
    for k, rank in enumerate(ranks):
        for module, (a, b) in trained[1][k].items():
            assert torch.equal(a, init.rows(module, rank, a.shape[1]))
            assert float(b.abs().max()) > 0
        for module, (a, b) in trained[2][k].items():  # round 2: B held at round 1's global B
            held = (b_bar[module][:rank].T / scales[k]).float()
            torch.testing.assert_close(b, held, rtol=1e-5, atol=1e-7)
            assert not torch.equal(a, init.rows(module, rank, a.shape[1]))  # A trained
        a_bytes = sum(a.numel() * 4 for a, _ in trained[1][k].values())
        b_bytes = sum(b.numel() * 4 for _, b in trained[1][k].values())
        assert (records[1, k]["bytes_up"], records[1, k]["bytes_down"]) == (b_bytes, 0)
        assert (records[2, k]["bytes_up"], records[2, k]["bytes_down"]) == (a_bytes, a_bytes
                                                                             + b_bytes)  # fmt: skip
    a_bar = _component_mean(trained[2], sizes, lambda a, b, k: a)
    for t, expected in (
        (1, {m: b_bar[m].T @ init.rows(m, 8, a.shape[1]).double()
             for m, (a, _) in trained[1][2].items()}),
        (2, {m: b_bar[m].T @ a_bar[m] for m in a_bar}),
    ):  # fmt: skip
        exported = _factors(run / f"round_{t}" / "global")  # scale 1: the delta is B @ A
        for m, want in expected.items():
            a, b = exported[m]
            torch.testing.assert_close((b @ a).double(), want, rtol=1e-4, atol=1e-6)


def _weighted_update(factors, scales, sizes, padded):
    """Per module ``sum_k p_k Bh_k A_k`` (FedEx-LoRA's exact mean) or, ``padded``, the product
    of the zero-padded weighted factors ``Bbar @ Abar`` (float64)."""
    p = [n / sum(sizes) for n in sizes]
    out = {}
    for module in factors[0]:
        pairs = [(a.double(), scales[k] * b.double()) for k, f in enumerate(factors)
                 for a, b in [f[module]]]  # fmt: skip
        if not padded:
            out[module] = sum(w * bh @ a for w, (a, bh) in zip(p, pairs, strict=True))
            continue
        width = max(a.shape[0] for a, _ in pairs)
        a_bar = torch.zeros(width, pairs[0][0].shape[1], dtype=torch.float64)
        b_bar = torch.zeros(pairs[0][1].shape[0], width, dtype=torch.float64)
        for w, (a, bh) in zip(p, pairs, strict=True):
            a_bar[: len(a)] += w * a
            b_bar[:, : len(a)] += w * bh
        out[module] = b_bar @ a_bar
    return out


def test_fedex_lora_global_model_is_the_exact_mean_and_its_residual_travels(workspace, tmp_path):
    """Round 1's global model is exactly sum_k p_k dW_k; round 2's is the base's residual
    (round 1's exact mean minus the product of its averaged factors) plus round 2's exact
    mean, as exported (a PEFT folder on the original base); a round-2 client downloads the
    factors and the residual, counted as FLoRA's merged total is."""
    assert cli.main(lm_argv(workspace, tmp_path, "--method", "FedEx-LoRA")) == 0
    run = tmp_path / "3"
    ranks = (2, 4, 8)
    records, sizes, trained, scales = _two_rounds(run, ranks)
    exact = {t: _weighted_update(trained[t], scales, sizes, padded=False) for t in (1, 2)}
    product_1 = _weighted_update(trained[1], scales, sizes, padded=True)
    expected = {1: exact[1], 2: {m: exact[1][m] - product_1[m] + exact[2][m] for m in exact[2]}}
    for t in (1, 2):
        exported = _factors(run / f"round_{t}" / "global")  # scale 1: the delta is B @ A
        assert exported.keys() == expected[t].keys()
        for m, want in expected[t].items():
            a, b = exported[m]
            scale = float(want.norm())
            torch.testing.assert_close((b @ a).double() / scale, want / scale, rtol=0,
                                       atol=1e-5)  # fmt: skip
            assert float((exact[1][m] - product_1[m]).norm()) > 1e-4 * scale  # a real residual
    # round 2's download: the rank-r factors, and the residual at most as a dense matrix
    shapes = {m: (b.shape[0], a.shape[1]) for m, (a, b) in trained[1][2].items()}
    width = max(min(sum(ranks) + max(ranks), *shape) for shape in shapes.values())
    residual = sum(min(width * (d_out + d_in), d_out * d_in) * 4 for d_out, d_in in shapes.values())
    for k, rank in enumerate(ranks):
        factors = sum((d_out + d_in) * rank * 4 for d_out, d_in in shapes.values())
        assert records[1, k]["bytes_down"] == 0
        assert records[2, k]["bytes_down"] == factors + residual
        assert records[2, k]["bytes_up"] == factors


def _assert_resumes_bitwise(workspace, tmp_path, monkeypatch, *argv):
    """A run of ``argv`` killed in round 2 and resumed ends with round 2's global and client
    adapters equal, to the bit, to those of the uninterrupted run."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert cli.main(lm_argv(workspace, full, *argv)) == 0
    assert killed_in_round_2(monkeypatch, lm_argv(workspace, cut, *argv)) == 130
    assert cli.main(lm_argv(workspace, cut, *argv, "--resume")) == 0
    for sub in ("round_2/global", "round_2/client_0", "round_2/client_2"):
        x, y = adapter_tensors(full / "3" / sub), adapter_tensors(cut / "3" / sub)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), sub


def test_a_fedex_lora_run_resumed_in_round_2_ends_bitwise_as_an_uninterrupted_one(
    workspace, tmp_path, monkeypatch
):
    """The residual folded into the base is the checkpointed running total: a resumed run is
    the uninterrupted one to the bit."""
    _assert_resumes_bitwise(workspace, tmp_path, monkeypatch, "--method", "FedEx-LoRA")


def _assert_sparsity_weighted_mean(exported, pairs):
    """``exported`` ``(A, B)`` is HETLoRA's ``Bbar @ Abar`` of the clients' ``pairs``
    ``(A_k, Bh_k)`` (float64), zero-padded to the widest and weighted by
    ``||Bh_k A_k||_F / sum_k' ||Bh_k' A_k'||_F`` (to 1e-5 of its norm)."""
    norms = torch.tensor([float(torch.linalg.norm(bh @ a)) for a, bh in pairs])
    w = (norms / norms.sum()).tolist()
    width = max(len(a) for a, _ in pairs)
    a_bar = torch.zeros(width, pairs[0][0].shape[1], dtype=torch.float64)
    b_bar = torch.zeros(pairs[0][1].shape[0], width, dtype=torch.float64)
    for wk, (a, bh) in zip(w, pairs, strict=True):
        a_bar[: len(a)] += wk * a
        b_bar[:, : len(a)] += wk * bh
    want = b_bar @ a_bar
    a, b = exported
    scale = float(want.norm())
    torch.testing.assert_close((b @ a).double() / scale, want / scale, rtol=0, atol=1e-5)


def test_hetlora_global_model_is_the_sparsity_weighted_padded_mean(workspace, tmp_path):
    """HETLoRA as published (a round aggregated from its list): each round's exported global
    model is, per module, ``Bbar @ Abar`` of the zero-padded factors weighted by
    ``||Bh_k A_k||_F / sum_k' ||Bh_k' A_k'||_F``, computed densely from the saved adapters."""
    assert cli.main(lm_argv(workspace, tmp_path, "--method", "HETLoRA")) == 0
    run = tmp_path / "3"
    ranks = (2, 4, 8)
    for t in (1, 2):
        folders = [run / f"round_{t}" / f"client_{k}" for k in range(3)]
        trained = [_factors(f) for f in folders]
        scales = [_alpha(folders[k]) / r for k, r in enumerate(ranks)]
        exported = _factors(run / f"round_{t}" / "global")
        assert exported.keys() == trained[0].keys()
        for m in trained[0]:
            pairs = [
                (f[m][0].double(), s * f[m][1].double())
                for f, s in zip(trained, scales, strict=True)
            ]
            _assert_sparsity_weighted_mean(exported[m], pairs)
    # the round records name the method
    assert {r["method"] for r in metrics(run) if r["type"] == "round" and r["round"] > 0} == {
        "HETLoRA"
    }


def test_hetlora_clients_prune_their_rank_and_the_server_takes_the_smaller_reply(
    workspace, tmp_path
):
    """With --hetlora_lambda a client prunes to max(1, floor(r / 2)) when its tail ends the round
    smaller than it started, and replies at that rank (bytes up in proportion, its saved adapter
    at that rank); round 1 starts from B = 0, so nobody prunes; here (seeded) the rank-2 client
    prunes in round 2 (under Adam, tails far smaller than a step need not shrink). The global
    model is the sparsity-weighted padded mean of what the clients sent, at their ranks."""
    argv = ("--method", "HETLoRA", "--hetlora_lambda", "50", "--hetlora_prune_gamma", "0.5")
    assert cli.main(lm_argv(workspace, tmp_path, *argv)) == 0
    run = tmp_path / "3"
    records = {(r["round"], r["client"]): r for r in metrics(run) if r["type"] == "client"}
    ranks, kept = (2, 4, 8), (1, 2, 4)
    sent = []
    for k in range(3):
        f1 = _factors(run / "round_1" / f"client_{k}")
        f2 = _factors(run / "round_2" / f"client_{k}")
        assert {a.shape[0] for a, _ in f1.values()} == {ranks[k]}
        (rank,) = {a.shape[0] for a, _ in f2.values()}
        assert rank in (ranks[k], kept[k])
        sent.append(rank)
        assert records[2, k]["bytes_up"] * ranks[k] == records[1, k]["bytes_up"] * rank
        assert records[2, k]["rank"] == ranks[k]  # the server's rank of the client stays
    assert sent[0] == kept[0]  # the rank-2 client pruned
    folders = [run / "round_2" / f"client_{k}" for k in range(3)]
    trained = [_factors(f) for f in folders]
    exported = _factors(run / "round_2" / "global")
    for m in trained[0]:
        pairs = [(f[m][0].double(), _alpha(folders[k]) / sent[k] * f[m][1].double())
                 for k, f in enumerate(trained)]  # fmt: skip
        _assert_sparsity_weighted_mean(exported[m], pairs)


def test_a_pruning_hetlora_run_resumed_in_round_2_ends_bitwise_as_an_uninterrupted_one(
    workspace, tmp_path, monkeypatch
):
    """Rank self-pruning keeps no state between rounds (ours), so a resumed run prunes the same
    clients and ends as the uninterrupted one, to the bit."""
    argv = ("--method", "HETLoRA", "--hetlora_lambda", "50")
    _assert_resumes_bitwise(workspace, tmp_path, monkeypatch, *argv)
