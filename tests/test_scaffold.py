"""SCAFFOLD: the client's control-variate update, and the server's control variate in a real Ray simulation."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from conftest import disable_dropout, tiny_config
from flwr.app import Array, Context, Message
from flwr.clientapp import ClientApp
from ray import cloudpickle
from safetensors.numpy import load_file

from fed_adapters.configuration import ConfigError
from fed_adapters.federated import checkpoints
from fed_adapters.federated.client_app import evaluate_adapter, identify, train_adapter
from fed_adapters.federated.mods import CONTROL_PREFIX
from fed_adapters.federated.head_calibration import HEAD_BIAS, HEAD_WEIGHT
from fed_adapters.federated.personalization import SharedWire, shared_parameters, snapshot
from fed_adapters.federated.private_store import PrivateStore
from fed_adapters.federated.scaffold import PENDING, PENDING_ROUND, Scaffold, counted_control, train_with_controls
from fed_adapters.federated.simulation import simulate
from fed_adapters.federated.task import build_adapted_model, model_and_tokenizer, tokenizer
from fed_adapters.training import train

# Ray actors cannot import this test module: ship its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

SCAFFOLD = dict(strategy={"name": "scaffold", "num_rounds": 3, "fraction_train": 0.5},
                train={"optimizer": "sgd", "lr": 0.5, "local_epochs": 2})


def assert_server_control_is_the_mean_of_the_counted_client_controls(config, adapter_keys: set[str], num_clients: int) -> None:
    """SCAFFOLD's invariant c = mean(c_i) over every client (one never sampled counts as zero), with each client's
    c_i as the server counts it: its last update's c_i+ only where the server's ledger took that update."""
    final = config.run_dir / "checkpoints" / f"round-{config.strategy.num_rounds:03d}"
    ledger = {int(c): r for c, r in json.loads((final / "server_state.json").read_text())["scaffold_accepted_rounds"].items()}
    server = load_file(str(final / "global.safetensors"))
    stored = PrivateStore(config.private_state_dir)
    counted = {c: counted_control(stored.load(c), ledger.get(c, 0)) for c in stored.clients()}
    for key in adapter_keys:
        mean_of_clients = sum(c_i[key].numpy() for c_i in counted.values()) / num_clients
        np.testing.assert_allclose(server[CONTROL_PREFIX + key], mean_of_clients, atol=1e-6)
        assert np.abs(server[CONTROL_PREFIX + key]).max() > 0


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

    reply, stats = train_with_controls(model, config, message, store, 3, fit, server_round=4, accepted=0)
    kept = store.load(3)
    assert stats.steps == 1 and set(reply.keys()) == set(x) | {CONTROL_PREFIX + k for k in x}
    # c_i+ waits as pending, from round 4, beside the c_i the server counts until it takes this update.
    assert int(kept[PENDING_ROUND]) == 4
    for key in x:
        torch.testing.assert_close(kept[PENDING + key], gradient[key], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(kept[key], own[key])
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

    # Every client holds the same number of examples, so the server's c is the mean of all four c_i.
    assert 2 <= len(PrivateStore(config.private_state_dir).clients()) <= 4
    assert_server_control_is_the_mean_of_the_counted_client_controls(config, adapter_keys, num_clients=4)

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


def test_a_client_takes_its_new_control_only_once_the_server_lists_its_update() -> None:
    before, after = {"w": torch.zeros(2)}, {"w": torch.ones(2)}
    saved = {**before, PENDING + "w": after["w"], PENDING_ROUND: torch.tensor(5)}
    assert counted_control(None, 0) is None
    torch.testing.assert_close(counted_control(saved, 5), after)  # round 5's update was aggregated
    for accepted in (0, 3):  # rejected, lost or skipped: the server never added its dc_i, so c_i stays
        torch.testing.assert_close(counted_control(saved, accepted), before)


rejecting_app = ClientApp()


@rejecting_app.train()
def nan_in_round_one_from_client_one(msg: Message, context: Context) -> Message:
    """Client 1 trains honestly (and keeps its c_i+), then its round-1 reply is spoilt, so the server rejects it."""
    reply = train_adapter(msg, context)
    if int(context.node_config["partition-id"]) == 1 and int(msg.content["config"]["server-round"]) == 1:
        arrays = reply.content["arrays"]
        name = next(iter(arrays))
        arrays[name] = Array(np.full(arrays[name].shape, np.nan, dtype=np.float32))
    return reply


rejecting_app.evaluate()(evaluate_adapter)
rejecting_app.query()(identify)


def test_a_rejected_update_leaves_the_client_control_as_the_server_counts_it(tmp_path, tiny_base, keyword_data) -> None:
    """Client 1's round-1 c_i+ must not count: the server never added its dc_i to c."""
    config = tiny_config(tmp_path, tiny_base, keyword_data, strategy={**SCAFFOLD["strategy"], "fraction_train": 1.0},
                         train=SCAFFOLD["train"], partition={"local_test_fraction": 0.0})
    recorder = simulate(config, verbose=False, client_app=rejecting_app)
    assert [r["updates_rejected"] for r in recorder.records[1:]] == [1, 0, 0]
    model, _ = model_and_tokenizer(config)
    assert_server_control_is_the_mean_of_the_counted_client_controls(config, set(SharedWire(config).pack(model).keys()),
                                                                      num_clients=4)


def test_a_resumed_run_keeps_the_ledger_of_accepted_updates(tmp_path, tiny_base, keyword_data) -> None:
    """Flower's node ids change with every run, so the ledger is by client id and travels in the checkpoint."""
    config = tiny_config(tmp_path, tiny_base, keyword_data, **SCAFFOLD)
    strategy = Scaffold(num_clients=4)
    strategy.accepted_rounds = {0: 2, 3: 1, 2**31 - 1: 2}
    model = build_adapted_model(config)
    checkpoints.write(tmp_path / "run", 2, model, SharedWire(config).pack(model), [], strategy, None, {}, 1.0)
    resumed = Scaffold(num_clients=4)
    checkpoints.restore(checkpoints.latest(tmp_path / "run"), resumed, None)
    assert resumed.accepted_rounds == strategy.accepted_rounds


def test_scaffold_config_errors(tmp_path, tiny_base, keyword_data) -> None:
    with pytest.raises(ConfigError, match="set train.optimizer = 'sgd'"):
        tiny_config(tmp_path, tiny_base, keyword_data, strategy={"name": "scaffold"})
    with pytest.raises(ConfigError, match="personalization.mode = 'split' keeps private tensors"):
        tiny_config(tmp_path, tiny_base, keyword_data, **SCAFFOLD, partition={"method": "iid", "num_clients": 4,
                    "local_test_fraction": 0.2}, personalization={"mode": "split"})
