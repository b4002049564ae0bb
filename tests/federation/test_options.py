"""train.py options: flags, YAML configs, precedence and validation."""

from pathlib import Path

import pytest

from rblora.federation.options import SEED_RANKS, TrainArgs
from rblora.federation.options import parse_args as parse_with_given


def parse_args(argv):
    return parse_with_given(argv)[0]


CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


def test_seed_defaults():
    args = parse_args([])
    assert args.method == "RB-LoRA"
    assert args.num_clients == 10
    assert args.ranks() == SEED_RANKS
    assert args.global_model is None  # the task's default model
    assert args.reduction() == "svd"


def test_seed_command_line_flags():
    args = parse_args(
        [
            "--method",
            "Uniform HETLoRA",
            "--global_model",
            "m",
            "--data_path",
            "./d",
            "--output_dir",
            "./o",
            "--num_clients",
            "4",
            "--num_communication_rounds",
            "3",
            "--local_num_epochs",
            "1",
            "--local_batch_size",
            "32",
            "--train_on_inputs",
            "--group_by_length",
            "--reduction_method",
            "truncate",
            "--lora_target_modules",
            "q_proj",
            "k_proj",
            "--client_lora_rank_dict",
            '{"client_0": 2, "client_1": 4, "client_2": 8, "client_3": 8}',
            "--local_micro_batch_size",
            "8",
        ]
    )
    assert args.group_by_length is True and args.train_on_inputs is True
    assert args.reduction() == "truncate"
    assert args.lora_target_modules == ["q_proj", "k_proj"]
    assert args.ranks() == [2, 4, 8, 8]


def test_bool_flag_forms():
    assert parse_args(["--train_on_inputs", "false"]).train_on_inputs is False
    assert parse_args(["--no_train_on_inputs"]).train_on_inputs is False
    assert parse_args(["--group_by_length"]).group_by_length is True


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    args = parse_args(["--config", str(path)])
    assert len(args.ranks()) == args.num_clients
    sizes = args.expected_sizes()
    assert sizes is None or len(sizes) == args.num_clients


def test_flags_override_yaml(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "method: FLoRA\nnum_clients: 2\nclient_ranks: [2, 4]\nlocal_learning_rate: 1e-4\n"
    )
    args = parse_args(["--config", str(cfg), "--local_learning_rate", "0.5"])
    assert args.method == "FLoRA" and args.ranks() == [2, 4]
    assert args.local_learning_rate == 0.5
    assert args.reduction() == "merge"


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--method", "FedNope"], "FedNope"),
        (["--num_clients", "0"], "num_clients 0"),
        (["--local_batch_size", "10", "--local_micro_batch_size", "4"], "multiple"),
        (["--client_selection_frac", "1.5"], "client_selection_frac"),
        (["--reduction_method", "zip"], "zip"),
        (["--num_clients", "3", "--client_ranks", "4,4"], "client_ranks has 2"),
        (["--num_clients", "2", "--client_lora_rank_dict", '{"client_0": 4}'], "client_1"),
        (["--client_ranks", "4,4,4,4,4,4,4,4,4,0"], "rank 0"),
        (["--resume", "--overwrite"], "exclude"),
    ],
)
def test_bad_values_name_the_value(argv, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_args(argv)


def test_bad_yaml(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("methd: FLoRA\n")
    with pytest.raises(ValueError, match="unknown option 'methd'"):
        parse_args(["--config", str(cfg)])
    cfg.write_text("num_clients: ten\n")
    with pytest.raises(ValueError, match="num_clients='ten'"):
        parse_args(["--config", str(cfg)])
    with pytest.raises(ValueError, match="does not exist"):
        parse_args(["--config", str(tmp_path / "missing.yaml")])


def test_rule_for_other_client_counts():
    assert TrainArgs(num_clients=3).ranks() == SEED_RANKS[:3]
    assert TrainArgs(num_clients=12).ranks() == SEED_RANKS + SEED_RANKS[:2]
