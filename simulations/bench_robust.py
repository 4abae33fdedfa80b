"""Robust aggregation against a malicious minority: clean vs attacked federations, per strategy.

The same federation (config) runs with FedAvg, FedMedian, FedTrimmedAvg, Krum and MultiKrum, each three times:

  clean    every client trains honestly
  scaled   clients 0 and 1 (2 of 10) train, then send global - 10 x (their update): a boosted, flipped update
  random   clients 0 and 1 send random adapters (Gaussian, each tensor's own std)

and reports the global adapter's final accuracy on the held-out split. Server-side update validation is
left at its defaults (no norm bound), so the strategies alone face the attack. Prints a table; writes
`<results_dir>/<run_name>/results.json` beside the resolved config and every run's directory.

    python simulations/bench_robust.py configs/bench_robust.toml [--strategies fedavg,krum] [--set key=value ...]
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
from flwr.app import Array, Context, Message
from flwr.clientapp import ClientApp

from common import load_or_explain, output_dir, parse_args, select
from fed_adapters.federated.client_app import evaluate_adapter, train_adapter
from fed_adapters.federated.config import RunConfig, load_run_config
from fed_adapters.federated.simulation import simulate

STRATEGIES = ["fedavg", "fedmedian", "fedtrimmedavg", "krum", "multikrum"]
ATTACKS = ["clean", "scaled", "random"]
ATTACKERS = 2


def attacking_app(attack: str) -> ClientApp:
    """The real ClientApp, except that clients 0..ATTACKERS-1 tamper with their reply as `attack` says."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        received = {name: value.numpy() for name, value in msg.content["arrays"].items()}
        reply = train_adapter(msg, context)
        if attack == "clean" or int(context.node_config["partition-id"]) >= ATTACKERS:
            return reply
        arrays = reply.content["arrays"]
        rng = np.random.default_rng(int(context.node_config["partition-id"]))
        for name in list(arrays.keys()):
            trained = arrays[name].numpy()
            if attack == "scaled":
                tampered = received[name] - 10.0 * (trained - received[name])
            else:
                tampered = rng.normal(0.0, float(trained.std()) or 1.0, trained.shape)
            arrays[name] = Array(tampered.astype(trained.dtype))
        return reply

    app.evaluate()(evaluate_adapter)
    return app


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__, "configs/bench_robust.toml", argv,
                      ("--strategies", {"default": None, "help": f"comma-separated subset of {','.join(STRATEGIES)}"}))
    config: RunConfig | None = load_or_explain(load_run_config, args)
    strategies = select(args.strategies, STRATEGIES, "strategy")
    if config is None or strategies is None:
        return 2
    out = output_dir(Path(config.results_dir) / config.run_name, config.to_toml())
    results: dict = {"attackers": ATTACKERS, "clients": config.partition.num_clients, "runs": {}}
    for strategy in strategies:
        for attack in ATTACKS:
            name = f"{strategy}-{attack}"
            print(f"== {name}", flush=True)
            run = dataclasses.replace(config, run_name=name, results_dir=str(out),
                                      strategy=dataclasses.replace(config.strategy, name=strategy, krum_malicious=ATTACKERS))
            records = simulate(run, overwrite=True, verbose=False, client_app=attacking_app(attack)).records
            results["runs"][name] = {"accuracy": records[-1]["accuracy"], "per_round": [r["accuracy"] for r in records]}
    print(f"\n{'strategy':<15}" + "".join(f"{a:>10}" for a in ATTACKS) + f"{'worst drop':>12}")
    for strategy in strategies:
        accuracy = {a: results["runs"][f"{strategy}-{a}"]["accuracy"] for a in ATTACKS}
        drop = 100 * (accuracy["clean"] - min(accuracy["scaled"], accuracy["random"]))
        results.setdefault("worst_drop_points", {})[strategy] = drop
        print(f"{strategy:<15}" + "".join(f"{100 * accuracy[a]:>9.2f}%" for a in ATTACKS) + f"{drop:>11.2f}")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"results in {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
