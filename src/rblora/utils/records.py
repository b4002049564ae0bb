"""The one reader of record files: a JSON array or JSON lines, with file:line in every error.

Instruction data (Dolly, Alpaca), multiple-choice files (the papers' MMLU file), packaged task
splits and metrics all go through :func:`parse_records`; :func:`read_json` reads one JSON
document (a prepared folder's files).
"""

from __future__ import annotations

import json
from pathlib import Path


def read_json(path: str | Path):
    """One JSON document; ValueError naming the file and line."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8-sig") as fh:
            return json.load(fh)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason})") from None


def read_records(path: str | Path, *, stop_at_error: bool = False) -> list[tuple[int, object]]:
    """``(line, value)`` pairs of a JSON array or JSON-lines file (see :func:`parse_records`)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ValueError(f"cannot read {path}: {err.strerror or err}") from None
    return parse_records(raw, path, stop_at_error=stop_at_error)


def parse_records(
    raw: bytes, path: str | Path, *, stop_at_error: bool = False
) -> list[tuple[int, object]]:
    """Parse the bytes of a JSON array or JSON-lines file into ``(line, value)`` pairs.

    The first non-blank character decides: ``[`` a JSON array, else one JSON value per
    non-blank line. A UTF-8 byte-order mark is accepted. ValueError names ``path`` and the line
    of the first problem; with ``stop_at_error`` (JSON lines only) the values before a broken
    line are returned instead (a file whose last line a kill cut short).
    """
    path = Path(path)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text ({err.reason})") from None
    start = len(text) - len(text.lstrip())
    if start == len(text):
        if stop_at_error:
            return []
        raise ValueError(f"{path}: the file is empty; expected a JSON array or JSON lines")
    if text[start] == "[":
        return _parse_array(text, start, path)
    out = []
    # Only "\n" ends a record: str.splitlines would also split inside strings holding U+2028,
    # U+0085 or other Unicode line breaks, which JSON allows unescaped (MMLU has some).
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if line.strip():
            try:
                out.append((number, json.loads(line)))
            except json.JSONDecodeError as err:
                if stop_at_error:
                    break
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
    return out


def _parse_array(text: str, pos: int, path: Path) -> list[tuple[int, object]]:
    """Decode a JSON array element by element, remembering the line each element starts on."""
    decoder = json.JSONDecoder()
    out: list[tuple[int, object]] = []
    line, seen = 1, 0

    def line_at(p: int) -> int:
        nonlocal line, seen
        line += text.count("\n", seen, p)
        seen = p
        return line

    def skip_ws(p: int) -> int:
        while p < len(text) and text[p] in " \t\r\n":
            p += 1
        return p

    pos = skip_ws(pos + 1)
    if pos < len(text) and text[pos] == "]":
        return out
    while True:
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{line_at(err.pos)}: not valid JSON ({err.msg})") from None
        out.append((line_at(pos), value))
        pos = skip_ws(pos)
        if pos < len(text) and text[pos] == ",":
            pos = skip_ws(pos + 1)
            continue
        if pos < len(text) and text[pos] == "]":
            if skip_ws(pos + 1) != len(text):
                raise ValueError(f"{path}:{line_at(pos + 1)}: extra data after the JSON array")
            return out
        raise ValueError(f"{path}:{line_at(pos)}: expected ',' or ']' in the JSON array")
