"""train.py options: flags, YAML configs, precedence and validation."""

from pathlib import Path

import pytest

from rblora import configs
from rblora.federation.options import SEED_RANKS, TrainArgs, selection_count
from rblora.federation.options import parse_args as parse_with_given


def parse_args(argv):
    return parse_with_given(argv)[0]


CONFIGS = [configs.shipped_path(name) for name in configs.shipped()]


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


def test_the_configs_ship_in_the_package_and_only_there():
    names = [p.name for p in CONFIGS]
    assert {"embedded.yaml", "rb_lora.yaml", "vit_embedded.yaml", "flora.yaml"} <= set(names)
    assert all(p.parent == Path(configs.__file__).parent for p in CONFIGS)
    assert not (Path(__file__).parents[2] / "configs").exists()  # one home, no second copy


@pytest.mark.parametrize("given", ["configs/rb_lora.yaml", "rb_lora.yaml", "rb_lora"])
def test_a_shipped_config_by_name_or_by_the_seeds_path(given, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ folder here: the packaged file is read
    args = parse_args(["--config", given])
    assert args.method == "RB-LoRA" and args.ranks() == SEED_RANKS
    assert args.client_dataset_size_dict["client_9"] == 2500


def test_a_file_that_exists_wins_over_the_shipped_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "rb_lora.yaml").write_text("method: FLoRA\nnum_clients: 2\n")
    assert parse_args(["--config", "configs/rb_lora.yaml"]).method == "FLoRA"


@pytest.mark.parametrize(
    "given", ["configs/nope.yaml", "elsewhere/rb_lora.yaml", "/x/rb_lora.yaml"]
)
def test_a_missing_config_names_the_shipped_ones(given, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"does not exist; shipped configs: embedded.yaml, "):
        parse_args(["--config", given])


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
        (["--num_clients", "3", "--client_ranks", "4,4,4", "--min_replies", "5"],
         r"min_replies 5 can never be met: 3 client\(s\) are selected per round"),
        (["--client_selection_frac", "0.2", "--min_replies", "3"],
         r"min_replies 3 can never be met: 2 client\(s\) are selected per round \(num_clients "
         r"10, client_selection_frac 0.2\); give at most 2, or a fraction below 1"),
        (["--min_replies", "2.5"], "min_replies 2.5: a count must be a whole number"),
        (["--min_replies", "0"], "min_replies 0.0 must be a count >= 1 or a fraction"),
        (["--discovery_timeout", "0"], "discovery_timeout 0.0 must be a number of seconds > 0"),
        (["--num_clients", "3", "--client_ranks", "4,4,4", "--local_val_set_size", "-1"],
         "local_val_set_size -1 must be >= 0"),
    ],
)  # fmt: skip
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


@pytest.mark.parametrize(
    "clients, frac, count",
    [(100, 0.57, 57), (100, 0.1, 10), (10, 0.25, 3), (10, 0.24, 2), (3, 0.1, 1), (3, 0.5, 2),
     (7, 1.0, 7)],
)  # fmt: skip
def test_selection_takes_the_rounded_count(clients, frac, count):
    from rblora.federation.server import FederatedServer
    from rblora.protocol.types import ClientSpec

    assert selection_count(clients, frac) == count
    server = FederatedServer("RB-LoRA", [ClientSpec(k, 4, 16.0) for k in range(clients)], frac=frac)
    assert len(server.select(1)) == count


def test_a_fraction_of_replies_is_always_reachable():
    args = parse_args(["--client_selection_frac", "0.2", "--min_replies", "0.9"])
    assert args.selected_per_round() == 2


def test_tracking_options_from_flags_and_yaml(tmp_path):
    args = parse_args(["--report_to", "tensorboard,mlflow", "--mlflow_tags", '{"n": 3}'])
    assert args.report_to == ["tensorboard", "mlflow"] and args.mlflow_tags == {"n": "3"}
    assert parse_args([]).report_to == ["none"]
    cfg = tmp_path / "c.yaml"
    cfg.write_text("report_to: [mlflow]\nmlflow_tags: {setting: wide, final: true}\n")
    args = parse_args(["--config", str(cfg)])
    assert args.report_to == ["mlflow"] and args.mlflow_tags == {"setting": "wide", "final": "true"}
    cfg.write_text("mlflow_tags: {setting: [1, 2]}\n")
    with pytest.raises(ValueError, match=r"mlflow_tags=.* has setting=\[1, 2\], which is not a"):
        parse_args(["--config", str(cfg)])
    with pytest.raises(ValueError, match=r"report_to 'wandb': valid are tensorboard, mlflow"):
        parse_args(["--report_to", "wandb"])
