"""Flower's strategies, chosen by name, each wrapped so that every message it sends or receives is recorded."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
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
    Strategy,
)

from .config import RunConfig
from .mods import UNIFORM_WEIGHT_KEY
from .privacy import with_privacy
from .validation import LOG, screen
from .recording import RoundRecorder

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
}


def _recording(base: type[Strategy]) -> type[Strategy]:
    """`base` with its message traffic reported to a RoundRecorder (bytes, tensor names, replies, failures)."""

    class Recording(base):  # type: ignore[valid-type, misc]
        def __init__(self, recorder: RoundRecorder, max_update_norm: float = 0.0, **kwargs) -> None:
            super().__init__(**kwargs)
            self.recorder = recorder
            self.max_update_norm = max_update_norm
            self.global_arrays = ArrayRecord()

        def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
            self.global_arrays = arrays  # what every update is checked against
            messages = list(super().configure_train(server_round, arrays, config, grid))
            self.recorder.sent(server_round, messages, phase="train")
            return messages

        def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
            replies = list(replies)
            kept, rejected = screen(server_round, replies, self.global_arrays, self.max_update_norm)
            self.recorder.received(server_round, kept, phase="train", rejected=len(rejected))
            usable = sum(not r.has_error() for r in kept)
            if usable < self.min_train_nodes:
                LOG.warning("round %d skipped: %d usable update(s) of %d sampled, fewer than strategy.min_train_clients = %d; "
                            "the global adapter stays as it was", server_round, usable, len(replies), self.min_train_nodes)
                self.recorder.note(skipped=1)
                return None, None
            return super().aggregate_train(server_round, kept)

        def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
            messages = list(super().configure_evaluate(server_round, arrays, config, grid))
            self.recorder.sent(server_round, messages, phase="evaluate")
            return messages

        def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
            replies = list(replies)
            self.recorder.received(server_round, replies, phase="evaluate")
            return super().aggregate_evaluate(server_round, replies)

    Recording.__name__ = Recording.__qualname__ = base.__name__
    return Recording


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
    }
    strategy = _recording(STRATEGY_CLASSES[s.name])(recorder, s.max_update_norm, **common, **specific.get(s.name, {}))
    return with_privacy(strategy, config, num_clients, recorder)
