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

from rblora.federation import personal, rounds
from rblora.federation.options import TrainArgs, parse_args, required_replies
from rblora.federation.results import scalar_evals
from rblora.federation.rounds import RunError, log
from rblora.federation.saving import plan_for
from rblora.federation.server import derive_seed
from rblora.federation.setup import PreparedRun, finish_run, open_run
from rblora.flower.node_keys import load_node_keys, node_public_keys
from rblora.flower.records import CONFIG, content_bytes, from_content, reply_rank, to_content
from rblora.protocol.codec import decode_update, encode_start, update_shapes
from rblora.protocol.types import ClientResult, ClientStart

app = ServerApp()


class NodeDirectory:
    """Which Flower node is which client, from the nodes' answers to a query, each checked
    against what the server knows (see the module doc).

    Args:
        args: the run's options (the client count, the ranks, ``--max_client_examples``,
            ``--ranks_from_nodes``; sent to nodes with the query).
        sizes: each client's training examples as the server knows them (partition.json), None
            where unknown (then the node's answer is taken, up to ``--max_client_examples``).
        options: the options nodes receive (JSON text).
        keys: partition -> the public key its node must hold (``--node_keys``), or None.
    """

    def __init__(
        self,
        args: TrainArgs,
        sizes: list[int | None],
        options: str,
        keys: dict[int, bytes] | None = None,
    ):
        self.count = args.num_clients
        self.sizes = list(sizes)
        self.ranks = args.ranks()
        self.adopt_ranks = args.ranks_from_nodes
        self.max_examples = args.max_client_examples
        self.options = options
        self.keys = keys
        self.found: dict[int, dict[str, Any]] = {}  # client -> {"node", "rank", "examples"}
        self.refused: dict[int, str] = {}  # node -> why it was refused
        self._asked: set[int] = set()
        self._claims: dict[int, list[int]] = {}  # client -> nodes that claimed it

    def missing(self) -> list[int]:
        return [k for k in range(self.count) if k not in self.found]

    def poll(self, grid: Grid, timeout: float) -> None:
        """Ask the nodes not asked yet; take their answers (waits at most ``timeout``). No
        answer, however malformed, stops the server: it is refused and named."""
        new = [n for n in grid.get_node_ids() if n not in self._asked]
        if not new:
            return
        held = node_public_keys(grid, new) if self.keys is not None else {}
        query = RecordDict({CONFIG: ConfigRecord({"train-args": self.options})})
        msgs = [Message(query, dst_node_id=n, message_type=MessageType.QUERY) for n in new]
        answered = set()
        for reply in grid.send_and_receive(msgs, timeout=max(1.0, timeout)):
            node = reply.metadata.src_node_id
            answered.add(node)
            try:
                self._take(node, reply, held.get(node))
            except Exception as err:  # whatever a node sends, the server goes on
                self._refuse(node, f"unreadable discovery answer ({type(err).__name__})")
        self._asked.update(answered)  # a node that did not answer in time is asked again

    def _take(self, node: int, reply: Message, key: bytes | None) -> None:
        if reply.has_error():
            self._refuse(node, f"failed to start: {_short(reply.error.reason)}")
            return
        try:
            claimed, rank = _discovery_answer(reply, self.count)
        except ValueError as err:
            self._refuse(node, f"malformed discovery answer: {err}")
            return
        for k, examples in claimed:
            self._take_partition(node, k, rank, examples, key)

    def _take_partition(
        self, node: int, k: int, rank: int | None, examples: int, key: bytes | None
    ) -> None:
        """One partition a node claims, checked against what the server knows."""
        if self.keys is not None:
            if key is None:
                self._refuse(
                    node,
                    f"claims partition {k} but holds no registered public key (--node_keys needs "
                    "SuperNode authentication: flower-superlink --enable-supernode-auth)",
                )
                return
            if self.keys.get(k) != key:
                bound = (
                    "the key --node_keys binds to it"
                    if k in self.keys
                    else "a key: --node_keys binds none to it"
                )
                self._refuse(node, f"claims partition {k} but does not hold {bound}")
                return
        claims = self._claims.setdefault(k, [])
        claims.append(node)
        if len(claims) > 1:  # neither node can be told from the other: trust neither
            self.found.pop(k, None)
            why = (
                "the same key" if self.keys is not None else "without --node_keys the server "
                "cannot tell which of them holds it, so neither is taken"
            )  # fmt: skip
            for other in claims:
                self._refuse(other, f"partition {k} is claimed by nodes {claims} ({why})")
            return
        known = self.sizes[k]
        if known is not None and examples != known:
            self._refuse(
                node,
                f"partition {k}: the node holds {examples} training examples, the server's "
                f"partition.json says {known} (the node has other data)",
            )
            return
        if known is None and examples > self.max_examples:
            self._refuse(
                node,
                f"partition {k}: the node claims {examples} training examples, above "
                f"--max_client_examples {self.max_examples} (without partition.json its claim "
                "would be its aggregation weight)",
            )
            return
        if rank is not None and rank != self.ranks[k] and not self.adopt_ranks:
            self._refuse(
                node,
                f"partition {k}: the node's lora-rank {rank} differs from the run's "
                f"{self.ranks[k]} (--ranks_from_nodes takes the nodes' ranks)",
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


PULL_INTERVAL = 0.5
"""Seconds between two pulls of a round's replies (Flower's send_and_receive waits 3)."""


class _SentIndex:
    """Message id -> (client, bytes down) of a round's messages, read when replies arrive (the
    grid sets each message's id when it pushes it, after the round's messages were built)."""

    def __init__(self, sent: list[tuple[Message, int, int]]):
        self._sent = sent
        self._index: dict[str, tuple[int, int]] | None = None

    def get(self, message_id: str, default):
        if self._index is None:  # the first reply: every message has been pushed
            self._index = {msg.metadata.message_id: (k, down) for msg, k, down in self._sent}
            self._sent = []
        return self._index.get(message_id, default)


def _short(text: Any, limit: int = 200) -> str:
    """A node's text (an error reason) cut to ``limit`` characters for a log line or record."""
    text = str(text)
    return text if len(text) <= limit else text[:limit] + "..."


def _discovery_answer(reply: Message, count: int) -> tuple[list[tuple[int, int]], int | None]:
    """``([(partition, examples), ...], rank or None)`` of a node's answer; ValueError if
    malformed (lists of integers of one length, each partition once and in range, at least one
    example each)."""
    if CONFIG not in reply.content.config_records:
        raise ValueError(f"no {CONFIG!r} record")
    answer = dict(reply.content.config_records[CONFIG])
    rank = answer.get("lora-rank")
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise ValueError(f"lora-rank {_short(rank, 40)!r} is not an integer")
    if rank != -1 and rank < 1:
        raise ValueError(f"lora-rank {rank} must be >= 1 (or -1: the run's)")
    ids, sizes = answer.get("partition-ids"), answer.get("num-examples")
    for key, values in (("partition-ids", ids), ("num-examples", sizes)):
        ok = isinstance(values, list) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in values
        )
        if not ok or not values or len(values) > count:
            raise ValueError(f"{key} {_short(values, 40)!r} is not a list of 1..{count} integers")
    if len(ids) != len(sizes) or len(set(ids)) != len(ids):
        raise ValueError("partition-ids and num-examples differ in length or repeat a partition")
    for k, examples in zip(ids, sizes, strict=True):
        if not 0 <= k < count:
            raise ValueError(f"partition-id {k} is out of range; valid are 0..{count - 1}")
        if examples < 1:
            raise ValueError(f"num-examples {examples} of partition {k} must be >= 1")
    return list(zip(ids, sizes, strict=True)), (None if rank == -1 else rank)


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
        self._round: dict[str, Any] = {}
        self._layout = run.task.update_layout()
        self._grid: Grid | None = None  # the grid of the rounds (personalised evaluation)
        self._local_sizes = local_test_sizes(run.args) if run.args.eval_personalized else None
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
        self._grid = grid
        if self.directory.missing():  # nodes that started late join now
            self.directory.poll(grid, min(args.discovery_timeout, 30.0))
            self._adopt_late_nodes()
        self.saving.begin_round(self.run.folder, server_round)
        selected = server.select(server_round)
        self._round = {
            "started": time.perf_counter(),
            "selected": selected,
            "missing": {},  # client -> why its update is not in the round
            "sent": {},  # message id -> (client, bytes down)
            "done": set(),  # clients whose reply was taken (folded or dropped)
            "tally": rounds.RoundTally(),
        }
        sent = []
        for k in selected:
            if k not in self.directory.found:
                self._round["missing"][k] = "no node has answered for this client"
                continue
            content = self._client_content(
                k, server_round, server.deliver(k), server.plan.at(server_round).receives,
                seed=derive_seed(args.seed, server_round, k),
            )  # fmt: skip
            msg = Message(
                content,
                dst_node_id=self.nodes[k],
                message_type=MessageType.TRAIN,
                group_id=str(server_round),
            )
            sent.append((msg, k, content_bytes(content)))
        # message ids exist once the grid pushed them: map them when replies come
        self._round["sent"] = _SentIndex(sent)
        return [msg for msg, _, _ in sent]

    def _adopt_late_nodes(self) -> None:
        """A late node of a client whose size the server did not know: take its count."""
        clients = self.run.server.clients
        for k, found in self.directory.found.items():
            if clients[k].num_examples is None:
                clients[k] = replace(clients[k], num_examples=found["examples"])

    def receive(self, server_round: int, reply: Message) -> None:
        """Take one reply as it arrives: decode it against the server's knowledge, fold its
        update into the round's running sums (:meth:`FederatedServer.fold`), record its line.
        A reply to another message, from another node or a second one for a client is ignored;
        any failure to decode or check it drops it, named in the round's ``missing``: no reply,
        however built, stops the server."""
        run, state = self.run, self._round
        k, down = state["sent"].get(reply.metadata.reply_to_message_id, (None, 0))
        if k is None or reply.metadata.src_node_id != self.nodes.get(k) or k in state["done"]:
            return  # a late reply to an earlier message, a forged one, or a second one
        state["done"].add(k)
        node = self.nodes[k]
        if reply.has_error():
            state["missing"][k] = f"node {node}: error {reply.error.code}: " + _short(
                reply.error.reason
            )
            return
        spec = run.server.clients[k]
        try:
            plan = run.server.plan.at(server_round)  # the client protocol: what a reply carries
            sent = spec  # a client that pruned its rank (where its method does) replies smaller
            if plan.prunes:
                rank = reply_rank(reply.content, self._layout.modules, plan.sends)
                if rank is not None and rank != spec.rank:
                    plan.check_rank(rank, spec.rank, f"client {spec.client_id}")
                    sent = replace(spec, rank=rank)
            shapes = update_shapes(sent, self._layout, plan.sends)
            tensors, meta = from_content(reply.content, shapes)
            update, metrics = decode_update(tensors, meta, sent, self._layout, plan)
            result = ClientResult(
                dict(update.factors), update.num_examples, dense=dict(update.dense),
                metrics=metrics,
            )  # fmt: skip
            record = rounds.client_record(
                server_round, spec, result, ClientStart(None, download_bytes=down),
                content_bytes(reply.content),
            )  # fmt: skip
            update = run.server.fold(update)  # a factor not sent: the server's own
        except Exception as err:  # no reply, however built, stops the server
            reason = str(err) if isinstance(err, ValueError) else type(err).__name__
            state["missing"][k] = f"node {node}: reply dropped: {_short(reason)}"
            return
        if run.args.saves_client_adapters() and self.saving.saves(server_round):
            rounds.save_client_adapter(run.task, run.folder, server_round, spec, update)
        record["node"] = node
        rounds.keep_client_record(run.folder, record, state["tally"], run.args.records_clients())

    def close(self, server_round: int) -> MetricRecord:
        """Close the round with the replies taken: name the missing clients, stop the run if
        fewer than ``--min_replies`` replied, else aggregate, export, evaluate and commit."""
        run, state = self.run, self._round
        missing: dict[int, str] = state["missing"]
        for k in state["selected"]:
            if k not in state["done"] and k not in missing:
                missing[k] = f"node {self.nodes[k]}: no reply within {run.args.round_timeout:g} s"
        for k, reason in sorted(missing.items()):
            log(f"round {server_round}: client {k} missing ({reason})")
        replied = state["tally"].clients
        needed = required_replies(run.args.min_replies, len(state["selected"]))
        if replied < needed:
            raise RunError(
                f"round {server_round}: {replied} of {len(state['selected'])} "
                f"selected clients replied, {needed} needed (--min_replies); missing: "
                + "; ".join(f"client {k}: {r}" for k, r in sorted(missing.items()))
            )
        record = rounds.close_round(
            run.task,
            run.server,
            run.folder,
            server_round,
            state["tally"],
            started=state["started"],
            selected=state["selected"],
            missing=missing,
            export=self.saving.saves(server_round),
        )
        if run.args.eval_personalized:
            rounds.keep_personal(record, self.personalised(server_round), run.folder.private)
        rounds.commit_round(run.server, run.folder, record, run.trackers)
        self.saving.end_round(run.folder, server_round)
        scalars = {"round": server_round, **scalar_evals(record.get("eval"))}
        return MetricRecord({k: float(v) for k, v in scalars.items()})

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's hook: take the round's replies (each as :meth:`receive`), then close it."""
        for reply in replies:
            self.receive(server_round, reply)
        return None, self.close(server_round)

    def exchange(self, grid: Grid, server_round: int, messages: list[Message], timeout: float):
        """Send the round's messages and take each reply as it is pulled (at most ``timeout``
        seconds): the server holds one pulled batch at a time, never the whole round's. The
        sums then follow the order replies arrive in, so two runs of a deployment may differ
        in float rounding (within one pulled batch, replies are taken in client order)."""
        pending = list(grid.push_messages(messages))
        del messages
        deadline = time.time() + timeout
        sent = self._round["sent"]
        while pending and time.time() < deadline:
            pulled = list(grid.pull_messages(pending))
            # within a batch in client order: the sums repeat when the batching does
            pulled.sort(key=lambda r: sent.get(r.metadata.reply_to_message_id, (-1, 0))[0])
            answered = {r.metadata.reply_to_message_id for r in pulled}
            pending = [i for i in pending if i not in answered]
            for reply in pulled:
                self.receive(server_round, reply)
            del pulled
            if pending:
                time.sleep(min(PULL_INTERVAL, max(0.0, deadline - time.time())))

    def _client_content(
        self, k: int, server_round: int, start: ClientStart, receives, **extra
    ) -> RecordDict:
        """The content of a message to client ``k``'s node in ``server_round``: ``start``'s
        factors that travel (``receives``) and what the node needs to read them (the run's
        options, the client, its rank, the round, the run's label for its kept factors), with
        ``extra`` (a train message's seed)."""
        tensors, meta = encode_start(start, receives)
        meta.update(
            {
                "train-args": self._options,
                "client": k,
                "rank": self.run.server.clients[k].rank,
                "round": server_round,
                "state-id": self.run.config.get("client_state_id", ""),
                **extra,
            }
        )
        return to_content(tensors, meta)

    # ------------------------------------------------------------------ personalised
    def personalised(self, server_round: int) -> dict[str, Any]:
        """``--eval_personalized`` after ``server_round``: each chosen client's node is sent the
        model its client holds (its next start, :meth:`FederatedServer.start_of`, with the
        dense extras and the merged base) and scores it on its own held-out split
        (:func:`rblora.federation.personal.score_client`, in the node's ``evaluate``); the
        server counts a reply only from that client's node, with figures it can check
        (:meth:`take_figures`). Clients whose figures did not come are named under
        ``missing``; ``bytes_down`` counts what the evaluate messages carried."""
        run = self.run
        server, args, started = run.server, run.args, time.perf_counter()
        chosen = personal.chosen_clients(
            server.participants(), args.eval_personalized_clients, args.seed, server_round
        )
        plan = server.plan.at(server_round + 1)  # what a start of the next round carries
        missing: dict[int, str] = {}
        sent, down = [], 0  # down: the bytes of the models sent to be scored
        for k in chosen:
            if k not in self.nodes:
                missing[k] = "no node has answered for this client"
                continue
            start = ClientStart(
                server.start_of(k), dense=dict(server.dense), base_delta=server.base_total.as_dict()
            )
            content = self._client_content(k, server_round, start, plan.receives)
            down += content_bytes(content)
            msg = Message(
                content, dst_node_id=self.nodes[k],
                message_type=MessageType.EVALUATE, group_id=f"personal-{server_round}",
            )  # fmt: skip
            sent.append((msg, k))
        replies = []
        if sent and self._grid is not None:
            replies = list(
                self._grid.send_and_receive([m for m, _ in sent], timeout=args.round_timeout)
            )
        by_id = {msg.metadata.message_id: k for msg, k in sent}
        scored: dict[int, dict[str, float]] = {}
        for reply in replies:
            k = by_id.pop(reply.metadata.reply_to_message_id, None)
            if k is None or reply.metadata.src_node_id != self.nodes.get(k):
                continue  # not a reply to this evaluation's message for that client's node
            try:
                figures = self.take_figures(k, reply)
            except Exception as err:  # no reply, however built, stops the server
                reason = str(err) if isinstance(err, ValueError) else type(err).__name__
                missing[k] = f"node {self.nodes[k]}: figures dropped: {_short(reason)}"
                continue
            if figures is not None:
                scored[k] = figures
        for k in by_id.values():
            missing.setdefault(
                k, f"node {self.nodes[k]}: no figures within {args.round_timeout:g} s"
            )
        for k, reason in sorted(missing.items()):
            log(f"round {server_round}: personalised evaluation of client {k} missing ({reason})")
        out: dict[str, Any] = {**personal.summarize(scored)}
        out["seconds"] = round(time.perf_counter() - started, 3)
        out["bytes_down"] = down
        if missing:
            out["missing"] = {str(k): reason for k, reason in sorted(missing.items())}
        return out

    def take_figures(self, k: int, reply: Message) -> dict[str, float] | None:
        """Client ``k``'s personalised figures from its node's reply, checked against what the
        server knows: finite numbers of the known names in range
        (:func:`rblora.federation.personal.check_figures`), and, when the server's
        ``partition.json`` lists the clients' held-out sizes, a count of examples equal to
        client k's (none when it holds none out). None: the client holds nothing out.
        ValueError naming what is wrong."""
        who = f"client {k}"
        if reply.has_error():
            raise ValueError(f"error {reply.error.code}: {_short(reply.error.reason)}")
        _, meta = from_content(reply.content, {})
        text = meta.get("figures")
        if not isinstance(text, str) or len(text) > 1000:
            raise ValueError(f"{who}: no readable figures in the reply")
        figures = json.loads(text)
        known = None if self._local_sizes is None else self._local_sizes[k]
        if figures is None:
            if known:
                raise ValueError(f"{who} holds {known} held-out examples but reported none")
            return None
        figures = personal.check_figures(figures, who)
        if "examples" not in figures:
            raise ValueError(f"{who}: the reply does not say how many examples it scored")
        if known is not None and figures["examples"] != known:
            raise ValueError(
                f"{who} scored {figures['examples']} held-out examples; partition.json says {known}"
            )
        return figures

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
        self._grid = grid
        for t in range(self.run.server.completed_rounds + 1, num_rounds + 1):
            messages = list(self.configure_train(t, ArrayRecord(), ConfigRecord(), grid))
            if messages:
                self.exchange(grid, t, messages, timeout)
            result.train_metrics_clientapp[t] = self.close(t)
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


def local_test_sizes(args: TrainArgs) -> list[int] | None:
    """Each client's held-out examples for ``--eval_personalized`` from the server's
    ``partition.json`` (None when the folder has none: the nodes' counts are then taken as
    they come, checked for sense only)."""
    from rblora.data import read_partition

    sizes = (read_partition(args.data_path, args.num_clients) or {}).get("local_test_sizes")
    ok = isinstance(sizes, list) and len(sizes) == args.num_clients
    return [int(n) for n in sizes] if ok else None


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
    run (its task holds the test set only), rounds, results. With ``--ranks_from_nodes`` node
    ranks from node configs become the run's ranks (and must agree with explicitly given ones);
    without it a node whose rank differs is refused."""
    from rblora.tasks import infer_task

    given = set(given or ())
    args.engine = "flower"
    args.task = infer_task(args)  # nodes hold no metadata to infer it from
    keys = load_node_keys(args.node_keys, args.num_clients) if args.node_keys else None
    sizes = known_sizes(args)
    directory = NodeDirectory(args, sizes, json.dumps(args.to_dict()), keys)

    def discover() -> dict[str, Any]:
        needed = required_replies(args.min_replies, args.num_clients)
        directory.discover(grid, args.discovery_timeout, needed)
        node_ranks = {k: f["rank"] for k, f in directory.found.items() if f["rank"] is not None}
        if node_ranks and args.ranks_from_nodes:
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
