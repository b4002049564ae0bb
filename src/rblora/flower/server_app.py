"""rblora's Flower ServerApp: the same round core as the in-process engine, over Flower messages.

:class:`HeteroRankStrategy` is a Flower ``Strategy``: ``configure_train`` sends each selected
node a start adapter of that node's own rank (the server's redistribution), ``aggregate_train``
validates the replies, whose shapes differ by node, and hands them to the round core
(:func:`rblora.federation.rounds.close_round`: aggregation through ``rblora.aggregation``,
export, centralised evaluation, metrics); the evaluation hooks send nothing (the global model is
evaluated on the server, as in-process). ``start`` runs the rounds after the checkpoint's, so a
run resumes.

Who holds what (DESIGN.md section 6): the server reads only the run's metadata and test set
(``partition.json``, ``global_test.json``), never a client's records; each node reads only its
own client's file. The server knows every client's rank, scaling and example count before any
reply (the options, ``partition.json``, or the node's discovery answer checked against it) and
believes nothing else a node sends: a reply is decoded against that knowledge
(:func:`rblora.protocol.codec.decode_update`), its metrics are only numbers under known names,
and its record's identity fields are the server's.

Discovery: every node is asked which client it is; the run starts when a node of every client
answered, or at ``--discovery_timeout`` with at least ``--min_replies`` of them (the missing ones
named); a node that answers later joins at the next round. A malformed answer, a partition out
of range or claimed by two nodes, an example count that differs from ``partition.json`` or a
node that fails to start is refused, named, and its client is missing.

Faults: a node that fails, crashes or does not answer within ``--round_timeout`` is left out of
its round; the round aggregates the replies it has (weights follow their examples) and its
metrics name who was missing and why. A reply that does not decode is dropped the same way.
Fewer replies than ``--min_replies`` stop the run.

Deployment: ``flwr run <rblora>/src/rblora/flower/app <superlink>`` with the run config key
``train-args`` holding train.py's options (see docs/flower.md); nodes identify themselves through
their node config (:mod:`rblora.flower.client_app`).
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Iterable
from dataclasses import replace
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

from rblora.federation import rounds
from rblora.federation.options import TrainArgs, parse_args, required_replies
from rblora.federation.results import scalar_evals
from rblora.federation.rounds import RunError, log
from rblora.federation.saving import plan_for
from rblora.federation.server import derive_seed
from rblora.federation.setup import PreparedRun, finish_run, open_run
from rblora.flower.records import CONFIG, content_bytes, from_content, to_content
from rblora.protocol.codec import decode_update, encode_start
from rblora.protocol.types import ClientResult, ClientStart

app = ServerApp()


class NodeDirectory:
    """Which Flower node is which client, from the nodes' answers to a query, each checked
    against what the server knows (see the module doc).

    Args:
        args: the run's options (the client count; sent to nodes with the query).
        sizes: each client's training examples as the server knows them (partition.json), None
            where unknown (then the node's answer is taken).
        options: the options nodes receive (JSON text).
    """

    def __init__(self, args: TrainArgs, sizes: list[int | None], options: str):
        self.count = args.num_clients
        self.sizes = list(sizes)
        self.options = options
        self.found: dict[int, dict[str, Any]] = {}  # client -> {"node", "rank", "examples"}
        self.refused: dict[int, str] = {}  # node -> why it was refused
        self._asked: set[int] = set()
        self._claims: dict[int, list[int]] = {}  # client -> nodes that claimed it

    def missing(self) -> list[int]:
        return [k for k in range(self.count) if k not in self.found]

    def poll(self, grid: Grid, timeout: float) -> None:
        """Ask the nodes not asked yet; take their answers (waits at most ``timeout``)."""
        new = [n for n in grid.get_node_ids() if n not in self._asked]
        if not new:
            return
        query = RecordDict({CONFIG: ConfigRecord({"train-args": self.options})})
        msgs = [Message(query, dst_node_id=n, message_type=MessageType.QUERY) for n in new]
        answered = set()
        for reply in grid.send_and_receive(msgs, timeout=max(1.0, timeout)):
            node = reply.metadata.src_node_id
            answered.add(node)
            self._take(node, reply)
        self._asked.update(answered)  # a node that did not answer in time is asked again

    def _take(self, node: int, reply: Message) -> None:
        if reply.has_error():
            self._refuse(node, f"failed to start: {reply.error.reason}")
            return
        try:
            k, rank, examples = _discovery_answer(reply, self.count)
        except ValueError as err:
            self._refuse(node, f"malformed discovery answer: {err}")
            return
        claims = self._claims.setdefault(k, [])
        claims.append(node)
        if len(claims) > 1:  # neither node can be told from the other: trust neither
            self.found.pop(k, None)
            for other in claims:
                self._refuse(other, f"partition {k} is claimed by nodes {claims}")
            return
        known = self.sizes[k]
        if known is not None and examples != known:
            self._refuse(
                node,
                f"partition {k}: the node holds {examples} training examples, the server's "
                f"partition.json says {known} (the node has other data)",
            )
            return
        self.found[k] = {"node": node, "rank": rank, "examples": examples}

    def _refuse(self, node: int, reason: str) -> None:
        if node not in self.refused:
            log(f"node {node} refused: {reason}")
        self.refused[node] = reason

    def discover(self, grid: Grid, timeout: float, required: int) -> None:
        """Poll until a node of every client answered, or until ``timeout`` seconds with at
        least ``required`` clients found (the missing ones are named); else RunError."""
        deadline = time.time() + timeout
        while True:
            self.poll(grid, deadline - time.time())
            if not self.missing():
                return
            if time.time() >= deadline:
                break
            time.sleep(min(1.0, max(0.0, deadline - time.time())))
        absent = self.missing()
        refused = "; ".join(f"node {n}: {r}" for n, r in sorted(self.refused.items()))
        detail = f" (refused: {refused})" if refused else ""
        if len(self.found) < required:
            raise RunError(
                f"after {timeout:g} s, nodes for {len(self.found)} of {self.count} clients "
                f"answered, {required} needed (--min_replies); no node for client(s) {absent}"
                f"{detail}; start them or raise --discovery_timeout"
            )
        log(
            f"starting with {len(self.found)} of {self.count} clients; no node for client(s) "
            f"{absent} yet (they join when their node answers){detail}"
        )


def _discovery_answer(reply: Message, count: int) -> tuple[int, int | None, int]:
    """``(partition, rank or None, examples)`` of a node's answer; ValueError if malformed."""
    if CONFIG not in reply.content.config_records:
        raise ValueError(f"no {CONFIG!r} record")
    answer = dict(reply.content.config_records[CONFIG])
    values = {}
    for key in ("partition-id", "lora-rank", "num-examples"):
        value = answer.get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key} {value!r} is not an integer")
        values[key] = value
    k, rank, examples = values["partition-id"], values["lora-rank"], values["num-examples"]
    if not 0 <= k < count:
        raise ValueError(f"partition-id {k} is out of range; valid are 0..{count - 1}")
    if rank != -1 and rank < 1:
        raise ValueError(f"lora-rank {rank} must be >= 1 (or -1: the run's)")
    if examples < 1:
        raise ValueError(f"num-examples {examples} must be >= 1")
    return k, (None if rank == -1 else rank), examples


