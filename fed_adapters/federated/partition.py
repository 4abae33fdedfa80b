"""Splitting one data set into client shards (flwr-datasets partitioners) and each shard into train/test.

Partitioning is a pure function of (data set, partition config, seed): every process that needs a shard
(the server for the summary, each Ray actor for its clients) gets the same split without any data
travelling: the first computes it, the others read its row numbers from beside the data set
(`partition_cache.py`).
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from typing import TYPE_CHECKING

import datasets
import numpy as np

from ..configuration import ConfigError
from .config import PartitionSection
from .partition_cache import cached_rows

if TYPE_CHECKING:
    from flwr_datasets.partitioner import Partitioner


# x 10 draws each inside flwr-datasets' partitioner; configs/sst2_dirichlet.toml at seed 6 needs more than 50 seeds.
DIRICHLET_SEEDS = 200


# Each row's number in the data set being split, carried through the partitioner.
ROW = "__fed_adapters_row__"


def column_array(dataset: datasets.Dataset, name: str) -> np.ndarray:
    """`dataset[name]` as one array. datasets 4 answers `dataset[name]` with a lazy Column, which `np.array()`
    (as flwr-datasets' label-based partitioners use it) reads row by row: ~0.2 s per 8,000 rows."""
    return np.asarray(dataset.select_columns([name]).with_format("numpy")[:][name])


class _ColumnsAtOnce(datasets.Dataset):
    """In-memory columns as the partitioners read them: `dataset[name]` is the array itself, not a lazy Column
    read row by row once per partitioner, so once per seed of the Dirichlet search below (13 s at
    configs/sst2_dirichlet.toml's seed 6, simulations/bench_partition.py). The same rows: the same partitions.
    """

    def __init__(self, columns: dict[str, np.ndarray], features: datasets.Features) -> None:
        table = datasets.Dataset.from_dict(columns, features=features)
        super().__init__(table.data, info=table.info, fingerprint=table._fingerprint)
        self._columns = columns

    def __getitem__(self, key):  # type: ignore[override]
        if isinstance(key, str) and key in self._columns:
            return self._columns[key]
        return super().__getitem__(key)


@dataclass(frozen=True)
class ClientShard:
    train: datasets.Dataset
    test: datasets.Dataset


def make_partitioner(section: PartitionSection, label_column: str, seed: int, size: int) -> Partitioner:
    # Imported here: flwr-datasets pulls in seaborn and scipy (seconds), which a SuperNode's ClientApp
    # process, started afresh for every message and never partitioning, should not pay.
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        InnerDirichletPartitioner,
        NaturalIdPartitioner,
        PathologicalPartitioner,
    )

    if section.method == "iid":
        return IidPartitioner(num_partitions=section.num_clients)
    if section.method == "dirichlet":
        return DirichletPartitioner(
            num_partitions=section.num_clients, partition_by=label_column, alpha=section.alpha,
            min_partition_size=section.min_client_size, self_balancing=False, seed=seed,
        )
    if section.method == "inner_dirichlet":
        # Equal-sized clients, each with its own label mix drawn from Dirichlet(alpha) (Hsu et al. 2019).
        sizes = [size // section.num_clients + (i < size % section.num_clients) for i in range(section.num_clients)]
        return InnerDirichletPartitioner(partition_sizes=sizes, partition_by=label_column, alpha=section.alpha, seed=seed)
    if section.method == "pathological":
        return PathologicalPartitioner(
            num_partitions=section.num_clients, partition_by=label_column,
            num_classes_per_partition=section.labels_per_client, seed=seed,
        )
    return NaturalIdPartitioner(partition_by=section.column)


def partition(dataset: datasets.Dataset, section: PartitionSection, label_column: str, seed: int) -> list[datasets.Dataset]:
    """The clients' shards, in partition-id order."""
    if section.method == "nodes":
        raise ConfigError("partition.method = 'nodes' is for deployments, where every SuperNode brings its own data "
                          "(--node-config \"data-path=...\"); a simulation partitions one data set: choose iid, "
                          "dirichlet, inner_dirichlet, pathological or natural")
    needed = section.column if section.method == "natural" else label_column
    if needed not in dataset.column_names:
        what = "partition.column" if section.method == "natural" else "data.label"
        raise ConfigError(f"{section.method} partitioning needs column {needed!r} ({what}); the data has {dataset.column_names}")
    if section.method == "natural" and None in dataset.unique(needed):
        raise ConfigError(f"natural partitioning by {needed!r} (partition.column): some rows have no value there; give "
                          "every row its client id, or drop the rows without one")
    if section.method != "natural" and section.num_clients > len(dataset):
        raise ConfigError(
            f"partition.num_clients = {section.num_clients} is more clients than the {len(dataset)} training examples; "
            "use fewer clients or more data (data.train_size)"
        )
    if section.method == "pathological":
        classes = len(dataset.unique(label_column))  # Arrow's, not a row-by-row read of the column
        if section.labels_per_client > classes:
            raise ConfigError(f"partition.labels_per_client = {section.labels_per_client} exceeds the {classes} classes in the data")
    if section.method == "dirichlet" and section.num_clients * section.min_client_size > len(dataset):
        raise ConfigError(
            f"partition.num_clients x partition.min_client_size = {section.num_clients} x {section.min_client_size} is more "
            f"than the {len(dataset)} training examples; lower min_client_size, use fewer clients or more data"
        )
    settings = [asdict(section), label_column, seed]
    rows = cached_rows(dataset, settings, lambda: partition_rows(dataset, section, label_column, seed))
    return [dataset.select(r) for r in rows]


def partition_rows(dataset: datasets.Dataset, section: PartitionSection, label_column: str, seed: int) -> list[np.ndarray]:
    """Each client's row numbers in `dataset`, drawn by flwr-datasets' partitioner on a two-column copy: the
    column it splits by (its feature type kept) and the row numbers. It reads nothing else, so the split is
    the one it would draw on the whole data set."""
    column = section.column if section.method == "natural" else label_column
    numbers = np.arange(len(dataset), dtype=np.int64)
    if section.method == "iid":
        # IidPartitioner shards contiguously: shuffle first so that shards do not follow the file's order.
        view = datasets.Dataset.from_dict({ROW: numbers}).shuffle(seed=seed)
    else:
        features = datasets.Features({column: dataset.features[column], ROW: datasets.Value("int64")})
        view = _ColumnsAtOnce({column: column_array(dataset, column), ROW: numbers}, features)
    return [column_array(shard, ROW) for shard in draw_partitions(view, section, label_column, seed)[0]]


def draw_partitions(view: datasets.Dataset, section: PartitionSection, label_column: str,
                    seed: int) -> tuple[list[datasets.Dataset], int]:
    """Flower's partitioner on `view`: the shards, and how many partitioner seeds it took.

    Flower's Dirichlet partitioner gives up after 10 draws short of min_client_size; at small alpha a valid
    draw can be rarer than that, so keep drawing, from seeds derived from the run's seed.
    """
    draws = DIRICHLET_SEEDS if section.method == "dirichlet" else 1
    for draw in range(draws):
        partitioner = make_partitioner(section, label_column, seed + 1000 * draw, len(view))
        partitioner.dataset = view
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # one warning per failed draw otherwise
                return [partitioner.load_partition(i) for i in range(partitioner.num_partitions)], draw + 1
        except ValueError as error:
            failure = error
    hint = ""
    if section.method == "dirichlet":
        hint = (f" ({10 * draws} draws); at alpha = {section.alpha} many clients draw almost no examples of any label, "
                f"so every client reaching partition.min_client_size = {section.min_client_size} is unlikely: lower "
                "min_client_size, raise alpha, use fewer clients, or use method = 'inner_dirichlet' (equal-sized "
                "clients, a Dirichlet label mix each)")
    raise ConfigError(f"{section.method} partitioning failed: {failure}{hint}") from None


def split_shard(shard: datasets.Dataset, test_fraction: float, seed: int, client: int) -> ClientShard:
    """A client's local train/test split; both sides get at least one example unless `test_fraction` is 0."""
    if test_fraction == 0:
        return ClientShard(shard, shard.select([]))
    if len(shard) < 2:
        raise ConfigError(
            f"client {client} holds {len(shard)} example(s), too few for a local train/test split; "
            "use fewer clients, more data or a larger partition.min_client_size"
        )
    test_size = min(max(1, round(test_fraction * len(shard))), len(shard) - 1)
    split = shard.train_test_split(test_size=test_size, seed=seed + client, shuffle=True)
    return ClientShard(split["train"], split["test"])


def client_shards(dataset: datasets.Dataset, section: PartitionSection, label_column: str, seed: int) -> list[ClientShard]:
    shards = partition(dataset, section, label_column, seed)
    return [split_shard(s, section.local_test_fraction, seed, i) for i, s in enumerate(shards)]


def summarize(shards: list[ClientShard], label_column: str) -> list[dict]:
    """Per client: train/test sizes and the training label histogram."""
    rows = []
    for client, shard in enumerate(shards):
        histogram = Counter(shard.train[label_column]) if label_column in shard.train.column_names else Counter()
        rows.append({
            "client": client,
            "train_examples": len(shard.train),
            "test_examples": len(shard.test),
            "labels": {str(k): v for k, v in sorted(histogram.items())},
        })
    return rows


def format_summary(rows: list[dict], limit: int = 12) -> str:
    lines = [f"{'client':>6} {'train':>7} {'test':>6}  labels (train)"]
    for row in rows[:limit]:
        labels = " ".join(f"{k}:{v}" for k, v in row["labels"].items())
        lines.append(f"{row['client']:>6} {row['train_examples']:>7} {row['test_examples']:>6}  {labels}")
    if len(rows) > limit:
        lines.append(f"   ... {len(rows) - limit} more clients (all in partition.json)")
    return "\n".join(lines)


def write_summary(rows: list[dict], path: Path, method: str) -> None:
    path.write_text(json.dumps({"method": method, "clients": rows}, indent=2) + "\n")
