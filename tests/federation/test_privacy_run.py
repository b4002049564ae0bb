"""Client-level DP in a run: options, the accountant's epsilon per round, the global folders,
resume, and the results (rblora.federation.privacy, FederatedServer with privacy)."""

from __future__ import annotations

import builtins
import json

import pytest
import torch
from run_helpers import (
    adapter_tensors,
    assert_refused_in_one_line,
    killed_in_round_2,
    lm_argv,
    metrics,
    spy_evaluated_logits,
    tb_scalars,
)

from rblora.federation import cli
from rblora.federation.privacy import epsilon_after, privacy_settings, solve_noise_multiplier

DP = ("--dp_clip", "0.5", "--dp_noise_multiplier", "0.8")


def _opacus_epsilon(z, q, rounds, delta, accountant="rdp"):
    """The library's own value, stepped here independently of rblora."""
    from opacus.accountants import PRVAccountant, RDPAccountant

    acc = {"rdp": RDPAccountant, "prv": PRVAccountant}[accountant]()
    for _ in range(rounds):
        acc.step(noise_multiplier=z, sample_rate=q)
    return acc.get_epsilon(delta=delta)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_is_the_librarys_for_the_same_q_z_t_delta(accountant):
    for q, z, rounds in ((1.0, 1.1, 5), (0.3, 0.9, 12)):
        got = epsilon_after(accountant, z, q, rounds, 1e-5)
        assert got == pytest.approx(_opacus_epsilon(z, q, rounds, 1e-5, accountant), rel=1e-9)
    assert epsilon_after("rdp", 0.0, 1.0, 3, 1e-5) is None  # no noise: no guarantee


def test_noise_is_solved_for_a_budget_and_an_unreachable_one_is_refused():
    settings = privacy_settings(
        clip=1.0, noise_multiplier=None, epsilon=4.0, delta=1e-5, accountant="rdp",
        sample_rate=0.5, rounds=20, sampling="poisson",
    )  # fmt: skip
    spent = _opacus_epsilon(settings.noise_multiplier, 0.5, 20, 1e-5)
    assert 4.0 - 0.01 <= spent <= 4.0
    with pytest.raises(ValueError, match=r"dp_epsilon 0.05 at delta 1e-05 cannot be met in 20"):
        solve_noise_multiplier(0.05, 1e-5, 1.0, 20, "rdp")


