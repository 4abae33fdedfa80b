"""What a client does with a message: local training and evaluation of its adapter on its private shard.

Called by the ClientApp (`client_app.py`) in its own process (simulation: the Ray actor, which keeps the
base cached across virtual clients and rounds) or in a SuperNode's long-running worker (`node_worker.py`).
Inputs and outputs are plain dicts and arrays so that they cross a process boundary unchanged.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..configuration import from_mapping
from ..data import make_loader
from ..training import (
    OptimizerStateError, TrainStats, evaluate, label_prior_adjustment, planned_steps, seed_everything, train,
)
from .config import RunConfig
from ..deploy.processes import stat_fields
from .mods import ROUND_OFFSET_KEY, RUN_CONFIG_KEY, UNIFORM_WEIGHT_KEY, client_id
from .head_calibration import feature_statistics
from .node_worker import node_state_dir
from .personalization import Fit, SharedWire, evaluate_client, train_client
from .scaffold import accepted_round, train_with_controls
from .task import ClientSite, client_data, model_and_tokenizer

Arrays = dict[str, np.ndarray]


def run_config_from_record(message_config: ConfigRecord | dict) -> RunConfig:
    return from_mapping(RunConfig, json.loads(str(message_config[RUN_CONFIG_KEY])))


def as_record(arrays: Arrays) -> ArrayRecord:
    """A message's tensors again, as the wire and the personalization modes take them."""
    return ArrayRecord({name: Array(value) for name, value in arrays.items()})


def client_site(node: dict, node_id: int) -> ClientSite:
    """The client this node serves: a partition of the run's data (simulation) or the node's own data file.

    A SuperNode's node config: `data-path` (required), `state-dir` (private state, default beside the data),
    `client-id` (the name in reports and seeds, default the node id).
    """
    if "partition-id" in node:
        return ClientSite(int(node["partition-id"]))
    if "data-path" not in node:
        raise ValueError("this SuperNode has no data: start it with --node-config \"data-path=/path/to/data.jsonl\"")
    data_path = str(Path(str(node["data-path"])).expanduser().resolve())
    return ClientSite(client_id(node, node_id), data_path, node_state_dir(node))


def train_locally(arrays: Arrays, message_config: dict, node: dict, node_id: int) -> tuple[Arrays, dict]:
    """Local training from the received shared tensors; returns the tensors to send back and the metrics."""
    process_age, started = _process_age(), time.perf_counter()
    config = run_config_from_record(message_config)
    model, tokenizer = model_and_tokenizer(config)
    site = client_site(node, node_id)
    server_round, mu = _round_and_mu(message_config)
    fit = local_fit(model, tokenizer, config, site, server_round, mu)
    setup = time.perf_counter() - started
    received = as_record(arrays)
    if config.strategy.name == "scaffold":
        sent, stats = train_with_controls(model, config, received, site.store(config), site.client, fit, server_round,
                                          accepted_round(message_config, site.client))
    else:
        sent, stats = train_client(model, config, received, site.store(config), site.client, fit)
    metrics = dict(train_metrics(stats, len(client_data(config, site)[0])))
    # What a call costs before training (model, data; in a fresh process also the imports before it).
    metrics.update({"setup-seconds": setup, "process-age-seconds": process_age})
    return {name: value.numpy() for name, value in sent.items()}, metrics


def _process_age() -> float:
    """Seconds since this process started (Linux /proc); in a fresh ClientApp process, the start-up cost."""
    start_ticks = int(stat_fields()[19])
    return float(Path("/proc/uptime").read_text().split()[0]) - start_ticks / os.sysconf("SC_CLK_TCK")


def _round_and_mu(message_config: ConfigRecord | dict) -> tuple[int, float]:
    """The run's round (a resumed run's messages count from 1 again) and FedProx's mu (0 if not FedProx)."""
    server_round = int(message_config["server-round"]) + int(message_config.get(ROUND_OFFSET_KEY, 0))
    return server_round, float(message_config.get("proximal-mu", 0.0))


