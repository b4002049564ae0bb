"""Federated fine-tuning tasks: what a model learns from a client's data and how it is scored.

A task holds one base model in memory for the whole run and implements
:class:`rblora.tasks.base.Task`; the round core (:mod:`rblora.federation.rounds`) and its drivers
(in-process loop, Flower) call nothing else. ``build_task(args)`` picks and builds the task of a
run (``--task lm | image``, inferred from the data folder and the model when not given).
"""

from rblora.tasks.base import Task, build_task, infer_task

__all__ = ["Task", "build_task", "infer_task"]