def test_fixed_size_selection_is_accounted_without_amplification():
    """Opacus analyses Poisson sampling: a fixed-size selection of half the clients is accounted
    as if everyone took part (q = 1), Poisson sampling at its own q."""
    common = dict(clip=1.0, noise_multiplier=1.1, epsilon=None, delta=1e-5, accountant="rdp",
                  sample_rate=0.5, rounds=5)  # fmt: skip
    fixed = privacy_settings(**common, sampling="fixed")
    poisson = privacy_settings(**common, sampling="poisson")
    assert fixed.accounting_rate == 1.0 and poisson.accounting_rate == 0.5
    assert fixed.epsilon(5) == pytest.approx(_opacus_epsilon(1.1, 1.0, 5, 1e-5), rel=1e-12)
    assert poisson.epsilon(5) == pytest.approx(_opacus_epsilon(1.1, 0.5, 5, 1e-5), rel=1e-12)
    assert poisson.epsilon(5) < fixed.epsilon(5)
    assert "accounted at q = 1" in fixed.describe()
    assert "Poisson sampling at q = 0.5, accounted at that q" in poisson.describe()


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--dp_clip", "0", "--dp_noise_multiplier", "1"], "dp_clip 0.0 must be a finite number"),
        (["--dp_clip", "1", "--dp_noise_multiplier", "-1"], "dp_noise_multiplier -1.0 must be"),
        (["--dp_clip", "1"], "give exactly one of --dp_noise_multiplier z and --dp_epsilon E"),
        (
            ["--dp_clip", "1", "--dp_noise_multiplier", "1", "--dp_epsilon", "3"],
            "give exactly one of",
        ),
        (["--dp_noise_multiplier", "1"], "need --dp_clip C"),
        (["--dp_clip", "1", "--dp_epsilon", "0"], "dp_epsilon 0.0 must be a finite number > 0"),
        (["--dp_clip", "1", "--dp_epsilon", "3", "--dp_delta", "1"], "dp_delta 1.0 must be in"),
        (["--dp_clip", "1", "--dp_epsilon", "3", "--dp_accountant", "gdp"], "valid are rdp, prv"),
        (["--dp_clip", "1", "--dp_epsilon", "0.05"], "cannot be met in 2 rounds"),
        (
            [
                "--dp_clip",
                "1",
                "--dp_epsilon",
                "3",
                "--method",
                "FLoRA",
                "--reduction_method",
                "truncate",
            ],
            "truncate cannot be made differentially private",
        ),  # fmt: skip
        (["--client_sampling", "bernoulli"], "client_sampling 'bernoulli': valid are fixed"),
        (["--dp_clip_quantile", "1", "--dp_noise_multiplier", "1"], "dp_clip_quantile 1.0 must"),
        (
            ["--dp_clip", "1", "--dp_noise_multiplier", "1", "--dp_clip_count_stddev", "2"],
            "--dp_clip_count_stddev needs --dp_clip_quantile",
        ),  # fmt: skip
        (
            ["--dp_clip_quantile", "0.5", "--dp_noise_multiplier", "1", "--dp_clip_lr", "0"],
            "dp_clip_lr 0.0 must be",
        ),  # fmt: skip
        (
            ["--dp_clip_quantile", "0.5", "--dp_noise_multiplier", "1"],
            "the count's noise stddev 0.15 is too small for the noise multiplier 1",
        ),  # fmt: skip
        (
            ["--dp_clip", "1", "--dp_epsilon", "3", "--dp_noise_from_seed"],
            "no guarantee, so there is no epsilon to solve for",
        ),  # fmt: skip
        (["--dp_noise_from_seed"], "need --dp_clip C"),
    ],
)
def test_bad_dp_options_exit_2_in_one_line(workspace, tmp_path, extra, fragment, capsys):
    assert_refused_in_one_line(workspace, tmp_path / "out", extra, fragment, capsys)


def test_missing_opacus_is_one_clear_message(workspace, tmp_path, monkeypatch, capsys):
    real = builtins.__import__

    def no_opacus(name, *args, **kwargs):
        if name.startswith("opacus"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_opacus)
    assert cli.main(lm_argv(workspace, tmp_path, *DP)) == 2
    err = capsys.readouterr().err
    assert "needs opacus" in err and "pip install 'rblora[dp]'" in err and "Traceback" not in err


