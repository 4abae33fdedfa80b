"""Multi-adapter serving: one base answering a mixed batch of many clients' requests in one pass, against
switching adapters one client at a time (and one request at a time), on the same requests.

Every client gets its own adapter and head (random, non-zero: speed does not depend on the values); the
requests are real SST-2 dev sentences, each from a client drawn at random. Prints a table and writes
`<results_dir>/<run_name>/{config.toml,results.json}`.

    python simulations/bench_serving.py configs/bench_serving.toml [--set clients=32]
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from common import load_or_explain, output_dir, parse_args

from fed_adapters.adapters import AdapterConfig, add_adapter, save_adapter
from fed_adapters.configuration import load_toml, to_toml
from fed_adapters.data import load_split
from fed_adapters.modeling import DEFAULT_MODEL, load_model, load_tokenizer
from fed_adapters.provenance import environment
from fed_adapters.serving import AdapterServer
from fed_adapters.training import seed_everything


@dataclass
class ServingConfig:
    model: str = DEFAULT_MODEL
    num_labels: int = 2
    adapter: dict = dataclasses.field(default_factory=lambda: {"preset": "houlsby", "bottleneck_size": 16})
    clients: int = 16
    batch_size: int = 64
    batches: int = 8
    data_source: str = "sst2"
    data_root: str = ""
    split: str = "validation"
    max_length: int = 128
    seed: int = 0
    results_dir: str = "results"
    run_name: str = "bench_serving"


def client_adapters(config: ServingConfig, directory: Path) -> list[Path]:
    """`config.clients` adapters with heads, as `save_adapter` files (what `fed-adapters export` produces)."""
    paths = []
    for client in range(config.clients):
        seed_everything(config.seed + client)
        model = load_model(config.model, num_labels=config.num_labels)
        add_adapter(model, AdapterConfig.from_dict({**config.adapter, "init": "bert"}))
        with torch.no_grad():
            model.classifier.weight.normal_(std=0.5)
        paths.append(save_adapter(model, directory / f"client-{client:03d}"))
    return paths


def timed(serve, batches: list[tuple[list[str], list[str]]]) -> tuple[float, list[torch.Tensor]]:
    serve(*batches[0])  # warm-up: first-call allocations and lazy stacking
    started = time.perf_counter()
    outputs = [serve(texts, clients) for texts, clients in batches]
    return time.perf_counter() - started, outputs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__, "configs/bench_serving.toml", argv)
    config = load_or_explain(lambda path, overrides: load_toml(path, ServingConfig, overrides), args)
    if config is None:
        return 2
    out = output_dir(Path(config.results_dir) / config.run_name, to_toml(dataclasses.asdict(config)))
    torch.set_grad_enabled(False)

    print(f"building {config.clients} client adapters ...", flush=True)
    directories = client_adapters(config, out / "adapters")
    server = AdapterServer(load_model(config.model, num_labels=config.num_labels), load_tokenizer(config.model),
                           config.max_length)
    for client, directory in enumerate(directories):
        server.add_client(str(client), directory)

    texts = list(load_split(config.data_source, config.split, config.data_root or None)["text"])
    rng = random.Random(config.seed)
    batches = []
    for _ in range(config.batches):
        batch_texts = rng.sample(texts, config.batch_size)
        batches.append((batch_texts, [str(rng.randrange(config.clients)) for _ in batch_texts]))
    requests = config.batch_size * config.batches

    def one_request_at_a_time(batch_texts: list[str], clients: list[str]) -> torch.Tensor:
        return torch.cat([server.predict_one_client_at_a_time([t], [c]) for t, c in zip(batch_texts, clients)])

    rows = []
    reference = None
    for name, serve in (("mixed batch (routing)", server.predict),
                        ("one client at a time", server.predict_one_client_at_a_time),
                        ("one request at a time", one_request_at_a_time)):
        print(f"== {name}", flush=True)
        seconds, outputs = timed(serve, batches)
        reference = reference or outputs
        rows.append({"method": name, "seconds": seconds, "requests_per_second": requests / seconds,
                     "max_abs_diff_vs_mixed": max(float((a - b).abs().max()) for a, b in zip(outputs, reference))})
    for row in rows:
        row["speedup_of_mixed"] = rows[0]["requests_per_second"] / row["requests_per_second"]

    header = f"{'method':<24} {'requests/s':>10} {'mixed is x faster':>17} {'max |diff|':>10}"
    print("\n" + header + "\n" + "-" * len(header))
    for row in rows:
        print(f"{row['method']:<24} {row['requests_per_second']:>10.1f} {row['speedup_of_mixed']:>17.2f} "
              f"{row['max_abs_diff_vs_mixed']:>10.1e}")
    payload = {"benchmark": "serving", "config": dataclasses.asdict(config), "requests": requests, "results": rows,
               "environment": environment()}
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
