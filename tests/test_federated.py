"""Federated training in Flower's Simulation Engine on Ray, with a tiny random-init model."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tf
from flwr.common.config import flatten_dict
from safetensors.numpy import load_file

from fed_adapters.adapters import adapter_state_keys, load_adapter
from conftest import recorded_learning_rates, tiny_config

from fed_adapters.configuration import ConfigError
from fed_adapters.federated.config import RunConfig, load_run_config, run_config_from_flat
from fed_adapters.federated import simulation
from fed_adapters.federated.simulation import SimulationStopped, backend_config, check_client_device, simulate
from fed_adapters.federated.client_work import local_fit
from fed_adapters.federated.sampling import shuffled_participants
from fed_adapters.federated.task import ClientSite, build_adapted_model, model_and_tokenizer, tokenizer
from fed_adapters.modeling import load_model, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
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


@pytest.mark.parametrize("resources, message", [
    ({"num_gpus": 0.5, "ray_num_gpus": 0}, "simulation.num_gpus = 0.5 per client, but Ray has 0 GPU\\(s\\) "
                                           "\\(simulation.ray_num_gpus\\), so no client could start; set simulation.num_gpus = 0"),
    ({"num_gpus": 2.0, "ray_num_gpus": 1}, "simulation.num_gpus = 2 per client, but Ray has 1 GPU\\(s\\)"),
    ({"num_cpus": 3, "ray_num_cpus": 2}, "simulation.num_cpus = 3 per client, but Ray has 2 CPU\\(s\\) "
                                         "\\(simulation.ray_num_cpus\\), so no client could start; lower simulation.num_cpus"),
])
def test_client_resources_that_fit_no_actor_are_refused_before_ray_starts(tmp_path, tiny_base, keyword_data, resources,
                                                                          message) -> None:
    config = tiny_config(tmp_path, tiny_base, keyword_data, simulation=resources)
    with pytest.raises(ConfigError, match=message):
        simulate(config, verbose=False)
    assert not config.run_dir.exists()


def test_a_crashed_simulation_runtime_ends_the_server_thread_too(tmp_path, tiny_base, keyword_data, monkeypatch) -> None:
    """Flower raises in the main thread when its runtime fails (here: no Ray actor fits, with the check that
    refuses such resources switched off) but leaves the ServerApp thread waiting for replies; ours must stop."""
    monkeypatch.setattr(simulation, "check_client_resources", lambda config: None)
    config = tiny_config(tmp_path, tiny_base, keyword_data, simulation={"num_gpus": 1.0, "ray_num_gpus": 0},
                         strategy={"round_timeout": 300.0, "node_wait_timeout": 300.0})
    with pytest.raises(SimulationStopped, match="Simulation Runtime stopped: ValueError: ActorPool is empty"):
        simulate(config, verbose=False)
    server_threads = [t for t in threading.enumerate() if "server_th_with_start_checks" in t.name]
    assert server_threads  # Flower's ServerApp thread, found by its target's name
    for thread in server_threads:
        thread.join(timeout=60)  # round_timeout (300 s) is what it would wait without the guard
        assert not thread.is_alive()


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


@pytest.mark.parametrize("name", ["quickstart", "sst2_iid", "sst2_dirichlet", "mrpc", "agnews", "amazon_domains", "causal_lm",
                                  "bench_throughput", "bench_deploy", "bench_robust", "personalization_amazon", "personalization_sst2_dirichlet"])
def test_shipped_configs_are_valid(name: str) -> None:
    config = load_run_config(REPO / "configs" / f"{name}.toml")
    assert config.run_name == name


@pytest.mark.parametrize("schedule", ["per_round", "across_rounds"])
def test_client_learning_rate_schedule_per_round_or_across_rounds(tmp_path, tiny_base, keyword_data, schedule) -> None:
    config = tiny_config(tmp_path, tiny_base, keyword_data, strategy={"num_rounds": 3},
                         train={"local_steps": 4, "lr": 0.1, "warmup_ratio": 0.0, "lr_schedule": schedule})
    model = build_adapted_model(config)
    rates = {r: recorded_learning_rates(local_fit(model, tokenizer(config.model.name), config, ClientSite(0), r)) for r in (1, 3)}
    if schedule == "per_round":  # every round decays from the full rate to zero on its own
        assert rates[1] == rates[3] == pytest.approx([0.1, 0.075, 0.05, 0.025])
    else:  # rounds 1 and 3 are steps 0-3 and 8-11 of one 12-step decay
        assert rates[1] == pytest.approx([0.1 * (12 - s) / 12 for s in range(4)])
        assert rates[3] == pytest.approx([0.1 * (4 - s) / 12 for s in range(4)])
    side_job = recorded_learning_rates(lambda: local_fit(model, tokenizer(config.model.name), config, ClientSite(0), 3)(max_steps=2))
    assert side_job == pytest.approx([0.1, 0.05])  # k fine-tuning steps keep their own schedule


def test_a_linear_server_lr_schedule_shrinks_the_server_step_round_by_round(tmp_path, tiny_base, keyword_data) -> None:
    """FedAvgM without momentum steps x + server_lr x (mean - x); linear over 2 rounds: the full step, then half."""
    config = tiny_config(tmp_path, tiny_base, keyword_data, strategy={"name": "fedavgm", "num_rounds": 2, "server_lr": 1.0,
                         "server_momentum": 0.0, "server_lr_schedule": "linear"}, partition={"local_test_fraction": 0.0})
    recorder = simulate(config, keep_updates=True, verbose=False)
    checkpoint = config.run_dir / "checkpoints"
    x1, x2 = (load_file(str(checkpoint / f"round-00{r}" / "global.safetensors")) for r in (1, 2))

    def mean(r: int, key: str) -> np.ndarray:
        total = sum(n for n, _ in recorder.updates[r])
        return sum(n * a[key].astype(np.float64) for n, a in recorder.updates[r]) / total

    for key in x2:
        np.testing.assert_allclose(x1[key], mean(1, key), atol=1e-6)
        np.testing.assert_allclose(x2[key], x1[key] + 0.5 * (mean(2, key) - x1[key]), atol=1e-6)
    assert any(np.abs(x2[k] - mean(2, k)).max() > 1e-4 for k in x2)  # half a step is not the plain average


def test_logit_adjustment_keeps_a_one_label_client_from_biasing_the_head(tmp_path, tiny_base, keyword_data) -> None:
    bias_gap = {}
    for tau in (0.0, 1.0):
        config = tiny_config(tmp_path, tiny_base, keyword_data,
                             partition={"method": "pathological", "num_clients": 2, "labels_per_client": 1},
                             train={"local_steps": 10, "optimizer": "sgd", "lr": 0.5, "logit_adjustment": tau})
        model = build_adapted_model(config)
        local_fit(model, tokenizer(config.model.name), config, ClientSite(0), 1)()
        bias = model.classifier.bias.detach()
        bias_gap[tau] = abs(float(bias[1] - bias[0]))
    assert bias_gap[1.0] < 0.2 * bias_gap[0.0]  # plain training learns "everything is my label" into the head


@pytest.mark.parametrize("num_clients, per_round", [(4, 2), (5, 2), (7, 3), (3, 3)])
def test_shuffled_passes_train_every_client_once_per_pass(num_clients: int, per_round: int) -> None:
    rounds = 4 * num_clients  # per_round whole passes over the clients
    schedule = [shuffled_participants(num_clients, per_round, r, seed=11) for r in range(1, rounds + 1)]
    assert all(len(set(clients)) == per_round for clients in schedule)  # nobody twice in a round
    stream = [c for clients in schedule for c in clients]
    for start in range(0, len(stream), num_clients):  # each pass holds every client once
        assert sorted(stream[start:start + num_clients]) == list(range(num_clients)), (start, stream)
    assert schedule == [shuffled_participants(num_clients, per_round, r, seed=11) for r in range(1, rounds + 1)]
    assert schedule != [shuffled_participants(num_clients, per_round, r, seed=12) for r in range(1, rounds + 1)] or per_round == num_clients
    with pytest.raises(ValueError, match="cannot take 4 of 3 clients"):
        shuffled_participants(3, 4, 1, seed=0)


def test_shuffled_sampling_trains_each_client_equally_in_a_simulation(tmp_path, tiny_base, keyword_data) -> None:
    """5 clients, 2 per round, 5 rounds: uniform draws would leave some clients out; passes train each exactly twice."""
    config = tiny_config(tmp_path, tiny_base, keyword_data, partition={"num_clients": 5},
                         strategy={"num_rounds": 5, "fraction_train": 0.4, "sampling": "shuffled"}, train={"local_epochs": 1})
    records = simulate(config, verbose=False).records[1:]
    trained = [r["train_clients"] for r in records]
    assert trained == [sorted(shuffled_participants(5, 2, r, seed=0)) for r in range(1, 6)]
    assert all(r["clients_sampled"] == r["clients_replied"] == 2 for r in records)
    assert sorted(c for clients in trained for c in clients) == sorted(list(range(5)) * 2)


def test_clients_keep_their_adamw_moments_across_rounds(tmp_path, tiny_base, keyword_data) -> None:
    config = tiny_config(tmp_path, tiny_base, keyword_data, strategy={"num_rounds": 2},
                         train={"local_steps": 3, "keep_optimizer_state": True})
    simulate(config, verbose=False)
    model, _ = model_and_tokenizer(config)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    for client in range(4):
        state = load_file(str(config.run_dir / "clients" / "optimizer" / f"client-{client:05d}.safetensors"))
        assert sorted(state) == sorted(f"{n}/{k}" for n in trained for k in ("exp_avg", "exp_avg_sq", "step"))
        assert {float(state[f"{n}/step"]) for n in trained} == {6.0}  # 3 steps in each of 2 rounds: one AdamW run


@pytest.mark.parametrize("toml, message", [
    ("[train]\nlearning_rate = 0.1\n", "unknown key 'train.learning_rate'; valid keys here: batch_size, eval_batch_size, lr,"),
    ("[strategy]\nnum_rounds = 'three'\n", "strategy.num_rounds must be int, got str 'three'"),
    ("[strategy]\nname = 'fedbest'\n", "strategy.name = 'fedbest' is not one of fedavg, fedavgm, fedprox"),
    ("[partition]\nlocal_test_fraction = 0.0\n",
     "local_test_fraction = 0 leaves clients no local test split, but strategy.fraction_evaluate"),
    ("[partition]\nmethod = 'random'\n", "partition.method = 'random' is not one of iid, dirichlet"),
    ("[adapter]\nbottleneck_size = 8\nreduction_factor = 4\n", "adapter: give either bottleneck_size or reduction_factor"),
    ("[model]\ntask = 'causal_lm'\n[train]\nlogit_adjustment = 1.0\n",
     "model.task = 'causal_lm' has no classes: set train.logit_adjustment = 0"),
    ("[personalization]\nmode = 'split'\n[train]\nlogit_adjustment = 1.0\n",
     "personalization.mode = 'split' trains private parts in the same pass"),
    ("[train]\noptimizer = 'lion'\n", "unknown optimizer 'lion'; valid: adamw, sgd"),
    ("[train]\nhead_lr = -0.5\n", "head_lr must be >= 0 \\(0 = the same as lr\\), got -0.5"),
    ("[train]\nlr_schedule = 'cosine'\n", "train.lr_schedule = 'cosine' is not one of per_round, across_rounds"),
    ("[train]\noptimizer = 'sgd'\nkeep_optimizer_state = true\n",
     "train.keep_optimizer_state keeps AdamW's moments, but train.optimizer = 'sgd' keeps no state"),
    ("[train]\nkeep_optimizer_state = true\n[personalization]\nmode = 'ditto'\n",
     "personalization.mode = 'ditto' trains private parts in the same pass: use one or the other"),
    ("[strategy]\nsampling = 'cyclic'\n", "strategy.sampling = 'cyclic' is not one of uniform, shuffled"),
    ("[strategy]\nname = 'fedtrimmedavg'\ntrim_beta = 0.5\n", "strategy.trim_beta .* must lie in \\[0, 0.5\\), got 0.5"),
    ("[strategy]\nfraction_train = 0.0\n", "strategy.fraction_train = 0 trains no client"),
    ("[personalization]\nmode = 'ditto'\nprivate_bottleneck = 4\n",
     "mode = 'ditto' pulls the private adapter .* leave personalization.private_bottleneck at 0"),
    ("[strategy]\nmin_train_clients = 0\n", "strategy.min_train_clients must be >= 1, got 0"),
    ("[strategy]\nround_timeout = 0.0\n", "strategy.round_timeout must be > 0, got 0.0"),
    ("[data]\ntest_size = -1\n", "data.test_size must be >= 0, got -1"),
    ("[train]\nlocal_steps = -1\n", "train.local_steps must be >= 0, got -1"),
    ("[train]\nlocal_epochs = 0.0\n", "train.local_epochs must be > 0 \\(or train.local_steps >= 1\\), got 0.0"),
    ("[strategy]\nserver_momentum = 1.0\n", "strategy.server_momentum must lie in \\[0, 1\\), got 1.0"),
    ("[strategy]\nserver_lr_schedule = 'cosine'\n", "strategy.server_lr_schedule = 'cosine' is not one of constant, linear"),
    ("[strategy]\nserver_lr_schedule = 'linear'\n",
     "strategy.server_lr_schedule = 'linear' needs a server step, which strategy 'fedavg' has not: use one of"),
    ("[partition]\nmin_client_size = -1\n", "partition.min_client_size must be >= 0, got -1"),
    ("[simulation]\nray_num_cpus = -2\n", "simulation.ray_num_cpus must be >= 0, got -2"),
    ("[simulation]\nray_num_gpus = -5\n", "simulation.ray_num_gpus must be >= -1, got -5"),
    ("seed = -1\n", "seed must be >= 0, got -1"),
    ("run_name = '..'\n", "run_name = '..' must name a folder inside results_dir"),
    ("run_name = 'sweep/../../x'\n", "run_name = 'sweep/../../x' must name a folder inside results_dir"),
    ("run_name = ''\n", "run_name = '' must name a folder inside results_dir"),
    ("[data]\ntest_split = 'train'\n", "data.test_split = data.train_split = 'train': the server would evaluate on the very"),
    ("[simulation]\nnum_gpus = 1.5\n", "simulation.num_gpus = 1.5 per client: Ray shares a GPU only in fractions of one"),
    ("[strategy]\nsampling = 'shuffled'\nmin_train_clients = 3\n[privacy]\nsecure_aggregation = true\n",
     "SecAgg\\+ workflow, which draws each round's clients itself; strategy.sampling = 'shuffled'"),
])
def test_config_errors_name_the_key(tmp_path, toml: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=message):
        load_run_config(path)


def test_the_clients_device_is_checked_as_a_ray_actor_sees_it(tmp_path, tiny_base, keyword_data) -> None:
    def device(name: str, gpus: float):
        return tiny_config(tmp_path, tiny_base, keyword_data, train={"device": name}, simulation={"num_gpus": gpus})

    with pytest.raises(ConfigError, match="train.device = 'cuda' but simulation.num_gpus = 0: Ray gives the clients no GPU"):
        check_client_device(device("cuda", 0.0))
    with pytest.raises(ConfigError, match="train.device = 'cuda:1': each client sees only the 1 GPU\\(s\\) Ray assigns it"):
        check_client_device(device("cuda:1", 0.5))
    with pytest.raises(ConfigError, match="train.device: unknown device 'warp-drive'"):
        check_client_device(device("warp-drive", 0.0))
    check_client_device(device("cpu", 0.0))


def test_multikrum_cannot_select_more_updates_than_a_round_has(tmp_path, tiny_base, keyword_data) -> None:
    config = tiny_config(tmp_path, tiny_base, keyword_data, strategy={"name": "multikrum", "krum_select": 5})
    with pytest.raises(ConfigError, match="strategy 'multikrum' refuses these settings: strategy.krum_select = 5 exceeds "
                                          "the 4 clients sampled per round"):
        simulate(config, verbose=False)


def test_the_process_cache_keeps_one_base_per_model_adapter_and_seed(tmp_path, tiny_base, keyword_data) -> None:
    config = tiny_config(tmp_path, tiny_base, keyword_data, personalization={"mode": "ditto"})
    first, _ = model_and_tokenizer(config)
    assert model_and_tokenizer(dataclasses.replace(config, run_name="another-run"))[0] is first  # reused
    other_seed, _ = model_and_tokenizer(dataclasses.replace(config, seed=1))
    assert other_seed is not first  # its private adapter starts from seed 1's draw, as in a fresh process
    fresh = build_adapted_model(dataclasses.replace(config, seed=1))
    for (name, a), (_, b) in zip(other_seed.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b), name


def test_adapter_size_from_either_key(tmp_path) -> None:
    def adapter(toml: str):
        (tmp_path / "c.toml").write_text(toml)
        return load_run_config(tmp_path / "c.toml").adapter.to_adapter_config()

    assert adapter("").bottleneck_size == 16  # the default size
    only_rf = adapter("[adapter]\nreduction_factor = 8\n")
    assert (only_rf.reduction_factor, only_rf.bottleneck_size) == (8, None)
    assert adapter("[adapter]\nbottleneck_size = 32\n").bottleneck_size == 32


def test_a_moved_run_directory_reads_its_own_files(tmp_path) -> None:
    from fed_adapters.federated.config import load_run_dir_config

    config = load_run_config(REPO / "configs" / "quickstart.toml")
    moved = tmp_path / "elsewhere" / "my-run"
    moved.mkdir(parents=True)
    (moved / "config.toml").write_text(config.to_toml())
    reread = load_run_dir_config(moved)
    assert reread.run_dir == moved and reread.private_state_dir == moved / "clients"
    assert dataclasses.replace(reread, results_dir=config.results_dir, run_name=config.run_name) == config
    with pytest.raises(ConfigError, match="is not a run directory \\(no config.toml\\)"):
        load_run_dir_config(tmp_path)


def test_a_missing_config_file_is_named(tmp_path) -> None:
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


@pytest.fixture(scope="module")
def tiny_decoders(tmp_path_factory) -> dict[str, Path]:
    """A 2-layer GPT-2 and a 2-layer Llama with random weights (MiniLM's tokenizer), as local model directories.

    Initialised 10x wider than usual: with 0.02-scale frozen embeddings the LM head's logits are nearly flat
    whatever the adapters do, and perplexity could hardly move.
    """
    tokenizer = load_tokenizer()
    vocab = tokenizer.vocab_size
    configs = {
        "gpt2": tf.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=64, initializer_range=0.2,
                              bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id),
        "llama": tf.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                initializer_range=0.2),
    }
    directories = {}
    for family, config in configs.items():
        directory = tmp_path_factory.mktemp(f"tiny-{family}")
        torch.manual_seed(0)
        tf.AutoModelForCausalLM.from_config(config).save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        directories[family] = directory
    return directories


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_causal_lm_federation_lowers_perplexity(tmp_path, tiny_decoders, keyword_data, family: str) -> None:
    """Decoders federate too: Pfeiffer adapters on a frozen LM (head included), perplexity on the held-out split."""
    config = tiny_config(
        tmp_path, tiny_decoders[family], keyword_data, model={"task": "causal_lm"},
        adapter={"preset": "pfeiffer", "bottleneck_size": 16, "train_head": False},
        partition={"method": "iid", "num_clients": 2}, strategy={"num_rounds": 2, "fraction_evaluate": 1.0},
        train={"local_epochs": 2, "batch_size": 16, "lr": 1e-2, "device": "cpu"},
    )
    recorder = simulate(config, verbose=False)
    records = recorder.records
    assert records[-1]["perplexity"] < 0.5 * records[0]["perplexity"], [r["perplexity"] for r in records]
    assert all(r["clients_replied"] == 2 and r["eval_clients_replied"] == 2 for r in records[1:])
    model, _ = model_and_tokenizer(config)
    assert recorder.wire_keys["up"] == set(adapter_state_keys(model))
    assert not any(k.startswith("head.") for k in recorder.wire_keys["up"])  # the LM head stays frozen at home
    metrics = json.loads((config.run_dir / "metrics.json").read_text())
    assert metrics["rounds"][-1]["perplexity"] == records[-1]["perplexity"]


def test_throughput_benchmark_measures_both_federations(tmp_path, tiny_base, keyword_data) -> None:
    """simulations/bench_throughput.py: the same federation with adapter-only and full-model messages."""
    config = tiny_config(tmp_path, tiny_base, keyword_data, run_name="bench",
                         partition={"method": "iid", "num_clients": 3, "local_test_fraction": 0.0},
                         strategy={"num_rounds": 2, "fraction_evaluate": 0.0},
                         train={"local_steps": 3, "batch_size": 16, "lr": 1e-2, "device": "cpu"},
                         simulation={"num_cpus": 2, "ray_num_cpus": 2})
    path = tmp_path / "bench.toml"
    path.write_text(config.to_toml())
    done = subprocess.run([sys.executable, str(REPO / "simulations" / "bench_throughput.py"), str(path)],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fed_adapters / baseline: updates/s" in done.stdout
    results = json.loads((config.run_dir / "results.json").read_text())
    ours, baseline = results["summary"]
    assert (ours["variant"], baseline["variant"]) == ("fed_adapters", "baseline")

    model = build_adapted_model(config)
    adapter_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    all_tensors = sum(t.numel() for t in model.state_dict().values())
    assert ours["tensor_bytes_per_round"] == 2 * 3 * 4 * adapter_params  # both ways, 3 clients, float32
    assert baseline["tensor_bytes_per_round"] == 2 * 3 * 4 * all_tensors
    assert results["ratios"]["bytes_per_round"] == pytest.approx(ours["bytes_per_round"] / baseline["bytes_per_round"])
    assert results["ratios"]["bytes_per_round"] < 0.05
    for summary in (ours, baseline):
        assert summary["client_updates"] == 6
        assert 0 < summary["client_train_seconds"] < summary["train_phase_seconds"]
        assert summary["overhead_seconds"] == pytest.approx(
            summary["first_round_overhead_seconds"] + summary["steady_overhead_seconds_per_round"])  # 2 rounds
        assert summary["client_peak_rss_mb"] > 100
    # Our clients build the base and tokenize once, in round 1; the baseline reports no set-up of its own.
    assert ours["first_round_client_setup_seconds"] > 0 and baseline["first_round_client_setup_seconds"] == 0
    # Same seeds, same local steps, same adapter: the two federations start and learn the same thing
    # (the second run in the process starts from the seeded initial adapter, not the first run's result).
    start = {name: rounds[0]["loss"] for name, rounds in results["rounds"].items()}
    assert start["fed_adapters"] == start["baseline"]
    assert ours["accuracy"] == pytest.approx(baseline["accuracy"], abs=0.02)
    assert ours["loss"] == pytest.approx(baseline["loss"], rel=1e-3)
    assert (config.run_dir / "config.toml").is_file() and (config.run_dir / "baseline" / "metrics.json").is_file()


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().decode(errors="replace"):
                pids.append(int(cmdline.parent.name))
        except OSError:  # the process ended while we looked
            continue
    return pids


@pytest.fixture
def flwr_home(tmp_path):
    """A private FLWR_HOME; the local SuperLink that `flwr run` starts in it is stopped afterwards."""
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 39093)) == 0:
            pytest.fail("a SuperLink already listens on 127.0.0.1:39093 (Flower's local port); stop it: pkill -f flower-superlink")
    home = tmp_path / "flwr-home"
    yield home
    for pid in _processes_mentioning(str(home)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)  # the SuperLink leads its own process group, with its app processes


def test_flwr_run_runs_the_repo_as_a_flower_app(tmp_path, tiny_base, keyword_data, flwr_home) -> None:
    """`flwr run . local --run-config X.toml`: Flower's CLI, its local SuperLink and Simulation Engine, our apps."""
    config = tiny_config(tmp_path, tiny_base, keyword_data, run_name="flwr-run",
                         partition={"method": "iid", "num_clients": 2}, strategy={"num_rounds": 2, "fraction_evaluate": 1.0},
                         train={"local_epochs": 1, "batch_size": 16, "lr": 1e-2, "device": "cpu"})
    run_config = tmp_path / "run.toml"
    run_config.write_text(config.to_toml())
    env = {**os.environ, "FLWR_HOME": str(flwr_home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_DISABLE_UPDATE_CHECK": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    command = [str(Path(sys.executable).parent / "flwr"), "run", ".", "local", "--stream", "--run-config", str(run_config),
               "--federation-config", "num-supernodes=2 client-resources-num-cpus=1 init-args-num-cpus=2"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    metrics = json.loads((config.run_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [0, 1, 2]
    assert all(r["clients_replied"] == 2 and r["eval_clients_replied"] == 2 for r in metrics["rounds"][1:])
    assert metrics["run"]["num_clients"] == 2 and metrics["run"]["model"] == str(tiny_base)
    assert load_run_config(config.run_dir / "config.toml") == config  # the run config reached the ServerApp intact
    load_adapter(load_model(str(tiny_base), num_labels=2), config.run_dir / "adapter")
