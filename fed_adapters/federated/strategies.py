"""Flower's strategies, chosen by name, each wrapped so that every message it sends or receives is recorded."""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    Strategy,
)

from .config import SERVER_STEP_ATTRIBUTES, RunConfig
from .mods import UNIFORM_WEIGHT_KEY
from .privacy import clients_per_round, with_privacy
from .validation import LOG, screen
from .recording import RoundRecorder
from .sampling import ClientOrderedGrid, identify_clients, shuffled_participants, wait_for_nodes
from .scaffold import Scaffold

STRATEGY_CLASSES: dict[str, type[Strategy]] = {
    "fedavg": FedAvg,
    "fedavgm": FedAvgM,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
    "multikrum": MultiKrum,
    "scaffold": Scaffold,
}


def _recording(base: type[Strategy]) -> type[Strategy]:
    """`base` with its message traffic reported to a RoundRecorder (bytes, tensor names, replies, failures)."""

    class Recording(base):  # type: ignore[valid-type, misc]
        def __init__(self, recorder: RoundRecorder, max_update_norm: float = 0.0, seed: int = 0, shuffled_per_round: int = 0,
                     server_step_decay: tuple[str, int] | None = None, node_wait_timeout: float = 600.0, **kwargs) -> None:
            super().__init__(**kwargs)
            self.node_wait_timeout = node_wait_timeout
            self.recorder = recorder
            # (attribute holding the server step, rounds it decays linearly over); None: a constant step
            self.server_step_decay = server_step_decay
            self.max_update_norm = max_update_norm
            self.seed = seed
            # > 0: training rounds take this many clients from passes over all clients (strategy.sampling)
            self.shuffled_per_round = shuffled_per_round
            self.global_arrays = ArrayRecord()
            self.client_of: dict[int, int] = {}

        def sampling(self, grid: Grid, run_round: int, fraction: float, phase: int) -> Grid:
            """With partial participation, the grid Flower samples from: nodes in client order, the draw seeded
            by (run seed, round). Flower gives nodes random ids in every run, so without this the same seed
            would pick other clients each time (and a resumed run would differ from an uninterrupted one)."""
            if not 0.0 < fraction < 1.0:  # everyone, or nobody (evaluation off): nothing to draw
                return grid
            self.client_of = identify_clients(grid, self.min_available_nodes, self.client_of)
            random.seed(self.seed * 1_000_003 + 2 * run_round + phase)
            return ClientOrderedGrid(grid, self.client_of)

        def shuffled_round(self, grid: Grid, run_round: int) -> Grid:
            """A grid of only this round's clients under shuffled passes: the strategy, told to take all of it
            (`overriding` its fraction and minimum), trains exactly them through its own configure_train (FedProx's mu, SCAFFOLD's controls)."""
            clients = sorted(set(self.client_of.values()))  # partition ids in simulation, any client-id deployed
            chosen = shuffled_participants(len(clients), min(self.shuffled_per_round, len(clients)), run_round, self.seed)
            return ClientOrderedGrid(grid, self.client_of, only={clients[i] for i in chosen})

        def run_round(self, server_round: int) -> int:
            """Flower counts a resumed run's rounds from 1 again; strategies (FedAdam's bias correction) and
            clients (seeds) must see the run's round."""
            return server_round + self.recorder.offset

        def connected(self, grid: Grid, run_round: int, needed: int, phase: str) -> dict[str, int]:
            """Waits for the nodes a round needs: every client before the run's first round, `needed` later. Returns
            the override that lets Flower sample from whoever is connected: it would wait for every client, forever,
            also for one whose node has died (deployed silos come and go)."""
            first = run_round == self.recorder.offset + 1
            nodes = wait_for_nodes(grid, self.min_available_nodes if first else needed, self.node_wait_timeout,
                                   f"round {run_round} ({phase})")
            return {"min_available_nodes": min(self.min_available_nodes, len(nodes))}

        def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
            with overriding(self, **self.connected(grid, self.run_round(server_round), self.min_train_nodes, "training")):
                return self.configure_connected_train(server_round, arrays, config, grid)

        def configure_connected_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                                      grid: Grid) -> list[Message]:
            self.global_arrays = arrays  # what every update is checked against
            run_round = self.run_round(server_round)
            grid = self.sampling(grid, run_round, self.fraction_train, phase=0)
            shuffled = self.shuffled_per_round and 0.0 < self.fraction_train < 1.0
            identified = len(set(self.client_of.values()))
            if shuffled and identified < self.min_train_nodes:
                LOG.warning("round %d: only %d client(s) have said who they are, fewer than strategy.min_train_clients = "
                            "%d; this round draws its clients uniformly", run_round, identified, self.min_train_nodes)
                shuffled = False
            if shuffled:
                grid = self.shuffled_round(grid, run_round)
                # Flower trains `fraction_train` of the grid's nodes, waiting for `min_available_nodes`; for a
                # grid that lists only the chosen clients (those still connected), both must mean "all of them".
                with overriding(self, fraction_train=1.0, min_available_nodes=0,
                                min_train_nodes=min(self.min_train_nodes, len(grid.get_node_ids()))):
                    messages = list(super().configure_train(run_round, arrays, config, grid))
            else:
                messages = list(super().configure_train(run_round, arrays, config, grid))
            self.recorder.sent(server_round, messages, phase="train")
            if self.client_of:  # partial participation: who was asked to train (-1: a node that joined later)
                self.recorder.note(train_clients=sorted(self.client_of.get(m.metadata.dst_node_id, -1) for m in messages))
            return messages

        def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
            replies = list(replies)
            kept, rejected = screen(self.run_round(server_round), replies, self.global_arrays, self.max_update_norm)
            self.recorder.received(server_round, kept, phase="train", rejected=len(rejected))
            usable = sum(not r.has_error() for r in kept)
            if usable < self.min_train_nodes:
                LOG.warning("round %d skipped: %d usable update(s) of %d sampled, fewer than strategy.min_train_clients = %d; "
                            "the global adapter stays as it was", self.run_round(server_round), usable,
                            int(self.recorder.current("clients_sampled", len(replies))),
                            self.min_train_nodes)
                self.recorder.note(skipped=1)
                return None, None
            with overriding(self, **self.scheduled_server_step(self.run_round(server_round))):
                arrays, metrics = super().aggregate_train(self.run_round(server_round), kept)
            return _like(arrays, self.global_arrays), metrics

        def scheduled_server_step(self, run_round: int) -> dict[str, float]:
            """This round's server step under strategy.server_lr_schedule = "linear" (nothing to override when constant)."""
            if self.server_step_decay is None:
                return {}
            attribute, rounds = self.server_step_decay
            step = {attribute: getattr(self, attribute) * max(rounds - run_round + 1, 1) / rounds}
            if hasattr(self, "server_opt"):  # FedAvgM decided when built whether to step at all (not at lr 1, no momentum)
                step["server_opt"] = True
            return step

        def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
            run_round = self.run_round(server_round)
            asking = self.fraction_evaluate > 0.0  # evaluation off: no nodes to wait for
            with overriding(self, **(self.connected(grid, run_round, self.min_evaluate_nodes, "evaluation") if asking else {})):
                grid = self.sampling(grid, run_round, self.fraction_evaluate, phase=1)
                messages = list(super().configure_evaluate(run_round, arrays, config, grid))
            self.recorder.sent(server_round, messages, phase="evaluate")
            return messages

        def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
            replies = list(replies)
            self.recorder.received(server_round, replies, phase="evaluate")
            # Evaluation metrics are averaged by examples, also where training averages uniformly (differential
            # privacy weighs every update alike, and evaluation replies carry no such weight).
            with overriding(self, **({"weighted_by_key": "num-examples"} if hasattr(self, "weighted_by_key") else {})):
                return super().aggregate_evaluate(self.run_round(server_round), replies)

    Recording.__name__ = Recording.__qualname__ = base.__name__
    return Recording


