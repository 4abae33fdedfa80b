"""Differential privacy of the aggregate (clipping on the clients, noise on the server) in a real Ray federation."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from flwr.common import FitIns, bytes_to_ndarray, ndarrays_to_parameters
from flwr.compat.common import recorddict_compat
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.serverapp import ServerApp
from flwr.simulation import run_simulation

from flwr.app import Array, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.privacy_accounting import GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, SamplingMethod
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant
from ray import cloudpickle

from conftest import tiny_config
from fed_adapters.configuration import ConfigError
from fed_adapters.federated.client_app import app as client_app
from fed_adapters.federated.client_app import evaluate_adapter, train_adapter
from fed_adapters.federated.mods import NAMES_KEY, ROUND_OFFSET_KEY, RUN_CONFIG_KEY, clip_when_asked
from fed_adapters.federated.personalization import SharedWire
from fed_adapters.federated.server_app import run_federation
from fed_adapters.federated.simulation import backend_config, simulate
from fed_adapters.federated.task import build_adapted_model, shards

# Ray actors cannot import this test module: ship its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def test_central_dp_clips_updates_adds_noise_and_still_learns(tmp_path, tiny_base, keyword_data) -> None:
    clip, multiplier, clients = 0.5, 0.05, 4
    config = tiny_config(tmp_path, tiny_base, keyword_data, strategy={"num_rounds": 4},
                         privacy={"dp": "central", "clipping_norm": clip, "noise_multiplier": multiplier})
    recorder = simulate(config, keep_updates=True, verbose=False)
    records = recorder.records
    checkpoints = config.run_dir / "checkpoints"

    # Each client's reply differs from the adapter it received by at most the clipping norm (L2, all tensors).
    previous = load_file(str(checkpoints / "round-003" / "adapter.safetensors"))
    replies = recorder.updates[4]
    assert len(replies) == clients
    norms = [np.sqrt(sum(float(np.sum((arrays[k].astype(np.float64) - previous[k]) ** 2)) for k in arrays))
             for _, arrays in replies]
    assert max(norms) <= clip * (1 + 1e-5), norms
    assert min(norms) > 0.5 * clip  # untouched updates would be far larger: clipping acted

    # The new global adapter is the uniform mean of the replies plus Gaussian noise of std z * C / n.
    final = load_file(str(checkpoints / "round-004" / "adapter.safetensors"))
    residual = np.concatenate([
        (final[k] - sum(arrays[k].astype(np.float64) for _, arrays in replies) / clients).ravel() for k in replies[0][1]
    ])
    expected_std = multiplier * clip / clients
    assert records[4]["dp_noise_std"] == pytest.approx(expected_std)
    assert residual.std() == pytest.approx(expected_std, rel=0.1) and abs(residual.mean()) < expected_std / 10

    # Epsilon grows with every release and is written down; the model still learns the easy task.
    epsilons = [r["dp_epsilon"] for r in records[1:]]
    assert all(0 < a < b for a, b in zip(epsilons, epsilons[1:])), epsilons
    saved = json.loads((config.run_dir / "metrics.json").read_text())["rounds"]
    assert [r["dp_epsilon"] for r in saved[1:]] == epsilons
    assert records[-1]["accuracy"] > records[0]["accuracy"] + 0.15, [r["accuracy"] for r in records]


unreliable_app = ClientApp()


@unreliable_app.train(mods=[clip_when_asked])
def nan_in_round_1_crash_in_round_2(msg: Message, context: Context) -> Message:
    """Client 1's round-1 update is NaN (rejected by the server's screening); client 0 raises in round 2, beside
    client 1's reply without metrics (rejected too: the failed round is recorded, not crashed on)."""
    client, run_round = int(context.node_config["partition-id"]), int(msg.content["config"]["server-round"])
    if (client, run_round) == (0, 2):
        raise RuntimeError("client 0 crashed")
    reply = train_adapter(msg, context)
    if (client, run_round) == (1, 2):
        return Message(content=RecordDict({"arrays": reply.content["arrays"]}), reply_to=msg)
    if (client, run_round) == (1, 1):
        arrays = reply.content["arrays"]
        name = next(iter(arrays))
        arrays[name] = Array(np.full(arrays[name].shape, np.nan, dtype=np.float32))
    return reply


unreliable_app.evaluate()(evaluate_adapter)


