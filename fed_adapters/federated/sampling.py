"""Which clients take part in a round: views of Flower's Grid that make its draws repeatable, and shuffled passes.

Flower gives nodes random ids in every run and its strategies draw `fraction_train` of whatever the Grid lists,
so a seed alone does not fix who trains. Listing nodes in client order makes the (seeded) draw repeatable;
listing only the clients a schedule chose makes the strategy train exactly those.
"""

from __future__ import annotations

import random
import time

from flwr.app import Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid

from .mods import CLIENT_ID_KEY
from .validation import LOG


class NodesUnavailable(RuntimeError):
    """Too few nodes are connected for the run to go on."""


def wait_for_nodes(grid: Grid, required: int, timeout: float, waiting: str) -> list[int]:
    """Every connected node, once at least `required` are (polled each second, as Flower's own sampling does).
    Flower would wait forever, also for a node that has died; this stops after `timeout` seconds instead."""
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < required:
        if time.monotonic() > deadline:
            raise NodesUnavailable(
                f"{waiting}: {len(nodes)} node(s) connected after {timeout:.0f} s, {required} needed "
                "(strategy.node_wait_timeout); start the missing SuperNodes, or lower what the run waits for: "
                "partition.num_clients before the first round, strategy.min_train_clients after it")
        time.sleep(1.0)
    return nodes


class ClientOrderedGrid:
    """A Grid whose node ids come in the order of the clients they serve (optionally only some of them)."""

    def __init__(self, grid: Grid, client_of: dict[int, int], only: set[int] | None = None) -> None:
        self._grid = grid
        self._client_of = client_of
        self._only = only

    def get_node_ids(self) -> list[int]:
        nodes = self._grid.get_node_ids()
        if self._only is not None:
            nodes = [node for node in nodes if self._client_of.get(node) in self._only]
        return sorted(nodes, key=lambda node: (self._client_of.get(node, 2**62), node))

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


def identify_clients(grid: Grid, expected: int, known: dict[int, int] | None = None,
                     timeout: float = 600.0) -> dict[int, int]:
    """node id -> client id: `known` plus the answers of the connected nodes not in it (at the first call, once
    `expected` nodes are connected; `timeout` bounds that wait and the answers). A node that fails to answer is
    asked again at the next call; until then it is listed after the known ones and never chosen by shuffled
    passes (a warning says so)."""
    known = known or {}
    connected = grid.get_node_ids() if known else wait_for_nodes(grid, expected, timeout, "asking the nodes which client they serve")
    nodes = [node for node in connected if node not in known]
    if not nodes:
        return known
    questions = [Message(RecordDict(), dst_node_id=node, message_type=MessageType.QUERY) for node in nodes]
    replies = [r for r in grid.send_and_receive(questions, timeout=timeout) if not r.has_error()]
    answered = {r.metadata.src_node_id: int(r.content["metrics"][CLIENT_ID_KEY]) for r in replies}
    if len(answered) < len(nodes):
        LOG.warning("%d of %d node(s) did not say which client they serve (error or time-out): they are asked again "
                    "next round, and until they answer, shuffled passes leave them out", len(nodes) - len(answered), len(nodes))
    return {**known, **answered}


def shuffled_participants(num_clients: int, per_round: int, run_round: int, seed: int) -> list[int]:
    """The clients of `run_round` (from 1) when rounds walk through passes over all clients.

    Each pass is a seeded permutation of the clients; round r takes the next `per_round` of the stream of
    passes, so every client trains exactly once per pass (as every example is seen once per centralized epoch)
    instead of as often as independent draws happen to pick it. Where a round straddles two passes, the clients
    it already holds move to the end of the next pass: nobody trains twice in one round. A function of
    (seed, round) alone, so a resumed run continues the same schedule.
    """
    if not 1 <= per_round <= num_clients:
        raise ValueError(f"cannot take {per_round} of {num_clients} clients per round")
    stream: list[int] = []
    passes = 0
    while len(stream) < run_round * per_round:
        order = random.Random(seed * 1_000_003 + passes).sample(range(num_clients), num_clients)
        open_round = set(stream[len(stream) - len(stream) % per_round:])
        stream += [c for c in order if c not in open_round] + [c for c in order if c in open_round]
        passes += 1
    return stream[(run_round - 1) * per_round: run_round * per_round]
