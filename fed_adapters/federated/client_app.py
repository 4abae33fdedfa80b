"""The Flower ClientApp: a client trains and evaluates only its adapter (and head) on its private shard.

The run's configuration arrives with every message (`config["run-config"]`, JSON), so the same ClientApp
serves `fed-adapters simulate`, `flwr run` and deployed SuperNodes; a SuperNode names its own data with
`--node-config "data-path=..."`. Replies carry the shared adapter (and head) tensors and metrics, nothing
of the frozen base and nothing a personalization mode keeps private.

This module stays light (no torch, no transformers): in simulation the work runs here, in the Ray actor
that keeps the base cached (`client_work.py`); on a SuperNode, where Flower starts a fresh process for
every message, it goes to the node's long-running worker (`node_worker.py`), which keeps the base in
memory across messages and rounds (node config `persistent-worker="false"` runs it in-process instead).
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from . import node_worker
from .mods import (CALIBRATE_ACTION, CLIENT_ID_KEY, client_id, clip_when_asked, is_secure_fit, secure_fit_reply,
                   secure_when_asked)

app = ClientApp()


def run_work(kind: str, arrays: ArrayRecord, message_config: ConfigRecord, context: Context):
    """`client_work.HANDLERS[kind]` on this message, in this process or in the node's worker."""
    node = dict(context.node_config)
    work = ({name: value.numpy() for name, value in arrays.items()}, dict(message_config), node, context.node_id)
    if node_worker.wanted(node):
        return node_worker.call(kind, *work)
    from .client_work import HANDLERS  # here, not at import: a SuperNode's ClientApp process never needs it

    return HANDLERS[kind](*work)


def arrays_work(kind: str, arrays: ArrayRecord, message_config: ConfigRecord, context: Context) -> tuple[ArrayRecord, MetricRecord]:
    """`run_work` for the kinds of work that answer with tensors and metrics."""
    sent, metrics = run_work(kind, arrays, message_config, context)
    return ArrayRecord({name: Array(value) for name, value in sent.items()}), MetricRecord(metrics)


@app.train(mods=[clip_when_asked, secure_when_asked])
def train_adapter(msg: Message, context: Context) -> Message:
    if is_secure_fit(msg):
        return secure_fit_reply(msg, lambda arrays, config: arrays_work("train", arrays, config, context))
    arrays, metrics = arrays_work("train", msg.content["arrays"], msg.content["config"], context)
    return Message(content=RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate_adapter(msg: Message, context: Context) -> Message:
    """The global model's and the client's personal model's metrics on its local test split."""
    metrics = run_work("evaluate", msg.content["arrays"], msg.content["config"], context)
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


@app.query(CALIBRATE_ACTION)
def class_statistics(msg: Message, context: Context) -> Message:
    """Class feature statistics under the received adapter, for the server's head calibration."""
    arrays, metrics = arrays_work("statistics", msg.content["arrays"], msg.content["config"], context)
    return Message(content=RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """Which client this node serves: lets the server sample the same clients in every run (see strategies.py)."""
    return Message(content=RecordDict({"metrics": MetricRecord({CLIENT_ID_KEY: client_id(dict(context.node_config),
                                                                                     context.node_id)})}), reply_to=msg)
