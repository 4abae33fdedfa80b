"""`fed-adapters`: the command line.

    fed-adapters [--debug] simulate CONFIG.toml [--set key=value ...] [--overwrite] [--flower-logs] [--dry-run]
    fed-adapters simulate --resume RUN_DIR
    fed-adapters export RUN_DIR --client ID OUT_DIR [--overwrite]
    fed-adapters predict ADAPTER_DIR --input FILE.jsonl --output OUT.jsonl [--model NAME_OR_DIR]
    fed-adapters deploy certs DIR --nodes NAME ... [--hosts HOST ...]
    fed-adapters deploy local CONFIG.toml [--silos N] [--work-dir DIR] [--port P] [--insecure]
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from .adapters import AdapterConfigError, AdapterStateError
from .deploy.certs import CertificateError
from .deploy.processes import ProcessError
from .configuration import ConfigError
from .data import DataError
from .modeling import ModelConfigError
from .training import DeviceError

if TYPE_CHECKING:
    from .federated.config import RunConfig

USER_ERRORS = (ConfigError, AdapterConfigError, AdapterStateError, DataError, ModelConfigError, FileNotFoundError,
               FileExistsError, CertificateError, ProcessError, DeviceError)


def _simulate(args: argparse.Namespace) -> int:
    from .federated.config import load_run_config, load_run_dir_config

    if args.resume:
        if args.config or args.overrides or args.overwrite or args.dry_run:
            raise ConfigError("--resume RUN_DIR continues a run with the config it was started with; "
                              "give no CONFIG, --set, --overwrite or --dry-run with it")
        return _simulate_until_interrupted(load_run_dir_config(args.resume), flower_logs=args.flower_logs, resume=True)
    if not args.config:
        raise ConfigError("give a CONFIG.toml to run, or --resume RUN_DIR to continue an interrupted run")
    config = load_run_config(args.config, args.overrides)
    if args.dry_run:
        return _dry_run(config, args)
    return _simulate_until_interrupted(config, overwrite=args.overwrite, flower_logs=args.flower_logs)


def _dry_run(config: RunConfig, args: argparse.Namespace) -> int:
    """Every check `simulate` makes before it starts (config, data, partitioning, model, strategy, resources,
    run directory), and nothing else: also the way to vet a config for `flwr run`, whose own check of the run
    config says only "Invalid run configuration", not which key."""
    from .adapters import trainable_parameters
    from .federated.results import check_run_dir
    from .federated.simulation import preflight

    check_run_dir(config, args.overwrite)
    num_clients, model = preflight(config)
    print(f"{args.config}: valid — {num_clients} clients, {config.model.name}, {trainable_parameters(model)}, "
          f"results to {config.run_dir}; nothing was run")
    return 0


def _simulate_until_interrupted(config: RunConfig, **options) -> int:
    """`simulate`, where Ctrl-C ends the process at once and says how to go on. Flower's Simulation Runtime
    leaves a worker thread blocked on a Ray actor that the interrupt killed, and Python would wait for it
    forever before exiting. Checkpoints are renamed into place only when whole, so no round is half-kept."""
    from .federated.checkpoints import latest
    from .federated.simulation import simulate

    try:
        simulate(config, **options)
    except KeyboardInterrupt:
        done = latest(config.run_dir) if config.run_dir.is_dir() else None
        hint = (f"{config.run_dir} keeps the checkpoint of round {done.round}: continue with "
                f"`fed-adapters simulate --resume {config.run_dir}`" if done else "no round had completed, nothing to resume")
        sys.stdout.flush()
        print(f"\nfed-adapters: interrupted; {hint}", file=sys.stderr, flush=True)
        os._exit(130)  # 128 + SIGINT, as a shell reports it
    return 0


def _export(args: argparse.Namespace) -> int:
    from .federated.export import export_client

    out = export_client(args.run_dir, args.client, args.out_dir, overwrite=args.overwrite)
    print(f"client {args.client}'s adapter set written to {out}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from .predict import predict_file

    count = predict_file(args.adapter_dir, args.input, args.output, model_name=args.model, text=args.text,
                         text_pair=args.text_pair, batch_size=args.batch_size, max_length=args.max_length,
                         device=args.device, overwrite=args.overwrite)
    print(f"{count} predictions written to {args.output}")
    return 0


def _deploy_certs(args: argparse.Namespace) -> int:
    from .deploy.certs import create_certificates

    certs = create_certificates(args.directory, args.nodes, args.hosts or None, days=args.days)
    print(f"CA {certs.ca}\nSuperLink certificate {certs.superlink_cert} (key {certs.superlink_key})")
    for name in args.nodes:
        print(f"node {name}: give the silo {certs.node_key(name)}; register {certs.node_public_key(name)}")
    return 0


def _deploy_local(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .deploy.try_local import run_local_deployment
    from .federated.config import load_run_config

    config = load_run_config(args.config, args.overrides)
    work_dir = Path(args.work_dir or f"deployments/{config.run_name}")
    if work_dir.exists() and any(work_dir.iterdir()):
        raise FileExistsError(f"{work_dir} is not empty (an earlier deployment's certificates and results); "
                              "give another --work-dir or remove it")
    run_dir = run_local_deployment(config, args.silos, work_dir, port=args.port, insecure=args.insecure)
    print(f"deployment stopped; results in {run_dir}")
    return 0


def _add_deploy(commands: argparse._SubParsersAction) -> None:
    deploy = commands.add_parser("deploy", help="cross-silo deployment on Flower's Deployment Engine")
    actions = deploy.add_subparsers(dest="action", required=True)
    certs = actions.add_parser("certs", help="create a CA, the SuperLink's TLS certificate and SuperNode key pairs")
    certs.add_argument("directory", help="where to write them (existing files are kept)")
    certs.add_argument("--nodes", nargs="+", required=True, metavar="NAME", help="one key pair per SuperNode")
    certs.add_argument("--hosts", nargs="+", metavar="HOST",
                       help="names/IPs the SuperLink is reached at (default: localhost 127.0.0.1 ::1)")
    certs.add_argument("--days", type=int, default=365, help="validity of new certificates (default: 365)")
    certs.set_defaults(handler=_deploy_certs)
    local = actions.add_parser("local", help="run a config on a loopback SuperLink + SuperNodes (TLS, node auth)")
    local.add_argument("config", help="TOML run config; its training data are split into one file per silo")
    local.add_argument("--silos", type=int, default=3, help="number of SuperNodes (default: 3)")
    local.add_argument("--work-dir", help="certificates, silo data, logs and results (default: deployments/<run_name>)")
    local.add_argument("--port", type=int, default=9400, help="SuperLink port; nodes use port+10.. (default: 9400)")
    local.add_argument("--insecure", action="store_true", help="no TLS and no node authentication (not for real data)")
    local.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    local.set_defaults(handler=_deploy_local)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fed-adapters", description="Federated bottleneck-adapter tuning (Flower + Ray)")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)
    sim = commands.add_parser("simulate", help="run a federated simulation on Ray from a TOML config")
    sim.add_argument("config", nargs="?", help="TOML run config, e.g. configs/quickstart.toml")
    sim.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run after its last complete checkpoint")
    sim.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set strategy.num_rounds=5 (repeatable)")
    sim.add_argument("--overwrite", action="store_true", help="replace results already in the run directory")
    sim.add_argument("--flower-logs", action="store_true", help="also show Flower's own INFO log lines")
    sim.add_argument("--dry-run", action="store_true",
                     help="check the config, data, model and resources as a run would, then stop (runs nothing)")
    sim.set_defaults(handler=_simulate)

    export = commands.add_parser("export", help="write one client's personal adapter set out of a finished run")
    export.add_argument("run_dir", help="the run directory, e.g. results/amazon_domains")
    export.add_argument("--client", type=int, required=True, help="the client's partition id")
    export.add_argument("out_dir", help="where to write the adapter set (loadable with load_adapter)")
    export.add_argument("--overwrite", action="store_true", help="replace an adapter already in OUT_DIR")
    export.set_defaults(handler=_export)

    predict = commands.add_parser("predict", help="classify the texts of a JSONL file with a saved adapter (set)")
    predict.add_argument("adapter_dir")
    predict.add_argument("--input", required=True, help="JSONL, one object per line with a text column")
    predict.add_argument("--output", required=True, help="JSONL to write: each input line plus prediction, probabilities")
    predict.add_argument("--model", default=None, help="base model id or directory (default: the one the adapter records)")
    predict.add_argument("--text", default="text", help="text column (default: text)")
    predict.add_argument("--text-pair", default=None, help="second text column, for sentence-pair tasks")
    predict.add_argument("--batch-size", type=int, default=64)
    predict.add_argument("--max-length", type=int, default=128, help="tokens per example, as in training (default: 128)")
    predict.add_argument("--device", default="auto")
    predict.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    predict.set_defaults(handler=_predict)
    _add_deploy(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except USER_ERRORS as error:
        if args.debug:
            raise
        print(f"fed-adapters: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
