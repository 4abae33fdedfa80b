"""Federated training in Flower's Simulation Engine on Ray, with a tiny random-init model."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tf
from flwr.common.config import flatten_dict
from safetensors.numpy import load_file

from fed_adapters.adapters import adapter_state_keys, load_adapter
from fed_adapters.configuration import ConfigError, from_mapping
from fed_adapters.federated.config import RunConfig, load_run_config, run_config_from_flat
from fed_adapters.federated.simulation import backend_config, simulate
from fed_adapters.federated.task import model_and_tokenizer
from fed_adapters.modeling import load_model, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
FILLER = ("the a film movie plot actor scene story music camera light day night city road house table water "
          "green blue small large early late open close slow quick").split()


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    """A 2-layer, width-32 BERT with random weights and MiniLM's tokenizer, saved as a local model directory."""
    tokenizer = load_tokenizer()
    directory = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=48, max_position_embeddings=64)
    tf.BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def keyword_data(tmp_path_factory) -> Path:
    """Label 1 iff the sentence contains 'excellent': learnable by a frozen random encoder plus adapters."""
    directory = tmp_path_factory.mktemp("keyword")
    rng = random.Random(0)
    for split, n in (("train", 400), ("validation", 120)):
        rows = []
        for i in range(n):
            words = rng.choices(FILLER, k=6)
            if i % 2:
                words.insert(rng.randrange(7), "excellent")
            rows.append({"text": " ".join(words), "label": i % 2, "client_id": f"site-{i % 3}"})
        (directory / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


def tiny_config(tmp_path: Path, base: Path, data: Path, **sections) -> RunConfig:
    raw = {
        "run_name": "tiny", "results_dir": str(tmp_path / "results"), "seed": 0,
        "model": {"name": str(base), "max_length": 16},
        "adapter": {"preset": "houlsby", "bottleneck_size": 8},
        "data": {"source": str(data)},
        "partition": {"method": "iid", "num_clients": 4},
        "strategy": {"num_rounds": 3, "fraction_evaluate": 0.0},
        "train": {"local_epochs": 3, "batch_size": 16, "lr": 1e-2, "device": "cpu"},
        "simulation": {"num_cpus": 1},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values} if isinstance(values, dict) else values
    return from_mapping(RunConfig, raw)


def test_fedavg_simulation_end_to_end(tmp_path, tiny_base, keyword_data) -> None:
    config = tiny_config(tmp_path, tiny_base, keyword_data, strategy={"num_rounds": 3, "fraction_evaluate": 1.0})
    recorder = simulate(config, keep_updates=True, verbose=False)
    run_dir = config.run_dir
    records = recorder.records
    assert [r["round"] for r in records] == [0, 1, 2, 3]

    # Only adapter and head tensors cross the wire, both ways.
    model, _ = model_and_tokenizer(config)
    expected_keys = adapter_state_keys(model)
    assert recorder.wire_keys["down"] == recorder.wire_keys["up"] == set(expected_keys)
    assert all(".bottleneck_adapters." not in k and ("down." in k or "up." in k or k.startswith("head.")) for k in expected_keys)
    metadata = json.loads((run_dir / "metrics.json").read_text())["run"]
    assert metadata["tensors_down"] == metadata["tensors_up"] == sorted(expected_keys)

    # Bytes per round = (adapter + head parameters) x 4 bytes x clients, each way.
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    for record in records[1:]:
        assert record["clients_sampled"] == record["clients_replied"] == 4 and record["clients_failed"] == 0
        assert record["tensor_bytes_down"] == record["tensor_bytes_up"] == n_params * 4 * 4
        # Serialization adds a header and the key per tensor, nothing more.
        assert 0 < record["bytes_down"] - record["tensor_bytes_down"] <= 4 * len(expected_keys) * 256
        assert record["client_accuracy"] > 0  # federated evaluation on the clients' local test splits ran

    # The global adapter is the example-weighted mean of the clients' replies (FedAvg).
    final = load_file(str(run_dir / "adapter" / "adapter.safetensors"))
    updates = recorder.updates[3]
    total = sum(n for n, _ in updates)
    assert len({n for n, _ in updates}) >= 1 and total == sum(r["train_examples"] for r in records[3:4])
    for key in expected_keys:
        mean = sum(n * arrays[key].astype(np.float64) for n, arrays in updates) / total
        np.testing.assert_allclose(final[key], mean, rtol=0, atol=1e-6)

    # Accuracy rises on a learnable task.
    assert records[-1]["accuracy"] > records[0]["accuracy"] + 0.15, [r["accuracy"] for r in records]

    # Run directory: resolved config, metrics, plot, partition summary, final adapter and checkpoints that load.
    for name in ("config.toml", "metrics.json", "metrics.csv", "accuracy.png", "partition.json"):
        assert (run_dir / name).is_file(), name
    assert load_run_config(run_dir / "config.toml") == config
    assert (run_dir / "metrics.csv").read_text().splitlines()[0].startswith("round,accuracy,loss")
    partition = json.loads((run_dir / "partition.json").read_text())
    assert sum(c["train_examples"] + c["test_examples"] for c in partition["clients"]) == 400
    fresh = load_model(str(tiny_base), num_labels=2)
    load_adapter(fresh, run_dir / "checkpoints" / "round-003")
    reloaded = load_file(str(run_dir / "checkpoints" / "round-003" / "adapter.safetensors"))
    assert all(np.array_equal(reloaded[k], final[k]) for k in expected_keys)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["round-001", "round-002", "round-003"]

    # A second run into the same directory is refused instead of overwriting results.
    with pytest.raises(ConfigError, match="already holds results.*--overwrite"):
        simulate(config, verbose=False)


def test_ray_spreads_clients_over_gpus(tmp_path, tiny_base, keyword_data) -> None:
    """Two (declared) GPUs and one GPU per client: Ray runs one actor per GPU and uses both."""
    config = tiny_config(tmp_path, tiny_base, keyword_data, strategy={"num_rounds": 1, "fraction_evaluate": 0.0},
                         simulation={"num_cpus": 1, "num_gpus": 1.0, "ray_num_cpus": 2, "ray_num_gpus": 2},
                         train={"local_epochs": 1, "device": "cpu"})
    assert backend_config(config) == {
        "client_resources": {"num_cpus": 1.0, "num_gpus": 1.0},
        "init_args": {"num_cpus": 2, "num_gpus": 2, "include_dashboard": False},
    }
    records = simulate(config, verbose=False).records
    assert records[1]["clients_replied"] == 4 and records[1]["client_gpus"] == [0, 1]


def test_fractional_gpus_and_defaults_in_backend_config(tmp_path, tiny_base, keyword_data) -> None:
    config = tiny_config(tmp_path, tiny_base, keyword_data, simulation={"num_cpus": 2, "num_gpus": 0.25})
    resources = backend_config(config)
    assert resources["client_resources"] == {"num_cpus": 2.0, "num_gpus": 0.25}
    assert "num_gpus" not in resources["init_args"]  # Ray detects every visible GPU by itself


def test_flower_app_config_declares_every_run_config_key() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    flat = flatten_dict(pyproject["tool"]["flwr"]["app"]["config"])  # what Flower hands the apps
    assert flat == RunConfig().flat()
    assert run_config_from_flat(flat) == RunConfig()


@pytest.mark.parametrize("name", ["quickstart", "sst2_iid", "sst2_dirichlet", "mrpc", "agnews", "amazon_domains", "causal_lm"])
def test_shipped_configs_are_valid(name: str) -> None:
    config = load_run_config(REPO / "configs" / f"{name}.toml")
    assert config.run_name == name


def test_config_errors_name_the_key(tmp_path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[train]\nlearning_rate = 0.1\n")
    with pytest.raises(ConfigError, match="unknown key 'train.learning_rate'; valid keys here: batch_size, eval_batch_size, lr,"):
        load_run_config(path)
    path.write_text("[strategy]\nnum_rounds = 'three'\n")
    with pytest.raises(ConfigError, match="strategy.num_rounds must be int, got str 'three'"):
        load_run_config(path)
    path.write_text("[strategy]\nname = 'fedbest'\n")
    with pytest.raises(ConfigError, match="strategy.name = 'fedbest' is not one of fedavg, fedprox"):
        load_run_config(path)
    path.write_text("[partition]\nmethod = 'random'\n")
    with pytest.raises(ConfigError, match="partition.method = 'random' is not one of iid, dirichlet"):
        load_run_config(path)
    path.write_text("[adapter]\nbottleneck_size = 8\nreduction_factor = 4\n")
    with pytest.raises(ConfigError, match="adapter: give either bottleneck_size or reduction_factor"):
        load_run_config(path)
    with pytest.raises(ConfigError, match="config file .*missing.toml does not exist"):
        load_run_config(tmp_path / "missing.toml")


def test_cli_reports_bad_input_in_one_line(tmp_path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[model]\nnum_lables = 3\n")
    done = subprocess.run([sys.executable, "-m", "fed_adapters.cli", "simulate", str(path)], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"fed-adapters: error: {path}: unknown key 'model.num_lables' (did you mean 'num_labels'?); "
        "valid keys here: name, task, num_labels, pooling, max_length"
    ]
    done = subprocess.run([sys.executable, "-m", "fed_adapters.cli", "simulate", str(REPO / "configs" / "quickstart.toml"),
                           "--set", "data.source=/nonexistent/data", "--set", f"results_dir={tmp_path}"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "cannot load data set '/nonexistent/data'" in done.stderr
    assert "Traceback" not in done.stderr
