"""The round core and the in-process engine.

:mod:`~rblora.federation.server` (selection, aggregation, redistribution),
:mod:`~rblora.federation.rounds` (each step of a round, one function every engine calls),
:mod:`~rblora.federation.setup` and :mod:`~rblora.federation.rundir` (before and after the
rounds: checks, run folder, checkpoint, resume), :mod:`~rblora.federation.options` (every option
of a run), :mod:`~rblora.federation.engines` (``--engine``: the engines that joined) and
:mod:`~rblora.federation.loop` (the in-process engine).
"""