def local_fit(model: nn.Module, tokenizer: PreTrainedTokenizerBase, config: RunConfig, site: ClientSite, server_round: int,
              strategy_mu: float = 0.0) -> Fit:
    """Seeded local training on this client's shard; each call of the result starts from the same seed."""
    train_set, _ = client_data(config, site)
    # Each (round, client) repeats exactly, in any actor or process.
    call_seed = (config.seed + 7919 * server_round + site.client) % 2**32
    t = config.train
    adjustment = None
    if t.logit_adjustment:
        adjustment = label_prior_adjustment(train_set["labels"], config.model.num_labels, t.logit_adjustment)
    moments = site.optimizer_store(config) if t.keep_optimizer_state else None

    def fit(max_steps: int | None = None, prox_mu: float | None = None, prox_reference: dict | None = None,
            grad_correction: dict | None = None) -> TrainStats:
        seed_everything(call_seed)
        loader = make_loader(train_set, tokenizer, t.batch_size, shuffle=True, seed=call_seed, task=config.model.task)
        round_training = max_steps is None  # not a side job of k steps (personal fine-tuning: own schedule, plain loss)
        schedule = {}
        if round_training and t.lr_schedule == "across_rounds":
            steps = planned_steps(loader, t.local_epochs, t.local_steps or None)
            schedule = dict(schedule_start=(server_round - 1) * steps, schedule_steps=config.strategy.num_rounds * steps)
        state = (moments.load(site.client) or {}) if moments is not None and round_training else None
        try:
            stats = train(model, loader, epochs=t.local_epochs, max_steps=max_steps or t.local_steps or None, **schedule,
                          **t.train_kwargs(), logit_adjustment=adjustment if round_training else None,
                          prox_mu=strategy_mu if prox_mu is None else prox_mu, prox_reference=prox_reference,
                          grad_correction=grad_correction, optimizer_state=state)
        except OptimizerStateError as error:
            raise OptimizerStateError(f"{error} ({moments.path(site.client)}); delete the file to restart that client's "
                                      "optimizer") from None
        if state is not None:
            moments.save(site.client, state)
        return stats

    return fit


def train_metrics(stats: TrainStats, num_examples: int) -> MetricRecord:
    return MetricRecord({
        "num-examples": num_examples,
        UNIFORM_WEIGHT_KEY: 1,
        "train-loss": stats.loss,
        "train-seconds": stats.seconds,
        "train-steps": stats.steps,
        "train-examples-seen": stats.examples,  # examples passed through training (num-examples: the shard's size)
        "ray-gpu": _assigned_gpu(),
        "peak-rss-mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux reports KiB
    })


def _assigned_gpu() -> int:
    """The GPU Ray assigned to this actor (-1: none, or not under Ray), to show how clients were placed."""
    ray = sys.modules.get("ray")  # never imported here: a SuperNode's ClientApp process does not need it
    ids = ray.get_gpu_ids() if ray is not None and ray.is_initialized() else []
    return int(ids[0]) if ids else -1


def evaluate_locally(arrays: Arrays, message_config: dict, node: dict, node_id: int) -> dict:
    """The global model's and the client's personal model's metrics on its local test split."""
    config = run_config_from_record(message_config)
    model, tokenizer = model_and_tokenizer(config)
    site = client_site(node, node_id)
    _, test_set = client_data(config, site)
    t = config.train

    def evaluate_now() -> dict[str, float]:
        loader = make_loader(test_set, tokenizer, t.eval_batch_size, task=config.model.task)
        return evaluate(model, loader, device=t.device, amp=t.amp)

    fit = local_fit(model, tokenizer, config, site, *_round_and_mu(message_config))
    received = as_record(arrays)
    global_metrics, personal = evaluate_client(model, config, received, site.store(config), site.client, evaluate_now, fit)
    # A client sampled in no round has no private part of its own yet: its personal model is the initial one.
    trained = not config.personalization.keeps_private_part or site.store(config).holds(site.client)
    record = {"num-examples": len(test_set), "partition-id": site.client, "personal-trained": int(trained)}
    for prefix, metrics in (("", global_metrics), ("personal-", personal)):
        record.update({prefix + k.replace("_", "-"): v for k, v in metrics.items() if k != "num_examples"})
    return record


def statistics_locally(arrays: Arrays, message_config: dict, node: dict, node_id: int) -> tuple[Arrays, dict]:
    """Class feature statistics of this client's training split under the received adapter (head calibration)."""
    config = run_config_from_record(message_config)
    model, tokenizer = model_and_tokenizer(config)
    site = client_site(node, node_id)
    train_set, _ = client_data(config, site)
    SharedWire(config).load(model, as_record(arrays))
    loader = make_loader(train_set, tokenizer, config.train.eval_batch_size, task=config.model.task)
    statistics = feature_statistics(model, loader, config.model.num_labels, config.train.device)
    return statistics, {"num-examples": len(train_set), "partition-id": site.client}


HANDLERS = {"train": train_locally, "evaluate": evaluate_locally, "statistics": statistics_locally}
