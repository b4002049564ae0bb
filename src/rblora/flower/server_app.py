"""rblora's Flower ServerApp: the same round core as the in-process engine, over Flower messages.

:class:`HeteroRankStrategy` is a Flower ``Strategy``: ``configure_train`` sends each selected
node a start adapter of that node's own rank (the server's redistribution), ``aggregate_train``
validates the replies, whose shapes differ by node, and hands them to the round core
(:func:`rblora.federation.rounds.close_round`: aggregation through ``rblora.aggregation``,
export, centralised evaluation, metrics); the evaluation hooks send nothing (the global model is
evaluated on the server, as in-process). ``start`` runs the rounds after the checkpoint's, so a
run resumes.

Faults: a node that fails, crashes or does not answer within ``--round_timeout`` is left out of
its round; the round aggregates the replies it has (weights follow their examples) and its
metrics name who was missing and why. A reply that does not validate (shapes, rank, example
count, NaN/inf) is dropped the same way. Fewer replies than ``--min_replies`` stop the run.

Deployment: ``flwr run <rblora>/src/rblora/flower/app <superlink>`` with the run config key
``train-args`` holding train.py's options (see the README); nodes identify themselves through
their node config (:mod:`rblora.flower.client_app`).
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Iterable
from typing import Any

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result, Strategy

from rblora.adapters import dense_parameters
from rblora.aggregation.validation import validate_updates
from rblora.federation import rounds
from rblora.federation.options import TrainArgs, parse_args, required_replies
from rblora.federation.results import scalar_evals
from rblora.federation.rounds import RunError, log
from rblora.federation.server import derive_seed
from rblora.federation.setup import PreparedRun, finish_run, open_run
from rblora.flower.records import CONFIG, content_bytes, from_content, to_content
from rblora.protocol.codec import decode_update, encode_start
from rblora.protocol.types import ClientResult, ClientStart

app = ServerApp()


class HeteroRankStrategy(Strategy):
    """Flower's Strategy hooks over rblora's server and round core (see the module doc).

    Args:
        run: the prepared run (task for evaluation and export, server, run folder, options).
        nodes: client id -> Flower node id.
        examples: client id -> training examples the node reported (checked in every reply).
    """

    def __init__(self, run: PreparedRun, nodes: dict[int, int], examples: dict[int, int]):
        self.run = run
        self.nodes = nodes
        self.examples = examples
        self._sent: list[tuple[Message, int, int]] = []  # (message, client, bytes down)
        self._round: dict[str, Any] = {}
        task = run.task
        self._shapes = task.module_shapes()
        base = getattr(task, "model", None)
        self._dense = {
            n: tuple(p.shape)
            for n, p in (dense_parameters(base, task.modules_to_save) if base else {}).items()
        }
        self._options = json.dumps(run.args.to_dict())

    # ------------------------------------------------------------------ train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server, args = self.run.server, self.run.args
        selected = server.select(server_round)
        self._round = {"started": time.perf_counter(), "selected": selected}
        self._sent = []
        for k in selected:
            start = server.deliver(k)
            tensors, meta = encode_start(start)
            meta.update(
                {
                    "train-args": self._options,
                    "client": k,
                    "rank": server.clients[k].rank,
                    "seed": derive_seed(args.seed, server_round, k),
                    "round": server_round,
                }
            )
            content = to_content(tensors, meta)
            msg = Message(
                content,
                dst_node_id=self.nodes[k],
                message_type=MessageType.TRAIN,
                group_id=str(server_round),
            )
            self._sent.append((msg, k, content_bytes(content)))
        return [msg for msg, _, _ in self._sent]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        run = self.run
        sent = {msg.metadata.message_id: (k, down) for msg, k, down in self._sent}
        updates, records, missing = [], [], {}
        arrived = {}
        for reply in replies:
            k, down = sent.get(reply.metadata.reply_to_message_id, (None, 0))
            if k is not None:  # else a late reply to an earlier message
                arrived[k] = (reply, down)
        for k, (reply, down) in sorted(arrived.items()):  # client order: a repeatable log
            node = self.nodes[k]
            if reply.has_error():
                missing[k] = f"node {node}: error {reply.error.code}: {reply.error.reason}"
                continue
            try:
                update, metrics = self._decode(reply, k)
            except ValueError as err:
                missing[k] = f"node {node}: reply dropped: {err}"
                continue
            spec = run.server.clients[k]
            result = ClientResult(
                update.factors, update.num_examples, dense=update.dense, metrics=metrics
            )
            if run.args.save_client_adapters:
                rounds.save_client_adapter(run.task, run.folder, server_round, spec, update)
            start = ClientStart(None, download_bytes=down)
            record = rounds.client_record(
                server_round, spec, result, start, content_bytes(reply.content)
            )
            record["node"] = node
            run.folder.append_metrics(record)
            log(rounds.client_line(record))
            updates.append(update)
            records.append(record)
        got = {r["client"] for r in records}
        for k in self._round["selected"]:
            if k not in got and k not in missing:
                missing[k] = f"node {self.nodes[k]}: no reply within {run.args.round_timeout:g} s"
        for k, reason in sorted(missing.items()):
            log(f"round {server_round}: client {k} missing ({reason})")
        needed = required_replies(run.args.min_replies, len(self._round["selected"]))
        if len(updates) < needed:
            raise RunError(
                f"round {server_round}: {len(updates)} of {len(self._round['selected'])} "
                f"selected clients replied, {needed} needed (--min_replies); missing: "
                + "; ".join(f"client {k}: {r}" for k, r in sorted(missing.items()))
            )
        record = rounds.close_round(
            run.task,
            run.server,
            run.folder,
            server_round,
            updates,
            records,
            started=self._round["started"],
            selected=self._round["selected"],
            missing=missing,
        )
        rounds.commit_round(run.server, run.folder, record)
        scalars = {"round": server_round, **scalar_evals(record.get("eval"))}
        return None, MetricRecord({k: float(v) for k, v in scalars.items()})

    def _decode(self, reply: Message, client: int):
        """A reply's ClientUpdate and metrics, checked against what this client must send."""
        tensors, meta = from_content(reply.content)
        update = decode_update(tensors, meta, client_id=client)
        validate_updates([update])  # floats, 2-D, A/B ranks agree, finite
        rank = self.run.server.clients[client].rank
        for module, (a, b) in update.factors.items():
            if self._shapes.get(module) != (b.shape[0], a.shape[1]) or a.shape[0] != rank:
                raise ValueError(
                    f"module {module!r}: A {tuple(a.shape)} / B {tuple(b.shape)} do not fit rank "
                    f"{rank} and (d_out, d_in) {self._shapes.get(module)}"
                )
        if set(update.factors) != set(self._shapes) and update.factors:
            raise ValueError(f"modules {sorted(update.factors)} differ from {sorted(self._shapes)}")
        dense = {n: tuple(t.shape) for n, t in update.dense.items()}
        if dense != self._dense:
            raise ValueError(f"dense parameters {dense} differ from {self._dense}")
        if update.num_examples != self.examples[client]:
            raise ValueError(
                f"{update.num_examples} examples, but the node reported {self.examples[client]}"
            )
        return update, json.loads(meta.get("metrics", "{}"))

    # ------------------------------------------------------------------ evaluate
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []  # the global model is evaluated on the server, in close_round

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> None:
        return None

    def summary(self) -> None:
        log(
            f"Flower strategy {type(self).__name__}: {self.run.args.method}, "
            f"{len(self.nodes)} nodes"
        )

    # ------------------------------------------------------------------ rounds
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord | None = None,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn=None,
    ) -> Result:
        """Rounds after the checkpoint's up to ``num_rounds``: send, receive (at most
        ``timeout`` seconds), aggregate. The global model lives in the server, not in
        ``initial_arrays``."""
        result = Result()
        self.summary()
        for t in range(self.run.server.completed_rounds + 1, num_rounds + 1):
            messages = self.configure_train(t, ArrayRecord(), ConfigRecord(), grid)
            replies = grid.send_and_receive(messages, timeout=timeout)
            _, metrics = self.aggregate_train(t, replies)
            if metrics is not None:
                result.train_metrics_clientapp[t] = metrics
        return result