class HeteroRankStrategy(Strategy):
    """Flower's Strategy hooks over rblora's server and round core (see the module doc).

    Args:
        run: the prepared run (task for evaluation and export, server, run folder, options).
        directory: which node is which client (polled for late nodes before every round).
        options: the options nodes receive (JSON text: the run's, with its recorded precision).
    """

    def __init__(self, run: PreparedRun, directory: NodeDirectory, options: str):
        self.run = run
        self.directory = directory
        self._options = options
        self._sent: list[tuple[Message, int, int]] = []  # (message, client, bytes down)
        self._round: dict[str, Any] = {}
        self._layout = run.task.update_layout()
        self.saving, bound = plan_for(run.args, self._layout)
        log(self.saving.describe(bound))

    @property
    def nodes(self) -> dict[int, int]:
        """client id -> Flower node id, of the clients whose node answered."""
        return {k: f["node"] for k, f in self.directory.found.items()}

    # ------------------------------------------------------------------ train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server, args = self.run.server, self.run.args
        if self.directory.missing():  # nodes that started late join now
            self.directory.poll(grid, min(args.discovery_timeout, 30.0))
            self._adopt_late_nodes()
        self.saving.begin_round(self.run.folder, server_round)
        selected = server.select(server_round)
        self._round = {"started": time.perf_counter(), "selected": selected, "missing": {}}
        self._sent = []
        for k in selected:
            if k not in self.directory.found:
                self._round["missing"][k] = "no node has answered for this client"
                continue
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

    def _adopt_late_nodes(self) -> None:
        """A late node of a client whose size the server did not know: take its count."""
        clients = self.run.server.clients
        for k, found in self.directory.found.items():
            if clients[k].num_examples is None:
                clients[k] = replace(clients[k], num_examples=found["examples"])

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        run = self.run
        sent = {msg.metadata.message_id: (k, down) for msg, k, down in self._sent}
        updates, records = [], []
        missing: dict[int, str] = dict(self._round["missing"])
        arrived = {}
        for reply in replies:
            k, down = sent.get(reply.metadata.reply_to_message_id, (None, 0))
            if k is not None and reply.metadata.src_node_id == self.nodes.get(k):
                arrived[k] = (reply, down)  # else a late reply to an earlier message, or forged
        for k, (reply, down) in sorted(arrived.items()):  # client order: a repeatable log
            node = self.nodes[k]
            if reply.has_error():
                missing[k] = f"node {node}: error {reply.error.code}: {reply.error.reason}"
                continue
            spec = run.server.clients[k]
            try:
                tensors, meta = from_content(reply.content)
                update, metrics = decode_update(tensors, meta, spec, self._layout)
            except ValueError as err:
                missing[k] = f"node {node}: reply dropped: {err}"
                continue
            result = ClientResult(
                dict(update.factors), update.num_examples, dense=dict(update.dense), metrics=metrics
            )
            if run.args.save_client_adapters and self.saving.saves(server_round):
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
            export=self.saving.saves(server_round),
        )
        rounds.commit_round(run.server, run.folder, record, run.trackers)
        self.saving.end_round(run.folder, server_round)
        scalars = {"round": server_round, **scalar_evals(record.get("eval"))}
        return None, MetricRecord({k: float(v) for k, v in scalars.items()})

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
            messages = list(self.configure_train(t, ArrayRecord(), ConfigRecord(), grid))
            replies = grid.send_and_receive(messages, timeout=timeout) if messages else []
            _, metrics = self.aggregate_train(t, replies)
            if metrics is not None:
                result.train_metrics_clientapp[t] = metrics
        return result


