"""The data partition as a seed of ``rblora compare`` (``--data_seeds 1,2``).

The comparison's prepared folder (``--data_path`` of its train options) records the options it
was prepared with (``partition.json``: ``arguments``, ``seed``, ``sources``). For each data seed
``d`` the comparison uses a folder prepared with those same options and seed ``d``:

- the comparison's own folder when it was prepared with seed ``d``;
- else ``<output_dir>/data/seed<d>/<num_clients>/``, prepared there by the first comparison that
  needs it and taken as it is afterwards, once its ``partition.json`` shows the same options
  (all but the seed and the output folder), seed ``d`` and the same source files (checksums).

Each partition seed draws its own held-out test set too (``rblora.data.prepare``), so the
methods are compared item by item within a data seed, never across two.
"""

from __future__ import annotations

import json
from dataclasses import fields, replace
from pathlib import Path

#: Prepare options that may differ between the folders of one comparison.
_PER_FOLDER = ("seed", "output_dir", "overwrite")


def _partition(folder: Path) -> dict:
    path = folder / "partition.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(
            f"--data_seeds: {path} is missing: the data folder must be one rblora prepare-data "
            "wrote (its partition.json holds the options to prepare the other seeds with)"
        ) from None
    except (OSError, ValueError) as err:
        raise ValueError(f"--data_seeds: cannot read {path} ({err})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("arguments"), dict):
        raise ValueError(f"--data_seeds: {path} holds no prepare options ('arguments')")
    return meta


def _options(meta: dict) -> dict:
    return {k: v for k, v in meta["arguments"].items() if k not in _PER_FOLDER}


def _check_same(reference: dict, meta: dict, folder: Path, seed: int) -> None:
    """Refuse a folder prepared otherwise than ``reference`` with seed ``seed``."""
    want, have = _options(reference), _options(meta)
    differ = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
    if meta.get("seed") != seed:
        differ.insert(0, f"seed ({meta.get('seed')}, not {seed})")
    if meta.get("sources") != reference.get("sources"):
        differ.append("source files (checksums)")
    if differ:
        raise ValueError(
            f"--data_seeds: {folder} was prepared with other options than the comparison's data "
            f"({', '.join(differ)} differ); delete it to have it prepared again, or use another "
            "--output_dir"
        )


def data_folders(data_path: Path, num_clients: int, seeds: list[int], root: Path, log) -> dict:
    """Data seed -> the ``--data_path`` (a root holding ``<num_clients>/``) of its cells,
    preparing the folders that do not exist yet (see the module doc)."""
    from rblora.data.federated import resolve_folder
    from rblora.data.prepare import PrepareConfig, build_partition, write_prepared

    given = resolve_folder(data_path, num_clients)
    reference = _partition(given)
    names = {f.name for f in fields(PrepareConfig)}
    out = {}
    for seed in seeds:
        if reference.get("seed") == seed:
            out[seed] = data_path
            continue
        parent = root / "data" / f"seed{seed}"
        folder = parent / str(num_clients)
        if (folder / "partition.json").is_file():
            _check_same(reference, _partition(folder), folder, seed)
            log(f"data seed {seed}: {folder} (prepared earlier, same options)")
        else:
            values = {k: v for k, v in reference["arguments"].items() if k in names}
            cfg = replace(
                PrepareConfig(**values), seed=seed, output_dir=str(parent), overwrite=False
            )
            log(f"data seed {seed}: preparing {folder} with the options of {given}")
            prepared = build_partition(cfg)
            write_prepared(prepared, folder, overwrite=False)
            _check_same(reference, prepared.meta, folder, seed)
        out[seed] = parent
    return out
