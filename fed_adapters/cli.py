"""`fed-adapters`: the command line.

    fed-adapters simulate CONFIG.toml [--set key=value ...] [--overwrite] [--debug]
"""

from __future__ import annotations

import argparse
import sys

from .adapters import AdapterConfigError, AdapterStateError
from .configuration import ConfigError
from .data import DataError
from .modeling import ModelConfigError

USER_ERRORS = (ConfigError, AdapterConfigError, AdapterStateError, DataError, ModelConfigError, FileNotFoundError)


def _simulate(args: argparse.Namespace) -> int:
    from .federated.config import load_run_config
    from .federated.simulation import simulate

    config = load_run_config(args.config, args.overrides)
    simulate(config, overwrite=args.overwrite, flower_logs=args.flower_logs)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fed-adapters", description="Federated bottleneck-adapter tuning (Flower + Ray)")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)
    sim = commands.add_parser("simulate", help="run a federated simulation on Ray from a TOML config")
    sim.add_argument("config", help="TOML run config, e.g. configs/quickstart.toml")
    sim.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set strategy.num_rounds=5 (repeatable)")
    sim.add_argument("--overwrite", action="store_true", help="replace results already in the run directory")
    sim.add_argument("--flower-logs", action="store_true", help="also show Flower's own INFO log lines")
    sim.set_defaults(handler=_simulate)
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
