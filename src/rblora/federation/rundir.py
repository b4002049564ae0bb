"""A run's output folder: its layout, metrics, checkpoint and what resuming it requires.

    <output_dir>/<num_clients>/
      config.json          every option, the resolved ranks and client sizes, data fingerprint
      metrics.jsonl        one line per client per round, one per round (round 0: the base)
      round_<t>/global/    PEFT folder of the global model after round t (see rounds.export)
      round_<t>/client_<k>/  PEFT folder of client k's trained adapter (its rank and alpha)
      checkpoint/          server state after the last completed round:
        server.safetensors   tensors (client starts, merged total, dense extras)
        state.json           counters and the last round's record
        manifest.json        sha256 of the two files above, written last
      results.json summary.md plots/   written at the end (rblora.federation.results)

Writes are atomic (a file or folder appears complete or not at all) and durable in the order
they are made (``rblora.utils.atomic``: fsync before each rename, the folder after it, each
metrics line fsynced). A kill between the round's metrics line and its checkpoint leaves the
checkpoint of the round before: resuming drops the later lines and redoes the round.

Beside the run folder ``<num_clients>``:

    .<num_clients>.run.lock   held by the running process for the whole run (``locked``): a
                              second run on the folder is refused, naming the holder
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from rblora.utils.atomic import append_line, atomic_dir, fsync_file, recover, write_json, write_text
from rblora.utils.files import sha256_file
from rblora.utils.lockfile import hold
from rblora.utils.records import read_records

CHECKPOINT = "checkpoint"
MANIFEST = "manifest.json"
_ROUND_DIR = re.compile(r"^round_(\d+)$")


class ResumeError(ValueError):
    """The run folder cannot be resumed as it is; the message names the file and what to do."""


class RunFolder:
    """The output folder of one run (see the module doc for its layout)."""

    def __init__(self, path: Path | str):
        self.path = Path(path)

    # ------------------------------------------------------------------ layout
    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def round_dir(self, round_: int) -> Path:
        return self.path / f"round_{round_}"

    def global_dir(self, round_: int) -> Path:
        return self.round_dir(round_) / "global"

    def client_dir(self, round_: int, client: int) -> Path:
        return self.round_dir(round_) / f"client_{client}"

    def holds_run(self) -> bool:
        return self.path.is_dir() and any(self.path.iterdir())

    # ------------------------------------------------------------------ config
    def write_config(self, config: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.config_path, config)

    def read_config(self) -> dict[str, Any]:
        try:
            config = json.loads(self.config_path.read_text())
        except FileNotFoundError:
            raise ResumeError(
                f"--resume: {self.path} holds no run ({self.config_path.name} is missing); check "
                "--output_dir and --num_clients, or leave out --resume to start a new run"
            ) from None
        except (OSError, ValueError) as err:
            raise ResumeError(f"--resume: {self.config_path} is damaged ({err})") from None
        if not isinstance(config, dict):
            raise ResumeError(f"--resume: {self.config_path} is not a JSON object")
        return config

    # ------------------------------------------------------------------ metrics
    def append_metrics(self, record: dict[str, Any]) -> None:
        """Append one line, fsynced: the checkpoint written after it can never be on disk
        without it (a crash can cut only this last line, which reading then drops)."""
        append_line(self.metrics_path, json.dumps(record))

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.is_file():
            return []
        # a line cut by a kill ends the records: everything after it is an unfinished round
        return [r for _, r in read_records(self.metrics_path, stop_at_error=True)]

    def truncate_metrics(self, completed_rounds: int) -> None:
        """Drop metric lines of rounds after ``completed_rounds`` (an interrupted round)."""
        kept = [r for r in self.read_metrics() if r.get("round", 0) <= completed_rounds]
        write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))

    def clear_metrics(self) -> None:
        self.metrics_path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ checkpoint
    def save_checkpoint(self, tensors: dict, meta: dict[str, Any]) -> None:
        """Write the checkpoint atomically; the manifest of sha256s is written last, after the
        tensors are on disk (``atomic_dir`` fsyncs every file again before the rename)."""
        with atomic_dir(self.path / CHECKPOINT) as tmp:
            save_file(tensors, str(tmp / "server.safetensors"), metadata={"format": "pt"})
            fsync_file(tmp / "server.safetensors")
            write_text(tmp / "state.json", json.dumps(meta, indent=2) + "\n")
            files = {name: sha256_file(tmp / name) for name in ("server.safetensors", "state.json")}
            write_json(tmp / MANIFEST, {"files": files})

    def load_checkpoint(self) -> tuple[dict, dict[str, Any]] | None:
        """``(tensors, meta)`` of a verified checkpoint, or None if the run has none yet.

        Raises ResumeError naming the file if the checkpoint is incomplete, damaged or edited
        (a file missing, or not matching its sha256 in the manifest).
        """
        folder = self.path / CHECKPOINT
        recover(folder)  # a run killed while replacing its checkpoint: the old one is put back
        if not folder.exists():
            return None
        manifest_path = folder / MANIFEST
        try:
            files = json.loads(manifest_path.read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            raise ResumeError(
                f"--resume: {manifest_path} is missing or damaged, so the checkpoint cannot be "
                "trusted; start the run again (--overwrite)"
            ) from None
        for name in ("server.safetensors", "state.json"):
            path = folder / name
            if name not in files:
                raise ResumeError(f"--resume: {manifest_path} does not list {name}")
            if not path.is_file():
                raise ResumeError(f"--resume: {path} is missing; the checkpoint is damaged")
            if sha256_file(path) != files[name]:
                raise ResumeError(
                    f"--resume: {path} does not match its sha256 in {MANIFEST}: it was damaged "
                    "or edited; start the run again (--overwrite)"
                )
        try:
            tensors = load_file(str(folder / "server.safetensors"))
            meta = json.loads((folder / "state.json").read_text())
        except (OSError, ValueError, SafetensorError) as err:
            raise ResumeError(f"--resume: cannot read the checkpoint in {folder}: {err}") from None
        return tensors, meta

    def check_consistent(self, completed_rounds: int) -> None:
        """Refuse a folder whose outputs go beyond what the checkpoint can have produced: a
        checkpoint of round t may be followed only by round t+1's (interrupted) outputs."""
        limit = completed_rounds + 1
        later = sorted(
            int(m.group(1))
            for p in self.path.iterdir()
            if p.is_dir() and (m := _ROUND_DIR.match(p.name)) and int(m.group(1)) > limit
        )
        if later:
            raise ResumeError(
                f"--resume: {self.round_dir(later[0])} exists but the checkpoint is from round "
                f"{completed_rounds}: the checkpoint is older than the run's outputs (deleted "
                "or replaced); resuming would overwrite them. Start again with --overwrite"
            )
        beyond = [r for r in self.read_metrics() if r.get("round", 0) > limit]
        if beyond:
            raise ResumeError(
                f"--resume: {self.metrics_path} has round {beyond[0]['round']} but the "
                f"checkpoint is from round {completed_rounds}; start again with --overwrite"
            )