def test_dp_accounts_for_fewer_updates_records_failed_rounds_and_evaluates_clients(tmp_path, tiny_base, keyword_data) -> None:
    """A mean over fewer clients than sampled spends more privacy; a failed client skips the round, on the record;
    per-round client evaluation still averages by examples (training averages uniformly under DP)."""
    multiplier = 0.8
    config = tiny_config(tmp_path, tiny_base, keyword_data, partition={"local_test_fraction": 0.2},
                         strategy={"num_rounds": 3, "fraction_evaluate": 1.0},
                         privacy={"dp": "central", "clipping_norm": 0.5, "noise_multiplier": multiplier})
    records = simulate(config, verbose=False, client_app=unreliable_app).records
    first, second, third = records[1:]
    assert first["updates_rejected"] == 1 and first["dp_noise_multiplier"] == pytest.approx(multiplier * 3 / 4)
    assert second["skipped"] == 1 and second["clients_failed"] == 1 and second["updates_rejected"] == 1
    assert "dp_epsilon" not in second
    assert third["dp_noise_multiplier"] == pytest.approx(multiplier)
    ledger = RdpAccountant(PrivacyConfig(target_delta=config.privacy.target_delta, population_size=4,
                                         neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                         sampling_method=SamplingMethod.NO_AMPLIFICATION))
    ledger.compose(GaussianPrivacyEvent(multiplier * 3 / 4, 4, 4))
    assert first["dp_epsilon"] == pytest.approx(ledger.get_privacy_spent().epsilon)
    ledger.compose(GaussianPrivacyEvent(multiplier, 4, 4))
    assert third["dp_epsilon"] == pytest.approx(ledger.get_privacy_spent().epsilon)
    assert all(r["eval_clients_replied"] == 4 and 0 <= r["client_accuracy"] <= 1 for r in (first, third))


def test_dp_needs_a_uniform_mean(tmp_path, tiny_base, keyword_data) -> None:
    with pytest.raises(ConfigError, match="privacy.dp = 'central'.*strategy.name = 'fedmedian'.*'fedavg'"):
        tiny_config(tmp_path, tiny_base, keyword_data, strategy={"name": "fedmedian"}, privacy={"dp": "central"})
    with pytest.raises(ConfigError, match="privacy.clipping_norm must be > 0"):
        tiny_config(tmp_path, tiny_base, keyword_data, privacy={"dp": "central", "clipping_norm": 0.0})


class RecordingGrid:
    """The ServerApp's Grid, keeping every message the server sends and receives."""

    def __init__(self, grid) -> None:
        self._grid = grid
        self.exchanges: list[tuple[list, list]] = []

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self.exchanges.append((messages, replies))
        return replies

    def __getattr__(self, name):
        return getattr(self._grid, name)


def test_secure_aggregation_equals_fedavg_and_hides_each_update(tmp_path, tiny_base, keyword_data) -> None:
    secure = {"secure_aggregation": True, "secagg_max_weight": 100.0, "secagg_clipping_range": 4.0}
    plain_config = tiny_config(tmp_path / "plain", tiny_base, keyword_data, strategy={"num_rounds": 2, "min_train_clients": 3})
    secure_config = tiny_config(tmp_path / "secure", tiny_base, keyword_data, strategy={"num_rounds": 2, "min_train_clients": 3},
                                privacy=secure)
    plain = simulate(plain_config, keep_updates=True, verbose=False)

    grids: list[RecordingGrid] = []
    server = ServerApp()

    @server.main()
    def main(grid, context) -> None:
        grids.append(RecordingGrid(grid))
        grids[0].recorder = run_federation(grids[0], secure_config, verbose=False)

    run_simulation(server_app=server, client_app=client_app, num_supernodes=4, backend_config=backend_config(secure_config))
    records = grids[0].recorder.records

    # The SecAgg+ aggregate is FedAvg's example-weighted mean, up to quantization.
    for round_dir in ("round-001", "round-002"):
        ours = load_file(str(secure_config.run_dir / "checkpoints" / round_dir / "adapter.safetensors"))
        reference = load_file(str(plain_config.run_dir / "checkpoints" / round_dir / "adapter.safetensors"))
        assert ours.keys() == reference.keys()
        for key in ours:
            np.testing.assert_allclose(ours[key], reference[key], rtol=0, atol=2e-4, err_msg=key)
    assert records[2]["accuracy"] == pytest.approx(plain.records[2]["accuracy"], abs=0.02)
    assert all(r["clients_replied"] == 4 and r["bytes_up"] > 0 for r in records[1:])

    # No reply carries a tensor; the masked vectors look like uniform noise mod 2^32, and decoding one
    # as if it were unmasked matches none of the clients' true updates (known from the plain run).
    true_updates = [np.concatenate([a.ravel() for a in arrays.values()]) for _, arrays in plain.updates[1]]  # wire order
    quantization = secure_config.privacy.secagg_quantization_range
    masked_vectors = []
    for messages, replies in grids[0].exchanges:
        for reply in replies:
            assert all(len(record) == 0 for record in reply.content.array_records.values())
            stage = reply.content.config_records.get(RECORD_KEY_CONFIGS)
            if stage is not None and Key.MASKED_PARAMETERS in stage:
                masked_vectors.append(np.concatenate([bytes_to_ndarray(b).ravel() for b in stage[Key.MASKED_PARAMETERS][1:]]))
    assert len(masked_vectors) == 4 * 2

    def naive_decode(vector: np.ndarray) -> np.ndarray:
        return dequantize([vector.astype(np.int64) % quantization], 4.0, quantization)[0]

    # The check has power: an unmasked (only quantized) update decodes to itself.
    unmasked = quantize([true_updates[0] * 0.8], 4.0, quantization)[0]
    assert np.corrcoef(naive_decode(unmasked), true_updates[0])[0, 1] > 0.99
    for vector in masked_vectors:
        assert np.mean(vector > quantization) > 0.9  # an unmasked quantized value lies in [0, quantization]
        naive = naive_decode(vector)
        assert naive.size == true_updates[0].size
        for update in true_updates:
            assert abs(np.corrcoef(naive, update)[0, 1]) < 0.3