def private_metrics(run):
    return [json.loads(x) for x in (run / "private" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "method, reduction",
    [
        ("RB-LoRA", "svd"),
        ("FLoRA", "merge"),
        ("Uniform HETLoRA", "truncate"),
        ("RoLoRA", "truncate"),  # a held factor, one released a round
        ("FedEx-LoRA", "truncate"),  # a dense residual folded into the base
    ],
)
def test_dp_run_records_epsilon_and_its_global_folders_load_with_peft(
    workspace, tmp_path, monkeypatch, method, reduction
):
    """Each round's global folder, loaded with PeftModel on the original base, gives the noised
    model the round evaluated; metrics, results.json and summary.md carry epsilon and only what
    may be released; the clients' lines, statistics and adapters are in private/."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rblora.federation.rounds import RELEASED

    probe = torch.tensor([[5, 17, 33, 40, 8, 61, 12]])
    evaluated = spy_evaluated_logits(monkeypatch, probe)
    argv = lm_argv(workspace, tmp_path, "--method", method, "--reduction_method", reduction, *DP)
    assert cli.main(argv) == 0
    run = tmp_path / "3"
    records = metrics(run)
    assert {r["type"] for r in records} == {"round"}  # no client line is released
    rounds = [r for r in records if r["type"] == "round"]
    for r in rounds:
        assert set(r) <= set(RELEASED), sorted(set(r) - set(RELEASED))
        assert r["dp_epsilon"] == pytest.approx(_opacus_epsilon(0.8, 1.0, r["round"], 1e-5))
    kept = private_metrics(run)
    assert sorted((r["round"], r["client"]) for r in kept if r["type"] == "client") == [
        (t, k) for t in (1, 2) for k in range(3)
    ]
    for r in (r for r in kept if r["type"] == "round"):
        assert r["selected"] == [0, 1, 2] and r["train_loss"] is not None
        assert 0 <= r["dp_clipped"] <= 3 and r["dp_unclipped"] == 3 - r["dp_clipped"]
        # the median term norm before clipping: above C exactly when most of the 3 were clipped
        assert r["dp_norm_median"] > 0
        assert (r["dp_clipped"] >= 2) == (r["dp_norm_median"] > 0.5)
    assert (run / "private").stat().st_mode & 0o777 == 0o700
    assert (run / "private" / "round_2" / "client_1" / "adapter_model.safetensors").is_file()
    assert not (run / "round_2" / "client_1").exists()
    for t in (1, 2):
        base = AutoModelForCausalLM.from_pretrained(workspace / "model")
        reloaded = PeftModel.from_pretrained(base, run / f"round_{t}" / "global").eval()
        with torch.no_grad():
            logits = reloaded(probe).logits
        torch.testing.assert_close(logits, evaluated[t], rtol=1e-4, atol=1e-4)
    results = json.loads((run / "results.json").read_text())
    assert results["privacy"]["epsilon"] == rounds[-1]["dp_epsilon"]
    assert results["privacy"]["noise_multiplier"] == 0.8 and results["privacy"]["guarantee"]
    assert results["clients"] == [] and all(r["train_loss"] is None for r in results["rounds"])
    assert "client-level DP: epsilon" in (run / "summary.md").read_text()
    assert "| DP epsilon |" in (run / "summary.md").read_text()


def _run_files(run):
    """Every file of a run folder outside the server's private state (checkpoint/, private/)."""
    private = {run / "checkpoint", run / "private"}
    return [p for p in run.rglob("*") if p.is_file() and not any(q in p.parents for q in private)]


def _noise_key(run) -> bytes:
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    return bytes.fromhex(state["dp"]["noise_key"])


def _encodings(key: bytes) -> list[bytes]:
    """The key as raw bytes, hex (both cases) and base64: any way a writer could spill it."""
    import base64

    return [key, key.hex().encode(), key.hex().upper().encode(), base64.b64encode(key)]


def test_the_noise_key_is_nowhere_outside_the_private_state(workspace, tmp_path, capfd):
    """A DP run with both trackers: no file of the run folder (config.json, metrics, results,
    summary, global folders, TensorBoard events, tracking.json) nor the MLflow store nor the
    log holds the key, which the checkpoint keeps (mode 0600) from before round 1."""
    pytest.importorskip("mlflow")
    argv = lm_argv(workspace, tmp_path, *DP, "--report_to", "tensorboard,mlflow", "--eval_base")
    assert cli.main(argv) == 0
    run = tmp_path / "3"
    key = _noise_key(run)
    assert len(key) == 32
    files = _run_files(run) + [tmp_path / "mlflow.db"]
    assert any("tfevents" in p.name for p in files) and (run / "config.json") in files
    log = capfd.readouterr()
    for path in files:
        data = path.read_bytes()
        for form in _encodings(key):
            assert form not in data, path
    for form in _encodings(key):
        assert form.decode("latin-1") not in log.out + log.err
    config = json.loads((run / "config.json").read_text())
    assert config["privacy"]["guarantee"] is True
    tags = set(tb_scalars(run / "tensorboard"))  # the trackers got the released figures only
    assert {"dev/accuracy", "round/dp_epsilon", "round/eval_seconds"} <= tags
    assert not [t for t in tags if t.startswith("client_") or "loss" in t and "heldout" not in t]
    assert "round/train_loss" not in tags and "round/bytes_up" not in tags


@pytest.mark.slow  # three runs
def test_the_same_seed_releases_other_noise_unless_noise_from_seed_is_asked(workspace, tmp_path):
    """Two runs with the same options and seed release different models (each drew its own
    key); with --dp_noise_from_seed they repeat, and say there is no guarantee (epsilon null)."""
    runs = {}
    for name, extra in (("a", DP), ("b", DP), ("seeded", (*DP, "--dp_noise_from_seed")),
                        ("seeded_again", (*DP, "--dp_noise_from_seed"))):  # fmt: skip
        assert cli.main(lm_argv(workspace, tmp_path / name, *extra,
                                num_communication_rounds=1)) == 0  # fmt: skip
        runs[name] = adapter_tensors(tmp_path / name / "3" / "round_1" / "global")
    assert any(not torch.equal(runs["a"][k], runs["b"][k]) for k in runs["a"])
    assert all(torch.equal(runs["seeded"][k], runs["seeded_again"][k]) for k in runs["seeded"])
    run = tmp_path / "seeded" / "3"
    assert [r["dp_epsilon"] for r in metrics(run)] == [None]
    results = json.loads((run / "results.json").read_text())
    assert results["privacy"]["guarantee"] is False and results["privacy"]["epsilon"] is None
    assert "NO GUARANTEE (noise drawn from the public seed)" in (run / "summary.md").read_text()


@pytest.mark.slow  # four runs
def test_clip_only_gives_the_plain_update_and_noise_changes_it(workspace, tmp_path):
    runs = {}
    for name, extra in (
        ("clip", ("--dp_clip", "1e9", "--dp_noise_multiplier", "0")),
        ("noise", DP),
    ):
        assert cli.main(lm_argv(workspace, tmp_path / name, *extra)) == 0
        runs[name] = adapter_tensors(tmp_path / name / "3" / "round_1" / "global")
    plain_dir = tmp_path / "plain"
    assert cli.main(lm_argv(workspace, plain_dir)) == 0
    plain = adapter_tensors(plain_dir / "3" / "round_1" / "global")
    # no clipping, no noise, everyone selected: the same update as without DP (held dense)
    for key in [k for k in plain if "lora_B" in k]:
        module = key.split(".lora_B")[0]
        a_key = key.replace("lora_B", "lora_A")
        ref = plain[key] @ plain[a_key]
        torch.testing.assert_close(runs["clip"][key] @ runs["clip"][a_key], ref,
                                   rtol=1e-4, atol=1e-6)  # fmt: skip
        noisy = runs["noise"][key] @ runs["noise"][a_key]
        assert not torch.allclose(noisy, ref, atol=1e-3), module


def _same_adapters(a, b, subs):
    for sub in subs:
        x, y = adapter_tensors(a / sub), adapter_tensors(b / sub)
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), (sub, key)


