"""Head calibration after the last round: the server refits the task head from class feature statistics.

Under label skew the averaged head leans toward the labels of whichever clients the last rounds sampled, and
clients that hold one label teach the shared head little else (classifier bias, Luo et al. 2021, CCVR). The
pooled features the head reads are another matter: every client's examples say something about their own
class. Per-class counts, means and the pooled within-class scatter merge exactly across clients, so the
server fits the shared-covariance Gaussian (LDA) classifier on all sampled clients' data at once: one extra
round trip, forward passes only, no example leaving its client. The adapter body is left as it is.

What a client sends is aggregate statistics of its features (num_labels x hidden means and one hidden x
hidden scatter matrix), in the clear: more revealing than an averaged update, so it is refused with
differential privacy and secure aggregation.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from torch import nn
from torch.utils.data import DataLoader

from ..adapters.state import HEAD_PREFIX
from ..training import resolve_device
from .config import RunConfig
from .mods import CALIBRATE_ACTION
from .recording import tensor_bytes
from .sampling import ClientOrderedGrid, NodesUnavailable, identify_clients

STATISTICS = ("class-counts", "class-means", "within-scatter")
HEAD_WEIGHT, HEAD_BIAS = HEAD_PREFIX + "classifier.weight", HEAD_PREFIX + "classifier.bias"  # PooledClassifier's


class CalibrationError(RuntimeError):
    pass


@torch.no_grad()
def feature_statistics(model: nn.Module, loader: DataLoader, num_labels: int, device: str = "auto") -> dict[str, np.ndarray]:
    """This client's per-class counts and feature means and its within-class scatter (centred per class), in
    float64 from full-precision features: sums over thousands of examples must not lose the small variances."""
    target = resolve_device(device)
    model.to(target).eval()
    features, labels = [], []
    for batch in loader:
        batch = {k: v.to(target) for k, v in batch.items()}
        labels.append(batch.pop("labels").cpu())
        features.append(model.features(**batch).double().cpu())
    x, y = torch.cat(features), torch.cat(labels)
    counts = torch.bincount(y, minlength=num_labels).double()
    means = torch.zeros(num_labels, x.shape[1], dtype=torch.float64)
    scatter = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
    for label in range(num_labels):
        members = x[y == label]
        if len(members):
            means[label] = members.mean(0)
            centred = members - means[label]
            scatter += centred.T @ centred
    return dict(zip(STATISTICS, (counts.numpy(), means.numpy(), scatter.numpy())))


def merge_statistics(parts: list[dict[str, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact pooled counts, class means and within-class covariance of all parts' examples together.

    A class's scatter about its pooled mean is each part's scatter plus n_k (mu_k - mu)(mu_k - mu)^T.
    """
    counts = np.sum([p["class-counts"] for p in parts], axis=0).astype(np.float64)
    weighted = np.sum([p["class-counts"][:, None] * p["class-means"] for p in parts], axis=0)
    means = weighted / np.maximum(counts, 1.0)[:, None]
    scatter = np.sum([p["within-scatter"] for p in parts], axis=0).astype(np.float64)
    for p in parts:
        offset = p["class-means"] - means  # (labels, hidden)
        scatter += (p["class-counts"][:, None] * offset).T @ offset
    return counts, means, scatter / counts.sum()


def lda_head(counts: np.ndarray, means: np.ndarray, covariance: np.ndarray, shrinkage: float) -> tuple[np.ndarray, np.ndarray]:
    """Weight (labels x hidden) and bias of the LDA classifier: w_c = S^-1 mu_c, b_c = -mu_c S^-1 mu_c / 2 + log p_c,
    with S shrunk by `shrinkage` toward (trace S / hidden) I, so that few examples still give a stable inverse."""
    missing = [label for label, n in enumerate(counts) if n == 0]
    if missing:
        raise CalibrationError(
            f"no sampled client holds an example of label(s) {missing}, so their head rows cannot be fitted; "
            "raise head_calibration.fraction (1.0 asks every client)"
        )
    dim = covariance.shape[0]
    shrunk = (1.0 - shrinkage) * covariance + shrinkage * np.trace(covariance) / dim * np.eye(dim)
    try:
        solved = np.linalg.solve(shrunk, means.T).T  # rows: S^-1 mu_c
    except np.linalg.LinAlgError:
        raise CalibrationError(f"the pooled features' covariance is singular at shrinkage {shrinkage}; raise "
                               "head_calibration.shrinkage (e.g. 0.1)") from None
    bias = -0.5 * np.sum(solved * means, axis=1) + np.log(counts / counts.sum())
    return solved, bias