@pytest.mark.parametrize("privacy,message", [
    ({"secagg_threshold": 5}, r"secagg_threshold = 5 exceeds the 4 clients that hold key shares each round \(4 sampled\)"
                              r".*at most 4"),
    ({"secagg_quantization_range": 2**30}, r"secagg_quantization_range = 1073741824 x 4 clients per round reaches 2\^32"
                                           r".*below 1073741824"),
    ({"secagg_quantization_range": 0}, r"refused by Flower's SecAgg\+ workflow: `quantization_range` must be greater than 0"),
])
def test_secure_aggregation_settings_that_would_train_nothing_or_sum_wrongly_are_refused(
        tmp_path, tiny_base, keyword_data, privacy: dict, message: str) -> None:
    config = tiny_config(tmp_path, tiny_base, keyword_data, strategy={"min_train_clients": 3},
                         privacy={"secure_aggregation": True, "secagg_max_weight": 100.0, **privacy})
    with pytest.raises(ConfigError, match=message):
        simulate(config, verbose=False)
    assert not config.run_dir.exists()


def secure_fit_message(config) -> Message:
    """The SecAgg+ workflow's fit message for client 0, as Flower's legacy FedAvg sends it."""
    arrays = SharedWire(config).pack(build_adapted_model(config))
    fit_config = {RUN_CONFIG_KEY: json.dumps(config.to_dict()), ROUND_OFFSET_KEY: 0, "server-round": 1,
                  NAMES_KEY: json.dumps(list(arrays.keys()))}
    fitins = FitIns(ndarrays_to_parameters([a.numpy() for a in arrays.values()]), fit_config)
    return Message(content=recorddict_compat.fitins_to_recorddict(fitins, keep_input=True), dst_node_id=1,
                   message_type="train")


def test_secure_aggregation_refuses_updates_it_would_corrupt(tmp_path, tiny_base, keyword_data, message_identity) -> None:
    """SecAgg+ scales an update by num_examples / max_weight, clips it silently and sums modulo 2^32: a weight past
    max_weight (overflow) or a scaled value past the clipping range (clipped) is refused with the setting to change."""
    secure = {"secure_aggregation": True, "secagg_max_weight": 5.0}
    config = tiny_config(tmp_path, tiny_base, keyword_data, strategy={"min_train_clients": 3}, privacy=secure)
    largest = max(len(shard.train) for shard in shards(config))
    assert largest > 5
    with pytest.raises(ConfigError, match=rf"secagg_max_weight = 5 is below the largest client's {largest} training "
                                          rf"examples.*secagg_max_weight >= {largest}"):
        simulate(config, verbose=False)
    assert not config.run_dir.exists()

    # A deployed server cannot see shard sizes: each client checks its own update before the mod scales it.
    context = Context(run_id=0, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    own = len(shards(config)[0].train)
    with pytest.raises(ValueError, match=rf"trains on {own} examples, more than privacy.secagg_max_weight = 5"):
        train_adapter(secure_fit_message(config), context)
    clipped = tiny_config(tmp_path, tiny_base, keyword_data, strategy={"min_train_clients": 3},
                          privacy={**secure, "secagg_max_weight": 100.0, "secagg_clipping_range": 1e-3})
    with pytest.raises(ValueError, match=r"values up to .* beyond privacy.secagg_clipping_range = 0.001.*"
                                         r"secagg_clipping_range >= "):
        train_adapter(secure_fit_message(clipped), context)
    fitting = tiny_config(tmp_path, tiny_base, keyword_data, strategy={"min_train_clients": 3},
                          privacy={**secure, "secagg_max_weight": 100.0})
    reply = train_adapter(secure_fit_message(fitting), context)
    result = recorddict_compat.recorddict_to_fitres(reply.content, keep_input=True)
    assert result.num_examples == own and len(result.parameters.tensors) == len(secure_fit_message(fitting).content[
        "fitins.parameters"])