# ---------------------------------------------------------------------- the ServerApp
def known_sizes(args: TrainArgs) -> list[int | None]:
    """Each client's training examples from the server's ``partition.json`` (None for every
    client when the folder has none: the nodes' answers are taken then)."""
    from rblora.data import read_partition
    from rblora.tasks import infer_task

    kind = "images" if infer_task(args) == "image" else "text"
    meta = read_partition(args.data_path, args.num_clients, kind)
    sizes = (meta or {}).get("client_sizes")
    if sizes is None:
        return [None] * args.num_clients
    return [args.training_examples(n) for n in sizes]


def node_options(args: TrainArgs, config: dict[str, Any]) -> str:
    """The options nodes train with (JSON): the run's, with its task and recorded precision
    fixed, so every node computes as the run does whatever its own timing would say."""
    precision = config.get("precision") or {}
    options = {**args.to_dict(), "task": config.get("task_resolved", args.task)}
    if isinstance(precision.get("bf16"), bool):
        options["bf16"] = "true" if precision["bf16"] else "false"
    return json.dumps(options)


def serve(grid: Grid, args: TrainArgs, given: set[str] | None = None) -> dict:
    """The whole run on ``grid``: under the run folder's lock, discover the nodes, prepare the
    run (its task holds the test set only), rounds, results. Node ranks from node configs become
    the run's ranks (and must agree with explicitly given ones)."""
    from rblora.tasks import infer_task

    given = set(given or ())
    args.engine = "flower"
    args.task = infer_task(args)  # nodes hold no metadata to infer it from
    sizes = known_sizes(args)
    directory = NodeDirectory(args, sizes, json.dumps(args.to_dict()))

    def discover() -> dict[str, Any]:
        needed = required_replies(args.min_replies, args.num_clients)
        directory.discover(grid, args.discovery_timeout, needed)
        node_ranks = {k: f["rank"] for k, f in directory.found.items() if f["rank"] is not None}
        if node_ranks:
            ranks = [node_ranks.get(k, r) for k, r in enumerate(args.ranks())]
            explicit = given & {"client_ranks", "client_lora_rank_dict"}
            if explicit and ranks != args.ranks():
                raise RunError(
                    f"the nodes' lora-rank {ranks} differ from the run's {args.ranks()}; give "
                    "the ranks in one place"
                )
            args.client_ranks, args.client_lora_rank_dict = ranks, None
        for k, found in directory.found.items():
            sizes[k] = found["examples"] if sizes[k] is None else sizes[k]
        return {"clients": [], "client_sizes": sizes}

    with open_run(args, given, discover=discover) as run:
        options = node_options(args, run.config)
        directory.options = options
        strategy = HeteroRankStrategy(run, directory, options)
        if args.eval_base and run.server.completed_rounds == 0:
            rounds.evaluate_base_once(run.task, run.folder, run.trackers)
        strategy.start(grid, num_rounds=args.num_communication_rounds, timeout=args.round_timeout)
        return finish_run(run)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Deployment entry: ``train-args`` (run config) holds train.py's options as one string."""
    argv = shlex.split(str(context.run_config.get("train-args", "")))
    args, given = parse_args(argv)
    serve(grid, args, given)
