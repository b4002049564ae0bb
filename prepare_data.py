"""Seed-compatible entry point: ``python prepare_data.py <num_clients> [diff_quantity] [seed]``.

diff_quantity: 0 Dirichlet (alpha 0.5), 1 category-sorted shards, 2 per-client sizes (default).
All flags of ``rblora prepare-data --help`` work here too; this file only calls the package.
"""

import sys

from rblora.data.prepare import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
