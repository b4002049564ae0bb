"""The shipped YAML configs of ``train.py`` (package data, so an installed wheel has them).

    python train.py --config embedded.yaml            # a shipped config, by name
    python train.py --config configs/rb_lora.yaml     # the seed's form: the same file
    python train.py --config ./my_run.yaml            # any file that exists
    rblora configs                                    # list them; `rblora configs NAME` prints one

A ``--config`` value that names an existing file is that file. Otherwise a bare name
(``rb_lora.yaml``, or ``rb_lora``) or the seed's ``configs/<name>`` names the config shipped in
this package; anything else is refused naming the shipped configs.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path, PurePath

SUFFIX = ".yaml"


def shipped() -> list[str]:
    """File names of the shipped configs, sorted (``["embedded.yaml", ...]``)."""
    return sorted(
        entry.name
        for entry in resources.files(__name__).iterdir()
        if entry.name.endswith(SUFFIX) and entry.is_file()
    )


def shipped_path(name: str) -> Path:
    """The file of the shipped config ``name`` (``embedded.yaml`` or ``embedded``); ValueError
    listing the shipped configs when there is none by that name."""
    file_name = name if name.endswith(SUFFIX) else name + SUFFIX
    if file_name not in shipped():
        raise ValueError(f"no shipped config {name!r}; shipped configs: {', '.join(shipped())}")
    return Path(str(resources.files(__name__) / file_name))


def resolve(path: str | Path) -> Path:
    """The file a ``--config`` value names: the file itself when it exists, else the shipped
    config of that name for a bare name or ``configs/<name>``; ValueError naming the shipped
    configs otherwise."""
    given = Path(path)
    if given.is_file():
        return given
    pure = PurePath(path)
    if not pure.is_absolute() and str(pure.parent) in (".", "configs"):
        file_name = pure.name if pure.name.endswith(SUFFIX) else pure.name + SUFFIX
        if file_name in shipped():
            return shipped_path(file_name)
    raise ValueError(
        f"config file {path} does not exist; shipped configs: {', '.join(shipped())} (give one "
        "by name, e.g. --config embedded.yaml; `rblora configs NAME` prints one to copy)"
    )


def main(argv: list[str] | None = None) -> int:
    """``rblora configs [NAME]``: list the shipped configs, or print one (to copy and edit)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(
            "usage: rblora configs [NAME]\n\nWithout NAME: the shipped train.py configs, one a "
            "line, with their first comment line.\nWith NAME: that config's text (e.g. `rblora "
            "configs embedded.yaml > my_run.yaml`)."
        )
        return 0
    if len(argv) > 1:
        print(
            f"rblora configs: error: give at most one config name, not {len(argv)} (see "
            "rblora configs --help)",
            file=sys.stderr,
        )
        return 2
    if argv:
        try:
            print(shipped_path(argv[0]).read_text(), end="")
        except ValueError as err:
            print(f"rblora configs: error: {err}", file=sys.stderr)
            return 2
        return 0
    width = max(len(name) for name in shipped())
    for name in shipped():
        first = shipped_path(name).read_text().splitlines()[0].lstrip("# ").strip()
        print(f"{name:<{width}}  {first}")
    return 0
