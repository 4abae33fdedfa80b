"""SCAFFOLD (Karimireddy et al. 2020): control variates that correct each client's drift under data skew.

Under label skew a client's local steps pull the adapter toward its own labels (client drift). SCAFFOLD
keeps a server control variate c (an estimate of the global gradient, one tensor per shared tensor) and one
per client, c_i (an estimate of that client's gradient, kept in its `PrivateStore`). Each local step follows
g + c - c_i: the client's gradient with its own bias swapped for the federation's. After training,

    c_i+ = c_i - c + (x - y_i) / (lr x schedule_sum)      (the paper's option II; x received, y_i trained)

and the client replies y_i with dc_i = c_i+ - c_i. The server averages the y_i as FedAvg does (example-
weighted) and moves c by (replied / all clients) x the example-weighted mean of the dc_i. c travels down
and dc_i up beside the adapter, named CONTROL_PREFIX + tensor name: twice FedAvg's bytes. The correction is
a gradient correction, so local training must be plain SGD (`train.optimizer = "sgd"`).

c stays the mean of the c_i only if a client's c_i moves exactly when the server counts its dc_i. An update
can be rejected (validation), lost, or land in a skipped round, so the client keeps c_i+ as pending and the
server lists, in every training message, the last round it aggregated from each client: at its next round the
client takes c_i+ if that round is its pending one, and drops it otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from torch import nn

from ..adapters import head_parameter_names, set_active_adapter
from ..training import TrainStats
from .config import RunConfig
from .mods import ACCEPTED_CLIENTS_KEY, ACCEPTED_ROUNDS_KEY, CONTROL_PREFIX, split_controls
from .personalization import SHARED, Fit, SharedWire, shared_parameters, snapshot
from .private_store import PrivateStore
from .sampling import identify_clients
from .validation import LOG

PENDING = "pending/"  # in a client's store: c_i+ of its last update, until the server says whether it counted
PENDING_ROUND = "pending-round"  # the round that update came from


def with_zero_controls(arrays: ArrayRecord) -> ArrayRecord:
    """The initial global record: the adapter and a zero server control variate for each of its tensors."""
    controls = {CONTROL_PREFIX + k: Array(np.zeros_like(v.numpy())) for k, v in arrays.items()}
    return ArrayRecord({**dict(arrays.items()), **controls})


class Scaffold(FedAvg):
    """FedAvg of the adapter (with an optional server step size) plus SCAFFOLD's server control variate."""

    def __init__(self, num_clients: int, server_lr: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_clients = num_clients
        self.server_lr = server_lr
        self.sent = ArrayRecord()
        # client id -> the last round whose update from that client was aggregated (checkpointed with the run)
        self.accepted_rounds: dict[int, int] = {}
        # node id -> client id; the same attribute the recording wrapper's sampling fills (strategies.py)
        self.client_of: dict[int, int] = {}

    def start(self, grid: Grid, initial_arrays: ArrayRecord, **kwargs) -> Result:
        """A fresh run starts from zero control variates; a resumed one brings its checkpointed ones."""
        if not split_controls(initial_arrays)[1]:
            initial_arrays = with_zero_controls(initial_arrays)
        return super().start(grid=grid, initial_arrays=initial_arrays, **kwargs)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.sent = arrays
        self.client_of = identify_clients(grid, self.min_available_nodes, self.client_of)
        clients = sorted(self.accepted_rounds)
        config = ConfigRecord({**config, ACCEPTED_CLIENTS_KEY: clients,
                               ACCEPTED_ROUNDS_KEY: [self.accepted_rounds[c] for c in clients]})
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        anonymous = sorted(r.metadata.src_node_id for r in replies
                           if not r.has_error() and r.metadata.src_node_id not in self.client_of)
        if anonymous:
            LOG.warning("round %d: left out the update(s) of node(s) %s, which have not said which client they serve: "
                        "SCAFFOLD could not tell them whether their update counted", server_round, anonymous)
            replies = [r for r in replies if r.has_error() or r.metadata.src_node_id in self.client_of]
        mean, metrics = super().aggregate_train(server_round, replies)
        if mean is None:
            return None, metrics
        for reply in replies:
            if not reply.has_error():
                self.accepted_rounds[self.client_of[reply.metadata.src_node_id]] = server_round
        share = sum(not r.has_error() for r in replies) / self.num_clients
        updated = {}
        for name, value in mean.items():
            old = self.sent[name].numpy()
            step = share * value.numpy() if name.startswith(CONTROL_PREFIX) else self.server_lr * (value.numpy() - old)
            updated[name] = Array(np.asarray(old + step, dtype=old.dtype))
        return ArrayRecord(updated), metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Evaluation needs only the adapter: the control variates stay home."""
        return super().configure_evaluate(server_round, split_controls(arrays)[0], config, grid)


def accepted_round(message_config: dict, client: int) -> int:
    """The last round whose update from `client` the server aggregated, as its training message says (0: none)."""
    ledger = dict(zip(message_config.get(ACCEPTED_CLIENTS_KEY, []), message_config.get(ACCEPTED_ROUNDS_KEY, [])))
    return int(ledger.get(client, 0))


def counted_control(saved: dict[str, torch.Tensor] | None, accepted: int) -> dict[str, torch.Tensor] | None:
    """The client's c_i as the server counts it: the pending c_i+ if the server aggregated the update it came
    with (`accepted` is its round), otherwise the c_i before it. None before the client's first round."""
    if saved is None:
        return None
    pending = {k.removeprefix(PENDING): v for k, v in saved.items() if k.startswith(PENDING)}
    if pending and int(saved[PENDING_ROUND]) == accepted:
        return pending
    return {k: v for k, v in saved.items() if not k.startswith(PENDING) and k != PENDING_ROUND}


def train_with_controls(model: nn.Module, config: RunConfig, arrays: ArrayRecord, store: PrivateStore, client: int,
                        fit: Fit, server_round: int, accepted: int) -> tuple[ArrayRecord, TrainStats]:
    """One SCAFFOLD round on one client: corrected local SGD, then c_i+ kept as pending and dc_i sent with y_i.
    `accepted`: the last round the server aggregated from this client (`accepted_round`)."""
    shared, server_control = split_controls(arrays)
    wire = SharedWire(config)
    wire.load(model, shared)
    set_active_adapter(model, SHARED)
    params = shared_parameters(model, config)
    received = {k: v.cpu() for k, v in snapshot(params).items()}  # the control arithmetic runs on the CPU
    own = counted_control(store.load(client), accepted) or {k: torch.zeros_like(v) for k, v in received.items()}
    if set(own) != set(received) or set(server_control) != set(received):
        raise ValueError(f"client {client}'s control variate ({store.path(client)}) or the server's does not match the "
                         "adapter; was the run started with another adapter config? Delete the file to reset it")
    control = {k: torch.from_numpy(server_control[k]).to(received[k].dtype) for k in received}
    full_name = {id(p): n for n, p in model.named_parameters()}
    stats = fit(grad_correction={full_name[id(p)]: control[k] - own[k] for k, p in params.items()})

    head = set(head_parameter_names(model))
    t = config.train
    updated = {}
    for key, param in params.items():
        lr = t.head_lr if t.head_lr and full_name[id(param)] in head else t.lr
        drift = (received[key] - param.detach().cpu()) / (lr * stats.schedule_sum)
        updated[key] = own[key] - control[key] + drift
    store.save(client, {**own, **{PENDING + k: v for k, v in updated.items()},
                        PENDING_ROUND: torch.tensor(server_round, dtype=torch.int64)})
    reply = wire.pack(model)
    for key in updated:
        reply[CONTROL_PREFIX + key] = Array((updated[key] - own[key]).numpy())
    return reply, stats
