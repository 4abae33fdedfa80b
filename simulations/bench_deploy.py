"""Per-round cost of the Deployment Engine: a real TLS + node-auth loopback federation, before and after.

A SuperNode starts a fresh ClientApp process for every message (Flower 1.41 has no long-running ClientApp
process: verified, see README), so each round pays Python's start, the imports and the base's build on
top of the clients' training. This script runs the same federation (2 silos, the config's rounds) with two
versions of the Flower App, in one run:

  before   the app as of git ref `--baseline-ref` (the first deployable version): every message's ClientApp
           process imports torch, transformers, datasets, builds the base and loads the data
  after    the app in this checkout: a light ClientApp process (flwr and numpy only) hands the work to the
           node's long-running worker, which keeps base and data in memory across messages and rounds

for two bases: a tiny random-init BERT (start-up dominates) and the packaged MiniLM. Per round it reports
wall time, the slowest client's training, the server's evaluation, and the overhead = wall - training -
evaluation. Prints a table; writes `<results_dir>/<run_name>/results.json` beside the resolved config.

    python simulations/bench_deploy.py configs/bench_deploy.toml [--baseline-ref REF] [--set key=value ...]
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import torch
import transformers as tf

from common import load_or_explain, output_dir, parse_args
from fed_adapters.configuration import to_toml
from fed_adapters.deploy.local import LoopbackFederation
from fed_adapters.deploy.try_local import APP_DIR, deployment_config, write_silo_data
from fed_adapters.federated.config import RunConfig, load_run_config
from fed_adapters.modeling import load_tokenizer

SILOS = 2


def tiny_base(directory: Path) -> Path:
    """A 2-layer, width-64 BERT with random weights and MiniLM's tokenizer."""
    tokenizer = load_tokenizer()
    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=128, max_position_embeddings=512)
    tf.BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def app_at(ref: str, directory: Path) -> Path:
    """The repository's Flower App as of git `ref`, unpacked into `directory`."""
    directory.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(APP_DIR), "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(directory)], input=archive, check=True)
    return directory


def declared_only(config: dict, app_dir: Path) -> dict:
    """The run config restricted to the keys that version of the app declares (Flower refuses others)."""
    declared = tomllib.loads((app_dir / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    return {key: ({k: v for k, v in value.items() if k in declared[key]} if isinstance(value, dict) else value)
            for key, value in config.items() if key in declared}


def measure(config: RunConfig, app_dir: Path, work_dir: Path, port: int) -> dict:
    silos = write_silo_data(config, SILOS, work_dir / "silo-data")
    deployed = deployment_config(config, SILOS, work_dir)
    run_config = work_dir / "run_config.toml"
    run_config.write_text(to_toml(declared_only(deployed.to_dict(), app_dir)))
    with LoopbackFederation(work_dir, silos, port=port) as federation:
        federation.run(app_dir, run_config)
    rounds = json.loads((deployed.run_dir / "metrics.json").read_text())["rounds"][1:]
    per_round = [{
        "seconds": r["seconds"], "train_seconds": r["client_train_seconds_max"], "server_eval_seconds": r["server_eval_seconds"],
        "overhead_seconds": r["seconds"] - r["client_train_seconds_max"] - r["server_eval_seconds"],
        "client_setup_seconds": r.get("client_setup_seconds_max"), "client_start_seconds": r.get("client_process_age_seconds_min"),
        "accuracy": r["accuracy"],
    } for r in rounds]
    summary = {key: statistics.mean(r[key] for r in per_round) for key in ("seconds", "train_seconds", "overhead_seconds")}
    return {**summary, "final_accuracy": rounds[-1]["accuracy"], "rounds": per_round}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__, "configs/bench_deploy.toml", argv,
                      ("--baseline-ref", {"default": "044be24", "help": "git ref of the 'before' app (default: 044be24)"}),
                      ("--port", {"type": int, "default": 9500, "help": "first SuperLink port (default: 9500)"}))
    config = load_or_explain(load_run_config, args)
    if config is None:
        return 2
    out = output_dir(Path(config.results_dir) / config.run_name, config.to_toml())
    results: dict = {"silos": SILOS, "baseline_ref": args.baseline_ref, "cases": {}}
    with tempfile.TemporaryDirectory() as scratch:
        scratch_dir = Path(scratch)
        apps = {"before": app_at(args.baseline_ref, scratch_dir / "app-before"), "after": APP_DIR}
        bases = {"tiny": str(tiny_base(scratch_dir / "tiny-bert")), "minilm": config.model.name}
        port = args.port
        for base_name, model_name in bases.items():
            for version, app_dir in apps.items():
                case = f"{base_name}/{version}"
                print(f"== {case}", flush=True)
                run = dataclasses.replace(config, run_name=case.replace("/", "-"),
                                          model=dataclasses.replace(config.model, name=model_name))
                results["cases"][case] = measure(run, app_dir, out / "work" / case.replace("/", "-"), port)
                port += 20
    print(f"\n{'case':<15}{'round s':>9}{'train s':>9}{'overhead s':>12}{'accuracy':>10}")
    for case, r in results["cases"].items():
        print(f"{case:<15}{r['seconds']:>9.1f}{r['train_seconds']:>9.1f}{r['overhead_seconds']:>12.1f}{100 * r['final_accuracy']:>9.2f}%")
    for base_name in ("tiny", "minilm"):
        before, after = results["cases"][f"{base_name}/before"], results["cases"][f"{base_name}/after"]
        results[f"{base_name}_overhead_ratio_after_before"] = after["overhead_seconds"] / before["overhead_seconds"]
        print(f"{base_name}: overhead after/before = {results[f'{base_name}_overhead_ratio_after_before']:.2f}")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"results in {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
