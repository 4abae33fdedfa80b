"""The Flower ClientApp: a client trains and evaluates only its adapter (and head) on its private shard.

The run's configuration arrives with every message (`config["run-config"]`, JSON), so the same ClientApp
serves `fed-adapters simulate`, `flwr run` and deployed SuperNodes. Replies carry the adapter and head
tensors and metrics, nothing of the frozen base.
"""

from __future__ import annotations

import json

import ray
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..adapters import adapter_state_dict
from ..configuration import from_mapping
from ..data import make_loader
from ..training import evaluate, seed_everything, train
from .config import RunConfig
from .task import client_data, load_arrays, model_and_tokenizer

RUN_CONFIG_KEY = "run-config"

app = ClientApp()


def run_config_from_message(msg: Message) -> RunConfig:
    return from_mapping(RunConfig, json.loads(msg.content["config"][RUN_CONFIG_KEY]))


def partition_id(context: Context) -> int:
    return int(context.node_config["partition-id"])


@app.train()
def train_adapter(msg: Message, context: Context) -> Message:
    config = run_config_from_message(msg)
    model, tokenizer = model_and_tokenizer(config)
    load_arrays(model, msg.content["arrays"])
    client = partition_id(context)
    train_set, _ = client_data(config, client)
    server_round = int(msg.content["config"]["server-round"])
    call_seed = config.seed + 7919 * server_round + client  # each (round, client) repeats exactly, in any actor
    seed_everything(call_seed)
    t = config.train
    loader = make_loader(train_set, tokenizer, t.batch_size, shuffle=True, seed=call_seed, task=config.model.task)
    stats = train(model, loader, epochs=t.local_epochs, max_steps=t.local_steps or None, **t.train_kwargs(),
                  prox_mu=float(msg.content["config"].get("proximal-mu", 0.0)))
    metrics = MetricRecord({
        "num-examples": len(train_set),
        "train-loss": stats.loss,
        "train-seconds": stats.seconds,
        "train-steps": stats.steps,
        "ray-gpu": _assigned_gpu(),
    })
    content = RecordDict({"arrays": ArrayRecord(adapter_state_dict(model)), "metrics": metrics})
    return Message(content=content, reply_to=msg)


def _assigned_gpu() -> int:
    """The GPU Ray assigned to this actor (-1: none, or not under Ray), to show how clients were placed."""
    ids = ray.get_gpu_ids() if ray.is_initialized() else []
    return int(ids[0]) if ids else -1


@app.evaluate()
def evaluate_adapter(msg: Message, context: Context) -> Message:
    config = run_config_from_message(msg)
    model, tokenizer = model_and_tokenizer(config)
    load_arrays(model, msg.content["arrays"])
    _, test_set = client_data(config, partition_id(context))
    t = config.train
    metrics = evaluate(model, make_loader(test_set, tokenizer, t.eval_batch_size, task=config.model.task), device=t.device, amp=t.amp)
    record = {"num-examples": len(test_set), **{k.replace("_", "-"): v for k, v in metrics.items() if k != "num_examples"}}
    return Message(content=RecordDict({"metrics": MetricRecord(record)}), reply_to=msg)
