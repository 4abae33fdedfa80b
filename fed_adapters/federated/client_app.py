"""The Flower ClientApp: a client trains and evaluates only its adapter (and head) on its private shard.

The run's configuration arrives with every message (`config["run-config"]`, JSON), so the same ClientApp
serves `fed-adapters simulate`, `flwr run` and deployed SuperNodes. Replies carry the shared adapter (and
head) tensors and metrics, nothing of the frozen base and nothing a personalization mode keeps private.
"""

from __future__ import annotations

import json
import resource

import ray
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..configuration import from_mapping
from ..data import make_loader
from ..training import TrainStats, evaluate, seed_everything, train
from .config import RunConfig
from .personalization import Fit, evaluate_client, train_client
from .private_store import PrivateStore
from .task import client_data, model_and_tokenizer

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
    client = partition_id(context)
    fit = local_fit(model, tokenizer, config, client, *_round_and_mu(msg))
    arrays, stats = train_client(model, config, msg.content["arrays"], PrivateStore(config.private_state_dir), client, fit)
    return reply(msg, arrays, train_metrics(stats, len(client_data(config, client)[0])))


def _round_and_mu(msg: Message) -> tuple[int, float]:
    """The server round and FedProx's mu (0 for other strategies) of a message."""
    return int(msg.content["config"]["server-round"]), float(msg.content["config"].get("proximal-mu", 0.0))


def local_fit(model: nn.Module, tokenizer: PreTrainedTokenizerBase, config: RunConfig, client: int, server_round: int,
              strategy_mu: float = 0.0) -> Fit:
    """Seeded local training on this client's shard; each call of the result starts from the same seed."""
    train_set, _ = client_data(config, client)
    call_seed = config.seed + 7919 * server_round + client  # each (round, client) repeats exactly, in any actor
    t = config.train

    def fit(max_steps: int | None = None, prox_mu: float | None = None, prox_reference: dict | None = None) -> TrainStats:
        seed_everything(call_seed)
        loader = make_loader(train_set, tokenizer, t.batch_size, shuffle=True, seed=call_seed, task=config.model.task)
        return train(model, loader, epochs=t.local_epochs, max_steps=max_steps or t.local_steps or None,
                     **t.train_kwargs(), prox_mu=strategy_mu if prox_mu is None else prox_mu, prox_reference=prox_reference)

    return fit


def train_metrics(stats: TrainStats, num_examples: int) -> MetricRecord:
    return MetricRecord({
        "num-examples": num_examples,
        "train-loss": stats.loss,
        "train-seconds": stats.seconds,
        "train-steps": stats.steps,
        "ray-gpu": _assigned_gpu(),
        "peak-rss-mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux reports KiB
    })


def reply(msg: Message, arrays: ArrayRecord, metrics: MetricRecord) -> Message:
    return Message(content=RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


def _assigned_gpu() -> int:
    """The GPU Ray assigned to this actor (-1: none, or not under Ray), to show how clients were placed."""
    ids = ray.get_gpu_ids() if ray.is_initialized() else []
    return int(ids[0]) if ids else -1


@app.evaluate()
def evaluate_adapter(msg: Message, context: Context) -> Message:
    """The global model's and the client's personal model's metrics on its local test split."""
    config = run_config_from_message(msg)
    model, tokenizer = model_and_tokenizer(config)
    client = partition_id(context)
    _, test_set = client_data(config, client)
    t = config.train

    def evaluate_now() -> dict[str, float]:
        loader = make_loader(test_set, tokenizer, t.eval_batch_size, task=config.model.task)
        return evaluate(model, loader, device=t.device, amp=t.amp)

    fit = local_fit(model, tokenizer, config, client, *_round_and_mu(msg))
    global_metrics, personal = evaluate_client(model, config, msg.content["arrays"], PrivateStore(config.private_state_dir),
                                               client, evaluate_now, fit)
    record = {"num-examples": len(test_set), "partition-id": client}
    for prefix, metrics in (("", global_metrics), ("personal-", personal)):
        record.update({prefix + k.replace("_", "-"): v for k, v in metrics.items() if k != "num_examples"})
    return Message(content=RecordDict({"metrics": MetricRecord(record)}), reply_to=msg)