@contextmanager
def overriding(strategy: Strategy, **values: object) -> Iterator[None]:
    """The strategy's attributes set to `values` within the block, restored after it."""
    saved = {name: getattr(strategy, name) for name in values}
    for name, value in values.items():
        setattr(strategy, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(strategy, name, value)


def _like(arrays: ArrayRecord | None, reference: ArrayRecord) -> ArrayRecord | None:
    """`arrays` in the dtypes of `reference`: server optimizers (FedAdam & co.) compute in float64, and the
    adapter must not change dtype (or double its bytes) on the wire."""
    if arrays is None:
        return None
    return ArrayRecord({name: Array(np.asarray(value.numpy(), dtype=reference[name].dtype) if name in reference else value.numpy())
                        for name, value in arrays.items()})


def make_strategy(config: RunConfig, num_clients: int, recorder: RoundRecorder) -> Strategy:
    s = config.strategy
    common = dict(
        fraction_train=s.fraction_train,
        fraction_evaluate=s.fraction_evaluate,
        min_train_nodes=min(s.min_train_clients, num_clients),
        min_evaluate_nodes=min(s.min_evaluate_clients, num_clients),
        # Wait for every client before round 1: otherwise early rounds sample whoever registered first.
        min_available_nodes=num_clients,
    )
    if config.privacy.dp != "none":
        common["weighted_by_key"] = UNIFORM_WEIGHT_KEY  # the noise is calibrated to a uniform mean
    per_round = clients_per_round(config, num_clients)
    if s.name == "multikrum" and s.krum_select > per_round:  # Flower would average every update, silently
        raise ValueError(f"strategy.krum_select = {s.krum_select} exceeds the {per_round} clients sampled per round")
    server_lr = {"eta": s.server_lr} if s.server_lr else {}
    server_optimizer = dict(**server_lr, eta_l=config.train.lr, tau=s.tau)
    specific = {
        "fedavgm": dict(server_momentum=s.server_momentum, **({"server_learning_rate": s.server_lr} if s.server_lr else {})),
        "fedprox": dict(proximal_mu=s.proximal_mu),
        "fedadam": server_optimizer,
        "fedyogi": server_optimizer,
        "fedadagrad": server_optimizer,
        "fedtrimmedavg": dict(beta=s.trim_beta),
        "krum": dict(num_malicious_nodes=s.krum_malicious),
        "multikrum": dict(num_malicious_nodes=s.krum_malicious, num_nodes_to_select=s.krum_select
                          or max(1, per_round - s.krum_malicious)),
        "scaffold": dict(num_clients=num_clients, server_lr=s.server_lr or 1.0),
    }
    shuffled_per_round = per_round if s.sampling == "shuffled" else 0
    decay = (SERVER_STEP_ATTRIBUTES[s.name], s.num_rounds) if s.server_lr_schedule == "linear" else None
    strategy = _recording(STRATEGY_CLASSES[s.name])(
        recorder, max_update_norm=s.max_update_norm, seed=config.seed, shuffled_per_round=shuffled_per_round,
        server_step_decay=decay, node_wait_timeout=s.node_wait_timeout, **common, **specific.get(s.name, {}))
    return with_privacy(strategy, config, num_clients, recorder)
