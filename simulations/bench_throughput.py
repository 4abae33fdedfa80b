"""Throughput of fed_adapters' federation against the pattern most Flower examples use.

Runs one federation twice in this process, with the same clients, data, seeds, adapter and local steps:

  fed_adapters  the frozen base is built once per Ray actor; only adapter and head tensors cross the wire;
  baseline      the model is rebuilt from disk in every client call; the whole model's weights cross the wire.

Give clients every core (`simulation.num_cpus = ray_num_cpus`, as configs/bench_throughput.toml does): they then
run one at a time, and a round's wall time minus its clients' training time is the federation's own
overhead: messaging, (de)serialization, model building, aggregation. The server's central evaluation is
timed separately and left out. Prints a table and writes `<results_dir>/<run_name>/results.json`, beside
each variant's run directory and the resolved `config.toml`.

    python simulations/bench_throughput.py configs/bench_throughput.toml [--set key=value ...]
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from common import load_or_explain, output_dir, parse_args
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from fed_adapters.federated.client_app import app as adapter_client_app
from fed_adapters.federated.client_work import client_site, local_fit, run_config_from_record, train_metrics
from fed_adapters.federated.config import RunConfig, load_run_config
from fed_adapters.federated.simulation import simulate
from fed_adapters.federated.personalization import WireFormat
from fed_adapters.federated.task import build_adapted_model, client_data
from fed_adapters.modeling import load_tokenizer
from fed_adapters.provenance import environment


class FullModelWire:
    """Every weight of the model crosses the wire, as in most Flower examples."""

    def pack(self, model: nn.Module) -> ArrayRecord:
        return ArrayRecord(model.state_dict())

    def load(self, model: nn.Module, arrays: ArrayRecord) -> None:
        model.load_state_dict(arrays.to_torch_state_dict(), strict=True)


FULL_MODEL = FullModelWire()

baseline_client_app = ClientApp()


@baseline_client_app.train()
def train_rebuilt_model(msg: Message, context: Context) -> Message:
    """The common Flower example: build the model from disk, load every weight, train, send every weight."""
    config = run_config_from_record(msg.content["config"])
    model = build_adapted_model(config)
    tokenizer = load_tokenizer(config.model.name)
    FULL_MODEL.load(model, msg.content["arrays"])
    site = client_site(dict(context.node_config), context.node_id)
    stats = local_fit(model, tokenizer, config, site, int(msg.content["config"]["server-round"]))()
    metrics = train_metrics(stats, len(client_data(config, site)[0]))
    return Message(content=RecordDict({"arrays": FULL_MODEL.pack(model), "metrics": metrics}), reply_to=msg)


VARIANTS: dict[str, tuple[ClientApp, WireFormat | None]] = {
    "fed_adapters": (adapter_client_app, None),  # None: the run's own wire format
    "baseline": (baseline_client_app, FULL_MODEL),
}


def reset_peak_rss() -> None:
    """Linux: restart this process's peak-RSS counter (VmHWM), so each variant's server peak is its own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def server_peak_rss_mb() -> float | None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    line = next((line for line in status.splitlines() if line.startswith("VmHWM:")), None)
    return int(line.split()[1]) / 1024 if line else None


