"""Per-round records of a federated run, measured on the messages themselves."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
from flwr.app import ArrayRecord, Message


def _arrays(message: Message) -> ArrayRecord | None:
    return message.content.array_records.get("arrays") if not message.has_error() else None


def global_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The server's evaluation metrics that a record keeps."""
    return {k: float(v) for k, v in metrics.items() if k in ("accuracy", "loss", "macro_f1", "perplexity")}


def tensor_bytes(arrays: ArrayRecord) -> int:
    """Bytes of tensor data alone (numel x itemsize), without serialization headers or key names."""
    return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in arrays.values())


class RoundRecorder:
    """Collects, per round: traffic both ways, replies and failures, client time, global metrics."""

    def __init__(self, num_rounds: int, verbose: bool = True, keep_updates: bool = False, offset: int = 0) -> None:
        self.num_rounds = num_rounds
        self.offset = offset  # rounds completed before a resume: Flower counts the rest from 1 again
        self.verbose = verbose
        self.records: list[dict] = []
        self.wire_keys: dict[str, set[str]] = {"down": set(), "up": set()}
        # round -> [(num-examples, {name: array})] of the clients' replies, for audits of the aggregation
        self.updates: dict[int, list[tuple[int, dict[str, np.ndarray]]]] | None = {} if keep_updates else None
        self._current: dict = {}
        self.clients: list[dict] = []  # the per-client report after the last round (client_report.py)

    def sent(self, server_round: int, messages: Sequence[Message], phase: str) -> None:
        if phase == "train":
            self._current = {"round": server_round, "started": time.perf_counter()}
        arrays = [a for a in map(_arrays, messages) if a is not None]
        for record in arrays:
            self.wire_keys["down"].update(record.keys())
        prefix = "" if phase == "train" else "eval_"
        self._current[f"{prefix}clients_sampled"] = len(messages)
        self._current[f"{prefix}bytes_down"] = sum(a.count_bytes() for a in arrays)
        self._current[f"{prefix}tensor_bytes_down"] = sum(tensor_bytes(a) for a in arrays)

    def received(self, server_round: int, replies: Sequence[Message], phase: str, rejected: int = 0) -> None:
        """`replies`: those that passed validation (and error replies); `rejected` were refused by it."""
        ok = [r for r in replies if not r.has_error()]
        metrics = [r.content.metric_records["metrics"] for r in ok]
        examples = sum(m["num-examples"] for m in metrics)

        def weighted_mean(key: str) -> float:
            having = [m for m in metrics if key in m]
            total = sum(m["num-examples"] for m in having)
            return sum(m[key] * m["num-examples"] for m in having) / total if total else float("nan")

        if phase != "train":
            self._current["eval_clients_replied"] = len(ok)
            for key in ("accuracy", "personal-accuracy"):
                if examples and all(key in m for m in metrics):
                    self._current[f"client_{key.replace('-', '_')}"] = weighted_mean(key)
            return
        arrays = [a for a in map(_arrays, ok) if a is not None]
        for record in arrays:
            self.wire_keys["up"].update(record.keys())
        if self.updates is not None:
            self.updates[server_round + self.offset] = [
                (int(m["num-examples"]), {k: v.numpy() for k, v in a.items()}) for m, a in zip(metrics, arrays)
            ]
        self._current.update(
            clients_replied=len(ok),
            # raised, timed out or never answered; rejected updates are counted apart
            clients_failed=self._current.get("clients_sampled", len(replies) + rejected) - len(ok) - rejected,
            updates_rejected=rejected,
            bytes_up=sum(a.count_bytes() for a in arrays),
            tensor_bytes_up=sum(tensor_bytes(a) for a in arrays),
            train_examples=int(examples),
            train_examples_seen=int(sum(m.get("train-examples-seen", 0) for m in metrics)),
            train_loss=weighted_mean("train-loss"),
            client_train_seconds_max=max((m.get("train-seconds", 0.0) for m in metrics), default=0.0),
            client_train_seconds_sum=sum(m.get("train-seconds", 0.0) for m in metrics),
            client_gpus=sorted({int(m["ray-gpu"]) for m in metrics if "ray-gpu" in m}),
            client_setup_seconds_max=max((m.get("setup-seconds", 0.0) for m in metrics), default=0.0),
            client_setup_seconds_sum=sum(m.get("setup-seconds", 0.0) for m in metrics),
            client_process_age_seconds_min=min((m.get("process-age-seconds", 0.0) for m in metrics), default=0.0),
            client_peak_rss_mb=max((m["peak-rss-mb"] for m in metrics if "peak-rss-mb" in m), default=0.0),
        )

    def note(self, **fields: float) -> None:
        """Extra measurements of the round in progress (e.g. the privacy spent)."""
        self._current.update(fields)

    def add(self, server_round: int, **amounts: float) -> None:
        """Adds to the round's counters; the first call of a round starts its clock (protocols of many stages)."""
        if self._current.get("round") != server_round:
            self._current = {"round": server_round, "started": time.perf_counter()}
        for key, amount in amounts.items():
            self._current[key] = self._current.get(key, 0) + amount

    def current(self, key: str, default: float = 0) -> float:
        return self._current.get(key, default)

    def evaluated(self, server_round: int, metrics: dict[str, float], seconds: float = 0.0) -> None:
        """The server's evaluation (which took `seconds`) closes a round (round 0: the initial adapter)."""
        keep = global_metrics(metrics)
        if server_round == 0:
            self.records.append({"round": 0, **keep, "seconds": 0.0, "server_eval_seconds": seconds})
        else:
            record = dict(self._current)
            started = record.pop("started", time.perf_counter())
            record.update(round=server_round + self.offset, **keep, seconds=time.perf_counter() - started, server_eval_seconds=seconds)
            self.records.append(record)
            self._current = {}
        if self.verbose:
            print(self.format_line(self.records[-1]), flush=True)

    def format_line(self, record: dict) -> str:
        parts = [f"round {record['round']:>3}/{self.num_rounds}"]
        if "accuracy" in record:
            parts.append(f"acc {100 * record['accuracy']:6.2f}%")
        if "perplexity" in record:
            parts.append(f"ppl {record['perplexity']:8.2f}")
        parts.append(f"loss {record.get('loss', float('nan')):.4f}")
        if record["round"] > 0:
            parts.append(f"clients {record.get('clients_replied', 0)}/{record.get('clients_sampled', 0)}")
            if record.get("updates_rejected") or record.get("skipped"):
                parts.append(f"rejected {record.get('updates_rejected', 0)}" + (" SKIPPED" if record.get("skipped") else ""))
            parts.append(f"down {record.get('bytes_down', 0) / 1e6:.2f} MB up {record.get('bytes_up', 0) / 1e6:.2f} MB")
            if "dp_epsilon" in record:
                parts.append(f"eps {record['dp_epsilon']:.2f}")
            parts.append(f"{record['seconds']:.1f} s")
        return "  ".join(parts)
