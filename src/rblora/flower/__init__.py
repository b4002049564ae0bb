"""Flower engine: rblora's rounds on Flower (``flwr``), in simulation or across machines.

``server_app.app`` and ``client_app.app`` are the Flower App's components (``flwr run
src/rblora/flower/app ...``); ``simulation.run_simulation_engine`` is ``train.py --engine
flower``. Both use the round core of :mod:`rblora.federation.rounds`, unchanged.
"""
