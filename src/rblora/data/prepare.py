"""`rblora prepare-data` / `python prepare_data.py`: partition a data source into federated clients.

    python prepare_data.py 10            # seed form: <num_clients> [diff_quantity] [seed]
    python prepare_data.py 10 0 7        # Dirichlet (alpha 0.5), seed 7
    rblora prepare-data 20 --partition dirichlet --alpha 0.1 --min_size 20
    rblora prepare-data 10 --dolly databricks-dolly-15k.jsonl --alpaca alpaca_data.json
    rblora prepare-data 10 --source fashion-mnist --partition shards

Writes ``<output_dir>/<num_clients>/``: ``local_training_<k>.json`` (k = 0..K-1),
``local_test_<k>.json`` (with ``--local_test_frac``: client k's own held-out split, for
``--eval_personalized``), ``global_training.json`` (the union of the clients' training
data), ``global_test.json`` (held out, stratified by category), ``partition.json`` (sizes,
per-client category histogram, seed, arguments, source checksums, local test sizes) and
``partition.png`` (clients x categories heatmap). The folder is built under a temporary name
and renamed at the end, so a failure never leaves half of it, while holding the lock
``<output_dir>/.<num_clients>.lock`` (empty, kept; see ``rblora.utils.atomic`` for the hidden
``.<num_clients>.tmp-*``/``.old-*`` leftovers a kill can leave and their recovery).
Image sources write indices, not pixels: ``{"source", "split", "indices"}`` per file.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from rblora.data import partition as P
from rblora.data import sources as S
from rblora.data.federated import CLIENT_FILE, LOCAL_TEST_FILE
from rblora.data.report import save_heatmap, summary_table
from rblora.utils.atomic import atomic_dir, exclusive_dir, lock_path, recover
from rblora.utils.options import OptionParser, add_flags, option, values_from

#: The seed's numeric modes (``diff_quantity``). The seed's usage text calls 1 "IID" but its code
#: deals category-sorted shards; we follow the code.
SEED_MODES = {"0": "dirichlet", "1": "shards", "2": "sizes"}
PARTITIONS = ("dirichlet", "iid", "shards", "sizes")
SOURCES = ("auto", "files", "mixture", *S.IMAGE_SOURCES, "imagefolder")
FORMAT_VERSION = 1


@dataclass
class PrepareConfig:
    """Every option of ``prepare-data``, with its default; the CLI flags are built from this."""

    num_clients: int = option(10, "number of clients K")
    partition: str = option("sizes", "dirichlet | iid | shards | sizes, or the seed's 0 | 1 | 2")
    seed: int = option(42, "seed of every random draw")
    alpha: float = option(0.5, "Dirichlet concentration (smaller: more skew)")
    min_size: int | None = option(
        None,
        "Dirichlet: minimum examples per client (default 40, or when 40 a client does not fit "
        "the pool, half the mean client size, floor(pool / 2K), at least 1); redrawn "
        "up to 1,000 times (fewer above 1,000 clients), then the closest draw is topped up "
        "from the other clients",
    )
    shards_per_client: int = option(2, "shards: shards per client")
    client_sizes: list[int] | None = option(
        None, "sizes: comma-separated per-client sizes (default: the seed's, scaled)"
    )
    source: str = option(
        "auto",
        "auto (files if given or found in the working directory, else mixture) | files | "
        "mixture | fashion-mnist | digits | imagefolder",
    )
    dolly: str | None = option(None, "Dolly-15k file (.jsonl or JSON array)")
    alpaca: str | None = option(None, "Alpaca file (alpaca_data.json)")
    alpaca_samples: int = option(42000, "Alpaca records kept (seed: 42000)")
    image_dir: str | None = option(
        None, "imagefolder: a folder of class folders, root/<class>/<image> (png, jpg, ...)"
    )
    skip_bad_images: bool = option(
        False,
        "imagefolder: leave out images that do not decode (truncated, not an image), each named "
        "in a note, instead of refusing the folder",
    )
    tasks: list[str] | None = option(
        None, "mixture: comma-separated tasks (default: every embedded task but mmlu)"
    )
    per_task: int = option(2000, "mixture: training records per task (at most)")
    mc_style: str = option(
        "mmlu",
        "mixture: mmlu (the papers' format: options listed, response 'The answer is: B. y') | "
        "cloze (question only, response the option's text; scored like zero-shot harnesses)",
    )
    pool_size: int | None = option(
        None,
        "keep a seeded subsample of this many training examples (stratified by category) "
        "before partitioning (default: the whole pool)",
    )
    test_per_category: int | None = option(
        None,
        "global_test examples per category (default: Dolly categories 10, alpaca 80, mixture "
        "tasks 20, image classes 100)",
    )
    local_test_frac: float = option(
        0.0,
        "hold out this fraction of every client's examples (seeded; round(frac x n), at least "
        "1, a client keeps at least 1 to train) as local_test_<k>.json, the client's own test "
        "split for --eval_personalized; a client of 1 example holds out none; 0: none",
    )
    output_dir: str = option("./data", "output root; data goes to <output_dir>/<K>")
    overwrite: bool = option(False, "replace an existing output folder")


#: Default held-out examples per category when --test_per_category is not given.
DEFAULT_TEST = {"files": 10, "alpaca": 80, "mixture": 20, "images": 100}


def build_parser() -> argparse.ArgumentParser:
    parser = OptionParser(
        prog="rblora prepare-data",
        description="Partition a data source into federated clients (seed form: "
        "<num_clients> [diff_quantity] [seed]; diff_quantity 0 Dirichlet, 1 shards, 2 sizes).",
    )
    parser.add_argument(
        "pos_num_clients", nargs="?", metavar="num_clients", help="number of clients"
    )
    parser.add_argument("pos_mode", nargs="?", metavar="diff_quantity", help="0 | 1 | 2 or a name")
    parser.add_argument("pos_seed", nargs="?", metavar="seed", help="random seed")
    add_flags(parser, PrepareConfig)
    return parser


def _parse_int(name: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {text!r}") from None


def config_from_args(argv: list[str]) -> PrepareConfig:
    """Parse the command line (seed positional form and/or flags) into a ``PrepareConfig``."""
    ns = vars(build_parser().parse_intermixed_args(argv))
    flags = {k: v for k, v in ns.items() if not k.startswith("pos_")}
    given = values_from(PrepareConfig, flags, "command line")
    for pos, name, conv in (
        ("pos_num_clients", "num_clients", lambda t: _parse_int("num_clients", t)),
        ("pos_mode", "partition", str),
        ("pos_seed", "seed", lambda t: _parse_int("seed", t)),
    ):
        if ns.get(pos) is None:
            continue
        value = conv(ns[pos])
        if name in given and str(given[name]) != str(value):
            raise ValueError(f"{name} given twice with different values: {value} and {given[name]}")
        given[name] = value
    if "num_clients" not in given:
        raise ValueError("the number of clients is required: prepare_data.py <num_clients> [...]")
    config = PrepareConfig(**given)
    config.partition = resolve_partition(config.partition)
    return config


def resolve_partition(mode: str) -> str:
    """Seed digit or name -> partition name."""
    name = SEED_MODES.get(str(mode).strip(), str(mode).strip().lower())
    if name not in PARTITIONS:
        raise ValueError(
            f"unknown partition mode {mode!r}; valid: 0 (dirichlet), 1 (shards), 2 (sizes), "
            f"or a name: {', '.join(PARTITIONS)}"
        )
    return name


# ------------------------------------------------------------------------------ pipeline
@dataclass
class Prepared:
    """Everything written to the output folder, in memory (before writing)."""

    files: dict[str, object]  # file name -> JSON value
    meta: dict
    histogram: np.ndarray  # (K, C)
    categories: list[str]
    notes: list[str]


def _resolve_source(cfg: PrepareConfig, cwd: Path) -> tuple[str, Path | None, Path | None]:
    if cfg.source not in SOURCES:
        raise ValueError(f"unknown source {cfg.source!r}; valid: {', '.join(SOURCES)}")
    dolly = Path(cfg.dolly) if cfg.dolly else None
    alpaca = Path(cfg.alpaca) if cfg.alpaca else None
    if cfg.source in ("auto", "files") and dolly is None and alpaca is None:
        dolly = S.find_default_file(S.DOLLY_DEFAULT_NAMES, cwd)
        alpaca = S.find_default_file(S.ALPACA_DEFAULT_NAMES, cwd)
        if cfg.source == "files" and dolly is None and alpaca is None:
            raise ValueError(
                f"--source files: no --dolly/--alpaca given and none of "
                f"{', '.join(S.DOLLY_DEFAULT_NAMES + S.ALPACA_DEFAULT_NAMES)} in {cwd}. "
                + S._WHERE_DOLLY
            )
    elif cfg.source not in ("auto", "files") and (dolly or alpaca):
        raise ValueError(
            f"--dolly/--alpaca are files; they cannot be used with --source {cfg.source}"
        )
    if cfg.source == "auto":
        return ("files" if dolly or alpaca else "mixture"), dolly, alpaca
    return cfg.source, dolly, alpaca


def _validate(cfg: PrepareConfig) -> None:
    if cfg.partition not in PARTITIONS:
        raise ValueError(f"unknown partition {cfg.partition!r}; valid: {', '.join(PARTITIONS)}")
    if cfg.num_clients < 1:
        raise ValueError(f"num_clients must be at least 1, got {cfg.num_clients}")
    if cfg.seed < 0:
        raise ValueError(f"seed must be >= 0, got {cfg.seed}")
    if cfg.client_sizes is not None and cfg.partition != "sizes":
        raise ValueError(f"--client_sizes applies to --partition sizes only, not {cfg.partition}")
    if cfg.client_sizes is not None and len(cfg.client_sizes) != cfg.num_clients:
        raise ValueError(
            f"--client_sizes has {len(cfg.client_sizes)} sizes but num_clients is "
            f"{cfg.num_clients}; give exactly {cfg.num_clients}"
        )
    if cfg.test_per_category is not None and cfg.test_per_category < 0:
        raise ValueError(f"--test_per_category must be >= 0, got {cfg.test_per_category}")
    if cfg.alpaca_samples < 0:
        raise ValueError(f"--alpaca_samples must be >= 0, got {cfg.alpaca_samples}")
    if cfg.pool_size is not None and cfg.pool_size < cfg.num_clients:
        raise ValueError(
            f"--pool_size {cfg.pool_size} is below the number of clients {cfg.num_clients}"
        )
    frac = cfg.local_test_frac
    if not (isinstance(frac, (int, float)) and not isinstance(frac, bool) and 0 <= frac < 1):
        raise ValueError(
            f"--local_test_frac {frac!r} must be a fraction in [0, 1) (0: no local test splits)"
        )
    if (cfg.source == "imagefolder") != (cfg.image_dir is not None):
        raise ValueError("--source imagefolder and --image_dir ROOT go together")
    if cfg.skip_bad_images and cfg.source != "imagefolder":
        raise ValueError(
            f"--skip_bad_images applies to --source imagefolder only, not --source {cfg.source}"
        )


def _split(cfg: PrepareConfig, labels: np.ndarray, rng: np.random.Generator, notes: list[str]):
    n, k = labels.size, cfg.num_clients
    if cfg.partition == "iid":
        return P.partition_iid(n, k, rng)
    if cfg.partition == "shards":
        return P.partition_shards(labels, k, rng, cfg.shards_per_client)
    if cfg.partition == "dirichlet":
        split = P.dirichlet_split(labels, k, cfg.alpha, rng, dirichlet_min_size(cfg, n, notes))
        notes.extend(_dirichlet_notes(split, n))
        return split.parts
    if cfg.client_sizes is not None:
        sizes = cfg.client_sizes
    else:
        sizes, note = P.default_client_sizes(k, n)
        notes.append(f"client sizes: {note}")
    return P.partition_sizes(n, sizes, rng)


#: The seed's Dirichlet minimum client size (its ``min_require_size``).
DIRICHLET_MIN_SIZE = 40


def dirichlet_min_size(cfg: PrepareConfig, pool: int, notes: list[str] | None = None) -> int:
    """``--min_size``, or its default for ``pool`` examples: 40 (the seed's), or when 40 a
    client does not fit the pool, half the mean client size ``floor(pool / 2K)``, at least 1
    (10,000 clients of Fashion-MNIST's 60,000 images: 3). A default that is not 40 is noted."""
    if cfg.min_size is not None:
        return cfg.min_size
    k = cfg.num_clients
    if DIRICHLET_MIN_SIZE * k <= pool:
        return DIRICHLET_MIN_SIZE
    size = max(1, pool // (2 * k))
    if notes is not None:
        notes.append(
            f"min_size {size}: {k} clients of {DIRICHLET_MIN_SIZE} do not fit the {pool} "
            "examples, so half the mean client size (floor(pool / 2K), at least 1)"
        )
    return size


def _dirichlet_notes(split: P.DirichletSplit, pool: int) -> list[str]:
    if not split.moved:
        return []
    return [
        f"Dirichlet: none of {split.draws} draws gave every client min_size; draw "
        f"{split.kept_draw} came closest ({split.short_clients} clients short) and was topped "
        f"up: {split.moved} examples ({split.moved / pool:.2%} of the pool) moved to the short "
        "clients, each of the category its own share favours most, from the clients that had "
        "kept the largest fraction of their drawn size"
    ]


def _test_counts(cfg: PrepareConfig, src: S.Source) -> np.ndarray:
    """Held-out examples wanted per category, shape ``(C,)``."""
    if cfg.test_per_category is not None:
        return np.full(len(src.categories), cfg.test_per_category, dtype=np.int64)
    kind = "images" if src.kind == "images" else src.name
    per = [
        DEFAULT_TEST["alpaca" if c == "alpaca" and kind == "files" else kind]
        for c in src.categories
    ]
    return np.array(per, dtype=np.int64)


def _hold_out(cfg: PrepareConfig, src: S.Source, rng: np.random.Generator):
    """(pool indices into ``src.train``, test items, test labels): stratified by category, carved
    out of the pool when the source has no separate held-out set (as the seed does)."""
    counts = _test_counts(cfg, src)
    if src.heldout is None:
        idx = P.stratified_sample(src.train_labels, counts, rng, src.categories, keep_one=True)
        keep = np.ones(src.train_labels.size, dtype=bool)
        keep[idx] = False
        return np.flatnonzero(keep), [src.train[i] for i in idx], src.train_labels[idx]
    idx = P.stratified_sample(src.heldout_labels, counts, rng)
    pool = np.arange(src.train_labels.size)
    return pool, [src.heldout[i] for i in idx], src.heldout_labels[idx]


def _subsample(
    pool: np.ndarray, labels: np.ndarray, size: int, rng: np.random.Generator, notes: list[str]
) -> np.ndarray:
    """``size`` indices of ``pool``, each category in proportion to its share (largest
    remainders), sorted."""
    if size >= pool.size:
        notes.append(f"pool_size {size} >= the {pool.size} available: the whole pool is used")
        return pool
    counts = np.bincount(labels[pool], minlength=int(labels.max()) + 1)
    quota = counts * size / pool.size
    take = np.floor(quota).astype(np.int64)
    for c in np.argsort(-(quota - take), kind="stable")[: size - int(take.sum())]:
        take[c] += 1
    chosen = P.stratified_sample(labels[pool], take, rng)
    notes.append(f"pool subsampled to {size} of {pool.size} examples (stratified)")
    return np.sort(pool[chosen])


def _output_files(
    src: S.Source, parts: list[np.ndarray], test_items: list, local_tests: list[np.ndarray]
) -> dict[str, object]:
    """File name -> JSON value: records for text, ``{"source","split","indices"}`` for images.
    ``local_tests[k]``: client k's held-out indices (``local_test_<k>.json``, only when it
    holds some out)."""
    if src.kind == "images":

        def index_file(split: str, idx) -> dict:
            return {"source": src.name, "split": split, "indices": [int(i) for i in idx]}

        files = {f"local_training_{k}.json": index_file("train", p) for k, p in enumerate(parts)}
        for k, idx in enumerate(local_tests):
            if idx.size:
                files[f"local_test_{k}.json"] = index_file("train", idx)
        files["global_training.json"] = index_file("train", np.concatenate(parts))
        test_split = "test" if src.heldout is not None else "train"
        files["global_test.json"] = index_file(test_split, test_items)
        if src.files is not None:
            files["image_files.json"] = src.files
        return files
    clients = [[src.train[i] for i in p] for p in parts]
    files = {f"local_training_{k}.json": c for k, c in enumerate(clients)}
    for k, idx in enumerate(local_tests):
        if idx.size:
            files[f"local_test_{k}.json"] = [src.train[i] for i in idx]
    files["global_training.json"] = [r for c in clients for r in c]
    files["global_test.json"] = test_items
    return files


def build_partition(cfg: PrepareConfig, cwd: Path | None = None) -> Prepared:
    """Load the source, hold out the test set, partition the rest; nothing is written."""
    _validate(cfg)
    source_name, dolly, alpaca = _resolve_source(cfg, Path.cwd() if cwd is None else cwd)
    seeds = np.random.SeedSequence(cfg.seed).spawn(4)  # independent streams per stage
    r_source, r_test, r_part, r_pool = (np.random.default_rng(s) for s in seeds)
    if source_name == "files":
        src = S.load_files(dolly, alpaca, cfg.alpaca_samples, r_source)
    elif source_name == "mixture":
        reserve = (
            DEFAULT_TEST["mixture"] if cfg.test_per_category is None else cfg.test_per_category
        )
        src = S.load_mixture(cfg.tasks, cfg.per_task, reserve, r_source, cfg.mc_style)
    elif source_name == "imagefolder":
        src = S.load_image_folder(Path(cfg.image_dir), cfg.skip_bad_images)
    else:
        src = S.load_image_source(source_name)
    notes, cats = list(src.notes), src.categories
    pool, test_items, test_labels = _hold_out(cfg, src, r_test)
    if cfg.pool_size is not None:
        pool = _subsample(pool, src.train_labels, cfg.pool_size, r_pool, notes)
    parts = [pool[p] for p in _split(cfg, src.train_labels[pool], r_part, notes)]
    local_tests = [p[:0] for p in parts]
    if cfg.local_test_frac:  # its own stream: the draws above are those of a run without it
        r_local = np.random.default_rng(np.random.SeedSequence(cfg.seed).spawn(5)[4])
        parts, local_tests = P.carve_local_tests(parts, cfg.local_test_frac, r_local)
        spared = sum(1 for t in local_tests if not t.size)
        if spared:
            notes.append(
                f"local_test_frac {cfg.local_test_frac:g}: {spared} client(s) too small to hold "
                "out an example keep all theirs for training (no personalised figure for them)"
            )
    hist = P.category_histogram(parts, src.train_labels, len(cats))
    files = _output_files(src, parts, test_items, local_tests)

    args = asdict(cfg)
    args.update(
        source=source_name,
        dolly=str(dolly) if dolly else None,
        alpaca=str(alpaca) if alpaca else None,
    )
    if not cfg.local_test_frac:
        del args["local_test_frac"]  # a folder without local tests is what it always was
    meta = {
        "format_version": FORMAT_VERSION,
        "kind": src.kind,
        "source": src.name,
        "num_clients": cfg.num_clients,
        "partition": cfg.partition,
        "seed": cfg.seed,
        "arguments": args,
        "categories": cats,
        "client_sizes": [int(p.size) for p in parts],
        "client_histograms": hist.tolist(),
        "client_entropy_bits": [round(float(h), 4) for h in P.category_entropy(hist)],
        "global_training_size": int(sum(p.size for p in parts)),
        "global_test_size": len(test_items),
        "global_test_histogram": np.bincount(test_labels, minlength=len(cats)).tolist(),
        "pool_size": int(pool.size),
        "sources": src.checksums,
        "notes": notes,
    }
    if cfg.local_test_frac:
        meta["local_test_frac"] = cfg.local_test_frac
        meta["local_test_sizes"] = [int(t.size) for t in local_tests]
    if cfg.partition == "dirichlet":
        meta["min_size"] = dirichlet_min_size(cfg, int(pool.size))
    return Prepared(files, meta, hist, cats, notes)


def write_prepared(prepared: Prepared, folder: Path, overwrite: bool) -> None:
    """Write every file into a temporary sibling of ``folder`` and rename it into place.

    Holds the folder's lock ``.<K>.lock`` next to it meanwhile, so concurrent runs for the same
    folder take turns (the second then finds the folder and refuses it without ``overwrite``),
    and leftovers of killed runs are recovered or deleted first.
    """
    folder = Path(folder)
    parent = folder.parent
    made_parent = not parent.exists()
    with exclusive_dir(folder, on_wait=_say_waiting):
        try:
            if folder.exists() and not overwrite:
                raise ValueError(
                    f"output folder {folder} already exists; pass --overwrite to replace it"
                )
            with atomic_dir(folder) as tmp:
                digest = hashlib.sha256()  # of the client files, in client order
                for name, value in prepared.files.items():
                    data = json.dumps(value, ensure_ascii=False).encode("utf-8")
                    (tmp / name).write_bytes(data)
                    if CLIENT_FILE.match(name) or LOCAL_TEST_FILE.match(name):
                        digest.update(f"{name} {hashlib.sha256(data).hexdigest()}\n".encode())
                meta = {**prepared.meta, "client_files_sha256": digest.hexdigest()}
                with open(tmp / "partition.json", "w", encoding="utf-8") as fh:
                    json.dump(meta, fh, indent=1, ensure_ascii=False)
                title = (
                    f"{meta['source']}: {meta['partition']} split, {meta['num_clients']} "
                    f"clients, seed {meta['seed']}"
                )
                save_heatmap(prepared.histogram, prepared.categories, tmp / "partition.png", title)
        except BaseException:
            if made_parent:  # leave no new, empty output root (lock file aside) behind
                _remove_if_only(parent, lock_path(folder))
            raise


def _say_waiting(lock: Path) -> None:
    print(
        f"prepare-data: waiting for another run writing to {lock.parent} (lock {lock})",
        file=sys.stderr,
    )


def _remove_if_only(folder: Path, lock: Path) -> None:
    # Only for an output root this run created a moment ago. A run started in that moment and
    # waiting on the lock file would get a lock that a third run no longer sees: a tiny window,
    # accepted to leave nothing behind after bad input.
    with contextlib.suppress(OSError):
        if [p.name for p in folder.iterdir()] == [lock.name]:
            lock.unlink()
            folder.rmdir()


def prepare(cfg: PrepareConfig, cwd: Path | None = None) -> Path:
    """Run the whole preparation; returns the output folder ``<output_dir>/<num_clients>``."""
    _validate(cfg)
    folder = Path(cfg.output_dir) / str(cfg.num_clients)
    recover(folder)  # a run killed while replacing the folder: its old copy is put back
    if folder.exists() and not cfg.overwrite:
        raise ValueError(f"output folder {folder} already exists; pass --overwrite to replace it")
    prepared = build_partition(cfg, cwd)
    write_prepared(prepared, folder, cfg.overwrite)
    meta = prepared.meta
    print(
        f"source {meta['source']} ({meta['pool_size']} training examples in the pool, "
        f"{len(prepared.categories)} categories), partition {meta['partition']}, "
        f"seed {meta['seed']}"
    )
    for note in prepared.notes:
        print(f"note: {note}")
    print(summary_table(prepared.histogram, prepared.categories))
    print(
        f"global_test: {meta['global_test_size']} examples; "
        f"global_training: {meta['global_training_size']}"
    )
    if meta.get("local_test_sizes") is not None:
        sizes = meta["local_test_sizes"]
        print(
            f"local_test: {sum(sizes)} examples held out of {sum(1 for n in sizes if n)} "
            f"client(s) (--local_test_frac {meta['local_test_frac']:g})"
        )
    print(f"Data saved to: {folder}")
    return folder


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``rblora prepare-data`` and ``prepare_data.py``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = config_from_args(argv)
        prepare(cfg)
    except SystemExit as done:  # --help
        return int(done.code or 0)
    except (ValueError, OSError) as err:  # bad input, unreadable source, unwritable output
        print(f"prepare-data: error: {err}", file=sys.stderr)
        return 2
    return 0
