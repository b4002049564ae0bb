"""The wheel works on its own: built from the package's files alone, installed into a fresh venv
outside the repository, its ``rblora`` command prepares data and trains with a shipped config.

The new venv gets no dependency from an index: the wheel is installed with ``--no-deps`` first,
then a ``.pth`` file puts this environment's site-packages after the venv's own, so the pinned
torch (and transformers, peft, ...) are the ones already here (a fresh torch from an index would
be a multi-GB CUDA build). The venv's own site-packages comes first on ``sys.path``, so
``import rblora`` finds the wheel's copy, not this checkout (asserted).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

from run_helpers import write_dolly
from tiny_models import build_tiny_llama, build_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def _build_wheel(tmp: Path) -> Path:
    """A wheel built from a copy holding only what the build reads (pyproject, README, src/),
    so nothing of the checkout outside them can end up needed."""
    source = tmp / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp / "dist"), str(source)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (wheel,) = (tmp / "dist").glob("rblora-*.whl")
    return wheel


def _venv_with(wheel: Path, tmp: Path) -> Path:
    """A fresh venv holding the wheel, seeing this environment's packages after its own."""
    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=False, symlinks=True)
    python = env_dir / "bin" / "python"
    # installed before the .pth exists: pip then sees an empty environment (it would otherwise
    # find this environment's rblora and try to replace it)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
         "--no-index", "-q", str(wheel)],
        capture_output=True, text=True, timeout=300, env=_clean_env(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True, env=_clean_env(),
    ).stdout.strip()  # fmt: skip
    ours = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (Path(purelib) / "zz_current_environment.pth").write_text("\n".join(ours) + "\n")
    return env_dir / "bin"


def _clean_env() -> dict[str, str]:
    """This process's environment without what would point Python back at the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _run(bin_dir: Path, cwd: Path, *argv: str, timeout: float = 600) -> str:
    done = subprocess.run(
        [str(bin_dir / argv[0]), *argv[1:]],
        cwd=cwd, capture_output=True, text=True, timeout=timeout, env=_clean_env(),
    )  # fmt: skip
    assert done.returncode == 0, f"{argv}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_the_wheel_installs_and_runs_outside_the_repository(tmp_path):
    bin_dir = _venv_with(_build_wheel(tmp_path), tmp_path)
    work = tmp_path / "work"  # no configs/, no src/: only what the wheel brings
    work.mkdir()

    where = _run(bin_dir, work, "python", "-c", "import rblora; print(rblora.__file__)")
    assert Path(where.strip()).is_relative_to(tmp_path / "venv"), where
    app = _run(bin_dir, work, "python", "-c", "from rblora.flower.local import APP_DIR; "
               "print((APP_DIR / 'pyproject.toml').is_file())")  # fmt: skip
    assert app.strip() == "True"  # `flwr run <rblora>/flower/app` has its App description

    assert "prepare-data" in _run(bin_dir, work, "rblora", "--help")
    listed = _run(bin_dir, work, "rblora", "train", "--method", "list")
    assert listed.startswith("RB-LoRA: redistribution svd") and "FedIT" in listed
    assert "embedded.yaml" in _run(bin_dir, work, "rblora", "configs")

    write_dolly(work / "dolly.jsonl")
    _run(bin_dir, work, "rblora", "prepare-data", "3", "2", "1", "--dolly", "dolly.jsonl",
         "--client_sizes", "8,12,16", "--test_per_category", "2",
         "--output_dir", "data")  # fmt: skip
    assert (work / "data" / "3" / "local_training_2.json").is_file()

    tok = build_tiny_tokenizer()
    model = build_tiny_llama(vocab_size=len(tok))
    model.save_pretrained(work / "model")
    tok.save_pretrained(work / "model")
    # the main job's shipped config, made tiny by flags (its data_path and output_dir too)
    _run(bin_dir, work, "rblora", "train", "--config", "embedded.yaml", "--global_model", "model",
         "--data_path", "data", "--output_dir", "out", "--num_clients", "3",
         "--client_ranks", "2,4,8", "--num_communication_rounds", "1", "--local_batch_size", "4",
         "--local_micro_batch_size", "2", "--cutoff_len", "160", "--bf16", "false",
         "--no_progress")  # fmt: skip
    run = work / "out" / "3"
    assert (run / "results.json").is_file()
    assert (run / "round_1" / "global" / "adapter_model.safetensors").is_file()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1 + 3 + 1  # r0, clients, r1