def run_variant(config: RunConfig, name: str) -> dict:
    """One federation; its summary measured from the per-round records."""
    variant_config = replace(config, run_name=f"{config.run_name}/{name}")
    client_app, wire = VARIANTS[name]
    reset_peak_rss()
    started = time.perf_counter()
    records = simulate(variant_config, overwrite=True, client_app=client_app, wire=wire).records
    total_seconds = time.perf_counter() - started
    rounds = records[1:]
    phase = [r["seconds"] - r["server_eval_seconds"] for r in rounds]
    training = [r["client_train_seconds_sum"] for r in rounds]
    updates = sum(r["clients_replied"] for r in rounds)
    steady = slice(1, None) if len(rounds) > 1 else slice(None)  # round 1 pays one-off costs (building, tokenizing)
    overheads = [p - t for p, t in zip(phase, training)]
    return {
        "variant": name,
        "client_updates": updates,
        "updates_per_second": updates / sum(phase),
        "train_phase_seconds": sum(phase),
        "client_train_seconds": sum(training),
        "overhead_seconds": sum(overheads),
        "overhead_fraction": sum(overheads) / sum(training),
        "steady_overhead_fraction": sum(overheads[steady]) / sum(training[steady]),
        # Round 1's overhead is mostly once per process: imports, the base, reading the split and the tokenized
        # shards; the part the clients measured themselves (base, data) is their set-up time (the baseline
        # rebuilds every call).
        "first_round_overhead_seconds": overheads[0],
        "first_round_client_setup_seconds": rounds[0].get("client_setup_seconds_sum", 0.0),
        "steady_overhead_seconds_per_round": sum(overheads[steady]) / len(overheads[steady]),
        "bytes_per_round": sum(r["bytes_down"] + r["bytes_up"] for r in rounds) / len(rounds),
        "tensor_bytes_per_round": sum(r["tensor_bytes_down"] + r["tensor_bytes_up"] for r in rounds) / len(rounds),
        "client_peak_rss_mb": max(r["client_peak_rss_mb"] for r in rounds),
        "server_peak_rss_mb": server_peak_rss_mb(),
        "accuracy": records[-1].get("accuracy"),
        "loss": records[-1]["loss"],
        "seconds": total_seconds,
        "rounds": records,
    }


def ratios(ours: dict, baseline: dict) -> dict:
    return {
        "bytes_per_round": ours["bytes_per_round"] / baseline["bytes_per_round"],
        "updates_per_second": ours["updates_per_second"] / baseline["updates_per_second"],
        "client_peak_rss": ours["client_peak_rss_mb"] / baseline["client_peak_rss_mb"],
        "server_peak_rss": (ours["server_peak_rss_mb"] / baseline["server_peak_rss_mb"]
                            if ours["server_peak_rss_mb"] and baseline["server_peak_rss_mb"] else None),
    }


def format_table(rows: list[dict], ratio: dict) -> str:
    header = (f"{'variant':<13} {'updates/s':>9} {'overhead %':>10} {'steady %':>8} {'round-1 s':>9} {'steady s':>8} "
              f"{'MB/round':>9} {'client RSS MB':>13} {'server RSS MB':>13} {'acc %':>6}")
    lines = [header, "-" * len(header)]
    for r in rows:
        server = f"{r['server_peak_rss_mb']:.0f}" if r["server_peak_rss_mb"] else "n/a"
        accuracy = f"{100 * r['accuracy']:.2f}" if r["accuracy"] is not None else "n/a"
        lines.append(
            f"{r['variant']:<13} {r['updates_per_second']:>9.3f} {100 * r['overhead_fraction']:>10.1f} "
            f"{100 * r['steady_overhead_fraction']:>8.1f} {r['first_round_overhead_seconds']:>9.1f} "
            f"{r['steady_overhead_seconds_per_round']:>8.2f} {r['bytes_per_round'] / 1e6:>9.2f} "
            f"{r['client_peak_rss_mb']:>13.0f} {server:>13} {accuracy:>6}"
        )
    server_ratio = f"{ratio['server_peak_rss']:.2f}x" if ratio["server_peak_rss"] else "n/a"
    lines.append(
        f"fed_adapters / baseline: updates/s {ratio['updates_per_second']:.2f}x, bytes {100 * ratio['bytes_per_round']:.3f} %, "
        f"client peak RSS {ratio['client_peak_rss']:.2f}x, server peak RSS {server_ratio}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    config = load_or_explain(load_run_config, parse_args(__doc__, "configs/bench_throughput.toml", argv))
    if config is None:
        return 2
    out = output_dir(config.run_dir, config.to_toml())
    rows = []
    for name in VARIANTS:
        print(f"== {name}", flush=True)
        rows.append(run_variant(config, name))
    ratio = ratios(rows[0], rows[1])
    payload = {
        "benchmark": "throughput",
        "config": config.to_dict(),
        "summary": [{k: v for k, v in r.items() if k != "rounds"} for r in rows],
        "ratios": ratio,
        "rounds": {r["variant"]: r["rounds"] for r in rows},
        "environment": {**environment(), "device": config.train.device},
    }
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    print()
    print(format_table(rows, ratio))
    print(f"\nwrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