# ---------------------------------------------------------------------- the ServerApp
def discover(grid: Grid, args: TrainArgs, deadline: float) -> dict[int, dict]:
    """Ask every node which client it is; wait (until ``deadline``) for all ``num_clients``.

    Returns client id -> {"node", "rank" (None: the run's), "examples"}. Raises RunError for a
    partition claimed twice, out of range, or still missing at the deadline.
    """
    found: dict[int, dict] = {}
    asked: set[int] = set()
    while True:
        new = [n for n in grid.get_node_ids() if n not in asked]
        if new:
            query = RecordDict({CONFIG: ConfigRecord({"train-args": json.dumps(args.to_dict())})})
            msgs = [Message(query, dst_node_id=n, message_type=MessageType.QUERY) for n in new]
            for reply in grid.send_and_receive(msgs, timeout=max(1.0, deadline - time.time())):
                asked.add(reply.metadata.src_node_id)
                if reply.has_error():
                    raise RunError(
                        f"node {reply.metadata.src_node_id} failed to start: {reply.error.reason}"
                    )
                answer = dict(reply.content.config_records[CONFIG])
                k, node = int(answer["partition-id"]), reply.metadata.src_node_id
                if not 0 <= k < args.num_clients:
                    raise RunError(
                        f"node {node} has partition-id {k}; valid are 0..{args.num_clients - 1}"
                    )
                if k in found:
                    raise RunError(f"nodes {found[k]['node']} and {node} both have partition {k}")
                rank = int(answer["lora-rank"])
                found[k] = {
                    "node": node,
                    "rank": None if rank < 0 else rank,
                    "examples": int(answer["num-examples"]),
                }
        if len(found) == args.num_clients:
            return found
        if time.time() > deadline:
            absent = sorted(set(range(args.num_clients)) - set(found))
            raise RunError(f"no node for partition(s) {absent} after waiting; start them")
        time.sleep(1.0)


