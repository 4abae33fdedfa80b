"""A run partitions once: the split is kept beside the data set, and other processes read it back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import datasets

from fed_adapters.federated.config import PartitionSection
from fed_adapters.federated.partition import partition
from fed_adapters.federated.partition_cache import cache_path

REPO = Path(__file__).resolve().parents[1]
SECTION = PartitionSection(method="dirichlet", num_clients=5, alpha=0.3, min_client_size=5)

# A fresh process, as a Ray actor is: partitions the same file and reports its shards and its imports.
READER = """
import json, sys
import datasets
from fed_adapters.federated.config import PartitionSection
from fed_adapters.federated.partition import partition
data = datasets.load_dataset("json", data_files=sys.argv[1], cache_dir=sys.argv[2], split="train")
shards = partition(data, PartitionSection(**json.loads(sys.argv[3])), "label", 0)
print(json.dumps({"shards": [list(s["text"]) for s in shards], "flwr_datasets": "flwr_datasets" in sys.modules}))
"""


def _file_backed(tmp_path: Path) -> tuple[Path, Path, datasets.Dataset]:
    data_file, cache_dir = tmp_path / "train.jsonl", tmp_path / "hf-cache"
    data_file.write_text("".join(json.dumps({"text": f"example {i}", "label": i % 2}) + "\n" for i in range(300)))
    return data_file, cache_dir, datasets.load_dataset("json", data_files=str(data_file), cache_dir=str(cache_dir),
                                                       split="train")


def _texts(shards: list[datasets.Dataset]) -> list[list[str]]:
    return [list(s["text"]) for s in shards]


def _stored(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.rglob("fed_adapters-partition-*.npz"))


def test_another_process_reads_the_split_without_flwr_datasets(tmp_path) -> None:
    data_file, cache_dir, data = _file_backed(tmp_path)
    shards = partition(data, SECTION, "label", 0)
    assert [p.parent for p in _stored(cache_dir)] == [Path(data.cache_files[0]["filename"]).parent]
    section = json.dumps({"method": "dirichlet", "num_clients": 5, "alpha": 0.3, "min_client_size": 5})
    done = subprocess.run([sys.executable, "-c", READER, str(data_file), str(cache_dir), section],
                          capture_output=True, text=True, cwd=REPO, check=True)
    reader = json.loads(done.stdout.splitlines()[-1])
    assert reader == {"shards": _texts(shards), "flwr_datasets": False}


def test_each_setting_has_its_own_split_and_a_damaged_one_is_drawn_again(tmp_path) -> None:
    _, cache_dir, data = _file_backed(tmp_path)
    first = _texts(partition(data, SECTION, "label", 0))
    [stored] = _stored(cache_dir)
    stored.write_bytes(b"not a partition")
    assert _texts(partition(data, SECTION, "label", 0)) == first
    assert stored.read_bytes() != b"not a partition"  # rewritten whole
    other_seed = _texts(partition(data, SECTION, "label", 1))
    milder = PartitionSection(method="dirichlet", num_clients=5, alpha=100.0, min_client_size=5)
    assert len({str(first), str(other_seed), str(_texts(partition(data, milder, "label", 0)))}) == 3
    assert len(_stored(cache_dir)) == 3 and stored in _stored(cache_dir)


def test_a_data_set_only_in_memory_is_partitioned_without_a_file() -> None:
    data = datasets.Dataset.from_dict({"text": [f"example {i}" for i in range(60)], "label": [i % 2 for i in range(60)]})
    assert cache_path(data, ["any settings"]) is None
    assert sum(len(s) for s in partition(data, SECTION, "label", 0)) == 60