@pytest.mark.slow  # five runs
def test_copies_of_one_round_1_state_resume_to_the_same_adapters(workspace, tmp_path, monkeypatch):
    """The key is read back from the checkpoint: two resumes from copies of one run killed in
    round 2 end with the same adapters; with --dp_noise_from_seed (the same key in both) a
    resumed run ends bitwise like an uninterrupted one, for RB-LoRA and FLoRA."""
    import shutil

    subs = ["round_2/global", "private/round_2/client_0", "private/round_2/client_2"]
    cut = tmp_path / "cut"
    assert killed_in_round_2(monkeypatch, lm_argv(workspace, cut, *DP)) == 130
    for copy in ("one", "two"):
        shutil.copytree(cut, tmp_path / copy)
        assert cli.main(lm_argv(workspace, tmp_path / copy, *DP, "--resume")) == 0
    _same_adapters(tmp_path / "one" / "3", tmp_path / "two" / "3", subs)
    for method in ("RB-LoRA", "FLoRA"):
        seeded = ("--method", method, *DP, "--dp_noise_from_seed")
        full, cut = tmp_path / method / "full", tmp_path / method / "cut"
        assert cli.main(lm_argv(workspace, full, *seeded)) == 0
        assert killed_in_round_2(monkeypatch, lm_argv(workspace, cut, *seeded)) == 130
        assert cli.main(lm_argv(workspace, cut, *seeded, "--resume")) == 0
        _same_adapters(full / "3", cut / "3", subs)


