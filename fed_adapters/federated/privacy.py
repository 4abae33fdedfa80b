"""Differential privacy of the aggregated adapter: clipping on the client, noise on the server, epsilon accounted.

Flower's `DifferentialPrivacyClientSideFixedClipping` sends the clipping norm with every training message,
`fixedclipping_mod` clips each client's update (reply minus received adapter) to that L2 norm before it
leaves the client, and the wrapper adds Gaussian noise of std `noise_multiplier * clipping_norm / n` to the
uniform mean of the n clipped updates. One client then moves the mean by at most `clipping_norm / n`, which is
what the noise is calibrated to; an example-weighted mean would break that bound, hence uniform weights.

Epsilon comes from Flower's RDP accountant (Google's dp-accounting) with no credit for client sampling: an
upper bound that holds however the server samples.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, Strategy
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from .config import RunConfig
from .recording import RoundRecorder
from .validation import LOG, screen

def clients_per_round(config: RunConfig, num_clients: int) -> int:
    """How many clients Flower's FedAvg samples per training round (its own formula)."""
    s = config.strategy
    return max(int(num_clients * s.fraction_train), min(s.min_train_clients, num_clients))


class AccountedClientSideClipping(DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side-clipping DP wrapper that also records the noise and the epsilon spent per round.

    Flower's own accounting refuses wrapped (recording) FedAvg subclasses, so the accountant runs here.
    """

    def __init__(self, strategy: Strategy, config: RunConfig, num_clients: int, recorder: RoundRecorder) -> None:
        p = config.privacy
        self.sample_size = clients_per_round(config, num_clients)
        super().__init__(strategy, p.noise_multiplier, p.clipping_norm, self.sample_size)
        self.population = num_clients
        self.recorder = recorder
        self.ledger = RdpAccountant(PrivacyConfig(
            target_delta=p.target_delta, population_size=num_clients,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE, sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )) if p.noise_multiplier > 0 else None

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        failed = sum(r.has_error() for r in replies)
        if failed:  # Flower's wrapper refuses the round before the recording strategy would see it: record it here
            LOG.warning("round %d skipped: %d of %d sampled client(s) failed, and differential privacy aggregates only "
                        "complete rounds", self.recorder.offset + server_round, failed, len(replies))
            # Screened as the recording strategy would: a malformed reply beside the failure must not crash the record.
            kept, rejected = screen(self.recorder.offset + server_round, replies, self.strategy.global_arrays,
                                    self.strategy.max_update_norm)
            self.recorder.received(server_round, kept, phase="train", rejected=len(rejected))
            self.recorder.note(skipped=1)
            return None, None
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:
            # The noise is calibrated to a mean over the sampled clients; a mean over fewer (updates rejected by
            # strategy.max_update_norm) moves further per client, so this round's noise multiplier is lower.
            averaged = int(self.recorder.current("clients_replied", self.sample_size))
            multiplier = self.noise_multiplier * min(averaged, self.sample_size) / self.sample_size
            fields = {"dp_noise_std": self.noise_multiplier * self.clipping_norm / self.sample_size,
                      "dp_noise_multiplier": multiplier}
            if self.ledger is not None:
                self.ledger.compose(GaussianPrivacyEvent(multiplier, self.sample_size, self.population))
                fields["dp_epsilon"] = self.ledger.get_privacy_spent().epsilon
            else:
                fields["dp_epsilon"] = float("inf")  # clipping without noise protects nothing
            self.recorder.note(**fields)
        return arrays, metrics


def with_privacy(strategy: Strategy, config: RunConfig, num_clients: int, recorder: RoundRecorder) -> Strategy:
    """`strategy` wrapped for the run's `[privacy]` settings."""
    if config.privacy.dp == "central":
        return AccountedClientSideClipping(strategy, config, num_clients, recorder)
    return strategy
