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
from .mods import CONTROL_PREFIX, split_controls
from .personalization import SHARED, Fit, SharedWire, shared_parameters, snapshot
from .private_store import PrivateStore


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

    def start(self, grid: Grid, initial_arrays: ArrayRecord, **kwargs) -> Result:
        """A fresh run starts from zero control variates; a resumed one brings its checkpointed ones."""
        if not split_controls(initial_arrays)[1]:
            initial_arrays = with_zero_controls(initial_arrays)
        return super().start(grid=grid, initial_arrays=initial_arrays, **kwargs)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.sent = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        mean, metrics = super().aggregate_train(server_round, replies)
        if mean is None:
            return None, metrics
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


def train_with_controls(model: nn.Module, config: RunConfig, arrays: ArrayRecord, store: PrivateStore, client: int,
                        fit: Fit) -> tuple[ArrayRecord, TrainStats]:
    """One SCAFFOLD round on one client: corrected local SGD, then the new c_i kept and dc_i sent with y_i."""
    shared, server_control = split_controls(arrays)
    wire = SharedWire(config)
    wire.load(model, shared)
    set_active_adapter(model, SHARED)
    params = shared_parameters(model, config)
    received = {k: v.cpu() for k, v in snapshot(params).items()}  # the control arithmetic runs on the CPU
    own = store.load(client) or {k: torch.zeros_like(v) for k, v in received.items()}
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
    store.save(client, updated)
    reply = wire.pack(model)
    for key in updated:
        reply[CONTROL_PREFIX + key] = Array((updated[key] - own[key]).numpy())
    return reply, stats
