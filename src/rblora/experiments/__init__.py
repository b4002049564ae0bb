"""Experiments over runs: ``rblora compare`` (methods x rank settings x seeds, one table),
``rblora evaluate`` (score a saved adapter) and ``rblora report`` (rebuild tables and plots).

They drive the engines of :mod:`rblora.federation` like a user would and read what finished runs
wrote; nothing in the round core imports them.
"""