# ---------------------------------------------------------------------- lock
def lock_path(path: Path | str) -> Path:
    """The run lock of the run folder ``path``: ``.<name>.run.lock`` beside it (not inside, so
    moving the folder aside does not move the lock)."""
    path = Path(path)
    return path.parent / f".{path.name}.run.lock"


@contextlib.contextmanager
def locked(path: Path | str) -> Iterator[RunFolder]:
    """Hold the run lock of the run folder ``path`` until the block ends. Raises ``LockHeld``
    (a ValueError naming the folder and the process running in it) if another run holds it.
    The OS releases the lock when the process exits or is killed."""
    path = Path(path)
    with hold(lock_path(path), f"output folder {path}"):
        yield RunFolder(path)


# ---------------------------------------------------------------------- resume
def check_resume(
    folder: RunFolder, args, data_fingerprint: dict[str, str]
) -> tuple[dict, dict[str, Any]] | None:
    """Before anything is loaded: the folder holds a run made with the same options (all but
    those marked resumable), the same client ranks and the same data files; its checkpoint, if
    any, is intact. Returns the verified checkpoint (as :meth:`RunFolder.load_checkpoint`).
    Raises ResumeError naming what differs."""
    from rblora.federation.options import resume_differences

    saved = folder.read_config()
    diffs = resume_differences(saved, args)
    if saved.get("client_ranks_resolved") != args.ranks():
        diffs.append(
            f"client ranks: run has {saved.get('client_ranks_resolved')}, now {args.ranks()}"
        )
    if diffs:
        raise ResumeError("cannot resume with different options: " + "; ".join(diffs))
    recorded = saved.get("data_sha256")
    if recorded is not None and recorded != data_fingerprint:
        changed = sorted(
            name
            for name in set(recorded) | set(data_fingerprint)
            if recorded.get(name) != data_fingerprint.get(name)
        )
        raise ResumeError(
            f"cannot resume: the data folder changed since the run started ({', '.join(changed)} "
            "differ): it was prepared again in place; start a new run (--overwrite)"
        )
    # the checkpoint is verified now, before the model is loaded (and read only this once)
    loaded = folder.load_checkpoint()
    completed = int(loaded[1].get("completed_rounds", 0)) if loaded is not None else 0
    folder.check_consistent(completed)
    return loaded
