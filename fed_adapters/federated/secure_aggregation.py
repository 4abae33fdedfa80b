"""Secure aggregation (SecAgg+, Bell et al. 2020): the server learns only the sum of the clients' adapters.

Flower 1.41 runs SecAgg+ through its legacy workflow (`SecAggPlusWorkflow` + legacy `FedAvg` on the
server, `secaggplus_mod` on the client), not through the Message-API strategies. Each client scales its
adapter by num_examples / max_weight, clips it to +-clipping_range, quantizes it and adds pairwise masks
that cancel only in the sum; the server sees masked integer vectors and the unmasked aggregate. The
result is FedAvg's example-weighted mean up to quantization error.

The ClientApp stays one app: `mods.secure_when_asked` runs Flower's mod only for SecAgg+ messages, and the
train handler answers the legacy fit format (`mods.is_secure_fit` / `mods.secure_fit_reply`) with the same
local training as the plain path. Legacy messages carry tensors as an ordered list, so the server sends the
tensor names with the fit config. Still visible to the server: each client's num_examples and metrics.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from ..configuration import ConfigError
from .config import RunConfig
from .mods import NAMES_KEY, named
from .privacy import clients_per_round
from .recording import RoundRecorder

MODULUS = 2**32  # SecAggPlusWorkflow's default modulus_range: the masked vectors are summed modulo it


# --- server side ---------------------------------------------------------------------------------------

class _TrafficGrid:
    """The server's Grid, with every SecAgg+ stage's traffic added to the round's record."""

    def __init__(self, grid: Grid, recorder: RoundRecorder) -> None:
        self._grid = grid
        self._recorder = recorder

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        if messages and messages[0].metadata.group_id != "0":
            ok = [r for r in replies if not r.has_error()]  # errors and time-outs (no reply at all) count as failed
            masked = sum(RECORD_KEY_CONFIGS in r.content.config_records and _carries_masked_vector(r) for r in ok)
            self._recorder.add(int(messages[0].metadata.group_id), bytes_down=sum(map(_payload_bytes, messages)),
                               bytes_up=sum(map(_payload_bytes, ok)), clients_failed=len(messages) - len(ok),
                               clients_replied=masked)
            self._recorder.note(clients_sampled=max(len(messages), self._recorder.current("clients_sampled", 0)))
        return replies

    def __getattr__(self, name: str):  # get_node_ids, run, ...
        return getattr(self._grid, name)


def _carries_masked_vector(reply: Message) -> bool:
    return Key.MASKED_PARAMETERS in reply.content.config_records[RECORD_KEY_CONFIGS]


def _payload_bytes(message: Message) -> int:
    """Tensor bytes plus the protocol's byte strings (keys, shares, masked vectors) of a message."""
    content = message.content
    size = sum(record.count_bytes() for record in content.array_records.values())
    for record in content.config_records.values():
        for value in record.values():
            items = value if isinstance(value, list) else [value]
            size += sum(len(item) for item in items if isinstance(item, bytes))
    return size


def secure_workflow(config: RunConfig) -> SecAggPlusWorkflow:
    """Flower's SecAgg+ workflow with the run's settings (built in the preflight too, for its argument checks)."""
    p = config.privacy
    return SecAggPlusWorkflow(
        num_shares=p.secagg_shares or 1.0, reconstruction_threshold=p.secagg_threshold, max_weight=p.secagg_max_weight,
        clipping_range=p.secagg_clipping_range, quantization_range=p.secagg_quantization_range,
        timeout=config.strategy.round_timeout,
    )


def check_secure_settings(config: RunConfig, shard_sizes: list[int]) -> None:
    """Settings under which SecAgg+ would run and yet train nothing, or sum wrongly, refused before the run:
    Flower's own argument checks, a client heavier than `secagg_max_weight` (each client checks its own update
    too, `mods.check_secure_scaling`: a deployed server never sees shard sizes), a threshold above the clients
    that hold shares (every round halts at its set-up), and quantized sums that overflow the 2^32 modulus (the
    mean comes out wrong without an error)."""
    p, num_clients, largest = config.privacy, len(shard_sizes), max(shard_sizes)
    if largest > p.secagg_max_weight:
        raise ConfigError(f"privacy.secagg_max_weight = {p.secagg_max_weight:g} is below the largest client's {largest} "
                          f"training examples: SecAgg+ expects num_examples <= max_weight (it scales each update by their "
                          f"ratio before clipping it, and sums the weights modulo 2^32); set privacy.secagg_max_weight >= "
                          f"{largest}")
    try:
        secure_workflow(config)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"privacy.secagg_* settings refused by Flower's SecAgg+ workflow: {error}") from None
    per_round = clients_per_round(config, num_clients)
    holders = min(p.secagg_shares or per_round, per_round)
    if p.secagg_threshold > holders:
        shares = f", secagg_shares = {p.secagg_shares}" if p.secagg_shares else ""
        raise ConfigError(f"privacy.secagg_threshold = {p.secagg_threshold} exceeds the {holders} clients that hold key "
                          f"shares each round ({per_round} sampled{shares}): SecAgg+ would halt every round at its "
                          f"set-up; set it to at most {holders}")
    if p.secagg_quantization_range * per_round >= MODULUS:
        raise ConfigError(f"privacy.secagg_quantization_range = {p.secagg_quantization_range} x {per_round} clients per round "
                          f"reaches 2^32: the masked sums would overflow and the mean come out wrong; set it below "
                          f"{MODULUS // per_round}")


def run_secure_rounds(
    grid: Grid, config: RunConfig, initial: ArrayRecord, fit_config: ConfigRecord, num_clients: int,
    recorder: RoundRecorder, evaluate_global: Callable[[int, ArrayRecord], MetricRecord], done: int = 0,
) -> ArrayRecord:
    """The rounds after `done` of FedAvg through SecAgg+; returns the final shared arrays."""
    s = config.strategy
    names = list(initial.keys())

    def round_config(server_round: int) -> dict:
        return {**dict(fit_config), NAMES_KEY: json.dumps(names), "server-round": server_round}

    def evaluate(server_round: int, ndarrays: list[np.ndarray], _: dict) -> tuple[float, dict]:
        metrics = evaluate_global(server_round, named(names, ndarrays))
        return float(metrics["loss"]), dict(metrics)

    strategy = LegacyFedAvg(
        fraction_fit=s.fraction_train, fraction_evaluate=0.0, min_fit_clients=min(s.min_train_clients, num_clients),
        min_available_clients=num_clients, on_fit_config_fn=round_config, evaluate_fn=evaluate,
        initial_parameters=ndarrays_to_parameters([a.numpy() for a in initial.values()]),
    )
    context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=s.num_rounds - done, round_timeout=s.round_timeout),
                           strategy=strategy)
    secure = secure_workflow(config)
    # A round that loses too many clients is skipped by Flower (logged); its record shows clients_replied.
    DefaultWorkflow(fit_workflow=secure, evaluate_workflow=lambda *_: None)(_TrafficGrid(grid, recorder), legacy)
    return named(names, context.state.array_records["parameters"].to_numpy_ndarrays())
