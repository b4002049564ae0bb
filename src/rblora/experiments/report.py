"""``rblora report``: rebuild the tables and plots of finished runs and comparisons.

    rblora report outputs/embedded/10 outputs/compare

For a run folder: ``results.json``, ``summary.md`` and the plots, from its ``metrics.jsonl``
(:mod:`rblora.federation.results`); for an ``rblora compare`` folder: ``comparison.md``,
``comparison.json`` and its plots, from the cells' metrics and per-item outcomes
(:mod:`rblora.experiments.compare`, :mod:`rblora.experiments.differences`); ``--reference``
picks the method the others are compared to. Nothing is evaluated again.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from rblora.utils.options import OptionParser

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = OptionParser(prog="rblora report", description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", help="run folders and/or rblora compare folders")
    parser.add_argument(
        "--reference",
        help="compare folders: the method the others are compared to item by item (default: "
        "the comparison's)",
    )
    try:
        ns = parser.parse_args(argv)
    except ValueError as err:
        print(f"rblora report: error: {err}", file=sys.stderr)
        return 2
    from rblora.experiments.compare import INDEX, comparison_table, write_comparison
    from rblora.experiments.differences import paired_table
    from rblora.federation.results import markdown_table, write_report
    from rblora.federation.rundir import RunFolder

    status = 0
    for path in map(Path, ns.folders):
        try:
            if (path / INDEX).is_file():
                data = write_comparison(path, ns.reference)
                paired = paired_table(data["paired"], data["reference"], data["index"]["rounds"])
                print(f"# {path}\n\n{comparison_table(data)}\n{paired}")
            elif (path / "config.json").is_file():
                folder = RunFolder(path)
                results = write_report(path, folder.read_metrics(), folder.read_config())
                print(f"# {path}\n\n{markdown_table(results)}")
            else:
                raise ValueError(f"{path} is neither a run folder nor a comparison folder")
        except (ValueError, OSError) as err:
            print(f"rblora report: error: {err}", file=sys.stderr)
            status = 2
    return status
