"""SCAFFOLD: the client's control-variate update, and the server's control variate in a real Ray simulation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import disable_dropout, tiny_config
from flwr.app import Array
from safetensors.numpy import load_file

from fed_adapters.configuration import ConfigError
from fed_adapters.federated.mods import CONTROL_PREFIX
from fed_adapters.federated.head_calibration import HEAD_BIAS, HEAD_WEIGHT
from fed_adapters.federated.personalization import SharedWire, shared_parameters, snapshot
from fed_adapters.federated.private_store import PrivateStore
from fed_adapters.federated.scaffold import train_with_controls
from fed_adapters.federated.simulation import simulate
from fed_adapters.federated.task import build_adapted_model, model_and_tokenizer, tokenizer
from fed_adapters.training import train

SCAFFOLD = dict(strategy={"name": "scaffold", "num_rounds": 3, "fraction_train": 0.5},
                train={"optimizer": "sgd", "lr": 0.5, "local_epochs": 2})


def test_one_corrected_step_leaves_the_client_control_at_its_gradient(tmp_path, tiny_base, keyword_data) -> None:
    """One SGD step y = x - lr (g + c - c_i) gives c_i+ = c_i - c + (x - y) / lr = g, whatever c and c_i were."""
    config = tiny_config(tmp_path, tiny_base, keyword_data, **SCAFFOLD)
    model = build_adapted_model(config)
    disable_dropout(model)
    batch = dict(tokenizer(config.model.name)(["an excellent film", "a plot"], padding=True, return_tensors="pt"),
                 labels=torch.tensor([1, 0]))
    params = shared_parameters(model, config)
    model(**batch).loss.backward()
    gradient = {k: p.grad.detach().clone() for k, p in params.items()}
    model.zero_grad(set_to_none=True)
    x = snapshot(params)
    rng = np.random.default_rng(0)
    server = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in x.items()}
    own = {k: torch.from_numpy(rng.normal(size=v.shape).astype(np.float32)) for k, v in x.items()}
    store = PrivateStore(tmp_path / "clients")
    store.save(3, own)
    message = SharedWire(config).pack(model)
    for key, value in server.items():
        message[CONTROL_PREFIX + key] = Array(value)

    def fit(**kwargs):
        return train(model, [batch], max_steps=1, lr=0.5, optimizer="sgd", weight_decay=0.0, warmup_ratio=0.0,
                     max_grad_norm=None, device="cpu", **kwargs)

    reply, stats = train_with_controls(model, config, message, store, 3, fit)
    kept = store.load(3)
    assert stats.steps == 1 and set(reply.keys()) == set(x) | {CONTROL_PREFIX + k for k in x}
    for key in x:
        torch.testing.assert_close(kept[key], gradient[key], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(torch.from_numpy(reply[CONTROL_PREFIX + key].numpy()), gradient[key] - own[key], atol=2e-5, rtol=1e-4)
        expected = x[key] - 0.5 * (gradient[key] + torch.from_numpy(server[key]) - own[key])
        torch.testing.assert_close(torch.from_numpy(reply[key].numpy()), expected, atol=1e-5, rtol=1e-4)


def test_scaffold_federation_keeps_the_server_control_at_the_mean_of_the_clients(tmp_path, tiny_base, keyword_data) -> None:
    config = tiny_config(tmp_path, tiny_base, keyword_data, **SCAFFOLD, head_calibration={"method": "lda"})
    recorder = simulate(config, keep_updates=True, verbose=False)
    records = recorder.records
    model, _ = model_and_tokenizer(config)
    adapter_keys = set(SharedWire(config).pack(model).keys())
    controls = {CONTROL_PREFIX + k for k in adapter_keys}
    # The control variates travel beside the adapter both ways in training; evaluation sends the adapter alone.
    assert recorder.wire_keys["down"] == recorder.wire_keys["up"] == adapter_keys | controls
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    for record in records[1:]:
        assert record["clients_sampled"] == record["clients_replied"] == 2
        assert record["tensor_bytes_down"] == record["tensor_bytes_up"] == 2 * n_params * 4 * 2

    # Every client holds the same number of examples, so the server's c is the mean of all four c_i (SCAFFOLD's
    # invariant), clients never sampled counting as zero.
    stored = PrivateStore(config.private_state_dir)
    assert 2 <= len(stored.clients()) <= 4
    server = load_file(str(config.run_dir / "checkpoints" / "round-003" / "global.safetensors"))
    for key in adapter_keys:
        mean_of_clients = sum(stored.load(c)[key].numpy() for c in stored.clients()) / 4
        np.testing.assert_allclose(server[CONTROL_PREFIX + key], mean_of_clients, atol=1e-6)
        assert np.abs(server[CONTROL_PREFIX + key]).max() > 0

    # After the last round the adapter travels alone: the head-calibration query carries no control variate.
    calibration = json.loads((config.run_dir / "metrics.json").read_text())["head_calibration"]
    assert calibration["bytes_down"] == 4 * SharedWire(config).pack(model).count_bytes()

    # The adapter itself is FedAvg's example-weighted mean of the replies (server step 1); the head was refitted.
    final = load_file(str(config.run_dir / "adapter" / "adapter.safetensors"))
    updates = recorder.updates[3]
    total = sum(n for n, _ in updates)
    for key in adapter_keys - {HEAD_WEIGHT, HEAD_BIAS}:
        np.testing.assert_allclose(final[key], sum(n * a[key].astype(np.float64) for n, a in updates) / total, atol=1e-6)
    assert records[-1]["accuracy"] > records[0]["accuracy"] + 0.15, [r["accuracy"] for r in records]


def test_scaffold_config_errors(tmp_path, tiny_base, keyword_data) -> None:
    with pytest.raises(ConfigError, match="set train.optimizer = 'sgd'"):
        tiny_config(tmp_path, tiny_base, keyword_data, strategy={"name": "scaffold"})
    with pytest.raises(ConfigError, match="personalization.mode = 'split' keeps private tensors"):
        tiny_config(tmp_path, tiny_base, keyword_data, **SCAFFOLD, partition={"method": "iid", "num_clients": 4,
                    "local_test_fraction": 0.2}, personalization={"mode": "split"})
