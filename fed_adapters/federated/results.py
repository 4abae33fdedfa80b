"""The run directory: resolved config, per-round metrics (JSON and CSV), the accuracy plot, the summary table."""

from __future__ import annotations

import csv
import json
import math
import shutil
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: simulations run headless
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from ..configuration import ConfigError  # noqa: E402
from ..provenance import environment  # noqa: E402
from .config import RunConfig  # noqa: E402

# What a run leaves in its directory besides config.toml and partition.json (rewritten by every start):
# an interrupted run's checkpoints and its clients' private states are results too.
RESULT_FILES = ("metrics.json", "metrics.csv", "accuracy.png", "adapter", "clients.csv", "personalization.png",
                "checkpoints", "clients")
# Column order of metrics.csv: global metrics first, then traffic, clients and time.
ROUND_FIELDS = (
    "round", "accuracy", "loss", "macro_f1", "perplexity", "clients_sampled", "clients_replied", "clients_failed",
    "bytes_down", "bytes_up", "tensor_bytes_down", "tensor_bytes_up", "seconds", "server_eval_seconds", "train_loss",
    "train_examples", "client_train_seconds_max", "client_train_seconds_sum", "client_peak_rss_mb", "client_accuracy",
    "client_personal_accuracy", "eval_clients_sampled", "eval_clients_replied", "eval_bytes_down",
    "eval_tensor_bytes_down", "client_gpus",
)


def check_run_dir(config: RunConfig, overwrite: bool = False) -> Path:
    """The run directory, unless it holds earlier results that `overwrite` does not allow to replace."""
    run_dir = config.run_dir
    existing = [name for name in RESULT_FILES if (run_dir / name).exists()]
    if existing and not overwrite:
        interrupted = "checkpoints" in existing and "metrics.json" not in existing
        raise ConfigError(
            f"{run_dir} already holds {'an interrupted run' if interrupted else 'results'} ({', '.join(existing)}); "
            + (f"continue it with `fed-adapters simulate --resume {run_dir}`, " if interrupted else "")
            + "choose another run name (--set run_name=...) or pass --overwrite"
        )
    return run_dir


def prepare_run_dir(config: RunConfig, overwrite: bool = False, resume: bool = False) -> Path:
    """The run directory with the resolved config written, for a run that starts now (`resume`: goes on).

    A fresh start refuses earlier results unless `overwrite`, and then removes them all first, so that no
    checkpoint, private state or metric of the earlier run survives into this one.
    """
    run_dir = config.run_dir
    if not resume:
        check_run_dir(config, overwrite)
        for name in RESULT_FILES:
            path = run_dir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(config.to_toml())
    return run_dir


def _finite(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_run(run_dir: Path, config: RunConfig, records: list[dict], seconds: float, num_clients: int,
              wire_keys: dict[str, set[str]] | None = None, clients: dict | None = None,
              calibration: dict | None = None, initial_calibration: dict | None = None) -> None:
    """metrics.json ({"run", "rounds", and when there is one "clients": the per-client summary,
    "head_calibration": what calibrating the head after the last round cost and gave, "initial_head_calibration":
    what fitting it before round 1 cost}), metrics.csv, accuracy.png."""
    metadata = {
        "run_name": config.run_name,
        "strategy": config.strategy.name,
        "partition": config.partition.method,
        "num_clients": num_clients,
        "num_rounds": config.strategy.num_rounds,
        "model": config.model.name,
        "seed": config.seed,
        "seconds": seconds,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **environment(),
    }
    if wire_keys is not None:
        metadata["tensors_down"] = sorted(wire_keys["down"])
        metadata["tensors_up"] = sorted(wire_keys["up"])
    payload = {"run": metadata, "rounds": records, **({"clients": clients} if clients else {}),
               **({"head_calibration": calibration} if calibration else {}),
               **({"initial_head_calibration": initial_calibration} if initial_calibration else {})}
    # Strict JSON: a value that does not exist (a round every client failed has no train loss) is null, not NaN.
    (run_dir / "metrics.json").write_text(json.dumps(_finite(payload), indent=2, allow_nan=False) + "\n")
    present = list(dict.fromkeys(key for record in records for key in record))
    columns = [f for f in ROUND_FIELDS if f in present] + [f for f in present if f not in ROUND_FIELDS]
    with (run_dir / "metrics.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(records)
    plot_accuracy(records, run_dir / "accuracy.png", title=f"{config.run_name} ({config.strategy.name}, {num_clients} clients)",
                  calibrated=(calibration or {}).get("accuracy"))


def plot_accuracy(records: list[dict], path: Path, title: str, calibrated: float | None = None) -> None:
    metric = "accuracy" if any("accuracy" in r for r in records) else "perplexity"
    rounds = [r["round"] for r in records if metric in r]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(rounds, [r[metric] * (100 if metric == "accuracy" else 1) for r in records if metric in r], marker="o",
            label="global adapter, held-out split")
    for key, label in (("client_accuracy", "clients' local test (weighted)"),
                       ("client_personal_accuracy", "clients' personal models, local test")):
        if any(key in r for r in records):
            ax.plot([r["round"] for r in records if key in r], [100 * r[key] for r in records if key in r],
                    marker="s", linestyle="--", label=label)
    if calibrated is not None:
        ax.plot([rounds[-1]], [100 * calibrated], marker="*", markersize=14, linestyle="none",
                label="after head calibration")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy (%)" if metric == "accuracy" else "perplexity")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def format_rounds(records: list[dict]) -> str:
    header = f"{'round':>5} {'acc %':>7} {'loss':>7} {'F1 %':>6} {'clients':>8} {'failed':>6} {'down MB':>8} {'up MB':>7} {'sec':>6}"
    lines = [header, "-" * len(header)]
    for r in records:
        acc = f"{100 * r['accuracy']:7.2f}" if "accuracy" in r else f"{'-':>7}"
        f1 = f"{100 * r['macro_f1']:6.2f}" if "macro_f1" in r else f"{'-':>6}"
        lines.append(
            f"{r['round']:>5} {acc} {r.get('loss', float('nan')):7.4f} {f1} "
            f"{r.get('clients_replied', 0):>4}/{r.get('clients_sampled', 0):<3} {r.get('clients_failed', 0):>6} "
            f"{r.get('bytes_down', 0) / 1e6:8.3f} {r.get('bytes_up', 0) / 1e6:7.3f} {r['seconds']:6.1f}"
        )
    return "\n".join(lines)
