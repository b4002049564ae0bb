"""Dataclasses as command lines: the one place that turns option fields into flags and YAML keys.

An option is a dataclass field made with :func:`option` (a default and a help text, and for
training runs whether a resumed run may change it). :func:`add_flags` adds one flag per field to an
``argparse`` parser, named after the field; :func:`coerce` turns a flag's text or a YAML value into
the field's type, refusing what would otherwise be silently converted (a YAML ``true`` for a count,
``2.7`` for a rank). Supported field types: ``bool``, ``int``, ``float``, ``str``, ``list[str]``,
``list[int]``, ``dict[str, int]``, ``dict[str, str]``, each optionally ``| None``.
:class:`OptionParser` is the ``argparse`` parser every command line of the package uses.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import MISSING, Field, field, fields
from pathlib import Path
from typing import Any

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_NEGATIVE = re.compile(r"-\.?\d")  # -1e-3, -.5, -4,8


class UsageError(ValueError):
    """A command line argparse could not parse (unknown flag, missing value, ...)."""


class OptionParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with two changes for the commands of this package.

    A word that starts like a negative number is a value: argparse takes ``-1e-3``, ``-inf`` or
    ``-4,8`` for an unknown flag (its pattern for negative numbers has no exponent) and stops
    with "expected one argument" where ``-0.001`` gets the option's own "must be > 0". No flag
    of ours starts with a digit, so nothing is lost.

    A usage error raises :class:`UsageError` (a ValueError) instead of printing the whole usage
    and exiting: the entry point prints it as the one ``<prog>: error: ...`` line (exit code 2)
    it prints for every other bad value. ``--help`` still prints the help and exits 0.
    """

    def _parse_optional(self, arg_string):
        if _NEGATIVE.match(arg_string) or is_number(arg_string):
            return None  # argparse: "not an option", i.e. a value
        return super()._parse_optional(arg_string)

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def is_number(text: str) -> bool:
    """Whether ``text`` parses as a float (``-1e-3``, ``-inf``, ``5``)."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def int_list(text: str, name: str) -> list[int]:
    """``"1,2,3"`` -> ``[1, 2, 3]``; ValueError naming ``name``, the text and the bad item."""
    values = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        try:
            values.append(as_int(item))
        except TypeError:
            raise ValueError(
                f"{name}: {item!r} in {text!r} is not an integer; give integers separated by "
                "commas, e.g. 1,2,3"
            ) from None
    return values


def option(default: Any, help_: str, *, resumable: bool = False, **metadata: Any) -> Any:
    """A dataclass field with a default and its help text.

    ``resumable=True`` marks an option a resumed training run may change (one that does not
    change what a round computes: the number of rounds, progress output, ...).
    """
    metadata = {"help": help_, "resumable": resumable, **metadata}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=metadata)
    return field(default=default, metadata=metadata)


def split_passthrough(argv: list[str]) -> tuple[list[str], list[str]]:
    """``(own, passed)``: a command's own arguments and those after the first ``--`` (train.py
    options that ``rblora compare`` and ``rblora evaluate`` hand on unchanged)."""
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1 :]


def default_of(f: Field) -> Any:
    return f.default if f.default is not MISSING else f.default_factory()


def kind_of(f: Field) -> str:
    """The field's annotation as written, without spaces (``"list[int]|None"``)."""
    return str(f.type).replace(" ", "")