def calibrate_head(grid: Grid, config: RunConfig, arrays: ArrayRecord, message_config: ConfigRecord,
                   num_clients: int) -> tuple[ArrayRecord | None, dict]:
    """`arrays` (the final ones, or the initial ones for `head_calibration.initial`) with an LDA head fitted on the
    sampled clients' statistics under them, and what it cost; (None, {"error": ...}) when the statistics cannot
    fit one (the run keeps the head it has)."""
    c = config.head_calibration
    try:  # the nodes connected now: a silo that left during the run is not waited for
        needed = min(num_clients, config.strategy.min_train_clients)
        client_of = identify_clients(grid, needed, timeout=config.strategy.node_wait_timeout) if c.fraction < 1.0 else {}
    except NodesUnavailable as error:
        return None, {"method": c.method, "shrinkage": c.shrinkage, "error": str(error)}
    nodes = calibration_nodes(grid, c.fraction, config.seed, client_of)
    parts, record = collect_statistics(grid, nodes, arrays, message_config, config.strategy.round_timeout)
    record.update(method=c.method, shrinkage=c.shrinkage)
    try:
        if not parts:
            raise CalibrationError(f"none of the {len(nodes)} clients asked sent its statistics")
        counts, means, covariance = merge_statistics(parts)
        weight, bias = lda_head(counts, means, covariance, c.shrinkage)
    except CalibrationError as error:
        return None, {**record, "error": str(error)}
    record.update(examples=int(counts.sum()), class_counts=[int(n) for n in counts])
    return calibrated_arrays(arrays, weight, bias), record


def calibration_nodes(grid: Grid, fraction: float, seed: int, client_of: dict[int, int]) -> list[int]:
    """A seeded draw of `fraction` of the connected nodes (at least one), taken in client order: Flower
    numbers nodes afresh in every run, the clients they serve stay the same."""
    nodes = ClientOrderedGrid(grid, client_of).get_node_ids()
    wanted = max(1, round(fraction * len(nodes)))
    return sorted(random.Random(seed * 1_000_003 + 7).sample(nodes, wanted)) if wanted < len(nodes) else nodes


def collect_statistics(grid: Grid, nodes: list[int], arrays: ArrayRecord, config: ConfigRecord,
                       timeout: float) -> tuple[list[dict[str, np.ndarray]], dict]:
    """Asks `nodes` for their statistics under `arrays`; returns the replies' statistics and the traffic."""
    questions = [Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=node,
                         message_type=f"{MessageType.QUERY}.{CALIBRATE_ACTION}") for node in nodes]
    replies = [r for r in grid.send_and_receive(questions, timeout=timeout) if not r.has_error()]
    parts = [{name: value.numpy() for name, value in r.content["arrays"].items()} for r in replies]
    return parts, {
        "clients_sampled": len(nodes), "clients_replied": len(replies),
        "clients": sorted(int(r.content["metrics"]["partition-id"]) for r in replies),
        "bytes_down": sum(q.content["arrays"].count_bytes() for q in questions),
        "bytes_up": sum(r.content["arrays"].count_bytes() for r in replies),
        "tensor_bytes_up": sum(tensor_bytes(r.content["arrays"]) for r in replies),
        "tensors_up": sorted({name for r in replies for name in r.content["arrays"].keys()}),
    }


def calibrated_arrays(arrays: ArrayRecord, weight: np.ndarray, bias: np.ndarray) -> ArrayRecord:
    """`arrays` with the head's weight and bias replaced (in their own dtype)."""
    replaced = {HEAD_WEIGHT: weight, HEAD_BIAS: bias}
    return ArrayRecord({name: Array(np.asarray(replaced[name], dtype=value.numpy().dtype) if name in replaced else value.numpy())
                        for name, value in arrays.items()})


def format_calibration(record: dict, before: dict) -> str:
    """One line for the end-of-run summary: what calibration cost and changed."""
    if "error" in record:
        return f"head calibration ({record['method']}) skipped: {record['error']}; the adapter keeps its averaged head"
    change = "  ".join(f"{key} {100 * before[key]:.2f}% -> {100 * record[key]:.2f}%" for key in ("accuracy", "macro_f1")
                       if key in before and key in record)
    return (f"head calibration ({record['method']}, shrinkage {record['shrinkage']}): {record['clients_replied']} of "
            f"{record['clients_sampled']} clients, {record['examples']:,} examples, up {record['bytes_up'] / 1e6:.2f} MB:  "
            f"{change}  loss {before.get('loss', float('nan')):.4f} -> {record.get('loss', float('nan')):.4f}")
