"""Per-client accuracy of every personalization mode on one federation.

Runs the config once per mode (same clients, data, seeds, rounds and local steps) and compares, over the
clients' local test splits, the global model with each mode's personal models: mean, median and worst-10 %
client accuracy. Prints a table and writes `<results_dir>/<run_name>/results.json` beside each mode's run
directory (clients.csv, personalization.png, ...).

    python simulations/bench_personalization.py configs/personalization_amazon.toml [--modes none,ditto]
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

from common import load_or_explain, output_dir, parse_args, select

from fed_adapters.federated.client_report import summarize
from fed_adapters.federated.config import RunConfig, load_run_config
from fed_adapters.federated.simulation import simulate
from fed_adapters.provenance import environment

# Variant -> personalization settings; `split` keeps the head private (FedPer), the others as documented.
VARIANTS = {
    "none": {"mode": "none"},
    "finetune": {"mode": "finetune"},
    "split": {"mode": "split", "private": "head"},
    "split-stacked": {"mode": "split", "private": "stacked"},
    "ditto": {"mode": "ditto"},
    "fusion": {"mode": "fusion"},
}


def run_variant(config: RunConfig, name: str) -> dict:
    personalization = dataclasses.replace(config.personalization, **VARIANTS[name], state_dir="")
    variant = dataclasses.replace(config, run_name=f"{config.run_name}/{name}", personalization=personalization)
    started = time.perf_counter()
    recorder = simulate(variant, overwrite=True)
    summary = summarize(recorder.clients)
    return {"variant": name, **VARIANTS[name], "seconds": time.perf_counter() - started, "summary": summary,
            "clients": recorder.clients, "central_accuracy": recorder.records[-1].get("accuracy")}


def format_table(rows: list[dict]) -> str:
    baseline = next((r["summary"]["personal"]["mean"] for r in rows if r["variant"] == "none"), None)
    header = (f"{'mode':<14} {'global mean':>11} {'personal mean':>13} {'median':>7} {'worst 10%':>9} "
              f"{'vs none':>8} {'minutes':>7}")
    lines = [header, "-" * len(header)]
    for r in rows:
        g, p = r["summary"]["global"], r["summary"]["personal"]
        delta = f"{100 * (p['mean'] - baseline):+8.2f}" if baseline is not None else f"{'':>8}"
        lines.append(f"{r['variant']:<14} {100 * g['mean']:>11.2f} {100 * p['mean']:>13.2f} {100 * p['median']:>7.2f} "
                     f"{100 * p['worst_10pct']:>9.2f} {delta} {r['seconds'] / 60:>7.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__, "configs/personalization_amazon.toml", argv,
                      ("--modes", dict(default=None, help=f"comma-separated, from {', '.join(VARIANTS)} (default: all)")))
    config = load_or_explain(load_run_config, args)
    names = select(args.modes, list(VARIANTS), "mode")
    if config is None or names is None:
        return 2
    out = output_dir(config.run_dir, config.to_toml())
    rows = []
    for name in names:
        print(f"== {name}", flush=True)
        rows.append(run_variant(config, name))
        payload = {"benchmark": "personalization", "config": config.to_dict(), "results": rows, "environment": environment()}
        (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")  # after every mode: nothing lost
    print("\n" + format_table(rows))
    print(f"\nwrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
