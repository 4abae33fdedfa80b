"""The per-client report after the last round: every client's local-test accuracy with the global model
and with its personal model, summarised (mean, median, worst 10 %), as `clients.csv` and `personalization.png`."""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402

CLIENT_FIELDS = ("client", "test_examples", "global_accuracy", "personal_accuracy", "global_loss", "personal_loss",
                 "personal_trained")


def evaluate_every_client(grid: Grid, arrays: ArrayRecord, config: ConfigRecord, timeout: float) -> list[dict]:
    """Sends the final global model to every connected client for evaluation; one row per client that replied."""
    messages = [
        Message(content=RecordDict({"arrays": arrays, "config": config}), message_type=MessageType.EVALUATE, dst_node_id=node)
        for node in grid.get_node_ids()
    ]
    rows = []
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if reply.has_error():
            continue
        m = reply.content.metric_records["metrics"]
        if "accuracy" not in m:  # language models: the report is about classification accuracy
            continue
        rows.append({
            "client": int(m["partition-id"]),
            "test_examples": int(m["num-examples"]),
            "global_accuracy": float(m["accuracy"]),
            "personal_accuracy": float(m["personal-accuracy"]),
            "global_loss": float(m["loss"]),
            "personal_loss": float(m["personal-loss"]),
            "personal_trained": bool(m.get("personal-trained", 1)),  # 0: sampled in no round, initial private part
        })
    return sorted(rows, key=lambda row: row["client"])


def summarize(rows: list[dict]) -> dict:
    """Mean, median and worst-10 % mean (the lowest tenth of clients, at least one) of each accuracy."""
    summary: dict = {"clients": len(rows), "never_trained": sum(not row.get("personal_trained", True) for row in rows)}
    for kind in ("global", "personal"):
        values = sorted(row[f"{kind}_accuracy"] for row in rows)
        if not values:
            continue
        worst = values[: max(1, math.ceil(len(values) / 10))]
        summary[kind] = {"mean": statistics.fmean(values), "median": statistics.median(values),
                         "worst_10pct": statistics.fmean(worst)}
    return summary


def write_report(run_dir: Path, rows: list[dict], title: str) -> None:
    with (run_dir / "clients.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CLIENT_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(rows) + 2), 4), dpi=120)
    positions = range(len(rows))
    ax.bar([i - 0.2 for i in positions], [100 * r["global_accuracy"] for r in rows], width=0.4, label="global model")
    ax.bar([i + 0.2 for i in positions], [100 * r["personal_accuracy"] for r in rows], width=0.4, label="personal model")
    ax.set_xticks(list(positions), [str(r["client"]) for r in rows], fontsize=7)
    ax.set_xlabel("client")
    ax.set_ylabel("local test accuracy (%)")
    ax.set_title(title)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(run_dir / "personalization.png")
    plt.close(fig)


def format_summary(summary: dict) -> str:
    lines = [f"{'per-client accuracy %':<22} {'mean':>6} {'median':>7} {'worst 10%':>9}   ({summary['clients']} clients)"]
    for kind in ("global", "personal"):
        if kind in summary:
            s = summary[kind]
            lines.append(f"{kind + ' model':<22} {100 * s['mean']:>6.2f} {100 * s['median']:>7.2f} {100 * s['worst_10pct']:>9.2f}")
    if summary.get("never_trained"):
        lines.append(f"{summary['never_trained']} client(s) were sampled in no round: their personal model holds the initial "
                     "private part (personal_trained = False in clients.csv)")
    return "\n".join(lines)
