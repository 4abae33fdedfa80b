"""The client side of the protocol that runs in the ClientApp process itself: message keys and Flower mods.

Kept free of torch and transformers: on a SuperNode the ClientApp process is started afresh for every
message, and whatever it imports is paid every time (the heavy work runs in `node_worker.py`).
"""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

RUN_CONFIG_KEY = "run-config"  # the run's RunConfig as JSON, in every message's config
ROUND_OFFSET_KEY = "round-offset"  # rounds done before a resume: message round + offset = the run's round
UNIFORM_WEIGHT_KEY = "unit-weight"  # every training reply carries it (= 1); DP runs average by it, i.e. uniformly
CLIENT_ID_KEY = "client-id"
CALIBRATE_ACTION = "calibrate"  # query action: class feature statistics for the server's head calibration
# SCAFFOLD's control variates travel beside the adapter, named CONTROL_PREFIX + the tensor's wire name.
CONTROL_PREFIX = "scaffold-control/"
# SCAFFOLD's ledger, in every training message's config: the clients whose updates the server aggregated and,
# for each, the last such round; a client keeps the c_i of an update only once the server lists it here.
ACCEPTED_CLIENTS_KEY = "scaffold-accepted-clients"
ACCEPTED_ROUNDS_KEY = "scaffold-accepted-rounds"
NAMES_KEY = "tensor-names"  # SecAgg+ messages carry tensors as a list: their names travel in the fit config
FIT_PARAMETERS = "fitins.parameters"
FIT_CONFIG = "fitins.config"


def split_controls(arrays: ArrayRecord) -> tuple[ArrayRecord, dict[str, np.ndarray]]:
    """(the adapter's arrays, SCAFFOLD's control variates by tensor name; empty for other strategies)."""
    shared = ArrayRecord({k: v for k, v in arrays.items() if not k.startswith(CONTROL_PREFIX)})
    controls = {k.removeprefix(CONTROL_PREFIX): v.numpy() for k, v in arrays.items() if k.startswith(CONTROL_PREFIX)}
    return shared, controls


def client_id(node: dict, node_id: int) -> int:
    """The client a node serves: its partition (simulation), its `client-id` node config, or its node id."""
    value = node.get("partition-id", node.get("client-id", node_id % 2**31))
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"node config client-id={value!r} must be a whole number (it seeds the node's training and "
                         "names its private state), e.g. --node-config \"client-id=3 data-path=...\"") from None


def clip_when_asked(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's `fixedclipping_mod` (DP) when the server sent a clipping norm, a no-op otherwise."""
    config = msg.content.config_records.get("config")
    if config is not None and KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


def secure_when_asked(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's `secaggplus_mod` for SecAgg+ protocol messages, a no-op for plain ones."""
    if msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def is_secure_fit(msg: Message) -> bool:
    return FIT_PARAMETERS in msg.content.array_records


def named(names: list[str], arrays) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(a, dtype=np.float32)) for name, a in zip(names, arrays, strict=True)})


def check_secure_scaling(arrays: ArrayRecord, num_examples: int, privacy: dict) -> None:
    """Refuses an update that SecAgg+ would corrupt without a word: Flower's mod scales it by num_examples /
    max_weight, clips it to +-clipping_range and sums the weights modulo 2^32. A deployed server never sees the
    clients' shard sizes, so each client checks its own update (a simulation checks the shards before it starts,
    `secure_aggregation.check_secure_settings`)."""
    max_weight, clipping_range = float(privacy["secagg_max_weight"]), float(privacy["secagg_clipping_range"])
    if num_examples > max_weight:
        raise ValueError(f"this client trains on {num_examples} examples, more than privacy.secagg_max_weight = "
                         f"{max_weight:g}: SecAgg+ expects num_examples <= max_weight (it scales each update by "
                         f"their ratio before clipping it, and sums the weights modulo 2^32); set "
                         f"privacy.secagg_max_weight >= the largest client's examples ({num_examples})")
    largest = max((float(np.max(np.abs(a.numpy()))) for a in arrays.values() if a.numpy().size), default=0.0)
    scaled = largest * num_examples / max_weight
    if scaled > clipping_range:
        raise ValueError(f"this client's adapter holds values up to {largest:.4g}, {scaled:.4g} once scaled by "
                         f"num_examples / max_weight = {num_examples} / {max_weight:g}: beyond privacy.secagg_clipping_range "
                         f"= {clipping_range:g}, where SecAgg+ would clip them and corrupt the aggregate; set "
                         f"privacy.secagg_clipping_range >= {scaled:.4g}")


def secure_fit_reply(msg: Message, train: Callable[[ArrayRecord, ConfigRecord], tuple[ArrayRecord, MetricRecord]]) -> Message:
    """Answers a legacy fit message (the SecAgg+ workflow's) with `train`, the plain path's local training."""
    config = msg.content.config_records[FIT_CONFIG]
    names = json.loads(str(config[NAMES_KEY]))
    arrays, metrics = train(named(names, msg.content.array_records[FIT_PARAMETERS].to_numpy_ndarrays()), config)
    check_secure_scaling(arrays, int(metrics["num-examples"]), json.loads(str(config[RUN_CONFIG_KEY]))["privacy"])
    result = FitRes(
        status=Status(code=Code.OK, message="ok"),
        parameters=ndarrays_to_parameters([arrays[name].numpy() for name in names]),
        num_examples=int(metrics["num-examples"]),
        metrics=dict(metrics),
    )
    return Message(recorddict_compat.fitres_to_recorddict(result, keep_input=False), reply_to=msg)