def as_int(value: Any) -> int:
    """``value`` as an int; TypeError for booleans, non-integral numbers and other types.

    YAML reads ``true`` as a boolean and JSON may carry ``2.7``: neither is a count or a rank,
    and ``int()`` would silently turn them into 1 and 2.
    """
    if isinstance(value, bool):
        raise TypeError("is a boolean, not an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise TypeError("is not an integer")


def as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    low = str(value).strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise TypeError("is not a boolean (true/false)")


def as_float(value: Any) -> float:
    if isinstance(value, bool):
        raise TypeError("is a boolean, not a number")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError("is not a number") from None


def _as_text(value: Any) -> str:
    if isinstance(value, (dict, list)) or value is None:
        raise TypeError("is not a text or a number")
    return str(value).lower() if isinstance(value, bool) else str(value)


def _text_list(text: str) -> list[str]:
    text = text.strip()
    if text.startswith("["):
        try:
            value = json.loads(text.replace("'", '"'))
        except json.JSONDecodeError as err:
            raise TypeError(f"is not a list ({err.msg})") from None
        if not isinstance(value, list):
            raise TypeError("is not a list")
        return value
    return [part.strip() for part in text.split(",") if part.strip()]


def _each(convert, values) -> list:
    out = []
    for v in values:
        try:
            out.append(convert(v))
        except TypeError as err:
            raise TypeError(f"has an element {v!r} that {err}") from None
    return out


def coerce(f: Field, value: Any, source: str) -> Any:
    """Convert a flag's text or a YAML value to the type of field ``f``.

    Raises ValueError naming ``source``, the key and the value.
    """
    kind = kind_of(f)
    base = kind.removesuffix("|None")
    try:
        if value is None:
            if kind.endswith("|None"):
                return None
            raise TypeError("cannot be empty")
        if base == "bool":
            return as_bool(value)
        if base == "int":
            return as_int(value)
        if base == "float":
            return as_float(value)
        if base == "str":  # a YAML boolean for a text option (bf16: true) reads as its word
            return str(value).lower() if isinstance(value, bool) else str(value)
        if base.startswith("list["):
            if isinstance(value, str):
                value = [value]
            elif not isinstance(value, (list, tuple)):
                raise TypeError("is not a list")
            items: list = []
            for v in value:  # flag words and YAML items may be comma lists themselves
                items += _text_list(v) if isinstance(v, str) else [v]
            return _each(as_int, items) if base == "list[int]" else [str(v) for v in items]
        if base.startswith("dict["):
            if isinstance(value, str):
                try:
                    value = json.loads(value.replace("'", '"'))
                except json.JSONDecodeError as err:
                    raise TypeError(f"is not a JSON object ({err.msg})") from None
            if not isinstance(value, dict):
                raise TypeError("is not a mapping")
            convert = as_int if base == "dict[str,int]" else _as_text
            out = {}
            for k, v in value.items():
                try:
                    out[str(k)] = convert(v)
                except TypeError as err:
                    raise TypeError(f"has {k}={v!r}, which {err}") from None
            return out
        raise TypeError(f"has an unsupported option type {kind}")
    except TypeError as err:
        raise ValueError(f"{source}: {f.name}={value!r} {err}") from None


def add_flags(parser: argparse.ArgumentParser, cls, title: str | None = None) -> None:
    """One ``--<field>`` flag per field of the dataclass ``cls`` (values are parsed later by
    :func:`coerce`, so flags and YAML keys accept the same forms). Booleans also take
    ``--<field>`` alone (true) and ``--no_<field>``; lists take several words or a comma list.
    Flags default to "not given" (``argparse.SUPPRESS``)."""
    group = parser.add_argument_group(title) if title else parser
    for f in fields(cls):
        kind = kind_of(f)
        help_ = f"{f.metadata['help']} (default: {default_of(f)})"
        flag = f"--{f.name}"
        if kind in ("bool", "bool|None"):
            group.add_argument(flag, nargs="?", const="true", default=argparse.SUPPRESS, help=help_)
            group.add_argument(
                f"--no_{f.name}",
                dest=f.name,
                action="store_const",
                const="false",
                default=argparse.SUPPRESS,
                help=argparse.SUPPRESS,
            )
        elif kind.startswith("list["):
            group.add_argument(flag, nargs="+", default=argparse.SUPPRESS, help=help_)
        else:
            group.add_argument(flag, default=argparse.SUPPRESS, help=help_)


def values_from(cls, given: dict[str, Any], source: str) -> dict[str, Any]:
    """``given`` (field name -> raw value) coerced to the fields of ``cls``; unknown keys raise
    ValueError listing the valid ones."""
    known = {f.name: f for f in fields(cls)}
    out = {}
    for key, value in given.items():
        if key not in known:
            raise ValueError(
                f"{source}: unknown option {key!r}; valid options are the flags of --help"
            )
        out[key] = coerce(known[key], value, source)
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file of ``option: value`` pairs; ValueError for a missing or malformed file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must be a mapping of option names to values")
    return data
