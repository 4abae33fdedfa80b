"""Per-process state of a federated run: the frozen base (built once) and the data shards.

Ray keeps a simulation's actors alive for the whole run and Flower calls the ClientApp in them for every
virtual client and round. Building a transformer per call would dominate the round time, so the base with
its adapter is cached here, in an importable module, keyed by everything that shapes it; a client call
only overwrites the adapter and head tensors with the ones in the message.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import datasets
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..adapters import add_adapter
from ..configuration import ConfigError
from ..data import held_out_subset, load_split, tokenize_dataset
from ..modeling import load_model, load_tokenizer
from ..training import seed_everything
from .config import RunConfig
from .partition import ClientShard, client_shards, split_shard
from .personalization import SHARED, prepare_model
from .private_store import PrivateStore

_MODELS: dict[str, nn.Module] = {}
_SHARDS: dict[str, list[ClientShard]] = {}
_TOKENIZED: dict[tuple[str, int | str, str], datasets.Dataset] = {}


def _key(*parts: object) -> str:
    return json.dumps(parts, sort_keys=True, default=str)


def model_and_tokenizer(config: RunConfig) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """The base with its adapter, built on first use in this process and reused afterwards."""
    # The seed too: it sets the initial private parts (a long-lived node worker serves run after run).
    key = _key(config.model, config.adapter.to_adapter_config().to_dict(), config.personalization, config.seed)
    if key not in _MODELS:
        _MODELS[key] = build_adapted_model(config)
    return _MODELS[key], tokenizer(config.model.name)


def build_adapted_model(config: RunConfig) -> nn.Module:
    """The base loaded from disk (or the Hub) with the run's shared adapter and the personalization mode's
    private modules; seeded, so every process builds the same initial weights."""
    seed_everything(config.seed)
    m = config.model
    model = load_model(m.name, task=m.task, num_labels=m.num_labels, pooling=m.pooling)
    add_adapter(model, config.adapter.to_adapter_config(), SHARED)
    prepare_model(model, config)
    return model


def checked_model(config: RunConfig) -> nn.Module:
    """`build_adapted_model`, in the process that starts a run, so that a model that cannot serve it fails there
    (unknown, unreadable, without adapter points or tokenizer, shorter than `model.max_length`), not mid-run."""
    model = build_adapted_model(config)
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions and config.model.max_length > positions:
        raise ConfigError(f"model.max_length = {config.model.max_length} exceeds the {positions} positions "
                          f"{config.model.name} has; set model.max_length <= {positions}")
    tokenizer(config.model.name)  # cached: the server reuses it
    return model


@functools.cache
def tokenizer(model_name: str) -> PreTrainedTokenizerBase:
    return load_tokenizer(model_name)


def training_data(config: RunConfig) -> datasets.Dataset:
    d = config.data
    dataset = load_split(d.source, d.train_split, d.data_root or None, d.subset or None)
    if d.train_size:
        dataset = dataset.shuffle(seed=config.seed).select(range(min(d.train_size, len(dataset))))
    return dataset


def test_data(config: RunConfig) -> datasets.Dataset:
    d = config.data
    dataset = load_split(d.source, d.test_split, d.data_root or None, d.subset or None)
    return held_out_subset(dataset, d.test_size)


def shards(config: RunConfig) -> list[ClientShard]:
    """Every client's raw train/test shard: deterministic in the config, so each process gets it without data
    travelling (the split drawn once per run and read back, `partition_cache.py`); kept for the process's life."""
    key = _key(config.data, config.partition, config.seed)
    if key not in _SHARDS:
        _SHARDS[key] = client_shards(training_data(config), config.partition, config.data.label, config.seed)
    return _SHARDS[key]


def tokenized(config: RunConfig, dataset: datasets.Dataset, cache_key: tuple[int | str, str]) -> datasets.Dataset:
    key = (_key(config.data, config.partition, config.model, config.seed), *cache_key)
    if key not in _TOKENIZED:
        m = config.model
        _TOKENIZED[key] = tokenize_dataset(dataset, tokenizer(m.name), config.data.columns, m.max_length, m.num_labels, m.task)
    return _TOKENIZED[key]


@dataclass(frozen=True)
class ClientSite:
    """Which client a ClientApp call serves, and where its data and private state live.

    In simulation a client is partition `client` of the run's data set; on a deployed SuperNode it is the
    node's own file (`data_path`), which never leaves the node, and its private state stays in `state_dir`.
    """

    client: int
    data_path: str = ""
    state_dir: str = ""

    def store(self, config: RunConfig) -> PrivateStore:
        return PrivateStore(self.state_dir or config.private_state_dir)

    def optimizer_store(self, config: RunConfig) -> PrivateStore:
        """Where `train.keep_optimizer_state` keeps this client's optimizer moments, beside its private state."""
        return PrivateStore(self.store(config).directory / "optimizer")


def node_shard(config: RunConfig, site: ClientSite) -> ClientShard:
    """A SuperNode's own data split into local train and test, as a partition would be."""
    key = _key("node", site.data_path, config.data, config.partition.local_test_fraction, config.seed)
    if key not in _SHARDS:
        path = Path(site.data_path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"data-path {site.data_path!r} of this SuperNode does not exist; restart the node with "
                                    "--node-config \"data-path=/absolute/path/to/data.jsonl\"")
        dataset = load_split(str(path.resolve()), config.data.train_split)
        _SHARDS[key] = [split_shard(dataset, config.partition.local_test_fraction, config.seed, site.client)]
    return _SHARDS[key][0]


def client_data(config: RunConfig, site: ClientSite) -> tuple[datasets.Dataset, datasets.Dataset]:
    """A client's tokenized local train and test splits."""
    if site.data_path:
        shard, cache = node_shard(config, site), site.data_path
    else:
        all_shards = shards(config)
        if not 0 <= site.client < len(all_shards):
            raise ValueError(f"partition-id {site.client} out of range: the partitioning has {len(all_shards)} clients")
        shard, cache = all_shards[site.client], site.client
    return tokenized(config, shard.train, (cache, "train")), tokenized(config, shard.test, (cache, "test"))
