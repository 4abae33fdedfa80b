"""Partitioners give the promised skew; bad partition requests fail clearly."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import datasets
import pytest

from conftest import tiny_config
from fed_adapters.configuration import ConfigError
from fed_adapters.federated.config import PartitionSection
from fed_adapters.federated.partition import (client_shards, format_summary, make_partitioner, partition, split_shard,
                                               summarize)

REPO = Path(__file__).resolve().parents[1]


def _balanced(n: int = 2000, classes: int = 4) -> datasets.Dataset:
    return datasets.Dataset.from_dict({
        "text": [f"example {i}" for i in range(n)],
        "label": [i % classes for i in range(n)],
        "client_id": [f"site-{i % 5}" for i in range(n)],
    })


def _dominant_share(shard: datasets.Dataset) -> float:
    counts = Counter(shard["label"])
    return max(counts.values()) / len(shard)


def test_iid_shards_are_equal_sized_and_label_balanced() -> None:
    shards = partition(_balanced(), PartitionSection(method="iid", num_clients=10), "label", seed=0)
    assert [len(s) for s in shards] == [200] * 10
    assert max(_dominant_share(s) for s in shards) < 0.4  # 4 balanced classes: about 0.25 each
    assert sorted(t for s in shards for t in s["text"]) == sorted(_balanced()["text"])  # disjoint and complete


def test_dirichlet_low_alpha_skews_labels() -> None:
    data = _balanced()
    skewed = partition(data, PartitionSection(method="dirichlet", num_clients=10, alpha=0.1), "label", seed=0)
    mild = partition(data, PartitionSection(method="dirichlet", num_clients=10, alpha=100.0), "label", seed=0)
    assert sum(len(s) for s in skewed) == len(data)
    mean_dominant = sum(_dominant_share(s) for s in skewed) / 10
    assert mean_dominant > 0.7 > sum(_dominant_share(s) for s in mild) / 10


def test_pathological_gives_k_labels_per_client() -> None:
    shards = partition(_balanced(), PartitionSection(method="pathological", num_clients=8, labels_per_client=1), "label", 0)
    assert all(len(set(s["label"])) == 1 for s in shards)
    shards = partition(_balanced(), PartitionSection(method="pathological", num_clients=8, labels_per_client=2), "label", 0)
    assert all(len(set(s["label"])) == 2 for s in shards)


def test_natural_partition_follows_the_column() -> None:
    shards = partition(_balanced(), PartitionSection(method="natural", column="client_id"), "label", seed=0)
    assert len(shards) == 5 and all(len(set(s["client_id"])) == 1 for s in shards)


@pytest.mark.parametrize("method", ["iid", "dirichlet", "pathological", "inner_dirichlet", "natural"])
def test_partitions_are_flwr_datasets_own(method: str) -> None:
    """The partitioners draw on a two-column copy (the column they split by, read at once, and row numbers):
    the same shards as on the whole data set, also on a shuffled subset, whose rows sit behind an indices mapping."""
    data = _balanced().shuffle(seed=3).select(range(1500))
    section = PartitionSection(method=method, num_clients=6, alpha=0.5, labels_per_client=2, column="client_id")
    reference = make_partitioner(section, "label", seed=4, size=len(data))
    reference.dataset = data.shuffle(seed=4) if method == "iid" else data  # iid shards a shuffle of the data
    expected = [list(reference.load_partition(i)["text"]) for i in range(reference.num_partitions)]
    shards = partition(data, section, "label", seed=4)
    assert [list(s["text"]) for s in shards] == expected
    assert all(type(s) is datasets.Dataset for s in shards)  # the shards are plain data sets again


def test_partitioning_is_seeded() -> None:
    section = PartitionSection(method="dirichlet", num_clients=6, alpha=0.3)
    first = [list(s["text"]) for s in partition(_balanced(), section, "label", seed=1)]
    assert first == [list(s["text"]) for s in partition(_balanced(), section, "label", seed=1)]
    assert first != [list(s["text"]) for s in partition(_balanced(), section, "label", seed=2)]


def test_local_train_test_split_and_summary(tmp_path) -> None:
    shards = client_shards(_balanced(100, 2), PartitionSection(num_clients=4, local_test_fraction=0.2), "label", 0)
    assert [(len(s.train), len(s.test)) for s in shards] == [(20, 5)] * 4
    assert not set(shards[0].train["text"]) & set(shards[0].test["text"])
    rows = summarize(shards, "label")
    assert rows[0]["train_examples"] == 20 and sum(rows[0]["labels"].values()) == 20
    assert "client" in format_summary(rows).splitlines()[0]


def test_partition_errors() -> None:
    with pytest.raises(ConfigError, match="num_clients = 50 is more clients than the 20 training examples"):
        partition(_balanced(20), PartitionSection(num_clients=50), "label", 0)
    with pytest.raises(ConfigError, match="needs column 'domain' \\(partition.column\\)"):
        partition(_balanced(), PartitionSection(method="natural", column="domain"), "label", 0)
    with_gaps = datasets.Dataset.from_list([{"text": "a", "label": 0, "client_id": "x"}, {"text": "b", "label": 1, "client_id": None}])
    with pytest.raises(ConfigError, match="natural partitioning by 'client_id' .* some rows have no value there"):
        partition(with_gaps, PartitionSection(method="natural", column="client_id"), "label", 0)
    with pytest.raises(ConfigError, match="needs column 'stars' \\(data.label\\)"):
        partition(_balanced(), PartitionSection(method="dirichlet"), "stars", 0)
    with pytest.raises(ConfigError, match="labels_per_client = 5 exceeds the 4 classes"):
        partition(_balanced(), PartitionSection(method="pathological", labels_per_client=5), "label", 0)
    with pytest.raises(ConfigError, match="is not one of iid, dirichlet, inner_dirichlet, pathological, natural"):
        PartitionSection(method="by-size")
    with pytest.raises(ConfigError, match="client 3 holds 1 example"):
        split_shard(_balanced(1), 0.2, 0, client=3)


def test_zero_local_test_fraction_keeps_every_example_for_training() -> None:
    shard = split_shard(_balanced(7), 0.0, 0, client=0)
    assert (len(shard.train), len(shard.test)) == (7, 0)
    assert len(split_shard(_balanced(7), 0.3, 0, client=0).test) == 2


def test_inner_dirichlet_gives_equal_sizes_and_skewed_label_mixes() -> None:
    data = _balanced(2003)
    shards = partition(data, PartitionSection(method="inner_dirichlet", num_clients=10, alpha=0.1), "label", seed=0)
    assert sorted(len(s) for s in shards) == [200] * 7 + [201] * 3
    assert sorted(t for s in shards for t in s["text"]) == sorted(data["text"])
    assert sum(_dominant_share(s) for s in shards) / 10 > 0.55  # 4 balanced labels: 0.25 without skew
    mild = partition(data, PartitionSection(method="inner_dirichlet", num_clients=10, alpha=100.0), "label", seed=0)
    assert sum(_dominant_share(s) for s in mild) / 10 < 0.4


def test_dirichlet_that_cannot_fill_every_client_says_what_to_change() -> None:
    # Impossible by count: said at once, without drawing.
    with pytest.raises(ConfigError, match="num_clients x partition.min_client_size = 20 x 50 is more than the 400"):
        partition(_balanced(400, 2), PartitionSection(method="dirichlet", num_clients=20, alpha=0.05, min_client_size=50), "label", 0)
    # Possible by count, never drawn at this alpha.
    with pytest.raises(ConfigError, match="dirichlet partitioning failed.*2000 draws.*min_client_size = 15.*inner_dirichlet"):
        partition(_balanced(400, 2), PartitionSection(method="dirichlet", num_clients=20, alpha=0.05, min_client_size=15), "label", 0)


def test_partition_benchmark_compares_with_the_plain_data_set(tmp_path, tiny_base, keyword_data) -> None:
    """simulations/bench_partition.py: both ways of reading the labels and the stored split, per seed, with the
    same shards."""
    config = tiny_config(tmp_path, tiny_base, keyword_data,
                         partition={"method": "dirichlet", "num_clients": 8, "alpha": 0.1, "min_client_size": 10})
    path = tmp_path / "bench.toml"
    path.write_text(config.to_toml())
    done = subprocess.run([sys.executable, str(REPO / "simulations" / "bench_partition.py"), str(path), "--seeds", "0-2"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((config.run_dir.parent / "bench_partition" / "results.json").read_text())
    assert [r["seed"] for r in results["seeds"]] == [0, 1, 2]
    assert all(r["same_shards"] and r["partitioner_seeds"] >= 1 and r["seconds"] > 0 and r["stored_seconds"] > 0
               for r in results["seeds"])
    assert max(r["partitioner_seeds"] for r in results["seeds"]) > 1  # this split needs the redraws it times
    assert (config.run_dir.parent / "bench_partition" / "config.toml").exists()
    # IID shuffles before it splits: no partitioner reads a column, so there is nothing to compare.
    path.write_text(tiny_config(tmp_path / "iid", tiny_base, keyword_data).to_toml())
    refused = subprocess.run([sys.executable, str(REPO / "simulations" / "bench_partition.py"), str(path), "--seeds", "0"],
                             capture_output=True, text=True, cwd=REPO, timeout=300)
    assert refused.returncode == 2 and "partitions IID; this benchmark times the partitioners that read a column" in refused.stderr