def serve(grid: Grid, args: TrainArgs, given: set[str] | None = None) -> dict:
    """The whole run on ``grid``: discover the nodes, prepare the run (as in-process), rounds,
    results. Node ranks from node configs become the run's ranks (and must agree with
    explicitly given ones)."""
    given = set(given or ())
    args.engine = "flower"
    found = discover(grid, args, time.time() + args.round_timeout)
    node_ranks = {k: f["rank"] for k, f in found.items() if f["rank"] is not None}
    if node_ranks:
        ranks = [node_ranks.get(k, r) for k, r in enumerate(args.ranks())]
        explicit = given & {"client_ranks", "client_lora_rank_dict"}
        if explicit and ranks != args.ranks():
            raise RunError(
                f"the nodes' lora-rank {ranks} differ from the run's {args.ranks()}; give "
                "the ranks in one place"
            )
        args.client_ranks, args.client_lora_rank_dict = ranks, None
    with open_run(args, given) as run:
        sizes = {k: run.task.num_examples(k) for k in range(args.num_clients)}
        wrong = {
            k: (f["examples"], sizes[k]) for k, f in found.items() if f["examples"] != sizes[k]
        }
        if wrong:
            raise RunError(
                "nodes hold other data than the server's prepared folder (client: node, server "
                f"examples): {wrong}"
            )
        strategy = HeteroRankStrategy(
            run,
            nodes={k: f["node"] for k, f in found.items()},
            examples={k: f["examples"] for k, f in found.items()},
        )
        if args.eval_base and run.server.completed_rounds == 0:
            rounds.evaluate_base_once(run.task, run.folder)
        strategy.start(grid, num_rounds=args.num_communication_rounds, timeout=args.round_timeout)
        return finish_run(run)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Deployment entry: ``train-args`` (run config) holds train.py's options as one string."""
    argv = shlex.split(str(context.run_config.get("train-args", "")))
    args, given = parse_args(argv)
    serve(grid, args, given)
