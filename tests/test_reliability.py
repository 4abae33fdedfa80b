"""Faulty clients cost their own contribution, never the run: validation, failures, skipped rounds."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from ray import cloudpickle
from safetensors.numpy import load_file

from conftest import tiny_config
from fed_adapters.federated.client_app import evaluate_adapter, train_adapter
from fed_adapters.federated.simulation import simulate
from fed_adapters.federated.validation import update_problem

# Ray actors cannot import this test module: ship its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

faulty_app = ClientApp()


@faulty_app.train()
def faulty_train(msg: Message, context: Context) -> Message:
    """Clients 0-2 misbehave after training honestly; the others are the real ClientApp."""
    client = int(context.node_config["partition-id"])
    if client == 0:
        raise RuntimeError("client 0 crashed")
    reply = train_adapter(msg, context)
    arrays = reply.content["arrays"]
    if client == 1:  # NaN in one tensor
        name = next(iter(arrays))
        arrays[name] = Array(np.full(arrays[name].shape, np.nan, dtype=np.float32))
    elif client == 2:  # a tensor of the wrong shape
        name = next(iter(arrays))
        arrays[name] = Array(np.zeros((3, 3), dtype=np.float32))
    return reply


faulty_app.evaluate()(evaluate_adapter)


def test_bad_updates_are_rejected_and_the_round_aggregates_the_rest(tmp_path, tiny_base, keyword_data) -> None:
    config = tiny_config(tmp_path, tiny_base, keyword_data, partition={"num_clients": 5},
                         strategy={"num_rounds": 2, "min_train_clients": 2})
    recorder = simulate(config, keep_updates=True, verbose=False, client_app=faulty_app)
    for record in recorder.records[1:]:
        assert (record["clients_sampled"], record["clients_replied"], record["clients_failed"], record["updates_rejected"]) \
            == (5, 2, 1, 2)
    # The global adapter is the example-weighted mean of the two sound updates only.
    sound = recorder.updates[2]
    total = sum(n for n, _ in sound)
    final = load_file(str(config.run_dir / "adapter" / "adapter.safetensors"))
    for key in final:
        np.testing.assert_allclose(final[key], sum(n * a[key].astype(np.float64) for n, a in sound) / total, atol=1e-6)
    assert recorder.records[-1]["accuracy"] > recorder.records[0]["accuracy"]


def test_a_round_below_the_minimum_is_skipped_not_fatal(tmp_path, tiny_base, keyword_data) -> None:
    config = tiny_config(tmp_path, tiny_base, keyword_data, partition={"num_clients": 5},
                         strategy={"num_rounds": 2, "min_train_clients": 3})
    records = simulate(config, verbose=False, client_app=faulty_app).records
    assert [r.get("skipped", 0) for r in records[1:]] == [1, 1]
    # Nothing was aggregated: every checkpoint is the initial adapter, and the run finished normally.
    assert records[1]["accuracy"] == records[2]["accuracy"] == records[0]["accuracy"]
    assert (config.run_dir / "metrics.json").is_file() and (config.run_dir / "adapter").is_dir()


def _reply(arrays: dict[str, np.ndarray], examples: object = 10) -> Message:
    sent = Message(RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros(4, np.float32))})}), dst_node_id=7,
                   message_type="train")
    return Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                               "metrics": MetricRecord({"num-examples": examples})}), reply_to=sent)


@pytest.fixture
def message_identity():
    """Messages built outside a run need Flower's task identity."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id = TaskIdentity._node_id = TaskIdentity._task_id = None


def test_update_problems_are_named(message_identity) -> None:
    sent = ArrayRecord({"w": Array(np.zeros(4, np.float32))})
    assert update_problem(_reply({"w": np.ones(4, np.float32)}), sent) is None
    assert "update norm 2 exceeds strategy.max_update_norm = 1" in update_problem(_reply({"w": np.ones(4, np.float32)}), sent, 1.0)
    assert "w holds NaN or Inf" in update_problem(_reply({"w": np.array([0, np.inf, 0, 0], np.float32)}), sent)
    assert "w is float64[4], expected float32[4]" in update_problem(_reply({"w": np.zeros(4)}), sent)
    assert "missing ['w'], unexpected ['v']" in update_problem(_reply({"v": np.zeros(4, np.float32)}), sent)
    assert "num-examples is 0" in update_problem(_reply({"w": np.zeros(4, np.float32)}, examples=0), sent)
