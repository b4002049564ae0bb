"""A run's output folder: its layout, metrics, checkpoint and what resuming it requires.

    <output_dir>/<num_clients>/
      config.json          every option, the resolved ranks and client sizes, data fingerprint
      metrics.jsonl        one line per client per round, one per round (round 0: the base)
      round_<t>/global/    PEFT folder of the global model after round t (see rounds.export)
      round_<t>/client_<k>/  PEFT folder of client k's trained adapter (its rank and alpha)
                           (rounds written and kept: ``rblora.federation.saving``)
      evaluation/round_<t>.json  per-item outcomes of round t's evaluation (round 0: the base):
                           ``{"round", "suites": {suite: {"ids", "accuracy"[, "acc_norm"]}}}``
                           (``rblora.evaluation.outcomes``), written before the round's metrics
                           line; kept whatever ``--save_every`` prunes
      checkpoint/          server state after the last completed round (mode 0700, files 0600;
                           under DP written at the start too: it holds the secret noise key):
        server.safetensors   tensors (clients' start basis, merged total, dense extras)
        state.json           counters, the last round's record, the DP noise key and clip
        manifest.json        sha256 of the two files above, written last
      private/             under client-level DP only (mode 0700): what the server computed from
                           raw client updates, never released
        metrics.jsonl        the client lines and each round's private fields (selection,
                           losses, bytes, timings, clipping counts and norms)
        round_<t>/client_<k>/  the clients' trained adapters
      results.json summary.md plots/   written at the end (rblora.federation.results)
      tensorboard/ tracking.json       with --report_to (rblora.federation.tracking)

Writes are atomic (a file or folder appears complete or not at all) and durable in the order
they are made (``rblora.utils.atomic``: fsync before each rename, the folder after it, each
metrics line fsynced). A kill between the round's metrics line and its checkpoint leaves the
checkpoint of the round before: resuming drops the later lines and redoes the round.
A redone round writes its ``evaluation/round_<t>.json`` again (one file per round, replaced
atomically: never lost, never two); a reader takes a round's file only with its metrics line.

Beside the run folder ``<num_clients>`` live two hidden siblings:

    .<num_clients>.run.lock   held by the running process for the whole run (``locked``): a
                              second run on the folder is refused, naming the holder
    .<num_clients>.replaced/  the run an ``--overwrite`` replaces, kept until the new run
                              completes (``RunFolder.start``, ``drop_replaced``); put back by
                              ``settle`` if the folder holds no run
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from rblora.utils.atomic import (
    TMP,
    append_line,
    atomic_dir,
    discard,
    fsync_dir,
    fsync_file,
    fsync_tree,
    make_temp_dir,
    recover,
    sibling_prefix,
    write_json,
    write_text,
)
from rblora.utils.files import sha256_file
from rblora.utils.lockfile import hold
from rblora.utils.records import read_records

CHECKPOINT = "checkpoint"
#: The server's private records of a DP run (with ``checkpoint/``, its private state).
PRIVATE = "private"
#: The folder of the per-item outcomes, one file per evaluated round.
ITEMS_DIR = "evaluation"
MANIFEST = "manifest.json"
_ROUND_DIR = re.compile(r"^round_(\d+)$")
_ITEMS_FILE = re.compile(r"^round_(\d+)\.json$")
_LEFTOVER = re.compile(r"^\.round_(\d+)\.tmp-")


class ResumeError(ValueError):
    """The run folder cannot be resumed as it is; the message names the file and what to do."""


class RunFolder:
    """The output folder of one run (see the module doc for its layout).

    ``private``: the run has client-level DP, so client lines, the private fields of round
    lines and client adapters go to ``private/`` (:meth:`append_private`, :meth:`client_dir`)."""

    def __init__(self, path: Path | str, private: bool = False):
        self.path = Path(path)
        self.private = private

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
        """Where client k's adapter of round t goes: ``round_<t>/client_<k>``, or under
        ``private/`` in a DP run."""
        root = self.private_dir() if self.private else self.path
        return root / f"round_{round_}" / f"client_{client}"

    @property
    def private_path(self) -> Path:
        """``private/``: the server's private records (see the module doc)."""
        return self.path / PRIVATE

    def private_dir(self) -> Path:
        """``private/``, created readable by its owner only (mode 0700)."""
        path = self.private_path
        if not path.is_dir():
            path.mkdir(parents=True, mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)
        return path

    @property
    def private_metrics_path(self) -> Path:
        return self.private_path / "metrics.jsonl"

    def append_private(self, record: dict[str, Any]) -> None:
        """Append one line to ``private/metrics.jsonl``, fsynced (as :meth:`append_metrics`)."""
        created = not self.private_metrics_path.exists()
        append_line(self.private_dir() / "metrics.jsonl", json.dumps(record))
        if created:
            os.chmod(self.private_metrics_path, 0o600)

    def read_private_metrics(self) -> list[dict[str, Any]]:
        if not self.private_metrics_path.is_file():
            return []
        return [r for _, r in read_records(self.private_metrics_path, stop_at_error=True)]

    def items_path(self, round_: int) -> Path:
        """``evaluation/round_<t>.json``: the per-item outcomes of round t's evaluation."""
        return self.path / ITEMS_DIR / f"round_{round_}.json"

    def write_items(self, round_: int, suites: dict[str, dict]) -> None:
        """Write round t's per-item outcomes atomically (replacing those of a redone round)."""
        write_json(self.items_path(round_), {"round": round_, "suites": suites}, indent=None)

    def read_items(self, round_: int) -> dict[str, dict] | None:
        """Round t's per-item outcomes ``{suite: {"ids", <measure>: [0 | 1]}}``, or None if the
        run wrote none (a run of an older version). ValueError naming a damaged file."""
        path = self.items_path(round_)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            raise ValueError(f"{path} is damaged ({err})") from None
        if not isinstance(data, dict) or data.get("round") != round_:
            raise ValueError(f"{path} does not hold round {round_}'s outcomes")
        return data["suites"]

    def saved_rounds(self) -> list[int]:
        """Rounds that have a ``round_<t>/`` folder, ascending."""
        if not self.path.is_dir():
            return []
        return sorted(
            int(m.group(1))
            for p in self.path.iterdir()
            if p.is_dir() and (m := _ROUND_DIR.match(p.name))
        )

    def drop_round(self, round_: int) -> None:
        """Delete ``round_<t>/`` so that neither a kill nor a power cut leaves part of it under
        its name: it is first moved into a hidden temporary folder (``.round_<t>.tmp-<pid>-*``,
        which :meth:`clean_dropped` deletes if the process dies first), the move made durable,
        then the temporary deleted."""
        for path in (self.round_dir(round_), self.private_path / f"round_{round_}"):
            if not path.is_dir():
                continue
            trash = make_temp_dir(path.parent, sibling_prefix(path, TMP))
            os.replace(path, trash / path.name)
            fsync_dir(trash)
            fsync_dir(path.parent)
            shutil.rmtree(trash, ignore_errors=True)

    def clean_dropped(self) -> None:
        """Delete what a process killed in :meth:`drop_round` left: hidden ``.round_<t>.tmp-*``
        folders of processes no longer running."""
        for root in (self.path, self.private_path):
            if not root.is_dir():
                continue
            for t in sorted(
                {int(m.group(1)) for p in root.iterdir() if (m := _LEFTOVER.match(p.name))}
            ):
                recover(root / f"round_{t}")

    def prune_rounds(self, keep_last: int, upto: int) -> list[int]:
        """Delete the round folders of rounds ``<= upto`` except the newest ``keep_last``
        (>= 1); returns the rounds deleted, oldest first."""
        if keep_last < 1:
            raise ValueError(f"prune_rounds: keep_last {keep_last} must be >= 1")
        done = [t for t in self.saved_rounds() if t <= upto]
        dropped = done[:-keep_last]
        for t in dropped:
            self.drop_round(t)
        return dropped

    def holds_run(self) -> bool:
        return self.path.is_dir() and any(self.path.iterdir())

    @property
    def replaced_path(self) -> Path:
        """Where the run an ``--overwrite`` replaces waits until the new run completes."""
        return replaced_path(self.path)

    # ------------------------------------------------------------------ a new run
    def start(self, config: dict[str, Any], log: Callable[[str], None]) -> None:
        """Begin a new run here: ``config.json`` is written into a fresh folder that one rename
        puts in place, so the folder never holds a run without its config.

        A run already here (the caller checked that ``--overwrite`` allows it) is moved to
        :attr:`replaced_path` and stays there until :func:`drop_replaced`. If a replaced run is
        there already (an earlier ``--overwrite`` was stopped before completing), that one is
        kept and the unfinished run here is deleted. Call under :func:`locked`.
        """
        kept = self.replaced_path
        new = make_temp_dir(self.path.parent, sibling_prefix(self.path, TMP))
        trash = moved = None  # where the folder's old content went
        try:
            write_json(new / self.config_path.name, config)
            fsync_tree(new)
            if self.holds_run() and not kept.exists():
                moved = kept
                log(f"--overwrite: the previous run is kept in {kept} until this one completes")
            elif os.path.lexists(self.path):
                if self.holds_run():
                    log(
                        f"--overwrite: deleting the unfinished run in {self.path}; the run it "
                        f"replaced stays in {kept} until this one completes"
                    )
                trash = make_temp_dir(self.path.parent, sibling_prefix(self.path, TMP))
                moved = trash / self.path.name
            if moved is not None:
                os.replace(self.path, moved)
            # a kill between the two renames leaves no run here: ``settle`` puts the kept one back
            os.replace(new, self.path)
            fsync_dir(self.path.parent)
        except BaseException:
            if moved is not None and os.path.lexists(moved) and not os.path.lexists(self.path):
                os.replace(moved, self.path)
            discard(new, self.path)
            raise
        finally:
            if trash is not None:
                discard(trash, self.path)

    # ------------------------------------------------------------------ config
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
        """Drop metric lines (and private ones) of rounds after ``completed_rounds`` (an
        interrupted round)."""
        kept = [r for r in self.read_metrics() if r.get("round", 0) <= completed_rounds]
        write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
        if self.private_metrics_path.is_file():
            rows = self.read_private_metrics()
            kept = [r for r in rows if r.get("round", 0) <= completed_rounds]
            write_text(self.private_metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
            os.chmod(self.private_metrics_path, 0o600)

    def clear_metrics(self) -> None:
        self.metrics_path.unlink(missing_ok=True)
        self.private_metrics_path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ checkpoint
    def save_checkpoint(self, tensors: dict, meta: dict[str, Any]) -> None:
        """Write the checkpoint atomically; the manifest of sha256s is written last, after the
        tensors are on disk (``atomic_dir`` fsyncs every file again before the rename)."""
        with atomic_dir(self.path / CHECKPOINT) as tmp:
            os.chmod(tmp, 0o700)  # before any file is in it: the server's private state
            save_file(tensors, str(tmp / "server.safetensors"), metadata={"format": "pt"})
            fsync_file(tmp / "server.safetensors")
            write_text(tmp / "state.json", json.dumps(meta, indent=2) + "\n")
            files = {name: sha256_file(tmp / name) for name in ("server.safetensors", "state.json")}
            write_json(tmp / MANIFEST, {"files": files})
            for name in (*files, MANIFEST):
                os.chmod(tmp / name, 0o600)

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
        evaluated = sorted(
            int(m.group(1))
            for p in (self.path / ITEMS_DIR).glob("round_*.json")
            if (m := _ITEMS_FILE.match(p.name)) and int(m.group(1)) > limit
        )
        if evaluated:
            raise ResumeError(
                f"--resume: {self.items_path(evaluated[0])} exists but the checkpoint is from "
                f"round {completed_rounds}: the checkpoint is older than the run's outputs; "
                "start again with --overwrite"
            )
        beyond = [r for r in self.read_metrics() if r.get("round", 0) > limit]
        if beyond:
            raise ResumeError(
                f"--resume: {self.metrics_path} has round {beyond[0]['round']} but the "
                f"checkpoint is from round {completed_rounds}; start again with --overwrite"
            )


# ---------------------------------------------------------------------- lock, replaced run
def lock_path(path: Path | str) -> Path:
    """The run lock of the run folder ``path``: ``.<name>.run.lock`` beside it (not inside, so
    moving the folder aside does not move the lock)."""
    path = Path(path)
    return path.parent / f".{path.name}.run.lock"


def replaced_path(path: Path | str) -> Path:
    path = Path(path)
    return path.parent / f".{path.name}.replaced"


@contextlib.contextmanager
def locked(path: Path | str) -> Iterator[RunFolder]:
    """Hold the run lock of the run folder ``path`` until the block ends, then :func:`settle`
    it. Raises ``LockHeld`` (a ValueError naming the folder and the process running in it)
    if another run holds it. The OS releases the lock when the process exits or is killed."""
    path = Path(path)
    with hold(lock_path(path), f"output folder {path}"):
        settle(path)
        yield RunFolder(path)


def settle(path: Path | str) -> None:
    """Clean up after a run killed while replacing the folder (call under :func:`locked`):
    temporaries of dead writers are deleted, and a replaced run is put back if the folder
    holds no run (the kill came before the new run's config was in place)."""
    folder = RunFolder(path)
    recover(folder.path)
    kept = folder.replaced_path
    if kept.is_dir() and not folder.holds_run():
        if folder.path.is_dir():
            folder.path.rmdir()  # empty
        os.replace(kept, folder.path)
        fsync_dir(folder.path.parent)


def drop_replaced(path: Path | str) -> None:
    """The run in ``path`` completed: delete the run it replaced, if any."""
    path = Path(path)
    kept = replaced_path(path)
    if kept.exists():
        discard(kept, path)
        fsync_dir(path.parent)


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