def test_a_dp_run_without_its_checkpoint_cannot_resume(workspace, tmp_path, monkeypatch, capsys):
    """The checkpoint is written before round 1 and holds the key: without it a resume would
    release round 1 again under other noise, so it is refused."""
    import shutil

    argv = lm_argv(workspace, tmp_path, *DP, num_communication_rounds=1)
    from rblora.tasks.lm import CausalLMTask

    def dies(self, spec, start, *, seed, round_):
        raise KeyboardInterrupt

    monkeypatch.setattr(CausalLMTask, "train_client", dies)
    assert cli.main(argv) == 130
    monkeypatch.undo()
    assert _noise_key(tmp_path / "3")  # kept before any client trained
    shutil.rmtree(tmp_path / "3" / "checkpoint")
    capsys.readouterr()
    assert cli.main([*argv, "--resume"]) == 2
    assert "secret DP noise key" in capsys.readouterr().err


def test_dp_options_cannot_change_on_resume(workspace, tmp_path, capsys):
    eps = ("--dp_clip", "0.5", "--dp_epsilon", "30")
    assert cli.main(lm_argv(workspace, tmp_path, *eps, num_communication_rounds=1)) == 0
    capsys.readouterr()
    changed = ("--dp_clip", "0.7", "--dp_epsilon", "30")
    assert cli.main(lm_argv(workspace, tmp_path, *changed, "--resume",
                            num_communication_rounds=1)) == 2  # fmt: skip
    assert "dp_clip: run has 0.5, now 0.7" in capsys.readouterr().err
    assert cli.main(lm_argv(workspace, tmp_path, *eps, "--resume")) == 2  # 2 rounds now
    assert "noise was solved for the run's rounds" in capsys.readouterr().err


def test_a_dp_comparison_shows_the_epsilon_spent(workspace, tmp_path):
    """DP options after ``--`` are a cell option like any other; comparison.md says the epsilon
    each row spent by the last round."""
    from rblora.cli import main as rblora

    root = tmp_path / "cmp"
    base = lm_argv(workspace, tmp_path / "unused", *DP, num_communication_rounds=2)
    i = base.index("--output_dir")
    del base[i : i + 2]
    argv = ["compare", "--methods", "RB-LoRA", "--seeds", "1", "--output_dir", str(root), "--"]
    assert rblora([*argv, *base]) == 0
    table = (root / "comparison.md").read_text()
    assert "| setting | method | seeds | DP epsilon r2 |" in table
    spent = _opacus_epsilon(0.8, 1.0, 2, 1e-5)
    assert f"| heterogeneous | RB-LoRA | 1 | {spent:.3g} |" in table


@pytest.mark.parametrize(
    "private, round_, advice",
    [
        (True, 2, "the start carried the DP noise of the last global model"),
        (True, 1, "(lower --local_learning_rate and start again)"),  # round 1: no noise yet
        (False, 2, "(lower --local_learning_rate and start again)"),
    ],
)
def test_a_client_diverging_from_a_noised_start_is_told_why(private, round_, advice):
    """Under DP a client's start after round 1 carries the noise; a divergence then says so
    rather than blaming the learning rate alone."""
    from rblora.federation.rounds import RunError, train_client
    from rblora.protocol.types import ClientSpec
    from rblora.training import TrainingDiverged

    class Diverges:
        def train_client(self, spec, start, *, seed, round_):
            raise TrainingDiverged("diverged at step 2: the loss rose from 11 to 19")

    with pytest.raises(RunError) as err:
        train_client(Diverges(), ClientSpec(0, 4, 16.0), None, seed=0, round_=round_,
                     private=private)  # fmt: skip
    assert f"client 0 (rank 4) in round {round_}: training diverged at step 2" in str(err.value)
    assert advice in str(err.value)


