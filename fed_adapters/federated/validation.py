"""Screening client updates before aggregation: a bad reply costs its sender's contribution, never the round.

A reply is rejected, and logged with its node id, when its tensors do not match what the server sent
(names, shapes, dtypes), hold NaN or Inf, its example count is not positive, or its update (reply minus
the global adapter it started from) is longer than `strategy.max_update_norm` (L2 over all adapter and head
tensors; SCAFFOLD's control variates beside them are checked but not part of the update).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence

import numpy as np
from flwr.app import ArrayRecord, Message

from .mods import CONTROL_PREFIX

LOG = logging.getLogger("fed_adapters")


def update_problem(reply: Message, sent: ArrayRecord, max_norm: float = 0.0) -> str | None:
    """Why `reply` cannot be aggregated, or None when it can."""
    arrays = reply.content.array_records.get("arrays")
    metrics = reply.content.metric_records.get("metrics")
    if arrays is None or metrics is None:
        return "the reply lacks its 'arrays' or 'metrics' record"
    if len(reply.content.array_records) != 1 or len(reply.content.metric_records) != 1:
        return "the reply holds other records beside 'arrays' and 'metrics'"
    examples = metrics.get("num-examples")
    if not isinstance(examples, (int, float)) or not math.isfinite(examples) or examples <= 0:
        return f"num-examples is {examples!r}, not a positive number"
    missing, unexpected = sorted(set(sent) - set(arrays)), sorted(set(arrays) - set(sent))
    if missing or unexpected:
        return f"tensor names differ from the global adapter's: missing {missing[:3]}, unexpected {unexpected[:3]}"
    squared_norm = 0.0
    for name, expected in sent.items():
        got = arrays[name]
        if tuple(got.shape) != tuple(expected.shape) or got.dtype != expected.dtype:
            return f"{name} is {got.dtype}{list(got.shape)}, expected {expected.dtype}{list(expected.shape)}"
        values = got.numpy()
        if not np.all(np.isfinite(values)):
            return f"{name} holds NaN or Inf"
        if not name.startswith(CONTROL_PREFIX):
            squared_norm += float(np.sum((values.astype(np.float64) - expected.numpy()) ** 2))
    if max_norm > 0 and math.sqrt(squared_norm) > max_norm:
        return f"update norm {math.sqrt(squared_norm):.3g} exceeds strategy.max_update_norm = {max_norm:g}"
    return None


def screen(server_round: int, replies: Sequence[Message], sent: ArrayRecord,
           max_norm: float = 0.0) -> tuple[list[Message], list[tuple[int, str]]]:
    """The replies fit for aggregation (error replies pass through: the strategy counts them as failures),
    and (node id, reason) for each rejected one."""
    problems = {id(r): None if r.has_error() else update_problem(r, sent, max_norm) for r in replies}
    # Flower's aggregation refuses the whole round unless every reply reports the same metrics: the odd ones
    # out (fewer than the most common set of keys) go, not the round.
    key_sets = [frozenset(r.content.metric_records["metrics"].keys()) for r in replies if problems[id(r)] is None
                and not r.has_error()]
    usual = Counter(key_sets).most_common(1)[0][0] if key_sets else frozenset()
    kept, rejected = [], []
    for reply in replies:
        problem = problems[id(reply)]
        if problem is None and not reply.has_error():
            keys = frozenset(reply.content.metric_records["metrics"].keys())
            if keys != usual:
                problem = (f"its metrics differ from the other replies' (missing {sorted(usual - keys)[:3]}, "
                           f"unexpected {sorted(keys - usual)[:3]})")
        if problem is None:
            kept.append(reply)
        else:
            rejected.append((reply.metadata.src_node_id, problem))
            LOG.warning("round %d: rejected the update of node %d: %s", server_round, reply.metadata.src_node_id, problem)
    return kept, rejected