@pytest.mark.parametrize("sampling, accounted", [("poisson", 0.5), ("fixed", 1.0)])
def test_the_recorded_epsilon_is_opacus_for_the_sampling_done(
    workspace, tmp_path, sampling, accounted
):
    """Poisson sampling at q = 0.5 is accounted at 0.5; a fixed selection of 2 of 3 clients at
    q = 1 (no amplification). Who took part is recorded in the private records only."""
    extra = ("--client_sampling", sampling, "--client_selection_frac", "0.5", *DP)
    assert cli.main(lm_argv(workspace, tmp_path, *extra, num_communication_rounds=3)) == 0
    run = tmp_path / "3"
    for r in metrics(run):
        assert "selected" not in r
        assert r["dp_epsilon"] == pytest.approx(_opacus_epsilon(0.8, accounted, r["round"], 1e-5))
    chosen = [r["selected"] for r in private_metrics(run) if r["type"] == "round"]
    assert len(chosen) == 3 and all(set(c) <= {0, 1, 2} for c in chosen)
    if sampling == "fixed":
        assert all(len(c) == 2 for c in chosen)  # round(0.5 * 3) = 2
    config = json.loads((run / "config.json").read_text())
    assert config["privacy"]["sampling"] == sampling
    assert config["privacy"]["accounting_sample_rate"] == accounted


def test_an_empty_round_releases_the_noise_alone(workspace, tmp_path, monkeypatch):
    """Poisson sampling may select nobody: the round still releases (noise of the shapes the
    server knows), is evaluated and accounted, and the next round starts from it."""
    from rblora.federation.server import FederatedServer

    original = FederatedServer.select
    monkeypatch.setattr(
        FederatedServer, "select", lambda self, t: [] if t == 1 else original(self, t)
    )
    extra = ("--client_sampling", "poisson", "--client_selection_frac", "0.9", *DP)
    assert cli.main(lm_argv(workspace, tmp_path, *extra)) == 0
    run = tmp_path / "3"
    rounds = metrics(run)
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[0]["dp_epsilon"] == pytest.approx(_opacus_epsilon(0.8, 0.9, 1, 1e-5))
    noise = adapter_tensors(run / "round_1" / "global")
    assert all(torch.isfinite(t).all() for t in noise.values())
    kept = [r for r in private_metrics(run) if r["round"] == 1]
    assert [r["type"] for r in kept] == ["round"] and kept[0]["selected"] == []
    assert kept[0]["dp_unclipped"] == 0 and kept[0]["dp_norm_median"] is None


def test_adaptive_clipping_follows_the_rule_and_the_accountant_sees_z(workspace, tmp_path):
    """With --dp_clip_quantile the released clip of round 2 is the rule applied to round 1's
    private count and the key's count-noise draw; epsilon is the accountant's for the effective
    multiplier z; the update's noise uses z_u = (z^-2 - (2 sigma_b)^-2)^-1/2."""
    from rblora.aggregation.privacy import AdaptiveClip, secret_generator
    from rblora.federation.server import COUNT_STREAM

    extra = ("--dp_clip", "0.3", "--dp_clip_quantile", "0.5", "--dp_noise_multiplier", "0.5",
             "--dp_clip_count_stddev", "1.0")  # fmt: skip
    assert cli.main(lm_argv(workspace, tmp_path, *extra)) == 0
    run = tmp_path / "3"
    rounds = metrics(run)
    for r in rounds:
        assert r["dp_epsilon"] == pytest.approx(_opacus_epsilon(0.5, 1.0, r["round"], 1e-5))
    assert rounds[0]["dp_clip"] == 0.3
    (first,) = [r for r in private_metrics(run) if r["type"] == "round" and r["round"] == 1]
    draw = float(secret_generator(_noise_key(run), 1, COUNT_STREAM).standard_normal())
    rule = AdaptiveClip(quantile=0.5, learning_rate=0.2, count_stddev=1.0, expected_clients=3)
    assert rounds[1]["dp_clip"] == pytest.approx(rule.next_clip(0.3, first["dp_unclipped"], draw))
    privacy = json.loads((run / "config.json").read_text())["privacy"]
    assert privacy["update_noise_multiplier"] == pytest.approx((0.5**-2 - 2.0**-2) ** -0.5)
    assert privacy["adaptive_clip"]["expected_clients"] == 3
